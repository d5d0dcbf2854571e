"""Durability of the wr job queue against the real daemon: kill -9 and SIGTERM, then a restart.

What the README promises: an add is committed before its 201; after a restart (clean or kill -9)
every queued job is there in its state and no completed job runs again; a job that was running is
recovered: adopted if still running, its outcome read from its files if it ended meanwhile, or
marked lost if it died without an exit status.

Jobs are kept queued across restarts with `[jobs] zero_core_slots = 0`: jobs asking for no cores
then never start (and are not "too big for the machine" either), while jobs asking for a core do.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from tests.integration.test_wr_jobs import (  # noqa: F401 (the fixture is used by being imported)
    JOBS, alive, gated, no_job_outlives_its_test, poll, wait_file, wait_jobs, wr_key)

pytestmark = pytest.mark.timeout(150)

HOLD_ZERO_CORE_JOBS = "[jobs]\nzero_core_slots = 0\nsample_interval = 0.2\n"
FAST_SAMPLING = "[jobs]\nsample_interval = 0.2\n"


def job_processes(run_dir: Path) -> list[int]:
    """Live (non-zombie) job leaders started by a daemon with this run directory."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(run_dir) in arg for arg in proc.info.get("cmdline") or []):
            found.append(proc.info["pid"])
    return found


async def wait_for_job_processes_to_end(reactor: Any, run_dir: Path, timeout: float = 15.0) -> None:
    async def check() -> tuple[bool, Any]:
        left = job_processes(run_dir)
        return not left, left

    await poll(reactor, check, timeout, "the job processes of the killed daemon to end")


async def restart(make_daemon: Any, config: Optional[str]) -> Any:
    """A new daemon on the same data directory ("data")."""
    return await make_daemon(config=config)


async def all_complete(client: Any, reactor: Any, group: str, count: int, timeout: float) -> None:
    """Wait until the rep group shows `count` jobs, all complete (polled cheaply with limit=1)."""

    async def check() -> tuple[bool, Any]:
        shown = await client.jobs(group, limit="1")
        summary = [(j["State"], j["Exitcode"], j["FailReason"], j["Similar"] + 1) for j in shown]
        return summary == [("complete", 0, "", count)], summary

    await poll(reactor, check, timeout, f"{count} jobs of {group} to complete")


# -- (a) every acknowledged add survives kill -9 ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_jobs_acknowledged_just_before_kill_9_are_all_there_in_their_state(make_daemon, reactor, tmp_path):
    ran = tmp_path / "ran.log"
    first = await make_daemon(config=HOLD_ZERO_CORE_JOBS)
    async with first.client(reactor) as client:
        # One buried and one complete job (a core each: they run), then 300 queued ones (no cores: held).
        await client.add_jobs([{"cmd": "echo failing >&2; exit 3", "cpus": 1},
                               {"cmd": f"echo once >> {ran}", "cpus": 1}], rep_grp="before")
        await wait_jobs(client, reactor, "before", ("buried", "complete"), count=2)
        acked = await client.add_jobs([{"cmd": f"echo {i} >> {ran}.queued"} for i in range(300)], rep_grp="queued")
    first.crash()  # right after the 201
    assert len(acked) == 300 and {j["State"] for j in acked} == {"ready"}

    second = await restart(make_daemon, HOLD_ZERO_CORE_JOBS)
    async with second.client(reactor) as client:
        queued = await client.jobs("queued")
        assert sorted(j["Key"] for j in queued) == sorted(j["Key"] for j in acked)
        assert {(j["State"], j["Attempts"]) for j in queued} == {("ready", 0)}
        assert len(await client.jobs()) == 301  # the incomplete ones: 300 queued + the buried one
        failed = (await client.jobs(wr_key("echo failing >&2; exit 3"), std="true"))[0]
        assert (failed["State"], failed["Exitcode"], failed["FailReason"], failed["StdErr"], failed["Attempts"]) == (
            "buried", 3, "command exited non-zero", "failing", 1)
        done = (await client.jobs(wr_key(f"echo once >> {ran}")))[0]
        assert (done["State"], done["Attempts"]) == ("complete", 1)
    assert await second.stop(reactor) == 0, second.log()

    # Now let them run: each exactly once, and the completed job not again.
    third = await restart(make_daemon, FAST_SAMPLING)
    async with third.client(reactor) as client:
        await all_complete(client, reactor, "queued", 300, timeout=30)
    assert sorted(int(line) for line in Path(f"{ran}.queued").read_text().split()) == list(range(300))
    assert ran.read_text() == "once\n"


# -- (b) the "Done when": kill -9 in the middle of a 1,000-job run -------------------------

N_JOBS = 1000


def numbered_job(i: int, log: Path) -> dict[str, Any]:
    # Every 10th job sleeps a little, so that some are running when the daemon is killed.
    return {"cmd": f"sleep 0.3; echo {i} >> {log}" if i % 10 == 0 else f"echo {i} >> {log}"}


@pytest.mark.parametrize("restart_when", ["after_its_jobs_ended", "at_once"])
@pytest_twisted.ensureDeferred
async def test_kill_9_in_a_1000_job_run_loses_no_acknowledged_job_and_reruns_no_completed_one(
        make_daemon, reactor, tmp_path, restart_when):
    """`after_its_jobs_ended`: every job that was running at the kill has ended before the restart,
    so the restart reads their outcome from their files. `at_once`: some are still running at the
    restart and must be adopted."""
    log = tmp_path / "ids.log"
    config = "[jobs]\nzero_core_slots = 8\nsample_interval = 0.2\n"
    daemon = await make_daemon(config=config)
    async with daemon.client(reactor) as client:
        acked = []
        for start in range(0, N_JOBS, 250):
            acked += await client.add_jobs([numbered_job(i, log) for i in range(start, start + 250)], rep_grp="many")

        async def some_done_some_running() -> tuple[bool, Any]:
            lines = log.read_text().count("\n") if log.exists() else 0
            running = job_processes(daemon.data_dir / "run") if lines >= N_JOBS // 3 else []
            return bool(running), (lines, running)

        _, running_at_kill = await poll(reactor, some_done_some_running, 30,
                                        "a third of the jobs to be done while some run")
    daemon.crash()
    lines_at_kill = log.read_text().count("\n")
    assert len(acked) == N_JOBS and lines_at_kill < N_JOBS, "the run ended before the kill: nothing was tested"
    assert running_at_kill, "no job was running at the kill"
    if restart_when == "after_its_jobs_ended":
        await wait_for_job_processes_to_end(reactor, daemon.data_dir / "run")

    again = await restart(make_daemon, config)
    async with again.client(reactor) as client:
        await all_complete(client, reactor, "many", N_JOBS, timeout=60)
        jobs = await client.jobs("many")
        missing_keys = sorted({j["Key"] for j in acked} - {j["Key"] for j in jobs})
        if missing_keys:
            by_key = await client.jobs(",".join(missing_keys[:20]))
            raise AssertionError(f"{len(missing_keys)} acknowledged jobs not in their rep group; by key: "
                                 f"{[(j['Cmd'], j['RepGroup'], j['State']) for j in by_key]}\n{again.log()[-3000:]}")
        assert len(jobs) == N_JOBS
        assert {(j["State"], j["Exitcode"], j["Attempts"]) for j in jobs} == {("complete", 0, 1)}
        assert await client.jobs() == []
    ids = [int(line) for line in log.read_text().split()]
    missing = sorted(set(range(N_JOBS)) - set(ids))
    twice = sorted({i for i in ids if ids.count(i) > 1})
    assert not missing and not twice, f"missing: {missing[:20]}, run more than once: {twice[:20]}"
    assert len(ids) == N_JOBS


# -- (c) jobs running across a kill -9 -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_jobs_that_ended_or_died_while_the_daemon_was_down(make_daemon, reactor, tmp_path):
    """One job ends by itself while the daemon is down: its exit code and output are recorded at the
    restart. Another is killed by a signal meanwhile: it is marked lost, and DELETE state=lost
    confirms it (it becomes buried)."""
    gate, pids = tmp_path / "gate", tmp_path / "pids"
    ends = f"{gated(gate, 'ends')}; echo out-$$; echo err >&2; exit 7"
    dies = f"echo $$ > {pids}; sleep 60"
    daemon = await make_daemon(config=FAST_SAMPLING)
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": ends}, {"cmd": dies}], rep_grp="across")
        before = {j["Cmd"]: j for j in await wait_jobs(client, reactor, "across", ("running",), count=2)}
    victim = int(await wait_file(reactor, pids))
    daemon.crash()
    assert alive(before[ends]["Pid"]) and alive(victim)
    gate.touch()
    os.killpg(victim, signal.SIGKILL)
    await wait_for_job_processes_to_end(reactor, daemon.data_dir / "run")

    again = await restart(make_daemon, FAST_SAMPLING)
    async with again.client(reactor) as client:
        after = {j["Cmd"]: j for j in await wait_jobs(client, reactor, "across", ("buried", "lost"), count=2,
                                                        timeout=10, std="true")}
        ended = after[ends]
        assert (ended["State"], ended["Exited"], ended["Exitcode"], ended["FailReason"]) == (
            "buried", True, 7, "command exited non-zero")
        assert ended["StdOut"] == f"ends\nout-{before[ends]['Pid']}" and ended["StdErr"] == "err"
        assert ended["Pid"] == before[ends]["Pid"] and ended["Attempts"] == 1
        assert ended["Started"] == before[ends]["Started"] and ended["Ended"] >= ended["Started"]

        lost = after[dies]
        assert (lost["State"], lost["FailReason"], lost["Attempts"]) == ("lost", "lost contact with runner", 1)
        assert [j["Key"] for j in await client.jobs(state="lost")] == [lost["Key"]]
        reply = await client.delete(JOBS + lost["Key"], params={"state": "lost"})
        assert reply.code == 202 and [j["Key"] for j in reply.json()] == [lost["Key"]]
        (confirmed,) = await client.jobs(lost["Key"])
        assert confirmed["State"] == "buried" and confirmed["FailReason"] == "lost contact with runner"

        async def run_files() -> tuple[bool, Any]:
            left = sorted(p.name for p in (again.data_dir / "run").iterdir())
            return not left, left

        await poll(reactor, run_files, 5, "the run files to go once every outcome is committed")


@pytest_twisted.ensureDeferred
async def test_a_long_job_running_across_kill_9_is_adopted_and_its_outcome_recorded(make_daemon, reactor, tmp_path):
    """Adopted after the restart: still shown running with its pid, not started again, its outcome
    recorded when it ends; and an adopted job can still be killed with DELETE state=running."""
    gate, pids = tmp_path / "gate", tmp_path / "pids"
    cmd = f"{gated(gate, 'long')}; echo out-$$; echo err >&2; exit 5"
    doomed = f"sleep 60 & echo $$ $! > {pids}; wait"
    daemon = await make_daemon(config=FAST_SAMPLING)
    async with daemon.client(reactor) as client:
        (job, victim) = await client.add_jobs([{"cmd": cmd}, {"cmd": doomed}])
        (before,) = await wait_jobs(client, reactor, job["Key"], ("running",))
        shell, child = map(int, (await wait_file(reactor, pids)).split())
    daemon.crash()
    assert alive(before["Pid"]) and alive(shell) and alive(child)

    again = await restart(make_daemon, FAST_SAMPLING)
    async with again.client(reactor) as client:
        (adopted,) = await client.jobs(job["Key"])
        assert (adopted["State"], adopted["Pid"], adopted["Attempts"]) == ("running", before["Pid"], 1)
        assert adopted["Started"] == before["Started"]
        assert f"adopted job {job['Key']}" in again.log()
        (adopted_victim,) = await client.jobs(victim["Key"])
        assert (adopted_victim["State"], adopted_victim["Pid"]) == ("running", shell)

        reply = await client.delete(JOBS + victim["Key"], params={"state": "running"})
        assert reply.code == 202 and [j["Key"] for j in reply.json()] == [victim["Key"]]
        (killed,) = await wait_jobs(client, reactor, victim["Key"], ("buried",), timeout=10)
        assert killed["FailReason"] == "killed by user request"
        assert not alive(shell) and not alive(child)

        # Still running: not started a second time.
        assert (await client.jobs(job["Key"]))[0]["State"] == "running"
        gate.touch()
        (done,) = await wait_jobs(client, reactor, job["Key"], ("buried",), timeout=10, std="true")
        assert (done["Exited"], done["Exitcode"], done["FailReason"]) == (True, 5, "command exited non-zero")
        assert done["StdOut"] == f"long\nout-{before['Pid']}" and done["StdErr"] == "err"
        assert done["Attempts"] == 1 and done["Ended"] >= done["Started"] == before["Started"]


# -- (d) SIGTERM leaves running jobs running; the next start adopts them ---------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_leaves_running_jobs_running_and_the_next_start_adopts_them(
        make_daemon, reactor, tmp_path):
    gate = tmp_path / "gate"
    cmd = f"{gated(gate, 'term')}; echo finished-$$"
    daemon = await make_daemon(config=FAST_SAMPLING)
    async with daemon.client(reactor) as client:
        (job,) = await client.add_jobs([{"cmd": cmd}])
        (before,) = await wait_jobs(client, reactor, job["Key"], ("running",))
    assert await daemon.stop(reactor) == 0, daemon.log()
    await deferLater(reactor, 0.3, lambda: None)
    assert alive(before["Pid"]), "SIGTERM to the daemon ended the job"

    again = await restart(make_daemon, FAST_SAMPLING)
    async with again.client(reactor) as client:
        (adopted,) = await client.jobs(job["Key"])
        assert (adopted["State"], adopted["Pid"], adopted["Attempts"]) == ("running", before["Pid"], 1)
        gate.touch()
        (done,) = await wait_jobs(client, reactor, job["Key"], ("complete",), timeout=10, std="true")
        assert done["Exitcode"] == 0 and done["Attempts"] == 1
        assert done["StdOut"] == f"term\nfinished-{before['Pid']}"


@pytest_twisted.ensureDeferred
async def test_a_job_killed_before_its_process_was_spawned_runs_after_the_restart(make_daemon, reactor, tmp_path):
    """The state a kill -9 leaves between JobRun.start() creating a run's output files and spawning
    its process, made by hand: a ready job, empty <key>.out and <key>.err, no process, no status."""
    ran = tmp_path / "ran.log"
    daemon = await make_daemon(config=HOLD_ZERO_CORE_JOBS)
    async with daemon.client(reactor) as client:
        (job,) = await client.add_jobs([{"cmd": f"echo ran >> {ran}"}])
    assert await daemon.stop(reactor) == 0
    run_dir = daemon.data_dir / "run"
    for suffix in (".out", ".err"):
        (run_dir / (job["Key"] + suffix)).write_bytes(b"")

    again = await restart(make_daemon, FAST_SAMPLING)
    async with again.client(reactor) as client:
        (done,) = await wait_jobs(client, reactor, job["Key"], ("complete", "buried", "lost"), timeout=10)
        assert (done["State"], done["Attempts"], done["FailReason"]) == ("complete", 1, "")
    assert ran.read_text() == "ran\n"
