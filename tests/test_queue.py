"""wmgr.jobs.queue: the state machine, driven by a Clock, a fake spawner (no process at all) and
a store that runs every operation at once on a temporary SQLite file (the real SQL, no threads).

Every transition here is one the integration tests also check over HTTPS, with real processes
and real time; these run in milliseconds, so they can be many and exact about time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from wmgr.jobs import model, runner, upkeep as upkeep_module
from wmgr.jobs.model import Job
from wmgr.jobs.queue import JobQueue, QueuePolicy
from wmgr.jobs.scheduler import Capacity
from wmgr.store import _connect, migrate


class SyncStore:
    """Store's interface, each operation run and committed at once on one connection."""

    def __init__(self, path: Path) -> None:
        self.conn = _connect(str(path))
        migrate(self.conn)
        self.commit_observers: list[Any] = []

    def write(self, operation: Any, durable: bool = True) -> Deferred[Any]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = operation(self.conn)
        except Exception:
            self.conn.execute("ROLLBACK")
            return fail()
        self.conn.execute("COMMIT")
        return succeed(result)

    def read(self, operation: Any) -> Deferred[Any]:
        return succeed(operation(self.conn))

    def row(self, key: str) -> Optional[tuple[str, str]]:
        return self.conn.execute("SELECT state, fail_reason FROM jobs WHERE key = ?", (key,)).fetchone()


class FakeProcess:
    def __init__(self, protocol: Any, pid: int, cmd: str, env: Any) -> None:
        self.proto, self.pid, self.cmd, self.env = protocol, pid, cmd, env
        self.rusage = None

    def end(self, code: Optional[int] = 0, sig: Optional[int] = None, lost: bool = False) -> None:
        if lost:
            reason: BaseException = error.ProcessTerminated(None, None, None)
        elif code == 0 and sig is None:
            reason = error.ProcessDone(0)
        else:
            reason = error.ProcessTerminated(code, sig, None)
        self.proto.processEnded(Failure(reason))


class FakeSpawner:
    """Starts nothing: each spawn is a FakeProcess, running at once (as the daemon's own spawn)."""

    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []
        self.next_pid = 1000

    def __call__(self, reactor: Any, protocol: Any, executable: str, argv: list[str], env: Any, extra: Any,
                 stdio: Any, remove: Optional[str] = None) -> FakeProcess:
        self.next_pid += 1
        process = FakeProcess(protocol, self.next_pid, argv[-1], env)
        self.spawned.append(process)
        protocol.makeConnection(process)
        return process

    def commands(self) -> list[str]:
        return [process.cmd for process in self.spawned]

    def running(self, cmd: str) -> FakeProcess:
        return [process for process in self.spawned if process.cmd == cmd][-1]


class HeldWrites:
    """Within it, the store's writes run at once but their commits are told only at release()
    (as from the writer thread, later): a test can act in between."""

    def __init__(self, store: SyncStore) -> None:
        self.store = store
        self.held: list[tuple[Deferred[Any], Deferred[Any]]] = []

    def __enter__(self) -> "HeldWrites":
        real_write = self.store.write

        def write(operation: Any, durable: bool = True) -> Deferred[Any]:
            told: Deferred[Any] = Deferred()
            self.held.append((told, real_write(operation, durable)))
            return told

        self.store.write = write  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.store.write  # the class's own again

    def release(self) -> None:
        for told, committed in self.held:
            committed.addCallback(told.callback)


def in_thread_now(fn: Any, *args: Any) -> Deferred[Any]:
    return succeed(fn(*args))


class Harness:
    def __init__(self, tmp_path: Path, cores: float = 4, memory: int = 8000, **policy: Any) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.clock.advance(1_000_000)  # a time that is not 0: "unset" must show
        self.store = SyncStore(tmp_path / "wmgr.db")
        self.spawner = FakeSpawner()
        policy.setdefault("retry_jitter", 0.0)
        self.capacity = Capacity(cores=cores, memory=memory, zero_core_slots=8)
        self.policy = QueuePolicy.from_config(None, **policy)
        self.queue = self.make_queue()

    def make_queue(self) -> JobQueue:
        queue = JobQueue(self.store, self.tmp_path / "run", self.clock, self.capacity, self.policy,
                         spawn=self.spawner, host=("testhost", "10.0.0.7"), in_thread=in_thread_now)
        queue.journal.flush_delay = 0.0  # time here moves only when a test says so
        queue.schedule_delay = 0.0
        return queue

    def start(self) -> None:
        self.queue.startService()
        self.settle()
        assert self.queue.ready is not None and self.queue.ready.called

    def settle(self) -> None:
        for _ in range(10):
            self.clock.advance(0)

    def run(self, coroutine: Any) -> Any:
        d = ensureDeferred(coroutine)
        self.settle()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "did not finish"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def add(self, *raws: dict[str, Any], **kw: Any) -> list[Job]:
        specs = [model.normalise(model.parse_spec(dict({"cwd": str(self.tmp_path)}, **raw), {})) for raw in raws]
        return self.run(self.queue.add(specs, **kw))

    def job(self, cmd: str) -> Job:
        return next(job for job in self.queue.live.values() if job.spec["cmd"] == cmd)

    def end(self, cmd: str, code: Optional[int] = 0, **kw: Any) -> None:
        self.spawner.running(cmd).end(code, **kw)
        self.settle()


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    harness.start()
    return harness


@pytest.fixture
def signals(monkeypatch: Any) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(runner, "signal_group", lambda pgid, sig: sent.append((pgid, sig)))
    return sent


# -- running, completing --------------------------------------------------------------------------


def test_a_job_runs_and_completes(h: Harness) -> None:
    (job,) = h.add({"cmd": "true"})
    h.settle()
    assert h.spawner.commands() == ["true"] and job.state == model.RUNNING
    assert job.pid == h.spawner.spawned[0].pid and job.host == "testhost" and job.started == h.clock.seconds()
    h.clock.advance(2)
    h.end("true")
    assert job.state == model.COMPLETE and job.walltime(0) == 2
    assert h.store.row(job.key) == (model.COMPLETE, "")
    assert job.key not in h.queue.live  # the store answers for it now
    assert (h.queue.counters.started, h.queue.counters.completed, h.queue.counters.failed) == (1, 1, 0)
    assert h.queue.state_counts()[model.COMPLETE] == 1 and h.queue.state_counts()[model.RUNNING] == 0


def test_a_job_completing_while_its_group_is_read_is_still_found(h: Harness) -> None:
    """A read of a rep group takes the store's answer in a thread; a job whose completion commits
    meanwhile leaves the live index then. It must be found all the same (CI once saw pman's
    `done` miss a job this way)."""
    jobs = h.add({"cmd": "first", "rep_grp": "g"}, {"cmd": "second", "rep_grp": "g"})
    h.settle()
    h.end("first")
    held: list[tuple[Deferred[Any], Any]] = []
    real_read = h.store.read

    def slow_read(operation: Any) -> Deferred[Any]:
        # The read runs now, its answer arrives later (as from a thread).
        d: Deferred[Any] = Deferred()
        held.append((d, operation(h.store.conn)))
        return d

    h.store.read = slow_read  # type: ignore[method-assign]
    reading = ensureDeferred(h.queue.select(["g"]))
    h.store.read = real_read  # type: ignore[method-assign]
    h.end("second")  # committed, unindexed, while the read is out
    assert jobs[1].key not in h.queue.live
    (d, answer), = held
    d.callback(answer)
    found: list[Any] = []
    reading.addCallback(found.append)
    assert sorted(job.spec["cmd"] for job in found[0]) == ["first", "second"]


def test_retries_back_off_exactly_then_bury(h: Harness) -> None:
    (job,) = h.add({"cmd": "false", "retries": 2})
    h.settle()
    h.end("false", 1)
    assert job.state == model.DELAYED and job.fail_reason == model.FAIL_NONZERO
    assert job.delay_until == h.clock.seconds() + 30  # retry_base
    h.clock.advance(29.9)
    h.settle()
    assert len(h.spawner.spawned) == 1
    h.clock.advance(0.1)
    h.settle()
    assert len(h.spawner.spawned) == 2 and job.state == model.RUNNING and job.attempts == 2
    h.end("false", 1)
    h.clock.advance(59.9)  # doubled
    h.settle()
    assert len(h.spawner.spawned) == 2
    h.clock.advance(0.1)
    h.settle()
    h.end("false", 1)
    assert job.state == model.BURIED and job.attempts == 3
    assert h.store.row(job.key) == (model.BURIED, model.FAIL_NONZERO)
    assert h.queue.counters.failed == 3
    assert h.queue.state_counts()[model.BURIED] == 1


def test_retry_renews_a_buried_job(h: Harness) -> None:
    (job,) = h.add({"cmd": "false"})
    h.settle()
    h.end("false", 1)
    assert job.state == model.BURIED
    assert h.run(h.queue.retry([job])) == [job]
    h.settle()
    assert job.state == model.RUNNING and len(h.spawner.spawned) == 2


@pytest.mark.parametrize("code, reason", [(126, model.FAIL_PERMISSION), (127, model.FAIL_NOT_FOUND)])
def test_permission_and_not_found_are_buried_at_once(h: Harness, code: int, reason: str) -> None:
    (job,) = h.add({"cmd": "x", "retries": 5})
    h.settle()
    h.end("x", code)
    assert job.state == model.BURIED and job.fail_reason == reason


# -- dependencies, priorities, limits --------------------------------------------------------------


def test_live_dependencies(h: Harness) -> None:
    h.add({"cmd": "a", "dep_grps": ["g"]}, {"cmd": "b", "deps": ["g"]})
    h.settle()
    assert h.spawner.commands() == ["a"] and h.job("b").state == model.DEPENDENT
    h.end("a")
    assert h.spawner.commands() == ["a", "b"]
    h.end("b")
    # A new job joins group g: b, complete, waits for it and runs again.
    h.add({"cmd": "c", "dep_grps": ["g"]})
    h.settle()
    assert h.job("b").state == model.DEPENDENT and h.store.row(h.job("b").key)[0] == model.DEPENDENT
    h.end("c")
    assert h.spawner.commands() == ["a", "b", "c", "b"]


def test_a_dependency_cycle_is_refused(h: Harness) -> None:
    from wmgr.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        h.add({"cmd": "a", "dep_grps": ["x"], "deps": ["y"]}, {"cmd": "b", "dep_grps": ["y"], "deps": ["x"]})


def test_priorities_pick_the_higher_first(tmp_path: Path) -> None:
    h = Harness(tmp_path, cores=1)
    h.start()
    h.add({"cmd": "hold", "cpus": 1})
    h.settle()
    h.add({"cmd": "low", "cpus": 1, "priority": 1}, {"cmd": "high", "cpus": 1, "priority": 9})
    h.settle()
    h.end("hold")
    h.end("high")
    assert h.spawner.commands() == ["hold", "high", "low"]


def test_limit_groups_cap_concurrency(h: Harness) -> None:
    h.add(*({"cmd": f"j{i}", "limit_grps": ["lg:2"]} for i in range(5)))
    h.settle()
    assert len(h.spawner.spawned) == 2
    h.end("j0")
    assert len(h.spawner.spawned) == 3
    assert h.queue.usage()["running"] == 2


def test_time_limit_is_enforced(h: Harness, signals: list) -> None:
    (job,) = h.add({"cmd": "slow", "time": "10s"})
    h.settle()
    pid = job.pid
    h.clock.advance(10.9)
    assert signals == []
    h.clock.advance(0.2)  # past the 10% margin
    assert signals == [(pid, 15)]
    h.clock.advance(5)  # kill_grace
    assert signals == [(pid, 15), (pid, 9)]
    h.end("slow", None, sig=9)
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_TIME


def test_memory_limit_is_enforced(h: Harness, signals: list, monkeypatch: Any) -> None:
    (job,) = h.add({"cmd": "big", "memory": "100M"})
    h.settle()
    monkeypatch.setattr(upkeep_module, "measure_trees", lambda pids: {pid: 105 for pid in pids})
    h.run(h.queue.sample())
    assert signals == [] and job.peak_ram == 105
    monkeypatch.setattr(upkeep_module, "measure_trees", lambda pids: {pid: 111 for pid in pids})
    h.run(h.queue.sample())
    assert signals == [(job.pid, 15)]
    h.end("big", None, sig=15)
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_RAM


def test_a_job_bigger_than_the_machine_is_buried(h: Harness) -> None:
    (job,) = h.add({"cmd": "huge", "cpus": 64})
    h.settle()
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_RESOURCES and not h.spawner.spawned
    assert h.queue.notices.take()[0]["Msg"].startswith("a job needs 64 cores")


# -- behaviours, pause and drain, lost jobs --------------------------------------------------------


def test_behaviour_remove_deletes_a_buried_job(h: Harness) -> None:
    (job,) = h.add({"cmd": "false", "on_failure": [{"remove": True}]})
    h.settle()
    h.end("false", 1)
    assert job.state == model.DELETED and job.key not in h.queue.live and h.store.row(job.key) is None


def test_behaviour_cleanup_removes_the_work_dir(h: Harness) -> None:
    (job,) = h.add({"cmd": "true", "on_success": [{"cleanup": True}]})
    h.settle()
    workdir = job.spec["cwd"] + job.actual_cwd
    assert os.path.isdir(workdir)
    h.end("true")
    assert not os.path.exists(workdir)


def test_pause_resume_and_drain(h: Harness) -> None:
    drained: list[bool] = []
    h.queue.on_drained = lambda: drained.append(True)
    h.queue.pause()
    h.add({"cmd": "a"})
    h.settle()
    assert h.spawner.spawned == [] and h.queue.mode == "paused"
    h.queue.resume()
    h.settle()
    assert h.spawner.commands() == ["a"]
    h.add({"cmd": "b"})
    h.queue.drain()
    h.settle()
    assert h.spawner.commands() == ["a", "b"] and drained == []  # b was already started
    h.add({"cmd": "c"})
    h.end("a")
    h.end("b")
    assert drained == [True] and h.spawner.commands() == ["a", "b"]


def test_a_lost_job_waits_for_confirmation(h: Harness) -> None:
    (job,) = h.add({"cmd": "x", "retries": 1})
    h.settle()
    h.end("x", lost=True)
    assert job.state == model.LOST and job.fail_reason == model.FAIL_LOST
    assert h.queue.counters.failed == 1
    assert h.run(h.queue.confirm_lost([job])) == [job]
    assert job.state == model.DELAYED and h.queue.counters.failed == 1


def test_kill_buries_with_the_users_reason(h: Harness, signals: list) -> None:
    (job,) = h.add({"cmd": "x", "retries": 3})
    h.settle()
    assert h.run(h.queue.kill([job])) == [job]
    h.end("x", None, sig=15)
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_KILLED


# -- recovery ----------------------------------------------------------------------------------------


def stop(h: Harness) -> None:
    h.run(h.queue.stop())


def test_recovery_records_a_run_that_ended_while_no_daemon_ran(h: Harness) -> None:
    (job,) = h.add({"cmd": "done-meanwhile"})
    h.settle()
    pid = job.pid
    stop(h)
    files = runner.RunFiles(h.tmp_path / "run", job.key, 1)
    Path(files.out).write_text("out\n")
    Path(files.rc).write_text(f"0 {pid}\n")
    h.queue = h.make_queue()
    h.start()
    h.settle()
    stored = h.run(h.queue.select([job.key]))[0]
    assert stored.state == model.COMPLETE and stored.pid == pid and stored.stdout == "out\n"
    assert not os.path.exists(files.rc)  # removed once the end was committed


def test_recovery_of_a_run_whose_start_was_never_stored(h: Harness) -> None:
    """A daemon killed after its launcher started a job but before it stored the start: the job
    is stored as ready, and its run's files say it ran. It must not show Pid 0, an unset Started
    or an empty Host (issue 9, item 9)."""
    h.queue.pause()
    (job,) = h.add({"cmd": "started-unrecorded"})
    stop(h)
    assert h.store.row(job.key)[0] == model.READY
    files = runner.RunFiles(h.tmp_path / "run", job.key, 1)
    os.makedirs(files.directory, exist_ok=True)
    Path(files.out).write_text("")
    os.utime(files.out, (h.clock.seconds() - 5, h.clock.seconds() - 5))
    Path(files.rc).write_text("0 4242\n")
    h.spawner.spawned.clear()
    h.queue = h.make_queue()
    h.start()
    stored = h.run(h.queue.select([job.key]))[0]
    assert stored.state == model.COMPLETE and stored.attempts == 1 and h.spawner.spawned == []
    status = stored.status(h.clock.seconds())
    assert status["Pid"] == 4242 and status["Host"] == "testhost" and status["HostIP"] == "10.0.0.7"
    assert status["Started"] == int(h.clock.seconds() - 5) != model.UNSET_TIME


def test_recovery_marks_a_run_that_never_started_lost(h: Harness) -> None:
    (job,) = h.add({"cmd": "never"})
    h.settle()
    stop(h)
    runner.RunFiles(h.tmp_path / "run", job.key, 1).remove()  # the process never opened its files
    h.queue = h.make_queue()
    h.start()
    assert h.queue.live[job.key].state == model.LOST
    assert h.queue.counters.failed == 1


def test_state_counts_come_back_from_the_store(h: Harness) -> None:
    h.add({"cmd": "a"}, {"cmd": "b"})
    h.settle()
    h.end("a")
    stop(h)
    h.queue = h.make_queue()
    h.start()
    counts = h.queue.state_counts()
    assert counts[model.COMPLETE] == 1 and counts[model.LOST] == 1 and sum(counts.values()) == 2


def test_usage(tmp_path: Path) -> None:
    h = Harness(tmp_path, cores=4, memory=8000)
    h.start()
    h.add({"cmd": "a", "cpus": 2, "memory": "1G"})
    h.settle()
    assert h.queue.usage() == {"running": 1, "cores_used": 2, "cores_total": 4, "memory_used_mb": 1024,
                               "memory_total_mb": 8000}


def test_policy_defaults_are_the_configs() -> None:
    from wmgr.config import Config

    config = Config(data_dir=Path("."), retry_base=7.0)
    assert QueuePolicy.from_config(config).retry_base == 7.0
    assert QueuePolicy.from_config().retry_base == Config(data_dir=Path(".")).retry_base


def test_a_job_the_launcher_cannot_start_is_buried_with_the_reason(h: Harness) -> None:
    """E2BIG (a 200 KB command) is not "command not found", 127 (issue 9, item 8)."""
    h.queue._spawn = lambda reactor, protocol, *args, **kw: protocol.startFailed("Argument list too long (E2BIG)")
    (job,) = h.add({"cmd": "echo " + "x" * 200_000, "retries": 3})
    h.settle()
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_START
    assert job.stderr == "Argument list too long (E2BIG)" and job.exitcode != 127
    assert h.queue.counters.failed == 1


def test_a_spawn_that_raises_value_error_fails_its_job_only(h: Harness) -> None:
    def spawn(reactor: Any, protocol: Any, executable: str, argv: list[str], *rest: Any, **kw: Any) -> Any:
        if argv[-1] == "bad":  # as posix_spawn does for a NUL byte or lone surrogate in env
            raise ValueError("embedded null byte")
        return h.spawner(reactor, protocol, executable, argv, *rest, **kw)

    h.queue._spawn = spawn
    bad, good = h.add({"cmd": "bad"}, {"cmd": "good"})
    h.settle()
    assert bad.state == model.BURIED and bad.fail_reason == model.FAIL_START
    assert good.state == model.RUNNING


def test_a_jobs_directory_goes_when_it_ends_unless_it_asks_to_keep_it(h: Harness) -> None:
    """wr_cwd directories must not pile up (issue 9, item 10)."""
    plain, kept = h.add({"cmd": "plain"}, {"cmd": "kept", "on_exit": [{"nothing": True}]})
    h.settle()
    plain_dir, kept_dir = (job.spec["cwd"] + job.actual_cwd for job in (plain, kept))
    assert os.path.isdir(plain_dir) and os.path.isdir(kept_dir)
    h.end("plain")
    h.end("kept")
    assert not os.path.exists(os.path.dirname(plain_dir))
    assert os.path.isdir(kept_dir) and not os.path.exists(os.path.join(os.path.dirname(kept_dir), "tmp"))


def test_saves_that_happen_by_themselves_are_written_together(tmp_path: Path) -> None:
    from wmgr.jobs.journal import Journal

    store = SyncStore(tmp_path / "j.db")
    writes: list[bool] = []
    real_write = store.write
    store.write = lambda operation, durable=True: (writes.append(durable), real_write(operation, durable))[1]
    clock = Clock()
    journal = Journal(store, clock)
    jobs = [Job(f"{i:032x}", {"rep_grp": "g", "memory": 1, "time": 1}, model.READY, i) for i in range(3)]
    journal.save([jobs[0]])
    clock.advance(0.002)
    journal.save([jobs[1]])  # a later reactor turn, within the delay: the same transaction
    clock.advance(0.002)
    assert writes == []
    clock.advance(0.002)
    assert writes == [False]
    journal.save([jobs[2]], durable=True)  # a client waits for this one: at the next turn
    clock.advance(0)
    assert writes == [False, True]


def test_a_big_add_is_stored_a_few_rows_per_statement_all_of_them(h: Harness, monkeypatch: Any) -> None:
    from wmgr.jobs import journal
    monkeypatch.setattr(journal, "_INSERT_ROWS", 2)
    h.queue.paused = True
    jobs = h.add(*({"cmd": f"echo {i}"} for i in range(5)))
    stored = dict(h.store.conn.execute("SELECT key, spec FROM jobs").fetchall())
    assert sorted(stored) == sorted(job.key for job in jobs)
    assert all(json.loads(stored[job.key])["cmd"] == job.spec["cmd"] for job in jobs)


def test_a_delete_whose_caller_goes_away_still_takes_its_jobs_out_of_the_queue(h: Harness) -> None:
    # Klein cancels a request's handler when the client goes away; the delete is committed all
    # the same, and a job deleted on disk must not stay queued (and run) in memory.
    h.queue.paused = True
    [job] = h.add({"cmd": "doomed"})
    with HeldWrites(h.store) as writes:
        deleting = ensureDeferred(h.queue.delete([job]))
    deleting.cancel()
    cancelled: list[Any] = []
    deleting.addErrback(cancelled.append)
    assert cancelled and cancelled[0].check(CancelledError)
    writes.release()
    assert h.store.row(job.key) is None
    assert job.key not in h.queue.live and job.state == model.DELETED
