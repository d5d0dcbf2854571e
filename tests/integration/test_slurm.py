"""The queue on a real one-node Slurm (scripts/slurm-one-node.sh): a manager with
`[scheduler] backend = slurm` submits runners with sbatch; they pull, run and report its jobs.

Skipped, with the reason printed, where no Slurm can be started (the script needs root and
Debian's packages). Each job appends "S <time>" as it starts and "E <time>" as it ends to a file
named after itself, so that two runs of one job at once would show as two starts without an end
between them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet.defer import succeed

from tests.harness import until
from tests.integration.test_cli import wmgr

pytestmark = pytest.mark.timeout(240)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm-one-node.sh"


def slurm_problem() -> str:
    """Why no Slurm can be used here ("" when one runs). Starts one with the project's script
    when it is not up (as .ci/run does), unless WMGR_SLURM_START=0."""
    if shutil.which("squeue") and subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0:
        return ""
    if os.environ.get("WMGR_SLURM_START", "1") == "0":
        return "Slurm is not running and WMGR_SLURM_START=0"
    if os.geteuid() != 0:
        return "Slurm is not running, and starting it (scripts/slurm-one-node.sh) needs root"
    done = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return f"scripts/slurm-one-node.sh start failed: {(done.stderr or done.stdout)[-600:]}"
    return ""


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = slurm_problem()
    if problem:
        print(f"Slurm tests skipped: {problem}")
        pytest.skip(problem)


def manager_config(**slurm: Any) -> str:
    options = {"max_runners": 3, "idle_exit": 6, "poll_interval": 0.5, "heartbeat": 0.5, "pack": 8,
               "backoff_base": 1, "runner_memory": 150, **slurm}
    return ("[scheduler]\nbackend = slurm\n[workers]\ntimeout = 10\ncheck_interval = 0.5\n[slurm]\n"
            + "".join(f"{key} = {value}\n" for key, value in options.items()))


def squeue_ids(name: str) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"], capture_output=True, text=True)
    return set(out.stdout.split())


def job_command(marks: Path, i: int, seconds: float) -> str:
    f = marks / f"job{i}"
    return f'echo "S $(date +%s.%N)" >> {f}; sleep {seconds}; echo "E $(date +%s.%N)" >> {f}; : {i}'


def runs_of(path: Path) -> list[tuple[str, float]]:
    return [(line.split()[0], float(line.split()[1])) for line in path.read_text().splitlines() if line.strip()]


def assert_never_twice(paths: list[Path], cut_at: float = 0.0) -> None:
    """Every job ran to its end, and none started again before its earlier run had ended but
    for a run cut short (a start without an end) before `cut_at`."""
    for path in paths:
        runs = runs_of(path)
        assert runs and runs[-1][0] == "E", (path.name, runs)
        open_start = None
        for mark, at in runs:
            if mark == "S":
                if open_start is not None:
                    assert cut_at and open_start < cut_at <= at + 0.5, (path.name, runs)
                open_start = at
            else:
                assert open_start is not None, (path.name, runs)
                open_start = None


async def start_one_job(client: Any, reactor: Any, marks: Path) -> dict[str, Any]:
    """Add job 0 (three seconds, one core), wait until a runner runs it, and return it."""
    [job] = await client.add_jobs([{"cmd": job_command(marks, 0, 3), "cpus": 1, "memory": "20M"}])

    async def running() -> Any:
        return (await client.get("rest/v1/jobs/" + job["Key"])).json()[0]["State"] == "running"

    await until(reactor, running, timeout=60, every=0.2)
    return job


async def all_complete(client: Any) -> bool:
    reply = await client.get("rest/v1/jobs/")
    return reply.code == 200 and reply.json() == []


@pytest_twisted.ensureDeferred
async def test_two_hundred_jobs_of_mixed_shapes_complete_through_runners(
        slurm: None, make_daemon: Any, reactor: Any, tmp_path: Path) -> None:
    manager = await make_daemon(name="manager", config=manager_config())
    marks = tmp_path / "marks"
    marks.mkdir()
    client = manager.client(reactor)
    try:
        info = (await client.get("rest/v1/info/")).json()
        assert info["Scheduler"] == "slurm"
        shapes = [{"cpus": 0, "memory": "20M"}, {"cpus": 1, "memory": "30M"}, {"cpus": 0, "memory": "50M",
                                                                             "priority": 5}]
        jobs = [dict(shapes[i % 3], cmd=job_command(marks, i, 0.05 * (i % 4)), retries=2, rep_grp=f"shape{i % 3}")
                for i in range(200)]
        started = time.monotonic()
        await client.add_jobs(jobs)
        await until(reactor, lambda: all_complete(client), timeout=150, every=0.5)
        print(f"200 jobs through Slurm runners in {time.monotonic() - started:.1f}s")
        done = (await client.get("rest/v1/jobs/shape0,shape1,shape2", params={"search": "true"})).json()
        assert len(done) == 200 and {job["State"] for job in done} == {"complete"}
        assert all(job["Host"].startswith("slurm-") for job in done)
        assert_never_twice([marks / f"job{i}" for i in range(200)])
        listing = (await client.get("slurm/v1/runners")).json()
        assert 1 <= listing["submitted"] <= 3 + 200 // 8, listing
        assert listing["job_name"].startswith("wmgr-") and listing["runner_failures"] == 0, listing
        metrics = (await client.get("metrics")).text
        assert "wmgr_slurm_runners_submitted_total" in metrics
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_runner_loses_no_job_and_a_job_over_its_memory_is_stopped(
        slurm: None, make_daemon: Any, reactor: Any, tmp_path: Path) -> None:
    manager = await make_daemon(name="manager", config=manager_config(max_runners=2))
    marks = tmp_path / "marks"
    marks.mkdir()
    client = manager.client(reactor)
    try:
        # Two runners of one core each, one job each: cancelling one runner mid-job must see its job
        # run again on a runner (the other, or a new one) and end complete, never twice at once.
        keys = [job["Key"] for job in await client.add_jobs(
            [{"cmd": job_command(marks, i, 4), "cpus": 1, "memory": "20M", "retries": 3, "rep_grp": "long"}
             for i in range(2)])]

        async def both_running() -> Any:
            jobs = (await client.get("rest/v1/jobs/" + ",".join(keys))).json()
            return all(job["State"] == "running" for job in jobs) and jobs

        running = await until(reactor, both_running, timeout=60, every=0.2)
        victim = running[0]
        cancelled_at = time.time()
        subprocess.run(["scancel", victim["Host"].removeprefix("slurm-")], check=True)

        async def redone() -> Any:
            job = (await client.get("rest/v1/jobs/" + victim["Key"])).json()[0]
            return job["State"] == "complete" and job

        job = await until(reactor, redone, timeout=90, every=0.5)
        assert job["Attempts"] >= 2 and job["Host"] != victim["Host"], job
        await until(reactor, lambda: all_complete(client), timeout=60, every=0.5)
        assert_never_twice([marks / "job0", marks / "job1"], cut_at=cancelled_at)
        servers = (await client.get("rest/v1/servers/")).json()
        bad = [server for server in servers if server["Name"] == victim["Host"]]
        assert bad and "CANCELLED" in bad[0]["Problem"], servers

        # A job that grows past its memory is stopped by its runner and said to be so.
        grow = ("python3 -c 'import time\nx=[]\nfor _ in range(60):\n x.append(bytearray(10<<20)); "
                "time.sleep(0.1)'")
        [big] = await client.add_jobs([{"cmd": grow, "memory": "30M", "retries": 0, "rep_grp": "big"}])

        async def buried() -> Any:
            job = (await client.get("rest/v1/jobs/" + big["Key"])).json()[0]
            return job["State"] == "buried" and job

        job = await until(reactor, buried, timeout=90, every=0.5)
        assert job["FailReason"] == "command used too much RAM" and job["Host"].startswith("slurm-"), job

        # One that takes far more than its runner's allocation at once: Slurm's cgroup kills it
        # before the sampler sees it, and the runner says why.
        [big] = await client.add_jobs([{"cmd": "python3 -c 'x = bytearray(600 << 20)'", "memory": "30M",
                                        "retries": 0, "rep_grp": "bigger"}])
        job = await until(reactor, buried, timeout=90, every=0.5)
        assert job["FailReason"] == "command used too much RAM", job
    finally:
        await client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_a_restarted_manager_finds_its_runners(slurm: None, make_daemon: Any, reactor: Any,
                                                     tmp_path: Path) -> None:
    port = free_port()  # the runners know the manager by its URL: the restart keeps the port
    config = manager_config(max_runners=2, idle_exit=60)
    manager = await make_daemon("--port", str(port), name="manager", config=config)
    marks = tmp_path / "marks"
    marks.mkdir()
    client = manager.client(reactor)
    try:
        # Runners sized for more memory than the jobs after the restart need (whatever learning
        # makes of them), so that those fit the runners found again.
        await client.add_jobs([{"cmd": job_command(marks, i, 0.1), "cpus": 1, "memory": "300M", "rep_grp": "before"}
                               for i in range(4)])
        await until(reactor, lambda: all_complete(client), timeout=90, every=0.5)
        job_name = (await client.get("slurm/v1/runners")).json()["job_name"]
        runners = squeue_ids(job_name)
        assert 1 <= len(runners) <= 2, runners
    finally:
        await client.close()

    assert await manager.stop(reactor) == 0, manager.log()
    await manager.start(reactor)
    client = manager.client(reactor)
    try:
        await client.add_jobs([{"cmd": job_command(marks, i, 0.1), "cpus": 1, "memory": "20M", "rep_grp": "after"}
                               for i in range(4, 10)])
        await until(reactor, lambda: all_complete(client), timeout=90, every=0.5)
        after = (await client.get("rest/v1/jobs/after", params={"search": "true"})).json()
        assert {job["Host"] for job in after} <= {f"slurm-{i}" for i in runners}, (after, runners)
        listing = (await client.get("slurm/v1/runners")).json()
        assert listing["submitted"] == 0 and {r["job_id"] for r in listing["runners"]} == runners, listing
        assert squeue_ids(job_name) == runners
        assert_never_twice([marks / f"job{i}" for i in range(10)])
        listed = wmgr(manager.data_dir, "slurm")
        assert listed.returncode == 0 and "RUNNING" in listed.stdout, listed
        assert all(f"slurm-{i}" in listed.stdout for i in runners), listed.stdout

        # Killing a job reaches its whole process group on the node, not only the shell.
        pid_file = tmp_path / "child.pid"
        [victim] = await client.add_jobs([{"cmd": f"sleep 300 & echo $! > {pid_file}; wait", "cpus": 1,
                                           "memory": "20M", "rep_grp": "victim"}])
        await until(reactor, lambda: succeed(pid_file.exists() and pid_file.read_text().strip()), timeout=30)
        child = int(pid_file.read_text())
        killed = wmgr(manager.data_dir, "kill", victim["Key"])
        assert killed.returncode == 0, killed

        async def child_gone() -> bool:
            return not Path(f"/proc/{child}").exists()

        await until(reactor, child_gone, timeout=30)
        job = (await client.get("rest/v1/jobs/" + victim["Key"])).json()[0]
        assert job["State"] == "buried" and job["FailReason"] == "killed by user request", job
    finally:
        await client.close()
    subprocess.run(["scancel", "-n", job_name])


@pytest_twisted.ensureDeferred
async def test_a_stopped_manager_leaves_its_runners_to_finish_their_job_and_exit(
        slurm: None, make_daemon: Any, reactor: Any, tmp_path: Path) -> None:
    manager = await make_daemon(name="manager", config=manager_config(max_runners=1, idle_exit=2))
    marks = tmp_path / "marks"
    marks.mkdir()
    client = manager.client(reactor)
    try:
        await start_one_job(client, reactor, marks)
        job_name = (await client.get("slurm/v1/runners")).json()["job_name"]
    finally:
        await client.close()
    assert await manager.stop(reactor) == 0, manager.log()
    stopped = time.time()
    [runner] = squeue_ids(job_name)

    def ended() -> Any:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", runner, "-o", "%T"], capture_output=True, text=True)
        return succeed(out.stdout.strip() in ("COMPLETED", "FAILED") and out.stdout.strip())

    # The job runs to its end on the node; the runner, idle and without a manager for longer
    # than the manager's worker timeout (10 s), exits by itself.
    state = await until(reactor, ended, timeout=60, every=0.5)
    assert state == "COMPLETED" and time.time() - stopped < 40
    [(start, _), (end, at)] = runs_of(marks / "job0")
    assert end == "E" and at > stopped, runs_of(marks / "job0")


@pytest_twisted.ensureDeferred
async def test_a_manager_back_within_its_worker_timeout_gets_the_end_of_the_job_its_runner_finished(
        slurm: None, make_daemon: Any, reactor: Any, tmp_path: Path) -> None:
    # Leases outlive a restart: the runner keeps the end of the job it finished while the manager
    # was down, registers again when it is back, and the end lands on the job's recovered lease.
    port = free_port()
    config = manager_config(max_runners=1, idle_exit=2).replace("timeout = 10\n", "timeout = 30\n")
    manager = await make_daemon("--port", str(port), name="manager", config=config)
    marks = tmp_path / "marks"
    marks.mkdir()
    client = manager.client(reactor)
    try:
        job = await start_one_job(client, reactor, marks)
    finally:
        await client.close()
    assert await manager.stop(reactor) == 0, manager.log()
    stopped = time.time()
    await until(reactor, lambda: succeed(len(runs_of(marks / "job0")) == 2), timeout=30, every=0.2)
    await manager.start(reactor)
    client = manager.client(reactor)
    try:
        async def ended() -> Any:
            [status] = (await client.get("rest/v1/jobs/" + job["Key"])).json()
            return status["State"] not in ("running", "reserved", "ready") and status

        status = await until(reactor, ended, timeout=60, every=0.5)
        assert status["State"] == "complete" and status["Attempts"] == 1, status
        [(start, _), (end, at)] = runs_of(marks / "job0")
        assert end == "E" and at > stopped and time.time() - stopped < 30
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_wmgr_slurm_says_when_a_daemon_does_not_run_on_slurm(daemon: Any) -> None:
    listed = wmgr(daemon.data_dir, "slurm")
    assert listed.returncode == 1 and "[scheduler] backend = local" in listed.stderr, listed


def test_a_manager_without_slurm_does_not_start(tmp_path: Path) -> None:
    from tests.harness import Daemon

    daemon = Daemon(tmp_path / "data", config="[scheduler]\nbackend = slurm\n[slurm]\nsbatch = /nonexistent/sbatch\n")
    done = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sbatch ('/nonexistent/sbatch') was not found" in done.stdout + done.stderr
