"""Job queue, part 2, against the real daemon: retries, dependencies, priorities, limits, limit
groups, behaviours, lost jobs, and the endpoints beyond wr's REST."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
import pytest_twisted

from tests.harness import until

pytestmark = pytest.mark.timeout(120)

FAST = """
[jobs]
retry_base = 0.2
retry_jitter = 0
sample_interval = 0.2
kill_grace = 1
"""


async def states(client, ids):
    return {job["Cmd"]: job for job in await client.jobs(ids)}


def all_in(jobs, *wanted):
    return jobs and all(job["State"] in wanted for job in jobs.values())


@pytest_twisted.ensureDeferred
async def test_retries_with_back_off_then_buried(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=FAST)
    async with daemon.client(reactor) as client:
        [job] = await client.add_jobs([{"cmd": "echo try; exit 3", "retries": 2, "rep_grp": "retry"}])
        seen = set()

        async def buried():
            [job] = await client.jobs("retry")
            seen.add(job["State"])
            return job if job["State"] == "buried" else None

        job = await until(reactor, buried, every=0.02)
        assert job["Attempts"] == 3 and job["Exitcode"] == 3
        assert job["FailReason"] == "command exited non-zero"
        assert "delayed" in seen
        # A user retry renews the retries: three more attempts.
        reply = await client.post("rest/v1/jobs/retry/retry")
        assert reply.code == 200 and [j["Key"] for j in reply.json()] == [job["Key"]]
        job = await until(reactor, lambda: _attempts_at_least(client, "retry", 6))
        assert job["State"] == "buried"


async def _attempts_at_least(client, ids, n):
    [job] = await client.jobs(ids)
    return job if job["Attempts"] >= n and job["State"] == "buried" else None


@pytest_twisted.ensureDeferred
async def test_a_chain_of_three_runs_in_order_and_live_dependencies_rerun(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=FAST)
    order = tmp_path / "order"
    async with daemon.client(reactor) as client:
        await client.add_jobs([
            {"cmd": f"echo third >> {order}", "dep_grps": ["c"], "deps": ["b"]},
            {"cmd": f"sleep 0.3; echo second >> {order}", "dep_grps": ["b"], "deps": ["a"]},
            {"cmd": f"sleep 0.3; echo first >> {order}", "dep_grps": ["a"]},
        ], rep_grp="chain")
        jobs = await states(client, "chain")
        assert jobs[f"echo third >> {order}"]["State"] == "dependent"
        assert jobs[f"echo third >> {order}"]["Dependencies"] == ["b"]
        await until(reactor, lambda: _all_complete(client, "chain", 3))
        assert order.read_text().split() == ["first", "second", "third"]

        # wr's live dependencies: a new job in group "a" re-runs what waited for it, recursively.
        await client.add_jobs([{"cmd": f"echo again >> {order}", "dep_grps": ["a"]}], rep_grp="chain")
        await until(reactor, lambda: _all_complete(client, "chain", 4))
        assert order.read_text().split()[3:] == ["again", "second", "third"]


async def _all_complete(client, ids, n):
    jobs = await client.jobs(ids)
    return len(jobs) == n and all(job["State"] == "complete" for job in jobs)


@pytest_twisted.ensureDeferred
async def test_cycles_are_refused_and_dependants_protect_their_dependencies(make_daemon, reactor):
    daemon = await make_daemon(config=FAST + "max_cores = 1\nzero_core_slots = 0\n")
    async with daemon.client(reactor) as client:
        reply = await client.post("rest/v1/jobs/", [
            {"cmd": "true 1", "dep_grps": ["p"], "deps": ["q"]},
            {"cmd": "true 2", "dep_grps": ["q"], "deps": ["p"]},
        ])
        assert reply.code == 400 and "cycle" in reply.json()["error"]
        assert await client.jobs() == []
        reply = await client.post("rest/v1/jobs/", [{"cmd": "true 3", "dep_grps": ["s"], "deps": ["s"]}])
        assert reply.code == 400
        # Nothing can run (no zero-core slots): both stay queued.
        await client.add_jobs([
            {"cmd": "true base", "dep_grps": ["base"], "rep_grp": "base"},
            {"cmd": "true top", "deps": ["base"], "rep_grp": "top"},
        ])
        reply = await client.delete("rest/v1/jobs/base", params={"state": "deletable"})
        assert reply.code == 409 and "depend" in reply.json()["error"]
        assert len(await client.jobs()) == 2
        reply = await client.delete("rest/v1/jobs/base,top", params={"state": "deletable"})
        assert reply.code == 200 and sorted(j["State"] for j in reply.json()) == ["deleted", "deleted"]
        assert await client.jobs() == []


@pytest_twisted.ensureDeferred
async def test_priority_order_on_a_one_core_limit(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=FAST + "max_cores = 1\n")
    order = tmp_path / "order"
    async with daemon.client(reactor) as client:
        await client.post("rest/v1/manager/pause")
        jobs = [{"cmd": f"echo {p} >> {order}", "priority": p, "cpus": 1} for p in (5, 200, 0, 50, 255)]
        await client.add_jobs(jobs, rep_grp="prio")
        info = (await client.post("rest/v1/manager/resume")).json()
        assert info["Mode"] == "started"
        await until(reactor, lambda: _all_complete(client, "prio", 5))
    assert order.read_text().split() == ["255", "200", "50", "5", "0"]


@pytest_twisted.ensureDeferred
async def test_fifo_within_one_priority(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=FAST + "max_cores = 1\n")
    order = tmp_path / "order"
    async with daemon.client(reactor) as client:
        await client.post("rest/v1/manager/pause")
        for n in range(4):
            await client.add_jobs([{"cmd": f"echo {n} >> {order}", "cpus": 1}], rep_grp="fifo")
        await client.post("rest/v1/manager/resume")
        await until(reactor, lambda: _all_complete(client, "fifo", 4))
    assert order.read_text().split() == ["0", "1", "2", "3"]


@pytest_twisted.ensureDeferred
async def test_time_limit_kills_the_process_group(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=FAST + "time_margin = 0\n")
    pids = tmp_path / "pids"
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": f"sleep 60 & echo $! > {pids}; sleep 60", "time": "1s", "rep_grp": "slow"}])
        [job] = await until(reactor, lambda: _state(client, "slow", "buried"))
        assert job["FailReason"] == "command used too much time"
        assert job["Walltime"] < 10
        child = int(pids.read_text())
        await until(reactor, _async(lambda: not psutil.pid_exists(child) or
                                    psutil.Process(child).status() == psutil.STATUS_ZOMBIE), timeout=5)


@pytest_twisted.ensureDeferred
async def test_memory_limit_kills_and_a_retry_asks_for_more(make_daemon, reactor):
    daemon = await make_daemon(config=FAST + "memory_margin = 0\n")
    hog = f"{sys.executable} -c \"import time; b = bytearray(300 * 1024 * 1024); time.sleep(60)\""
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": hog, "memory": "50M", "retries": 1, "rep_grp": "hog"}])

        async def retried():
            [job] = await client.jobs("hog")
            return job if job["Attempts"] >= 1 and job["State"] in ("delayed", "ready", "running") \
                and job["FailReason"] == "command used too much RAM" else None

        job = await until(reactor, retried, timeout=30, every=0.02)
        assert job["ExpectedRAM"] >= 1000  # twice the peak, at least the peak + 1000 MB
        assert job["PeakRAM"] >= 50
        await client.delete("rest/v1/jobs/hog", params={"state": "running"})


@pytest_twisted.ensureDeferred
async def test_limit_groups_cap_concurrency(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=FAST)
    log, gate = tmp_path / "log", tmp_path / "gate"
    async with daemon.client(reactor) as client:
        # Each job holds its slot until the gate opens, so the two allowed are surely both running
        # when it does (no reliance on how fast a loaded host starts them).
        jobs = [{"cmd": f"echo + >> {log}; while [ ! -e {gate} ]; do sleep 0.02; done; echo - >> {log}; true {n}",
                 "limit_grps": ["lg:2"]} for n in range(5)]
        await client.add_jobs(jobs, rep_grp="limited")

        async def two_running() -> bool:
            return log.exists() and log.read_text().split() == ["+", "+"]

        await until(reactor, two_running)
        states = sorted(job["State"] for job in await client.jobs("limited"))
        assert states == ["ready"] * 3 + ["running"] * 2
        gate.touch()
        await until(reactor, lambda: _all_complete(client, "limited", 5), timeout=30)
    running = peak = 0
    for mark in log.read_text().split():
        running += 1 if mark == "+" else -1
        peak = max(peak, running)
    assert peak == 2


@pytest_twisted.ensureDeferred
async def test_behaviours_run_cleanup_and_remove(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=FAST)
    marks = tmp_path / "marks"
    async with daemon.client(reactor) as client:
        await client.add_jobs([
            {"cmd": "echo data > out.txt", "rep_grp": "ok",
             "on_success": [{"run": f"cat out.txt >> {marks}; echo success >> {marks}"}],
             "on_failure": [{"run": f"echo wrong >> {marks}"}],
             "on_exit": [{"run": f"echo exit >> {marks}"}, {"cleanup": True}]},
            {"cmd": "exit 2", "rep_grp": "bad",
             "on_failure": [{"run": f"echo failure >> {marks}"}, {"remove": True}]},
            {"cmd": "echo x > kept.txt; exit 4", "rep_grp": "all", "on_failure": [{"cleanup_all": True}]},
        ])
        [ok] = await until(reactor, lambda: _state(client, "ok", "complete"))
        assert ok["Behaviours"] and "on_success" in ok["Behaviours"]
        assert not os.path.exists(ok["CwdBase"] + ok["Cwd"])  # cleaned up
        await until(reactor, _async(lambda: "failure" in _read(marks)))
        await until(reactor, lambda: _gone(client, "bad"))
        [failed] = await until(reactor, lambda: _state(client, "all", "buried"))
        assert not os.path.exists(failed["CwdBase"] + failed["Cwd"])  # removed, files and all
    assert _read(marks).split() == ["data", "success", "exit", "failure"] or \
        sorted(_read(marks).split()) == sorted(["data", "success", "exit", "failure"])


async def _gone(client, ids):
    return await client.jobs(ids) == []


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _async(predicate):
    async def check():
        return predicate()
    return check


async def _state(client, ids, state):
    jobs = await client.jobs(ids)
    return jobs if jobs and all(job["State"] == state for job in jobs) else None


@pytest_twisted.ensureDeferred
async def test_a_lost_job_after_kill_9_is_confirmed_and_retried(make_daemon, reactor, tmp_path):
    config = FAST
    daemon = await make_daemon(config=config)
    pidfile = tmp_path / "pid"
    done = tmp_path / "done"
    cmd = f"if [ -e {pidfile} ]; then echo second > {done}; else echo $$ > {pidfile}; sleep 60; fi"
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": cmd, "retries": 1, "rep_grp": "lost"}])
        await until(reactor, _async(lambda: pidfile.exists() and pidfile.read_text().strip()))
    daemon.crash()
    # While the daemon is down the job dies without an exit status: it is lost.
    os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    daemon = await make_daemon(config=config)
    async with daemon.client(reactor) as client:
        [job] = await until(reactor, lambda: _state(client, "lost", "lost"))
        assert job["FailReason"] == "lost contact with runner"
        reply = await client.delete("rest/v1/jobs/lost", params={"state": "lost"})
        assert reply.code == 202 and len(reply.json()) == 1
        [job] = await until(reactor, lambda: _state(client, "lost", "complete"))
        assert job["Attempts"] == 2
    assert done.read_text().strip() == "second"


@pytest_twisted.ensureDeferred
async def test_env_is_exactly_the_given_environment(make_daemon, reactor):
    daemon = await make_daemon(config=FAST)
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": "env | sort", "env": ["A=1", "B=two words"], "rep_grp": "env"}])
        [job] = await until(reactor, lambda: _state(client, "env", "complete"))
        [job] = await client.jobs("env", std="true", env="true")
        assert job["Env"] == ["A=1", "B=two words"]
        names = {line.split("=", 1)[0] for line in job["StdOut"].splitlines()}
        assert {"A", "B"} <= names
        assert names - {"A", "B", "TMPDIR", "PWD", "SHLVL", "_", "OLDPWD"} == set()


@pytest_twisted.ensureDeferred
async def test_upload_paths(make_daemon, reactor, tmp_path):
    daemon = await make_daemon()
    async with daemon.client(reactor) as client:
        reply = await client.put("rest/v1/upload/", data=b"hello")
        assert reply.code == 200
        stored = Path(reply.json()["path"])
        assert stored.read_bytes() == b"hello" and str(stored).startswith(str(daemon.data_dir / "uploads"))
        assert (await client.put("rest/v1/upload/", data=b"hello")).json()["path"] == str(stored)
        target = tmp_path / "sub" / "file"
        reply = await client.put("rest/v1/upload/", data=b"x", params={"path": str(target)})
        assert reply.code == 200 and target.read_bytes() == b"x"
        assert oct(target.stat().st_mode & 0o777) == "0o600"
        for bad in ("/etc/wmgr-should-not-exist", "~/../../etc/passwd-wmgr", "relative/path", "/tmp/../etc/wmgr-x", "/tmp"):
            reply = await client.put("rest/v1/upload/", data=b"x", params={"path": bad})
            assert reply.code == 400, bad
            assert "error" in reply.json()
        assert not os.path.exists("/etc/wmgr-should-not-exist")


@pytest_twisted.ensureDeferred
async def test_warnings_are_removed_once_read_and_servers(make_daemon, reactor):
    daemon = await make_daemon(config=FAST)
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": "true huge", "cpus": 4096, "rep_grp": "huge"}])
        [job] = await until(reactor, lambda: _state(client, "huge", "buried"))
        assert job["FailReason"] == "resource requirements cannot be met"
        warnings = (await client.get("rest/v1/warnings/")).json()
        assert len(warnings) == 1 and set(warnings[0]) == {"Msg", "FirstDate", "LastDate", "Count"}
        assert warnings[0]["Count"] == 1
        assert (await client.get("rest/v1/warnings/")).json() == []
        assert (await client.get("rest/v1/servers/")).json() == []
        assert (await client.delete("rest/v1/servers/")).code == 400
        assert (await client.delete("rest/v1/servers/", params={"id": "nope"})).code == 404


@pytest_twisted.ensureDeferred
async def test_modify_queued_jobs(make_daemon, reactor):
    daemon = await make_daemon(config=FAST)
    async with daemon.client(reactor) as client:
        await client.post("rest/v1/manager/pause")
        assert (await client.get("rest/v1/info/")).json()["Mode"] == "paused"
        [job] = await client.add_jobs([{"cmd": "true patched", "rep_grp": "patch"}])
        reply = await client.patch(f"rest/v1/jobs/{job['Key']}", {"priority": 9, "memory": "2G", "retries": 4})
        assert reply.code == 200
        [changed] = reply.json()
        assert changed["ExpectedRAM"] == 2048
        assert (await client.patch(f"rest/v1/jobs/{job['Key']}", {"cmd": "other"})).code == 400
        assert (await client.patch(f"rest/v1/jobs/{job['Key']}", {"memory": "lots"})).code == 400
        assert (await client.patch(f"rest/v1/jobs/{job['Key']}", ["not", "an", "object"])).code == 400
        [again] = await client.jobs(job["Key"])
        assert again["ExpectedRAM"] == 2048 and again["State"] == "ready"
        await client.post("rest/v1/manager/resume")
        await until(reactor, lambda: _state(client, "patch", "complete"))
        assert (await client.post("rest/v1/manager/sideways")).code == 404


@pytest_twisted.ensureDeferred
async def test_drain_stops_the_daemon_once_jobs_end(make_daemon, reactor):
    daemon = await make_daemon(config=FAST)
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": "sleep 0.5", "rep_grp": "drain"}])
        await until(reactor, lambda: _state(client, "drain", "running"))
        info = (await client.post("rest/v1/manager/drain")).json()
        assert info["Mode"] == "draining"
    assert await daemon.wait(reactor, 20) == 0


@pytest_twisted.ensureDeferred
async def test_history_is_pruned_and_counters_group_completed_jobs(make_daemon, reactor):
    daemon = await make_daemon(config=FAST + "[history]\nmax_count = 3\nprune_interval = 0.3\n")
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": f"true {n}"} for n in range(6)], rep_grp="hist")
        await until(reactor, lambda: _all_complete_at_most(client, "hist", 3), timeout=20)
        [example] = await client.jobs("hist", limit="1")
        assert example["State"] == "complete" and example["Similar"] == 2


async def _all_complete_at_most(client, ids, n):
    jobs = await client.jobs(ids)
    return len(jobs) == n and all(job["State"] == "complete" for job in jobs)


@pytest_twisted.ensureDeferred
async def test_learned_resources_per_req_grp_and_override(make_daemon, reactor):
    daemon = await make_daemon(config=FAST)
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": f"sleep 0.{n} && true learn {n}", "req_grp": "learn"} for n in range(1, 4)],
                              rep_grp="teach", memory="4G", time="2h")
        await until(reactor, lambda: _all_complete(client, "teach", 3))
        await client.post("rest/v1/manager/pause")
        jobs = await client.add_jobs([
            {"cmd": "true learned 0", "override": 0},
            {"cmd": "true learned 1", "override": 1},
            {"cmd": "true learned 2", "override": 2},
        ], req_grp="learn", rep_grp="learned", memory="2G", time="1h")
        by_override = {job["Cmd"][-1]: job for job in jobs}
        # Learned: the 95th percentile of the runs, rounded up to 100 MB and to the second.
        assert by_override["0"]["ExpectedRAM"] == 100 and by_override["0"]["ExpectedTime"] == 1
        assert by_override["1"]["ExpectedRAM"] == 2048 and by_override["1"]["ExpectedTime"] == 3600
        assert by_override["2"]["ExpectedRAM"] == 2048 and by_override["2"]["ExpectedTime"] == 3600
