"""The worker protocol, manager side: wmgr.workers.registry (leases, liveness) over the real job
queue, driven by a Clock with a fake spawner and a synchronous store (see test_queue.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from tests.test_queue import Harness
from wmgr.daemon import guarded
from wmgr.errors import Conflict
from wmgr.jobs import model
from wmgr.servers import BadServers
from wmgr.workers.registry import OFFLINE, ONLINE, RemoteRun, Workers

TIMEOUT = 60.0


class Manager(Harness):
    """A queue that runs nothing itself, and its registry of workers."""

    def __init__(self, tmp_path: Path, session_prefix: str = "session", **policy: Any) -> None:
        policy.setdefault("run_local", False)
        super().__init__(tmp_path, **policy)
        self.bad = BadServers(self.clock)
        sessions = iter(f"{session_prefix}{i}" for i in range(1000))
        self.workers = Workers(self.queue, self.clock, TIMEOUT, 5.0, self.bad, new_session=lambda: next(sessions),
                               store=self.store)

    def start(self) -> None:
        self.run(self.workers.load())
        super().start()

    def join(self, name: str, ip: str = "10.0.0.1") -> str:
        return self.workers.register(name, ip, 4, 8000).session

    def pull(self, name: str, session: str, cores: float = 4, memory: int = 8000, slots: int = 8) -> list[dict[str, Any]]:
        return self.run(self.workers.pull(name, session, cores, memory, slots))

    def report(self, name: str, payload: dict[str, Any], event: str, **fields: Any) -> None:
        self.workers.report(name, [dict(fields, key=payload["key"], attempt=payload["attempt"], event=event)])
        self.settle()


@pytest.fixture
def m(tmp_path: Path) -> Manager:
    manager = Manager(tmp_path)
    manager.start()
    return manager


def test_the_manager_runs_nothing_itself_when_run_local_is_off(m: Manager) -> None:
    (job,) = m.add({"cmd": "true"})
    m.settle()
    assert m.spawner.spawned == [] and job.state == model.READY


def test_a_pull_hands_out_what_fits_each_job_to_one_worker_under_a_lease(m: Manager) -> None:
    jobs = m.add(*({"cmd": f"job {i}", "cpus": 1} for i in range(5)))
    a, b = m.join("a", "10.0.0.1"), m.join("b", "10.0.0.2")
    first = m.pull("a", a, cores=3, memory=8000)
    assert [p["key"] for p in first] == [job.key for job in jobs[:3]]  # three cores: three jobs
    second = m.pull("b", b, cores=8, memory=8000)
    assert [p["key"] for p in second] == [job.key for job in jobs[3:]]  # never the same job twice
    assert m.pull("b", b) == []
    job = jobs[0]
    assert job.state == model.RESERVED and job.host == "a" and job.host_ip == "10.0.0.1" and job.attempts == 1
    status = job.status(m.clock.seconds())
    assert (status["Host"], status["HostIP"], status["HostID"]) == ("a", "10.0.0.1", m.workers.workers["a"].instance)
    assert first[0]["attempt"] == 1 and first[0]["spec"]["cmd"] == "job 0"
    assert isinstance(m.queue.runs[job.key], RemoteRun)
    assert m.workers.counts() == {"online": 2, "offline": 0, "leases": 5}


def test_a_pull_respects_memory_and_zero_core_slots(m: Manager) -> None:
    m.add({"cmd": "big", "memory": "3G"}, {"cmd": "small 1"}, {"cmd": "small 2"}, {"cmd": "small 3"})
    a = m.join("a")
    pulled = m.pull("a", a, cores=0, memory=2000, slots=2)
    assert sorted(p["spec"]["cmd"] for p in pulled) == ["small 1", "small 2"]  # big waits for room


def test_start_and_end_reports_run_the_job_as_a_local_one(m: Manager) -> None:
    (job,) = m.add({"cmd": "true"})
    a = m.join("a")
    (payload,) = m.pull("a", a)
    m.report("a", payload, "start", pid=4242, started=m.clock.seconds())
    assert job.state == model.RUNNING and job.pid == 4242
    m.clock.advance(3)
    m.report("a", payload, "end", exitcode=0, started=m.clock.seconds() - 3, ended=m.clock.seconds(),
             cpu_time=1.5, peak_ram=12, stdout="hi")
    assert job.state == model.COMPLETE and job.cpu_time == 1.5 and job.peak_ram == 12 and job.walltime(0) == 3
    assert m.store.row(job.key) == (model.COMPLETE, "")
    assert m.workers.counts()["leases"] == 0
    # The same end delivered again, or one for another attempt, changes nothing.
    m.report("a", payload, "end", exitcode=1)
    assert m.store.row(job.key) == (model.COMPLETE, "")


def test_a_report_for_someone_elses_lease_is_ignored(m: Manager) -> None:
    (job,) = m.add({"cmd": "false", "retries": 0})
    a, _ = m.join("a"), m.join("b")
    (payload,) = m.pull("a", a)
    m.report("b", payload, "end", exitcode=1)
    m.report("a", dict(payload, attempt=2), "end", exitcode=1)
    assert job.state == model.RESERVED
    m.report("a", payload, "end", exitcode=1)
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_NONZERO


def test_a_silent_worker_goes_offline_after_the_timeout_and_its_jobs_run_elsewhere(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 3})
    a, b = m.join("a"), m.join("b")
    (payload,) = m.pull("a", a)
    m.report("a", payload, "start", pid=1)
    m.clock.advance(TIMEOUT)
    m.workers.check()
    assert m.workers.workers["a"].connection == ONLINE and job.state == model.RUNNING  # not yet
    m.workers.beat("b", b, [])
    m.clock.advance(0.1)
    m.workers.check()
    m.settle()
    assert m.workers.workers["a"].connection == OFFLINE and m.workers.workers["b"].connection == ONLINE
    assert job.state == model.READY and job.failures == 1 and job.fail_reason == model.FAIL_LOST
    assert [s["Name"] for s in m.bad.all()] == ["a"] and "silent" in m.bad.all()[0]["Problem"]
    assert m.bad.all()[0]["Date"] == int(m.clock.seconds())  # the reactor's time, not the wall clock
    (again,) = m.pull("b", b)  # at once: no back-off for a lost host
    assert again["key"] == job.key and again["attempt"] == 2 and job.host == "b"


def test_a_lost_job_without_retries_left_is_buried(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 0})
    a = m.join("a")
    m.pull("a", a)
    m.clock.advance(TIMEOUT + 1)
    m.workers.check()
    m.settle()
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_LOST
    assert m.store.row(job.key) == (model.BURIED, model.FAIL_LOST)


def test_a_worker_that_comes_back_is_online_and_told_to_stop_work_given_away(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 3})
    a, b = m.join("a"), m.join("b")
    (payload,) = m.pull("a", a)
    m.clock.advance(TIMEOUT + 1)
    m.workers.beat("b", b, [])
    m.workers.check()
    m.settle()
    m.pull("b", b)
    reply = m.workers.beat("a", a, [job.key])
    assert m.workers.workers["a"].connection == ONLINE and m.bad.all() == []
    assert reply["stop"] == [job.key]
    assert m.workers.may_run("a", a, [(job.key, payload["attempt"])]) == {"run": [], "stop": [job.key]}
    # Its late end report is stale: the job is b's now.
    m.report("a", payload, "end", exitcode=0)
    assert job.state == model.RESERVED and job.host == "b"


def test_heartbeats_renew_leases(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep"})
    a = m.join("a")
    (payload,) = m.pull("a", a)
    for _ in range(30):
        m.clock.advance(5)
        assert m.workers.beat("a", a, [job.key]) == {"stop": [], "kill": {}, "ready": 0}
        m.workers.check()
    assert job.state == model.RESERVED and m.workers.may_run("a", a, [(job.key, 1)])["run"] == [job.key]


def test_a_kill_reaches_the_worker_in_its_heartbeat_reply(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep"})
    a = m.join("a")
    (payload,) = m.pull("a", a)
    m.report("a", payload, "start", pid=7)
    assert m.run(m.queue.kill([job])) == [job]
    assert m.workers.beat("a", a, [job.key])["kill"] == {job.key: model.FAIL_KILLED}
    assert m.workers.may_run("a", a, [(job.key, 1)])["stop"] == [job.key]
    m.report("a", payload, "end", signal=15, kill_reason=model.FAIL_KILLED)
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_KILLED


def test_a_heartbeat_says_whether_a_pull_could_find_work(m: Manager) -> None:
    a = m.join("a")
    assert m.workers.beat("a", a, [])["ready"] == 0
    m.add({"cmd": "true"}, {"cmd": "false"})
    assert m.workers.beat("a", a, [])["ready"] == 2
    m.workers.set_enabled("a", False)
    assert m.workers.beat("a", a, [])["ready"] == 0


def test_a_disabled_worker_gets_no_new_work(m: Manager) -> None:
    m.add({"cmd": "true"})
    a = m.join("a")
    m.workers.set_enabled("a", False)
    assert m.pull("a", a) == []
    m.workers.set_enabled("a", True)
    assert len(m.pull("a", a)) == 1


def test_registering_again_ends_the_old_sessions_leases(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 1})
    old = m.join("a")
    m.pull("a", old)
    new = m.join("a")
    m.settle()
    assert new != old and job.state == model.READY
    with pytest.raises(Conflict):
        m.workers.beat("a", old, [])
    assert m.workers.may_run("a", new, [(job.key, 1)])["stop"] == [job.key]


def test_registering_again_holding_its_jobs_keeps_their_leases(m: Manager) -> None:
    kept, dropped = m.add({"cmd": "kept", "retries": 1}, {"cmd": "dropped", "retries": 1})
    old = m.join("a")
    m.pull("a", old)
    new = m.workers.register("a", "10.0.0.1", 4, 8000, holding=[(kept.key, 1), (dropped.key, 2)]).session
    m.settle()
    assert kept.state == model.RESERVED and dropped.state == model.READY  # attempt 2 is not its lease
    assert m.workers.may_run("a", new, [(kept.key, 1)]) == {"run": [kept.key], "stop": []}
    m.report("a", {"key": kept.key, "attempt": 1}, "end", exitcode=0)
    assert kept.state == model.COMPLETE


def test_reports_and_pulls_are_answered_once_what_they_change_is_stored(m: Manager) -> None:
    (job,) = m.add({"cmd": "true"})
    a = m.join("a")
    real = m.store.write
    held: list[tuple[Any, Deferred[Any]]] = []

    def gated(operation: Any, durable: bool = True) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append((operation, d))
        return d

    def release() -> None:
        while held:
            operation, d = held.pop(0)
            real(operation).chainDeferred(d)
        m.settle()

    m.store.write = gated  # type: ignore[method-assign]
    pulled: list[Any] = []
    ensureDeferred(m.workers.pull("a", a, 4, 8000, 8)).addCallback(pulled.append)
    m.settle()
    assert pulled == [] and held  # the hand-out is not told before it is stored
    release()
    ((payload,),) = pulled
    answered: list[Any] = []
    m.workers.report("a", [{"key": payload["key"], "attempt": 1, "event": "end", "exitcode": 0}]).addCallback(
        answered.append)
    m.settle()
    assert answered == [] and held and job.state == model.COMPLETE
    release()
    assert answered and m.store.row(job.key) == (model.COMPLETE, "")


def restarted(m: Manager) -> Manager:
    """A new manager on the same store (the first one's memory gone), started."""
    again = Manager(m.tmp_path, session_prefix="restarted")
    again.start()
    return again


def test_a_job_running_on_a_worker_stays_running_across_a_manager_restart(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 1})
    a = m.join("a", "10.0.0.9")
    (payload,) = m.pull("a", a)
    m.report("a", payload, "start", pid=77, started=m.clock.seconds())
    host_id = job.host_id

    m2 = restarted(m)
    job = m2.queue.live[job.key]
    run = m2.queue.runs[job.key]
    assert isinstance(run, RemoteRun) and run.attempt == 1 and job.state == model.RUNNING
    assert (job.host, job.host_ip, job.host_id, job.attempts) == ("a", "10.0.0.9", host_id, 1)
    assert m2.workers.workers["a"].connection == ONLINE and m2.workers.counts()["leases"] == 1
    with pytest.raises(Conflict):  # its session died with the old manager: it registers again
        m2.workers.beat("a", a, [job.key])
    new = m2.workers.register("a", "10.0.0.9", 4, 8000, holding=[(job.key, 1)]).session
    assert m2.workers.may_run("a", new, [(job.key, 1)]) == {"run": [job.key], "stop": []}
    assert m2.workers.beat("a", new, [job.key])["stop"] == []
    # Not given to anyone else meanwhile.
    b = m2.join("b")
    assert m2.pull("b", b) == []
    m2.clock.advance(TIMEOUT + 1)  # heartbeats renew the lease as before
    m2.workers.beat("a", new, [job.key])
    m2.workers.check()
    assert job.state == model.RUNNING
    m2.report("a", payload, "end", exitcode=0, started=job.started, ended=m2.clock.seconds())
    assert job.state == model.COMPLETE and job.attempts == 1 and m2.store.row(job.key) == (model.COMPLETE, "")


def test_reports_of_a_worker_land_after_a_manager_restart_before_it_registers_again(m: Manager) -> None:
    (job,) = m.add({"cmd": "false", "retries": 0})
    a = m.join("a")
    (payload,) = m.pull("a", a)
    m2 = restarted(m)
    m2.report("a", payload, "end", exitcode=1)
    assert m2.queue.live[job.key].state == model.BURIED and m2.store.row(job.key) == (model.BURIED, model.FAIL_NONZERO)


def test_a_worker_not_back_within_the_timeout_after_a_restart_loses_its_jobs(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 1})
    a = m.join("a")
    m.pull("a", a)
    m2 = restarted(m)
    job = m2.queue.live[job.key]
    m2.clock.advance(TIMEOUT)
    m2.workers.check()
    assert job.state == model.RESERVED
    m2.clock.advance(0.1)
    m2.workers.check()
    m2.settle()
    assert m2.workers.workers["a"].connection == OFFLINE
    assert job.state == model.READY and job.fail_reason == model.FAIL_LOST and job.failures == 1
    b = m2.join("b")
    (again,) = m2.pull("b", b)
    assert again["key"] == job.key and again["attempt"] == 2


def test_a_worker_that_restarted_too_gives_back_the_jobs_it_no_longer_holds(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 1})
    a = m.join("a")
    m.pull("a", a)
    m2 = restarted(m)
    m2.workers.register("a", "10.0.0.1", 4, 8000)  # a new daemon: its jobs died with the old one
    m2.settle()
    assert m2.queue.live[job.key].state == model.READY and m2.workers.counts()["leases"] == 0


def test_without_a_worker_registry_a_job_a_worker_ran_is_lost_at_restart(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep"})
    a = m.join("a")
    m.pull("a", a)
    plain = Harness(m.tmp_path, run_local=False)  # a queue alone, as before workers existed
    plain.start()
    assert plain.queue.live[job.key].state == model.LOST


def test_workers_keep_their_ids_and_disable_across_a_restart_and_one_that_left_is_forgotten(m: Manager) -> None:
    m.join("a")
    b = m.join("b", "10.0.0.2")
    m.workers.announce("flam", "10.0.0.3", system="Linux")
    m.workers.set_enabled("b", False)
    assert [m.workers.get(name).id for name in ("a", "b", "flam")] == [1, 2, 3]
    m.workers.leave("b", b)
    m.workers.register("b", "10.0.0.2", 4, 8000)  # back: a new id, as a newcomer
    m.workers.set_enabled("b", False)
    m2 = restarted(m)
    assert {name: (w.id, w.connection, w.enabled, w.ip) for name, w in m2.workers.workers.items()} == {
        "a": (1, OFFLINE, True, "10.0.0.1"), "b": (4, OFFLINE, False, "10.0.0.2"), "flam": (3, OFFLINE, True, "10.0.0.3")}
    assert m2.workers.by_id(3).name == "flam" and m2.workers.by_id(3).system == "Linux"
    assert m2.workers.counts() == {"online": 0, "offline": 3, "leases": 0}
    assert m2.workers.register("a", "10.0.0.1", 4, 8000).id == 1  # the same id again
    assert m2.workers.register("new", "10.0.0.5", 4, 8000).id == 5  # never one used before
    assert m2.workers.register("b", "10.0.0.2", 4, 8000).enabled is False  # still disabled
    (job,) = m2.add({"cmd": "x"})
    assert m2.pull("b", m2.workers.get("b").session) == []


def test_a_worker_that_leaves_gives_its_jobs_back(m: Manager) -> None:
    (job,) = m.add({"cmd": "sleep", "retries": 1})
    a = m.join("a")
    m.pull("a", a)
    m.workers.leave("a", a)
    m.settle()
    assert job.state == model.READY and "a" not in m.workers.workers


def test_liveness_runs_as_a_timer_service_that_survives_a_failing_body(m: Manager) -> None:
    clock = Clock()
    calls: list[float] = []

    def body() -> None:
        calls.append(clock.seconds())
        if len(calls) == 1:
            raise RuntimeError("boom")

    timer = TimerService(5, guarded("check workers' liveness", body))
    timer.clock = clock
    timer.startService()
    for _ in range(3):
        clock.advance(5)
    timer.stopService()
    assert calls == [0, 5, 10, 15]
