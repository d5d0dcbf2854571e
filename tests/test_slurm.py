"""wmgr.slurm: the runners service over the real queue and worker registry, a Clock, and a fake
Slurm (the commands' answers scripted); the parsers of Slurm's output; the runner's idle watch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from tests.test_workers import Manager
from wmgr.jobs import model
from wmgr.runner import MemoryOutbox, RunnerService, memory_cgroups, oom_kills
from wmgr.slurm.commands import (JobLine, SlurmCommands, SlurmError, SlurmMissing, describe_end, parse_sbatch,
                                 parse_scontrol, parse_squeue, slurm_minutes)
from wmgr.slurm.service import SlurmRunners, SlurmSettings, manager_id


class FakeSlurm:
    """SlurmCommands' interface over a dict of jobs; sbatch fails with `refuse` when set."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobLine] = {}
        self.details: dict[str, dict[str, str]] = {}
        self.submitted: list[tuple[list[str], str]] = []
        self.refuse = ""
        self.warning = ""
        self.next_id = 100
        self.squeue_calls = 0

    async def sbatch(self, args: list[str], script: str) -> tuple[str, str]:
        if self.refuse:
            raise SlurmError(["/usr/bin/sbatch"], 1, self.refuse)
        self.next_id += 1
        job_id = str(self.next_id)
        self.submitted.append((args, script))
        self.jobs[job_id] = JobLine(job_id, "PENDING", "None", "", 1, "100M", "10:00")
        return job_id, self.warning

    async def squeue(self, name: str) -> list[JobLine]:
        self.squeue_calls += 1
        return list(self.jobs.values())

    async def show_job(self, job_id: str) -> dict[str, str]:
        return self.details.get(job_id, {})

    async def scancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.jobs[job_id].state = "CANCELLED"

    def set_state(self, job_id: str, state: str, exit_code: str = "0:0", reason: str = "None") -> None:
        self.jobs[job_id].state = state
        self.details[job_id] = {"JobState": state, "ExitCode": exit_code, "Reason": reason, "BatchHost": "node7"}


class Setup:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.m = Manager(tmp_path)
        self.m.start()
        self.slurm = FakeSlurm()
        options = dict(max_runners=3, pack=4, idle_exit=30, min_time=600, runner_memory=200, memory_margin=0.1,
                       time_margin=0.1, backoff_base=5, backoff_cap=40, python="/opt/py/bin/python3",
                       manager_url="https://manager.example:5012/", heartbeat=2, max_cpus=4)
        options.update(settings)
        self.service = SlurmRunners(self.m.clock, self.m.queue, self.m.workers, self.slurm,  # type: ignore[arg-type]
                                    SlurmSettings(**options), manager_id(b"CA PEM"), "CA PEM", "tok'en",
                                    self.m.bad)
        self.service.startService()

    def poll(self) -> None:
        self.service.poll()
        self.m.settle()

    def join(self, job_id: str) -> str:
        self.slurm.jobs[job_id].state = "RUNNING"
        return self.m.workers.register(f"slurm-{job_id}", "10.1.1.1", 4, 8000).session


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_runners_are_submitted_for_the_queued_work_at_most_max_runners(s: Setup) -> None:
    s.poll()
    assert s.slurm.submitted == []  # nothing queued: no runner
    s.m.add(*({"cmd": f"tiny {i}", "memory": "50M", "time": "2m"} for i in range(6)))
    s.poll()
    # Six jobs of no cores, four per runner: two runners.
    assert len(s.slurm.submitted) == 2
    args, script = s.slurm.submitted[0]
    assert f"--job-name=wmgr-{manager_id(b'CA PEM')}" in args
    assert "--cpus-per-task=1" in args and "--mem=420M" in args  # 4 x 50 MB + 10 %, + 200 MB for the runner
    assert "--time=12" in args  # min_time 600 s + idle_exit 30 + 2 heartbeats + 30: 664 s -> 12 minutes
    assert "--comment=wmgr manager https://manager.example:5012/" in args
    assert "exec /opt/py/bin/python3 -m wmgr.runner --manager https://manager.example:5012/" in script
    assert "--slots 4" in script and "--memory 200" in script and "--time-limit 720" in script
    assert "WMGR_RUNNER_TOKEN='tok'\"'\"'en'" in script and "WMGR_RUNNER_CA='CA PEM'" in script
    second = s.slurm.submitted[1][0]
    # The two jobs left, in a runner of a full pack all the same (slots of no cores are free, and
    # more such jobs may follow while it runs).
    assert "--mem=420M" in second and "--slots 4" in s.slurm.submitted[1][1]
    s.poll()
    assert len(s.slurm.submitted) == 2  # pending runners count as taking those jobs

    # More work than three runners of four: no more than max_runners at once.
    s.m.add(*({"cmd": f"more {i}", "memory": "50M"} for i in range(40)))
    s.poll()
    assert len(s.slurm.submitted) == 3
    assert [r["state"] for r in s.service.listing()] == ["PENDING"] * 3


def test_runner_size_follows_the_jobs_cores_time_and_options(tmp_path: Path) -> None:
    s = Setup(tmp_path, partition="short", account="lab", qos="low", extra_args=["--exclusive"], max_cpus=4)
    s.m.add(*({"cmd": f"wide {i}", "cpus": 3, "memory": "1G", "time": "2h"} for i in range(2)))
    s.poll()
    # A three-core job: one per runner of four cpus at most.
    assert len(s.slurm.submitted) == 2
    args, _ = s.slurm.submitted[0]
    assert "--cpus-per-task=3" in args and "--mem=1327M" in args  # 1024 MB + 10 % + 200
    assert "--time=134" in args  # 2 h + 10 % = 7920 s, + 92: 133.7 -> 134 minutes
    assert args[-4:] == ["--partition=short", "--account=lab", "--qos=low", "--exclusive"]


def test_a_failed_sbatch_is_warned_about_and_backed_off(s: Setup) -> None:
    s.slurm.refuse = "sbatch: error: Memory specification can not be satisfied"
    s.m.add({"cmd": "huge", "memory": "900G"})
    s.poll()
    warnings = [w["Msg"] for w in s.m.queue.notices.take()]
    assert any("Memory specification can not be satisfied" in w and "5s" in w for w in warnings), warnings
    assert s.service.submit_failures == 1 and s.service.held_for() == 5
    s.m.clock.advance(4)
    s.poll()
    assert s.service.submit_failures == 1  # held back
    s.m.clock.advance(1)
    s.poll()
    assert s.service.submit_failures == 2 and s.service.held_for() == 10  # doubled
    for _ in range(5):
        s.m.clock.advance(100)
        s.poll()
    assert s.service.held_for() == 40  # capped
    s.slurm.refuse = ""
    s.m.clock.advance(40)
    s.poll()
    assert len(s.slurm.submitted) == 1


def test_an_sbatch_warning_on_success_is_surfaced(s: Setup) -> None:
    s.slurm.warning = "sbatch: warning: can't honor --ntasks-per-node"
    s.m.add({"cmd": "x"})
    s.poll()
    assert len(s.slurm.submitted) == 1
    assert any("can't honor" in w["Msg"] for w in s.m.queue.notices.take())


def test_a_runner_ended_by_slurm_loses_its_jobs_with_slurms_reason(s: Setup) -> None:
    jobs = s.m.add({"cmd": "a", "retries": 1}, {"cmd": "b", "retries": 0})
    s.poll()
    (job_id,) = s.slurm.jobs
    session = s.join(job_id)
    pulled = s.m.pull(f"slurm-{job_id}", session)
    assert len(pulled) == 2
    s.poll()
    assert s.service.listing()[0]["registered"] and s.service.listing()[0]["jobs"] == 2

    s.slurm.set_state(job_id, "OUT_OF_MEMORY", "0:125", "OutOfMemory")
    s.poll()
    why = f"Slurm job {job_id} ended OUT_OF_MEMORY (exit code 0:125), reason OutOfMemory"
    # Lost with the reason; one retry left: ready again at once, none left: buried.
    assert jobs[0].state == model.READY and jobs[0].attempts == 1
    assert jobs[1].state == model.BURIED and jobs[1].fail_reason == model.FAIL_LOST and jobs[1].stderr == why
    assert f"slurm-{job_id}" not in s.m.workers.workers
    (bad,) = s.m.bad.all()
    assert bad["Name"] == f"slurm-{job_id}" and bad["IP"] == "node7" and bad["Problem"] == why
    assert s.service.runner_failures == 1 and s.service.held_for() == 5
    assert any("OUT_OF_MEMORY" in w["Msg"] for w in s.m.queue.notices.take())
    s.poll()
    assert len(s.slurm.submitted) == 1  # held back
    s.m.clock.advance(5)
    s.poll()
    assert len(s.slurm.submitted) == 2  # for the job that is ready again


def test_a_cancelled_runner_is_not_backed_off_and_a_completed_one_is_quiet(s: Setup) -> None:
    jobs = s.m.add({"cmd": "a", "retries": 2})
    s.poll()
    (first,) = s.slurm.jobs
    s.m.pull(f"slurm-{first}", s.join(first))
    s.slurm.set_state(first, "CANCELLED", "0:15")
    s.poll()
    assert jobs[0].state == model.READY and s.service.held_for() == 0
    assert len(s.slurm.submitted) == 2  # a new runner for the lost job, at once
    second = max(s.slurm.jobs)
    s.m.workers.leave(f"slurm-{second}", s.join(second))
    s.slurm.set_state(second, "COMPLETED")
    s.poll()
    assert s.service.runner_failures == 1 and len(s.m.bad.all()) == 1


def test_runners_slurm_has_forgotten_are_dropped_and_their_workers_ended(s: Setup) -> None:
    s.m.add({"cmd": "a", "retries": 1})
    s.poll()
    (job_id,) = s.slurm.jobs
    s.m.pull(f"slurm-{job_id}", s.join(job_id))
    del s.slurm.jobs[job_id]
    s.poll()
    assert f"slurm-{job_id}" not in s.m.workers.workers and s.service.runners == {}
    assert "no longer knows" in s.m.bad.all()[0]["Problem"]
    s.m.clock.advance(5)  # an end Slurm cannot explain counts as a failure: backed off
    s.poll()
    assert s.service.runners.keys() == {str(s.slurm.next_id)}  # a new one, for the lost job


def test_a_restarted_manager_counts_the_runners_it_finds_instead_of_submitting(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.slurm.jobs = {"7": JobLine("7", "RUNNING", "None", "node1", 1, "500M", "10:00"),
                    "8": JobLine("8", "COMPLETED", "None", "node1", 1, "500M", "10:00")}
    s.m.add(*({"cmd": f"x {i}"} for i in range(3)))
    s.poll()
    assert s.slurm.submitted == [] and list(s.service.runners) == ["7"]  # the ended one is history
    assert s.service.listing()[0]["state"] == "RUNNING"


def test_pause_and_drain_submit_nothing(s: Setup) -> None:
    s.m.add({"cmd": "x"})
    s.m.queue.pause()
    s.poll()
    assert s.slurm.submitted == []


def test_a_pending_runner_stuck_for_a_reason_is_warned_about(s: Setup) -> None:
    s.m.add({"cmd": "x"})
    s.poll()
    (job_id,) = s.slurm.jobs
    s.slurm.jobs[job_id].reason = "PartitionConfig"
    s.m.clock.advance(31)
    s.poll()
    assert any("PartitionConfig" in w["Msg"] for w in s.m.queue.notices.take())


def test_a_pull_with_time_left_hands_out_only_jobs_that_end_in_time(s: Setup) -> None:
    # (Within one shape the queue's order holds: a long job at its head holds the rest back.)
    s.m.add({"cmd": "long", "time": "1h", "memory": "2G"}, {"cmd": "short", "time": "1m"})
    session = s.m.workers.register("r", "10.0.0.1", 4, 8000).session
    pulled = s.m.run(s.m.workers.pull("r", session, 4, 8000, 8, time_left=600))
    assert [p["spec"]["cmd"] for p in pulled] == ["short"]
    assert [p["spec"]["cmd"] for p in s.m.run(s.m.workers.pull("r", session, 4, 8000, 8))] == ["long"]


# -- the commands ------------------------------------------------------------------------------


def test_slurms_output_is_parsed_defensively() -> None:
    assert parse_sbatch("1234\n") == "1234" and parse_sbatch("55;cluster\n") == "55"
    assert parse_sbatch("sbatch: warning: x\n77\n") == "77" and parse_sbatch("Submitted batch job\n") is None
    lines = parse_squeue("12|RUNNING|None|vm|2|200M|1:08:00\ngarbage\n13|PENDING|Resources|||x|UNLIMITED\n"
                         "14|running|None|vm|1|1M|1:00\n1|2|3\n")
    assert [(j.job_id, j.state, j.reason, j.cpus) for j in lines] == [("12", "RUNNING", "None", 2),
                                                                       ("13", "PENDING", "Resources", 0)]
    fields = parse_scontrol("JobId=9 JobName=wmgr-x JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 "
                            "Comment=wmgr manager https://h:1/ NodeList=vm\n")
    assert fields["JobState"] == "TIMEOUT" and fields["ExitCode"] == "0:15" and fields["NodeList"] == "vm"
    assert parse_scontrol("") == {}
    assert describe_end("9", "TIMEOUT", fields) == "Slurm job 9 ended TIMEOUT (exit code 0:15), reason TimeLimit"
    assert describe_end("9", "gone", {}) == "Slurm job 9 ended; Slurm no longer knows how (MinJobAge passed)"
    assert slurm_minutes(1) == 1 and slurm_minutes(60) == 1 and slurm_minutes(61) == 2


def test_missing_slurm_commands_are_a_clear_start_up_error() -> None:
    commands = SlurmCommands(MemoryReactor(), sbatch="/nonexistent/sbatch")
    with pytest.raises(SlurmMissing, match=r"sbatch \('/nonexistent/sbatch'\) was not found"):
        commands.check()


class SpawningClock(Clock):
    """A Clock that records spawnProcess calls, and fake processes that record what they get."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], Any]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None) -> Any:
        process = FakeProcess()
        protocol.makeConnection(process)
        self.spawned.append((protocol, executable, args, process))
        return process


class FakeProcess:
    def __init__(self) -> None:
        self.stdin = b""
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


def ended(code: int) -> Any:
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    return Failure(ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code))


def test_commands_run_as_processes_through_the_reactor_with_stdin() -> None:
    clock = SpawningClock()
    commands = SlurmCommands(clock, sbatch="/bin/sbatch")
    result: list[Any] = []
    d: Deferred[Any] = Deferred.fromCoroutine(commands.sbatch(["--mem=1M"], "#!/bin/sh\n"))
    d.addBoth(result.append)
    protocol, executable, argv, process = clock.spawned[-1]
    assert executable == "/bin/sbatch" and argv == ["/bin/sbatch", "--parsable", "--mem=1M"]
    assert process.stdin == b"#!/bin/sh\n" and process.stdin_closed
    protocol.errReceived(b"sbatch: warning: odd\n")
    protocol.outReceived(b"4242\n")
    protocol.processEnded(ended(0))
    assert result == [("4242", "sbatch: warning: odd")]

    failed: list[Any] = []
    Deferred.fromCoroutine(commands.sbatch([], "x")).addErrback(failed.append)
    protocol, _, _, _ = clock.spawned[-1]
    protocol.errReceived(b"sbatch: error: Memory specification can not be satisfied\n")
    protocol.processEnded(ended(1))
    assert failed[0].check(SlurmError) and "Memory specification" in failed[0].value.stderr

    # A controller that hangs: the command is killed after COMMAND_TIMEOUT.
    commands.run("sbatch", [])
    process = clock.spawned[-1][3]
    clock.advance(61)
    assert process.signals == ["KILL"]


# -- the runner's idle watch -------------------------------------------------------------------


class FakeAgent:
    def __init__(self) -> None:
        self.slots: dict[str, Any] = {}
        self.outbox = type("O", (), {"pending": {}})()
        self.reachable = True
        self.last_contact = 0.0
        self.manager_timeout = 60.0
        self.worker_name = "slurm-1"


def test_a_runner_exits_when_idle_and_its_reports_are_delivered() -> None:
    clock, agent, exits = Clock(), FakeAgent(), []
    watch = RunnerService(clock, agent, idle_exit=10, deadline=None, on_exit=lambda: exits.append(clock.seconds()))
    agent.slots["k"] = object()
    for _ in range(20):
        clock.advance(1)
        watch.check_idle()
    assert exits == []  # busy
    del agent.slots["k"]
    agent.outbox.pending = {1: {}}
    for _ in range(15):
        clock.advance(1)
        watch.check_idle()
    assert exits == []  # a report still to deliver
    agent.outbox.pending = {}
    clock.advance(1)
    watch.check_idle()
    assert exits == [36]
    watch.check_idle()
    assert exits == [36]  # once


def test_a_runner_gives_up_on_a_manager_gone_for_longer_than_its_timeout() -> None:
    clock, agent, exits = Clock(), FakeAgent(), []
    watch = RunnerService(clock, agent, idle_exit=10, deadline=None, on_exit=lambda: exits.append(clock.seconds()))
    agent.reachable, agent.outbox.pending = False, {1: {}}
    for _ in range(70):
        clock.advance(1)
        watch.check_idle()
    assert exits == [61]


def test_a_runner_exits_at_its_deadline_once_nothing_runs() -> None:
    clock, agent, exits = Clock(), FakeAgent(), []
    watch = RunnerService(clock, agent, idle_exit=1000, deadline=5, on_exit=lambda: exits.append(clock.seconds()))
    agent.slots["k"] = object()
    for _ in range(8):
        clock.advance(1)
        watch.check_idle()
    assert exits == []  # a job runs: it was pulled to end before the limit
    del agent.slots["k"]
    clock.advance(1)
    watch.check_idle()
    assert exits == [9]


def test_a_runners_outbox_keeps_reports_in_order_until_acknowledged() -> None:
    outbox = MemoryOutbox()
    for i in range(3):
        Deferred.fromCoroutine(outbox.put({"n": i}))
    assert [report["n"] for _, report in outbox.batch(2)] == [0, 1]
    Deferred.fromCoroutine(outbox.acknowledged([row_id for row_id, _ in outbox.batch(2)]))
    assert [report["n"] for _, report in outbox.batch()] == [2] and len(outbox.pending) == 1


def test_a_runner_that_never_reached_the_manager_is_explained_and_backed_off(s: Setup) -> None:
    s.m.add({"cmd": "x"})
    s.poll()
    (job_id,) = s.slurm.jobs
    s.slurm.set_state(job_id, "FAILED", "3:0", "NonZeroExitCode")
    s.poll()
    (warning,) = [w["Msg"] for w in s.m.queue.notices.take() if "FAILED" in w["Msg"]]
    assert "never reached the manager at https://manager.example:5012/" in warning and "for 5s" in warning


def test_a_job_killed_by_the_allocations_oom_killer_is_reported_as_too_much_ram() -> None:
    kills = [0]
    outbox = MemoryOutbox(lambda: Deferred.fromCoroutine(_value(kills[0])))
    Deferred.fromCoroutine(outbox.load())
    end = {"event": "end", "key": "k", "attempt": 1, "exitcode": None, "signal": 9}
    Deferred.fromCoroutine(outbox.put(dict(end)))  # a SIGKILL with no OOM kill: left as it is
    kills[0] = 1
    Deferred.fromCoroutine(outbox.put(dict(end, exitcode=137, signal=None)))  # the shell's child was killed
    Deferred.fromCoroutine(outbox.put(dict(end)))  # one OOM kill explains one end only
    Deferred.fromCoroutine(outbox.put(dict(end, kill_reason="killed by user request")))
    reasons = [report.get("kill_reason", "") for _, report in outbox.batch()]
    assert reasons == ["", model.FAIL_RAM, "", "killed by user request"]


async def _value(n: int) -> int:
    return n


def test_the_runners_memory_cgroups_and_their_oom_kills_are_found(tmp_path: Path) -> None:
    job = tmp_path / "memory" / "slurm_vm" / "uid_0" / "job_7"
    for directory in (job / "step_batch" / "task_0", job / "step_batch"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (job / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 2\n")
    proc = tmp_path / "cgroup"
    proc.write_text("5:devices:/\n4:memory:/slurm_vm/uid_0/job_7/step_batch/task_0\n0::/\n")
    dirs = memory_cgroups(str(proc), str(tmp_path))
    assert dirs == [str(job / "step_batch" / "task_0"), str(job / "step_batch"), str(job)]
    assert oom_kills(dirs) == 2
    assert memory_cgroups(str(tmp_path / "none"), str(tmp_path)) == []
