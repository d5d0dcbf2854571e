"""The worker role: wmgr.workers.agent against a manager in memory (the real registry and worker
routes over StubTreq, the real queue on a synchronous store), one Clock for both, fake processes
on the worker. No sleeps, no sockets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq

from tests.test_queue import FakeSpawner, SyncStore, in_thread_now
from tests.test_workers import Manager
from wmgr.api.openapi import ROOT_PATHS, document
from wmgr.api.root import Root, RootApp
from wmgr.api.workers import WORKER_PATHS, WorkersAPI
from wmgr.client import Client
from wmgr.jobs import model, runner
from wmgr.jobs.scheduler import Capacity
from wmgr.workers.agent import WorkerAgent
from wmgr.workers.outbox import Outbox

CLIENT_TOKEN, WORKER_TOKEN = "client-token", "worker-token"


class Down:
    """A manager that does not answer."""

    def request(self, *args: Any, **kw: Any) -> Any:
        raise ConnectionRefusedError("connection refused")


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.m = Manager(tmp_path)
        self.m.start()
        self.clock = self.m.clock  # the worker's; a restarted manager has its own
        self.stub = self.serve(self.m)
        self.worker_store = SyncStore(tmp_path / "worker.db")
        self.spawner = FakeSpawner()
        self.client = Client(None, "https://manager.test/", None, WORKER_TOKEN, http=self.stub)
        self.agent = WorkerAgent(self.m.clock, self.client, "w1", "10.9.9.9", Capacity(2, 4000, 4),
                                 Outbox(self.worker_store), tmp_path / "worker-run", self.spawner, heartbeat=5,
                                 in_thread=in_thread_now, figures=lambda: {"load_average": {"1min": 0.5}})

    @staticmethod
    def serve(manager: Manager) -> StubTreq:
        surfaces = [(("worker",), WorkersAPI(manager.workers).resource())]
        fallback = RootApp(document([WORKER_PATHS, ROOT_PATHS])).app.resource()
        return StubTreq(Root(CLIENT_TOKEN, surfaces, fallback, segment_tokens={"worker": WORKER_TOKEN}))

    def restart_manager(self) -> None:
        """A new manager on the same store and address; the old one's memory is gone."""
        self.m = Manager(self.tmp_path, session_prefix="restarted")
        self.m.start()
        self.stub = self.client._http = self.serve(self.m)

    def settle(self) -> None:
        for _ in range(30):
            self.clock.advance(0)
            if self.m.clock is not self.clock:
                self.m.clock.advance(0)
            self.stub.flush()

    def start(self) -> None:
        self.agent.startService()
        self.settle()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.m.clock is not self.clock:
            self.m.clock.advance(seconds)
        self.settle()

    def end(self, cmd: str, code: int = 0) -> None:
        self.spawner.running(cmd).end(code)
        self.settle()

    def outbox_rows(self) -> int:
        return self.worker_store.conn.execute("SELECT COUNT(*) FROM worker_outbox").fetchone()[0]


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_the_agent_registers_pulls_a_batch_that_fits_and_runs_it(s: Setup) -> None:
    jobs = s.m.add(*({"cmd": f"echo {i}", "cpus": 1, "memory": "100M"} for i in range(3)))
    s.start()
    assert s.m.workers.workers["w1"].figures == {"load_average": {"1min": 0.5}}
    assert s.spawner.commands() == ["echo 0", "echo 1"]  # two cores
    assert [job.state for job in jobs] == [model.RUNNING, model.RUNNING, model.READY]
    assert jobs[0].host == "w1" and jobs[0].host_ip == "10.9.9.9" and jobs[0].pid == s.spawner.spawned[0].pid
    s.end("echo 0")
    assert jobs[0].state == model.COMPLETE
    assert jobs[0].key not in s.m.queue.live  # its end followed through: the store answers for it now
    assert s.spawner.commands() == ["echo 0", "echo 1", "echo 2"]  # room again: pulled at once
    s.end("echo 1", 3)
    assert jobs[1].state == model.BURIED and jobs[1].exitcode == 3 and jobs[1].fail_reason == model.FAIL_NONZERO
    assert s.outbox_rows() == 0


def test_an_idle_worker_does_not_pull_from_an_idle_manager(s: Setup) -> None:
    s.start()
    pulls: list[Any] = []
    real = s.m.workers.pull
    s.m.workers.pull = lambda *args, **kw: pulls.append(args) or real(*args, **kw)  # type: ignore[method-assign]
    s.advance(5)
    s.advance(5)
    assert pulls == []
    s.m.add({"cmd": "work", "cpus": 1})
    s.advance(5)
    assert len(pulls) == 1 and s.spawner.commands() == ["work"]


def test_the_worker_token_grants_the_worker_routes_only(s: Setup) -> None:
    def code(path: str, token: str) -> int:
        d = s.stub.request("POST", "https://manager.test" + path, data=b"{}",
                           headers={b"Authorization": [f"Bearer {token}".encode()]})
        s.stub.flush()
        out: list[Any] = []
        d.addBoth(out.append)
        return out[0].code

    assert code("/worker/v1/heartbeat", WORKER_TOKEN) == 400  # past auth: the body is checked
    assert code("/worker/v1/heartbeat", CLIENT_TOKEN) == 400
    assert code("/worker/v1/heartbeat", "wrong") == 401
    assert code("/openapi.json", WORKER_TOKEN) == 401


def test_reports_are_kept_while_the_manager_is_unreachable_and_delivered_once(s: Setup) -> None:
    (job,) = s.m.add({"cmd": "work", "cpus": 1})
    s.start()
    assert job.state == model.RUNNING
    s.client._http = Down()
    s.end("work")
    assert s.outbox_rows() == 1 and job.state == model.RUNNING and not s.agent.reachable
    # Back-off: 1 s, 2 s, 4 s, then every heartbeat (5 s).
    s.advance(5)
    assert s.agent.backoff == 2
    s.client._http = s.stub
    s.advance(2)
    assert s.agent.reachable and s.outbox_rows() == 0
    assert job.state == model.COMPLETE
    assert s.m.store.row(job.key) == (model.COMPLETE, "")


def test_reports_survive_a_restart_of_the_worker(s: Setup, tmp_path: Path) -> None:
    (job,) = s.m.add({"cmd": "work", "cpus": 1})
    s.start()
    s.client._http = Down()
    s.end("work")
    assert s.outbox_rows() == 1
    # A new agent on the same store, the manager reachable again.
    client = Client(None, "https://manager.test/", None, WORKER_TOKEN, http=s.stub)
    again = WorkerAgent(s.m.clock, client, "w1", "10.9.9.9", Capacity(2, 4000, 4), Outbox(s.worker_store),
                        tmp_path / "worker-run", FakeSpawner(), in_thread=in_thread_now, figures=dict)
    s.agent.running = False
    again.startService()
    s.settle()
    assert job.state == model.COMPLETE and s.outbox_rows() == 0


def test_work_given_away_while_unreachable_is_stopped_when_the_manager_answers(s: Setup, monkeypatch: Any) -> None:
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(runner, "signal_group", lambda pgid, sig: signals.append((pgid, sig)))
    (job,) = s.m.add({"cmd": "long", "cpus": 1, "retries": 2})
    s.start()
    pid = s.spawner.running("long").pid
    s.client._http = Down()
    s.advance(61)
    s.m.workers.check()
    s.settle()
    assert job.state == model.READY and s.m.workers.workers["w1"].connection == "offline"
    s.client._http = s.stub
    s.advance(5)
    assert signals and signals[0][0] == pid  # stopped here (it was the manager's to give again)
    assert len(s.spawner.spawned) == 1  # nothing is pulled while a stopped job has not ended
    s.spawner.spawned[0].end(None, sig=15)
    s.settle()
    # Its end was stale; the job ran again, here, under a new lease (attempt 2).
    assert job.attempts == 2 and job.state == model.RUNNING and len(s.spawner.spawned) == 2


def test_a_worker_that_cannot_reach_its_manager_stops_its_jobs_before_their_lease_ends(
        s: Setup, monkeypatch: Any) -> None:
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(runner, "signal_group", lambda pgid, sig: signals.append((pgid, sig)))
    (job,) = s.m.add({"cmd": "long", "cpus": 1, "retries": 2})
    s.start()
    contact = s.agent.last_contact
    s.client._http = Down()
    # The manager waits 60 s; the worker stops its jobs at 60 - (kill grace 5 + heartbeat 5).
    while s.m.clock.seconds() < contact + 49.5:
        s.advance(0.5)
    assert signals == []
    s.advance(1)
    assert signals and signals[0][0] == s.spawner.spawned[0].pid
    assert s.m.clock.seconds() - contact < 60 and job.state == model.RUNNING  # before the manager moves it


def test_a_kill_on_the_manager_stops_the_job_on_the_worker(s: Setup, monkeypatch: Any) -> None:
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(runner, "signal_group", lambda pgid, sig: signals.append((pgid, sig)))
    (job,) = s.m.add({"cmd": "long", "cpus": 1})
    s.start()
    s.m.run(s.m.queue.kill([job]))
    s.advance(5)
    assert signals[0][0] == s.spawner.running("long").pid
    s.spawner.running("long").end(None, sig=15)
    s.settle()
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_KILLED


def test_a_pulled_job_over_its_memory_is_stopped(s: Setup, monkeypatch: Any) -> None:
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(runner, "signal_group", lambda pgid, sig: signals.append((pgid, sig)))
    monkeypatch.setattr("wmgr.workers.agent.measure_trees", lambda pids: {pid: 500 for pid in pids})
    (job,) = s.m.add({"cmd": "hog", "cpus": 1, "memory": "100M", "retries": 0})
    s.start()
    s.m.run(s.agent.sample())
    assert signals and signals[0][0] == s.spawner.running("hog").pid
    s.spawner.running("hog").end(None, sig=15)
    s.settle()
    assert job.state == model.BURIED and job.fail_reason == model.FAIL_RAM and job.peak_ram == 500


def test_the_agent_leaves_when_stopped_idle(s: Setup) -> None:
    s.start()
    assert "w1" in s.m.workers.workers
    s.agent.stopService()
    s.settle()
    assert "w1" not in s.m.workers.workers


class BehaviourCommands:
    """The reactor's spawnProcess for behaviours' `run` commands: recorded, ended by the test."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str, Any]] = []  # (command, cwd, protocol)

    def spawnProcess(self, protocol: Any, executable: str, argv: list[str], env: Any = None, path: Any = None,
                     childFDs: Any = None) -> Any:
        self.started.append((argv[-1], path, protocol))
        return self

    def closeStdin(self) -> None:
        pass

    def end(self, i: int, code: int = 0) -> None:
        from twisted.internet import error
        from twisted.python.failure import Failure
        reason = error.ProcessDone(0) if code == 0 else error.ProcessTerminated(code, None, None)
        self.started[i][2].processEnded(Failure(reason))


def test_a_pulled_job_runs_its_behaviours_on_the_worker_before_its_end_is_reported(s: Setup) -> None:
    commands = BehaviourCommands()
    s.clock.spawnProcess = commands.spawnProcess  # type: ignore[attr-defined]
    (job,) = s.m.add({"cmd": "work", "cpus": 1, "on_success": [{"run": "echo ok >> marks"}],
                      "on_failure": [{"run": "echo wrong"}], "on_exit": [{"cleanup": True}]})
    s.start()
    workspace = s.agent.slots[job.key].run.workspace  # type: ignore[union-attr]
    assert workspace is not None and os.path.isdir(workspace.cwd)
    s.end("work")
    # The success behaviour runs where the job ran; until it ends the job holds its slot and its
    # end is not reported.
    assert [(cmd, cwd) for cmd, cwd, _ in commands.started] == [("echo ok >> marks", workspace.cwd)]
    assert job.state == model.RUNNING and job.key in s.agent.slots and os.path.isdir(workspace.cwd)
    commands.end(0)
    s.settle()
    assert job.state == model.COMPLETE and not os.path.exists(workspace.root)  # on_exit: cleanup


def test_a_pulled_job_kept_by_its_behaviours_keeps_its_directory_and_remove_leaves_the_queue(s: Setup) -> None:
    kept, removed = s.m.add({"cmd": "kept", "cpus": 1, "on_exit": [{"nothing": True}]},
                            {"cmd": "gone", "cpus": 1, "retries": 0, "on_failure": [{"remove": True}]})
    s.start()
    kept_root = s.agent.slots[kept.key].run.workspace.root  # type: ignore[union-attr]
    gone_root = s.agent.slots[removed.key].run.workspace.root  # type: ignore[union-attr]
    s.end("kept")
    s.end("gone", 2)
    assert kept.state == model.COMPLETE and os.path.isdir(kept_root)
    assert removed.state == model.DELETED and removed.key not in s.m.queue.live and s.m.store.row(removed.key) is None
    assert os.path.isdir(gone_root)  # as for a local job: behaviours without cleanup keep the directory


def test_a_run_stopped_because_its_job_was_given_away_runs_no_behaviours(s: Setup, monkeypatch: Any) -> None:
    monkeypatch.setattr(runner, "signal_group", lambda pgid, sig: None)
    commands = BehaviourCommands()
    s.clock.spawnProcess = commands.spawnProcess  # type: ignore[attr-defined]
    (job,) = s.m.add({"cmd": "long", "cpus": 1, "retries": 2, "on_failure": [{"run": "echo failed"}]})
    s.start()
    root = s.agent.slots[job.key].run.workspace.root  # type: ignore[union-attr]
    s.client._http = Down()
    s.advance(61)
    s.m.workers.check()
    s.client._http = s.stub
    s.advance(5)
    s.spawner.running("long").end(None, sig=15)
    s.settle()
    assert commands.started == [] and not os.path.exists(root)


def test_a_pulled_job_carries_on_across_a_restart_of_the_manager_and_runs_once(s: Setup) -> None:
    (job,) = s.m.add({"cmd": "long", "cpus": 1, "retries": 2})
    s.start()
    assert job.state == model.RUNNING
    s.restart_manager()
    s.advance(5)  # the heartbeat is refused (no such session): it registers again holding its job
    job = s.m.queue.live[job.key]
    assert s.agent.session == s.m.workers.workers["w1"].session and s.agent.reachable and s.spawner.commands() == ["long"]
    assert s.m.workers.workers["w1"].leases.keys() == {job.key} and job.state == model.RUNNING
    s.m.add({"cmd": "other", "cpus": 1})
    s.advance(5)
    assert s.spawner.commands() == ["long", "other"]  # pulling again, and never the same job twice
    s.end("long")
    assert job.state == model.COMPLETE and job.attempts == 1 and job.host == "w1"
    assert s.m.store.row(job.key) == (model.COMPLETE, "")


def test_a_job_that_ends_before_the_next_report_batch_is_reported_by_its_end_alone(s: Setup) -> None:
    events: list[tuple[str, str]] = []
    real_report = s.m.workers.report
    s.m.workers.report = lambda name, reports: (  # type: ignore[method-assign]
        events.extend((r["key"], r["event"]) for r in reports) or real_report(name, reports))
    real_started = s.agent._started

    def started(slot: Any, fields: Any) -> None:
        real_started(slot, fields)
        if slot.spec["cmd"] == "quick":
            s.spawner.running("quick").end(0)  # ends before the next cycle sends its start

    s.agent._started = started  # type: ignore[method-assign]
    quick, slow = s.m.add({"cmd": "quick", "cpus": 1}, {"cmd": "slow", "cpus": 1})
    s.start()
    assert quick.state == model.COMPLETE and quick.attempts == 1
    assert [event for key, event in events if key == quick.key] == ["end"]
    assert [event for key, event in events if key == slow.key] == ["start"]  # still running: its start is told
    assert slow.state == model.RUNNING and slow.pid == s.spawner.running("slow").pid
