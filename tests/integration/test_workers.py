"""Workers on loopback: a manager that runs nothing itself and two worker daemons that pull its
jobs. One worker is killed with SIGKILL mid-job; its work must finish on the other within the
manager's timeout plus one liveness period, every job run, none run twice at once.

A second test kills the manager (kill -9) mid-run and starts it again on the same port: the jobs
the workers ran carry on under their leases, none is lost and none runs twice.

Each job appends "S <time>" as it starts and "E <time>" as it ends to a file named after itself,
so that two runs of one job at once would show as two starts without an end between them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.harness import until

pytestmark = pytest.mark.timeout(180)

TIMEOUT, CHECK, LONG = 3.0, 0.5, 8.0
MANAGER_CONFIG = f"""
[workers]
timeout = {TIMEOUT}
check_interval = {CHECK}
run_local = false
"""
WORKER_CONFIG = """
[worker]
heartbeat = 0.5
max_cores = 4
"""


def job_command(marks: Path, i: int, seconds: float) -> str:
    f = marks / f"job{i}"
    return (f'echo "S $(date +%s.%N)" >> {f}; sleep {seconds}; echo "E $(date +%s.%N)" >> {f}; : {i}')


def runs_of(path: Path) -> list[tuple[str, float]]:
    return [(line.split()[0], float(line.split()[1])) for line in path.read_text().splitlines() if line.strip()]


@pytest_twisted.ensureDeferred
async def test_two_workers_run_the_queue_and_one_dies_mid_job(make_daemon: Any, reactor: Any, tmp_path: Path) -> None:
    manager = await make_daemon(name="manager", config=MANAGER_CONFIG)
    worker_args = ["--manager", manager.url, "--manager-ca", str(manager.data_dir / "ca.pem"),
                   "--manager-token-file", str(manager.data_dir / "worker.token")]
    w1 = await make_daemon(*worker_args, "--worker-name", "w1", name="w1", config=WORKER_CONFIG)
    marks = tmp_path / "marks"
    marks.mkdir()
    client = manager.client(reactor)
    try:
        # The manager's own token is not needed: the worker token grants the worker routes only.
        token = (manager.data_dir / "worker.token").read_text().strip()
        assert (await client.get("rest/v1/jobs/", token=token)).code == 401

        # Long jobs (longer than timeout + liveness period: one left running on w1 would overlap
        # its rerun on w2) go to w1 alone, taking three of its four cores; then w2 joins, and
        # 200 short jobs run on both.
        longs = [{"cmd": job_command(marks, i, LONG), "cpus": 1, "retries": 3, "rep_grp": "long"} for i in range(3)]
        shorts = [{"cmd": job_command(marks, i, 0.05), "cpus": 1, "retries": 3, "rep_grp": "short"}
                  for i in range(3, 203)]
        await client.add_jobs(longs)

        async def longs_on_w1() -> Any:
            jobs = await client.jobs(state="running")
            return len([job for job in jobs if job["Host"] == "w1" and job["RepGroup"] == "long"]) == 3

        await until(reactor, longs_on_w1, timeout=30)
        w2 = await make_daemon(*worker_args, "--worker-name", "w2", name="w2", config=WORKER_CONFIG)
        await client.add_jobs(shorts)
        # A Flamenco frame task: one job per chunk of two frames, printing Blender's "Fra:N".
        f = marks / "frames{frame_start}"
        render = (f'echo "S $(date +%s.%N)" >> {f}; for n in $(seq {{frame_start}} {{frame_end}}); do echo Fra:$n; '
                  f'sleep 0.3; done; echo "E $(date +%s.%N)" >> {f}')
        reply = await client.post("tasks", {"task_id": 7, "type": "frames", "parser": "frames",
                                            "settings": {"command": render, "frames": "1-6", "chunk_size": 2}})
        assert reply.code == 202 and reply.json()["frame_end"] == 6, reply

        async def some_done_on_w1() -> Any:
            jobs = (await client.get("rest/v1/jobs/short", params={"search": "true"})).json()
            return len([job for job in jobs if job["State"] == "complete" and job["Host"] == "w1"]) >= 10

        await until(reactor, some_done_on_w1, timeout=30)
        w1.crash()
        killed_at = time.time()
        lost_keys = [job["Key"] for job in await client.jobs(state="running") if job["Host"] == "w1"]
        assert len(lost_keys) >= 3

        async def all_complete() -> Any:
            reply = await client.get("rest/v1/jobs/")
            return reply.code == 200 and reply.json() == []

        # The jobs w1 held finish on w2 within the timeout plus one liveness period (plus their
        # own run and a few heartbeats' worth of pulling).
        async def lost_done_elsewhere() -> Any:
            reply = await client.get("rest/v1/jobs/" + ",".join(lost_keys))
            jobs = reply.json()
            return all(job["State"] == "complete" and job["Host"] == "w2" for job in jobs) and jobs

        done = await until(reactor, lost_done_elsewhere, timeout=60)
        finished_at = time.time()
        print(f"w1's jobs finished on w2 {finished_at - killed_at:.1f}s after the kill")
        assert finished_at - killed_at < TIMEOUT + CHECK + LONG + 2.0, finished_at - killed_at
        assert all(job["Attempts"] >= 2 for job in done)

        await until(reactor, all_complete, timeout=90)
        task = (await client.get("tasks/7")).json()
        assert task["status"] == "completed" and task["frame_current"] == 6, task
        workers = (await client.get("workers")).json()
        assert workers["w1"]["connection"] == "offline" and workers["w2"]["connection"] == "online"
        servers = (await client.get("rest/v1/servers/")).json()
        assert [server["Name"] for server in servers] == ["w1"] and servers[0]["IsBad"] is True

        # Every job ran to its end; no job ever started again before its earlier run had ended,
        # except a run cut short on w1 (a start without an end, before the kill).
        for path in [marks / f"job{i}" for i in range(203)] + [marks / f"frames{n}" for n in (1, 3, 5)]:
            runs = runs_of(path)
            i = path.name
            assert runs[-1][0] == "E", (i, runs)
            open_start = None
            for mark, at in runs:
                if mark == "S":
                    if open_start is not None:
                        assert open_start < killed_at <= at + 0.5, (i, runs)  # the killed run
                    open_start = at
                else:
                    assert open_start is not None, (i, runs)
                    open_start = None
        hosts = {job["Host"] for job in (await client.get("rest/v1/jobs/short", params={"search": "true"})).json()}
        assert hosts == {"w1", "w2"}
    finally:
        await client.close()
    assert await w2.stop(reactor) == 0, w2.log()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_the_manager_restarts_mid_run_and_no_job_is_lost_or_run_twice(
        make_daemon: Any, reactor: Any, tmp_path: Path) -> None:
    # A timeout long enough for the manager to come back before its workers stop their jobs
    # (they stop them once unreachable for about as long as a lease lasts: here 54.5 s, ample
    # for a restart on a loaded machine). No worker goes silent here, so it costs no time.
    config = MANAGER_CONFIG.replace(f"timeout = {TIMEOUT}", "timeout = 60")
    manager = await make_daemon("--port", str(free_port()), name="manager", config=config)
    worker_args = ["--manager", manager.url, "--manager-ca", str(manager.data_dir / "ca.pem"),
                   "--manager-token-file", str(manager.data_dir / "worker.token")]
    await make_daemon(*worker_args, "--worker-name", "w1", name="w1", config=WORKER_CONFIG)
    await make_daemon(*worker_args, "--worker-name", "w2", name="w2", config=WORKER_CONFIG)
    marks = tmp_path / "marks"
    marks.mkdir()
    n = 40
    client = manager.client(reactor)
    try:
        await client.add_jobs([{"cmd": job_command(marks, i, 1.5), "cpus": 1, "retries": 3} for i in range(n)])
        # A job with behaviours: they run on the worker that ran it, in its directory.
        behaved = tmp_path / "behaved"
        await client.add_jobs([{"cmd": "echo out > file", "cpus": 1, "rep_grp": "behaved",
                                "on_success": [{"run": f"cat file >> {behaved}; pwd >> {behaved}"}],
                                "on_exit": [{"cleanup": True}]}])

        async def some_running_and_done() -> Any:
            running = await client.jobs(state="running")
            done = [path for path in marks.iterdir() if runs_of(path)[-1:] and runs_of(path)[-1][0] == "E"]
            return len(running) >= 4 and len(done) >= 4 and running

        running = await until(reactor, some_running_and_done, timeout=60)
        ids = {name: w["id"] for name, w in (await client.get("workers")).json().items()}
        await client.close()
        manager.crash()  # kill -9 mid-run: nothing in memory survives
        await manager.start(reactor)
        client = manager.client(reactor)

        # The jobs the workers ran carry on there under their first attempt.
        after = {job["Key"]: job for job in await client.jobs(",".join(job["Key"] for job in running))}
        assert all(job["State"] in ("reserved", "running", "complete") for job in after.values()), \
            [(job["State"], job["FailReason"], job["Attempts"], job["Host"]) for job in after.values()
             if job["State"] not in ("reserved", "running", "complete")]

        async def all_complete() -> Any:
            reply = await client.get("rest/v1/jobs/")
            return reply.code == 200 and reply.json() == []

        await until(reactor, all_complete, timeout=90)
        for i in range(n):
            assert [mark for mark, _ in runs_of(marks / f"job{i}")] == ["S", "E"], i  # run once, to its end
        for job in await client.jobs(",".join(job["Key"] for job in running)):
            assert job["State"] == "complete" and job["Attempts"] == 1 and job["Host"] in ("w1", "w2"), job
        lines = behaved.read_text().split()
        assert lines[0] == "out" and len(lines) == 2 and not Path(lines[1]).exists(), lines  # ran once; cleaned up
        # The workers kept their Flamenco ids.
        workers = (await client.get("workers")).json()
        assert {name: w["id"] for name, w in workers.items()} == ids
        assert all(w["connection"] == "online" for w in workers.values())
        assert (await client.get(f"workers/{ids['w1']}")).json()["hostname"] == "w1"
    finally:
        await client.close()
