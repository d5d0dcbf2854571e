"""The wr job API (/rest/v1/jobs/) against the real daemon: the seed's Quick Start, keys, checks of
job definitions, duplicates and reruns, GET's parameters, DELETE, and the environment jobs run in.

Jobs that must stay queued are held back by a "blocker": a job waiting for a gate file that takes
the only core of a daemon configured with `[jobs] max_cores = 1`. Jobs that must stay running wait
for a gate file of their own. Nothing sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import farmhash
import psutil
import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater

pytestmark = pytest.mark.timeout(120)

JOBS = "rest/v1/jobs/"
UNSET = -62135596800  # wr's time.Time{} in unix seconds: "not started" / "not ended"
FINAL = ("complete", "buried", "lost")

# Exactly the fields of wr's status object (JStatus) that the issue lists.
STATUS_FIELDS = {
    "Key", "RepGroup", "DepGroups", "Dependencies", "Cmd", "State", "Cwd", "CwdBase", "HomeChanged",
    "Behaviours", "Mounts", "MonitorDocker", "WithDocker", "WithSingularity", "ContainerMounts",
    "ExpectedRAM", "ExpectedTime", "RequestedDisk", "Cores", "PeakRAM", "OtherRequests", "Exited",
    "Exitcode", "FailReason", "Pid", "Host", "HostID", "HostIP", "Walltime", "CPUtime", "Started",
    "Ended", "StdErr", "StdOut", "Env", "Attempts", "Similar",
}

ONE_CORE = "[jobs]\nmax_cores = 1\n"


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(tmp_path: Path) -> Any:
    """Jobs outlive their daemon by design, so a test that fails before opening its gates would
    leave them running: at the end of each test, kill the process group of every job started by
    this test's daemons (their command line names a run file under tmp_path)."""
    yield
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if len(cmdline) > 5 and cmdline[3] == "wmgr-job" and any(str(tmp_path) in arg for arg in cmdline):
            try:
                os.killpg(proc.info["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# -- helpers ---------------------------------------------------------------------------------------


def wr_key(cmd: str, cwd: Optional[str] = None) -> str:
    """wr's key, computed the way a wr client computes it."""
    essence = cmd + "."
    if cwd is not None:
        essence = cwd + "." + essence
    return "%016x%016x" % farmhash.fingerprint128(essence)


async def poll(reactor: Any, check: Callable[[], Awaitable[tuple[bool, Any]]], timeout: float = 15.0,
               what: str = "a condition") -> Any:
    """Call `check` (-> (done, value)) every 50 ms until done; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        done, value = await check()
        if done:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {value!r}"[:4000])
        await deferLater(reactor, 0.05, lambda: None)


async def wait_jobs(client: Any, reactor: Any, ids: str, states: tuple[str, ...] = FINAL, count: Optional[int] = None,
                    timeout: float = 15.0, **params: Any) -> list[dict[str, Any]]:
    """GET jobs/<ids> until every job shown is in one of `states` (and there are `count` of them)."""

    async def check() -> tuple[bool, Any]:
        jobs = await client.jobs(ids, **params)
        ok = bool(jobs) and all(j["State"] in states for j in jobs) and (count is None or len(jobs) == count)
        return ok, [(j["Cmd"][:60], j["State"], j["FailReason"]) for j in jobs] if not ok else jobs

    return await poll(reactor, check, timeout, f"jobs {ids} to reach {states}")


async def wait_file(reactor: Any, path: Path, timeout: float = 15.0) -> str:
    async def check() -> tuple[bool, Any]:
        text = path.read_text() if path.exists() else ""
        return text.endswith("\n"), text

    return (await poll(reactor, check, timeout, f"{path} to be written")).strip()


async def wait_settled(reactor: Any, daemon: Any, key: str, timeout: float = 10.0) -> None:
    """Wait until the end of a job's run is committed: the daemon removes the run's files (under
    DIR/run/) only then, and only then does a completed job leave the live queue."""

    async def check() -> tuple[bool, Any]:
        left = [p.name for p in (daemon.data_dir / "run").glob(key + ".*")]
        return not left, left

    await poll(reactor, check, timeout, f"the end of job {key} to be committed")


def gated(gate: Path, tag: str) -> str:
    """A command that runs until `gate` exists (unique per tag, so each is its own job)."""
    return f"while [ ! -e {gate} ]; do sleep 0.05; done; echo {tag}"


def alive(pid: int) -> bool:
    """Whether a process still runs. Orphans are not reaped on every machine (a PID 1 that does not
    reap leaves zombies), so a zombie counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def error_of(reply: Any) -> str:
    assert reply.headers.getRawHeaders(b"content-type", [b""])[0].startswith(b"application/json"), reply
    body = reply.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


async def start_blocker(client: Any, reactor: Any, gate: Path) -> dict[str, Any]:
    """A job that takes a whole core until `gate` exists, once it is running."""
    cmd = gated(gate, "blocker")
    await client.add_jobs([{"cmd": cmd, "cpus": 1, "memory": "10M", "rep_grp": "blocker"}])
    (job,) = await wait_jobs(client, reactor, wr_key(cmd), ("running",))
    return job


# -- the seed's Quick Start ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_quick_start_as_written(client, reactor):
    """The seed's Quick Start with `sleep 1` for `sleep 5`: the same request, the same replies."""
    first, second = "sleep 1 && echo mymsg && false", "sleep 1"
    body = [{"cmd": first, "memory": "5M", "cpus": 1}, {"cmd": second, "cpus": 1}]
    before = time.time()
    reply = await client.post(JOBS, body, params={"rep_grp": "myid", "cpus": "2", "memory": "3G", "time": "5s"})
    assert reply.code == 201, reply
    assert reply.headers.getRawHeaders(b"content-type")[0].startswith(b"application/json")
    added = reply.json()
    assert [j["Key"] for j in added] == [wr_key(first), wr_key(second)]
    for job in added:
        assert set(job) == STATUS_FIELDS, set(job) ^ STATUS_FIELDS
        assert job["State"] in ("ready", "running")
    # The job's own cpus (1) win over the query default (2), as wr's JobViaJSON.Convert does. The
    # seed's sample reply shows Cores 2 for the first job, which contradicts its own request
    # ("cpus":1) and wr's code; the memory of the same job (5M over the 3G default) shows the rule.
    expected_common = {
        "RepGroup": "myid", "DepGroups": None, "Dependencies": None, "CwdBase": "/tmp",
        "HomeChanged": False, "Behaviours": "", "Mounts": "", "MonitorDocker": "", "WithDocker": "",
        "WithSingularity": "", "ContainerMounts": "", "ExpectedTime": 5, "RequestedDisk": 0,
        "OtherRequests": None, "Cores": 1, "HostID": "", "Env": None, "Similar": 0, "StdErr": "", "StdOut": "",
    }
    for job, cmd, ram in zip(added, (first, second), (5, 3072)):
        assert job["Cmd"] == cmd
        assert job["ExpectedRAM"] == ram
        assert {k: job[k] for k in expected_common} == expected_common
        if job["State"] == "ready":
            assert {k: job[k] for k in ("Cwd", "PeakRAM", "Exited", "Exitcode", "FailReason", "Pid", "Host",
                                        "HostIP", "Walltime", "CPUtime", "Started", "Ended", "Attempts")} == {
                "Cwd": "", "PeakRAM": 0, "Exited": False, "Exitcode": 0, "FailReason": "", "Pid": 0, "Host": "",
                "HostIP": "", "Walltime": 0, "CPUtime": 0, "Started": UNSET, "Ended": UNSET, "Attempts": 0,
            }

    # Both are incomplete for now.
    assert {j["Key"] for j in await client.jobs()} == {wr_key(first), wr_key(second)}

    done = await wait_jobs(client, reactor, "myid", count=2, std="true")
    by_cmd = {j["Cmd"]: j for j in done}
    failed, ok = by_cmd[first], by_cmd[second]
    assert (failed["State"], failed["Exited"], failed["Exitcode"], failed["FailReason"]) == (
        "buried", True, 1, "command exited non-zero")
    assert failed["StdOut"] == "mymsg" and failed["StdErr"] == ""
    assert (ok["State"], ok["Exited"], ok["Exitcode"], ok["FailReason"]) == ("complete", True, 0, "")
    assert ok["StdOut"] == "" and ok["StdErr"] == ""

    # GET /rest/v1/jobs/: only the incomplete one, and without std no output.
    incomplete = await client.jobs()
    assert [j["Key"] for j in incomplete] == [wr_key(first)]
    assert incomplete[0]["StdOut"] == "" and incomplete[0]["State"] == "buried"
    assert all(j["StdOut"] == "" for j in await client.jobs("myid"))

    # By keys, comma-separated: both, completed one included, in the order asked.
    by_keys = await client.jobs(f"{wr_key(first)},{wr_key(second)}")
    assert [j["Key"] for j in by_keys] == [wr_key(first), wr_key(second)]
    assert [j["State"] for j in by_keys] == ["buried", "complete"]

    hostname = socket.gethostname()
    for job in by_keys:
        assert set(job) == STATUS_FIELDS
        assert job["Pid"] > 0 and job["Host"] == hostname
        ipaddress.ip_address(job["HostIP"])
        assert int(before) <= job["Started"] <= job["Ended"] <= time.time() + 1
        assert 0.9 <= job["Walltime"] < 5, job["Walltime"]
        assert isinstance(job["CPUtime"], float) and job["CPUtime"] >= 0
        assert isinstance(job["PeakRAM"], int) and job["PeakRAM"] >= 0
        assert job["Attempts"] == 1 and job["Exited"] is True
        key = job["Key"]
        assert re.fullmatch(rf"/wr_cwd/{key[0]}/{key[1]}/{key[2]}/{key[3:]}[0-9a-f]+/cwd", job["Cwd"]), job["Cwd"]
        # A job without behaviours leaves no directory behind: wr_cwd directories do not pile up
        # (issue 9); the ones that ask to keep theirs are in test_queue.py.
        workdir = Path("/tmp" + job["Cwd"])

        async def removed(workdir: Path = workdir) -> tuple[bool, Any]:
            return not workdir.parent.exists(), str(workdir.parent)

        await poll(reactor, removed, what=f"{workdir.parent} to be removed")  # by its launcher, after the end
    assert by_keys[0]["Pid"] != by_keys[1]["Pid"]


SEED_REPLY = json.loads(
    '[{"Key":"58cef10e7a340c3b7fa09ea304a3cb98","RepGroup":"myid","DepGroups":null,"Dependencies":null,'
    '"Cmd":"sleep 5 && echo mymsg && false","State":"ready","Cwd":"","CwdBase":"/tmp","HomeChanged":false,'
    '"Behaviours":"","Mounts":"","ExpectedRAM":5,"ExpectedTime":5,"RequestedDisk":0,"OtherRequests":null,'
    '"Cores":2,"PeakRAM":0,"Exited":false,"Exitcode":0,"FailReason":"","Pid":0,"Host":"","HostID":"",'
    '"HostIP":"","Walltime":0,"CPUtime":0,"Started":-62135596800,"Ended":-62135596800,"StdErr":"",'
    '"StdOut":"","Env":null,"Attempts":0,"Similar":0},{"Key":"ea4266bc0fc7dd493caeb2fff1963e4a",'
    '"RepGroup":"myid","DepGroups":null,"Dependencies":null,"Cmd":"sleep 5","State":"ready","Cwd":"",'
    '"CwdBase":"/tmp","HomeChanged":false,"Behaviours":"","Mounts":"","ExpectedRAM":3072,"ExpectedTime":5,'
    '"RequestedDisk":0,"OtherRequests":null,"Cores":1,"PeakRAM":0,"Exited":false,"Exitcode":0,'
    '"FailReason":"","Pid":0,"Host":"","HostID":"","HostIP":"","Walltime":0,"CPUtime":0,'
    '"Started":-62135596800,"Ended":-62135596800,"StdErr":"","StdOut":"","Env":null,"Attempts":0,"Similar":0}]'
)


@pytest_twisted.ensureDeferred
async def test_seed_request_gives_the_seed_reply_and_keys(make_daemon, reactor, tmp_path):
    """The seed's own request, held in the queue (the only core is taken): the 201 is the seed's
    reply field for field, keys included; the jobs can then be found by key and deleted."""
    daemon = await make_daemon(config=ONE_CORE)
    async with daemon.client(reactor) as client:
        gate = tmp_path / "gate"
        await start_blocker(client, reactor, gate)
        body = [{"cmd": "sleep 5 && echo mymsg && false", "memory": "5M", "cpus": 1}, {"cmd": "sleep 5", "cpus": 1}]
        reply = await client.post(JOBS, body, params={"rep_grp": "myid", "cpus": "2", "memory": "3G", "time": "5s"})
        assert reply.code == 201, reply
        expected = [dict(job, MonitorDocker="", WithDocker="", WithSingularity="", ContainerMounts="") for job in SEED_REPLY]
        expected[0]["Cores"] = 1  # see test_quick_start_as_written: the seed's sample contradicts its request here
        assert reply.json() == expected
        assert wr_key("sleep 5") == "ea4266bc0fc7dd493caeb2fff1963e4a"

        keys = "58cef10e7a340c3b7fa09ea304a3cb98,ea4266bc0fc7dd493caeb2fff1963e4a"
        found = await client.jobs(keys)
        assert [j["Key"] for j in found] == keys.split(",") and {j["State"] for j in found} == {"ready"}

        deleted = await client.delete(JOBS + "myid", params={"state": "deletable"})
        assert deleted.code == 200, deleted
        assert sorted((j["Key"], j["State"]) for j in deleted.json()) == [
            ("58cef10e7a340c3b7fa09ea304a3cb98", "deleted"), ("ea4266bc0fc7dd493caeb2fff1963e4a", "deleted")]
        assert await client.jobs(keys) == []
        gate.touch()
        await wait_jobs(client, reactor, "blocker", ("complete",))


@pytest_twisted.ensureDeferred
async def test_a_job_that_can_never_fit_is_buried(make_daemon, reactor):
    daemon = await make_daemon(config=ONE_CORE + "max_memory = 1G\n")
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": "echo too many cores", "cpus": 2},
                               {"cmd": "echo too much memory", "cpus": 1, "memory": "2G"}], rep_grp="huge")
        # A job that fits is not held up behind them.
        await client.add_jobs([{"cmd": "echo fits", "cpus": 1, "memory": "10M"}], rep_grp="fits")
        await wait_jobs(client, reactor, "fits", ("complete",))
        jobs = await wait_jobs(client, reactor, "huge", ("buried",), count=2, timeout=5)
        assert {j["FailReason"] for j in jobs} == {"resource requirements cannot be met"}
        assert all(j["Attempts"] == 0 and j["Pid"] == 0 for j in jobs)


# -- bad job definitions ---------------------------------------------------------------------------

GOOD = {"cmd": "echo good", "rep_grp": "badtest"}

BAD_REQUESTS = [
    # (what, body, query parameters, a word the reason must contain)
    ("missing cmd", [{"rep_grp": "badtest", "cwd": "/tmp"}], {}, "cmd"),
    ("empty cmd", [{"cmd": "", "rep_grp": "badtest"}], {}, "cmd"),
    ("cmd not a string", [{"cmd": ["echo", "x"], "rep_grp": "badtest"}], {}, "cmd"),
    ("memory without a unit", [dict(GOOD, memory="5")], {}, "memory"),
    ("memory not a number", [dict(GOOD, memory="lots")], {}, "memory"),
    ("memory as a JSON number", [dict(GOOD, memory=5)], {}, "memory"),
    ("time without a unit", [dict(GOOD, time="5")], {}, "time"),
    ("time with a day unit", [dict(GOOD, time="1d")], {}, "time"),
    ("priority over 255", [dict(GOOD, priority=256)], {}, "priority"),
    ("priority negative", [dict(GOOD, priority=-1)], {}, "priority"),
    ("retries negative", [dict(GOOD, retries=-1)], {}, "retries"),
    ("retries over 255", [dict(GOOD, retries=256)], {}, "retries"),
    ("override 3", [dict(GOOD, override=3)], {}, "override"),
    ("cpus negative", [dict(GOOD, cpus=-1)], {}, "cpus"),
    ("cpus not a number", [dict(GOOD, cpus="two")], {}, "cpus"),
    ("unknown property", [dict(GOOD, colour="blue")], {}, "colour"),
    ("env not a list", [dict(GOOD, env={"A": "1"})], {}, "env"),
    ("behaviour unknown", [dict(GOOD, on_exit=[{"explode": True}])], {}, "on_exit"),
    ("with_docker", [dict(GOOD, with_docker="ubuntu:latest")], {}, "with_docker"),
    ("with_singularity", [dict(GOOD, with_singularity="img.sif")], {}, "with_singularity"),
    ("mounts", [dict(GOOD, mounts=[{"Mount": "/tmp/m", "Targets": [{"Path": "bucket/dir"}]}])], {}, "mounts"),
    ("body an object, not an array", GOOD, {}, "array"),
    ("an array of strings", ["echo good"], {}, "object"),
    ("bad memory default", [GOOD], {"memory": "5"}, "memory"),
    ("bad priority default", [GOOD], {"priority": "300"}, "priority"),
    ("bad time default", [GOOD], {"time": "soon"}, "time"),
    ("unknown default", [GOOD], {"colour": "blue"}, "colour"),
    ("cmd as a default", [{"rep_grp": "badtest"}], {"cmd": "echo x"}, "cmd"),
    ("bad mounts default", [GOOD], {"mounts": "not json"}, "mounts"),
    ("env entry without =", [dict(GOOD, env=["NOEQUALS"])], {}, "env"),
    ("relative cwd", [dict(GOOD, cwd="relative/dir")], {}, "cwd"),
    ("NUL in cmd", [{"cmd": "echo a\x00b", "rep_grp": "badtest"}], {}, "cmd"),
    ("cloud_script that does not exist", [dict(GOOD, cloud_script="/no/such/script")], {}, "cloud_script"),
    ("a bad env among good jobs",
     [{"cmd": "echo good 1", "rep_grp": "badtest"}, {"cmd": "echo bad", "rep_grp": "badtest", "env": ["X"]}],
     {}, "env"),
    ("one bad job among good ones",
     [{"cmd": "echo good 1", "rep_grp": "badtest"}, {"cmd": "echo bad", "rep_grp": "badtest", "memory": "x"},
      {"cmd": "echo good 2", "rep_grp": "badtest"}], {}, "memory"),
]


@pytest_twisted.ensureDeferred
async def test_bad_job_definitions_get_400_with_a_reason_and_add_nothing(client, reactor):
    for what, body, params, word in BAD_REQUESTS:
        reply = await client.post(JOBS, body, params=params)
        assert reply.code == 400, (what, reply)
        reason = await error_of(reply)
        assert word.lower() in reason.lower(), (what, reason)
    for what, data in (("not JSON", b"[{cmd: echo}"), ("empty body", b""), ("truncated", b'[{"cmd":"echo good"')):
        reply = await client.request("POST", JOBS, data=data, headers={"Content-Type": "application/json"})
        assert reply.code == 400, (what, reply)
        assert "json" in (await error_of(reply)).lower(), what

    # Nothing was added: not queued, not run, not in any rep group, not findable by key.
    assert await client.jobs() == []
    for group in ("badtest", "manually_added"):
        assert await client.jobs(group) == [], group
    for cmd in ("echo good", "echo good 1", "echo good 2", "echo bad", "echo x"):
        assert await client.jobs(wr_key(cmd)) == [], cmd

    # The same daemon still takes good jobs (and values at the edges of their ranges).
    edge = dict(GOOD, priority=255, retries=255, override=2, cpus=0, memory="512K", time="1h30m")
    (added,) = await client.add_jobs([edge])
    assert added["ExpectedRAM"] == 1 and added["ExpectedTime"] == 5400 and added["Cores"] == 0


# -- duplicates and reruns -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_queued_key_returns_the_existing_job_and_completed_one_needs_rerun(daemon, client, reactor, tmp_path):
    gate, log = tmp_path / "gate", tmp_path / "runs.log"
    cmd = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo ran >> {log}"
    (first,) = await client.add_jobs([{"cmd": cmd, "rep_grp": "one", "memory": "10M"}])
    await wait_jobs(client, reactor, first["Key"], ("running",))

    # Same command again (other properties differ): the existing job, as it is now.
    reply = await client.post(JOBS, [{"cmd": cmd, "rep_grp": "two", "memory": "20M"}, {"cmd": "echo new 1"}])
    assert reply.code == 201
    again, new = reply.json()
    assert again["Key"] == first["Key"] and again["RepGroup"] == "one" and again["ExpectedRAM"] == 10
    assert again["State"] == "running" and again["Pid"] > 0
    assert new["Key"] == wr_key("echo new 1")
    assert await client.jobs("two") == []
    # The same command twice in one request is one job.
    await client.add_jobs([{"cmd": "echo twice"}, {"cmd": "echo twice"}], rep_grp="twice")
    assert len(await wait_jobs(client, reactor, "twice", ("complete",))) == 1

    # Requests for the same new command at the same moment: one job, run once. (It waits for the
    # gate so that it cannot complete, and so drop out of the replies, during the race.)
    racing = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo race >> {log}.race"
    replies = await gatherResults([ensureDeferred(client.post(JOBS, [{"cmd": racing, "rep_grp": f"race{i}"}]))
                                   for i in range(4)])
    assert {r.code for r in replies} == {201}
    assert [len(r.json()) for r in replies] == [1] * 4
    assert {r.json()[0]["Key"] for r in replies} == {wr_key(racing)}
    assert len({r.json()[0]["RepGroup"] for r in replies}) == 1

    gate.touch()
    (done,) = await wait_jobs(client, reactor, first["Key"], ("complete",))
    assert done["Attempts"] == 1 and log.read_text() == "ran\n"
    # (Re-adding a job whose end is still being committed is test_rerun_right_after_completion.)
    await wait_settled(reactor, daemon, first["Key"])
    await wait_jobs(client, reactor, wr_key(racing), ("complete",))
    assert Path(f"{log}.race").read_text() == "race\n"

    # Completed: adding it again does nothing and it is left out of the reply.
    reply = await client.post(JOBS, [{"cmd": cmd, "rep_grp": "three"}, {"cmd": "echo new 2"}])
    assert reply.code == 201
    assert [j["Key"] for j in reply.json()] == [wr_key("echo new 2")]
    await wait_jobs(client, reactor, wr_key("echo new 2"), ("complete",))
    assert (await client.jobs(first["Key"]))[0]["State"] == "complete"
    assert log.read_text() == "ran\n"

    # rerun=true: queued and run again.
    reply = await client.post(JOBS, [{"cmd": cmd, "rep_grp": "one"}], params={"rerun": "true"})
    assert reply.code == 201
    (rerun,) = reply.json()
    assert rerun["Key"] == first["Key"] and rerun["State"] in ("ready", "running")
    (done_again,) = await wait_jobs(client, reactor, first["Key"], ("complete",))
    await wait_settled(reactor, daemon, first["Key"])
    assert log.read_text() == "ran\nran\n"
    assert done_again["Attempts"] >= 1 and done_again["Started"] >= done["Ended"]

    # rerun as a property of the job works the same way.
    reply = await client.post(JOBS, [{"cmd": cmd, "rep_grp": "one", "rerun": True}])
    assert [j["Key"] for j in reply.json()] == [first["Key"]]
    await poll(reactor, lambda: _lines(log, 3), what="a third run")
    await wait_jobs(client, reactor, first["Key"], ("complete",))


@pytest_twisted.ensureDeferred
async def test_rerun_right_after_completion(client, reactor, tmp_path):
    """A client that sees a job complete and asks for a rerun at once gets it rerun, every time."""
    log = tmp_path / "runs.log"
    dropped = []
    for i in range(30):
        cmd = f"echo {i} >> {log}"
        (job,) = await client.add_jobs([{"cmd": cmd}])
        while (await client.jobs(job["Key"]))[0]["State"] != "complete":
            await deferLater(reactor, 0.002, lambda: None)
        reply = await client.post(JOBS, [{"cmd": cmd}], params={"rerun": "true"})
        assert reply.code == 201
        if [j["Key"] for j in reply.json()] != [job["Key"]]:
            dropped.append(i)
        else:
            await wait_jobs(client, reactor, job["Key"], ("complete",))
    await deferLater(reactor, 0.3, lambda: None)
    runs = [int(line) for line in log.read_text().split()]
    assert {i: runs.count(i) for i in dropped} == {i: 1 for i in dropped}  # really not run again
    assert not dropped, f"rerun dropped for {len(dropped)} of 30 jobs: {dropped}"


async def _lines(path: Path, n: int) -> tuple[bool, Any]:
    text = path.read_text() if path.exists() else ""
    return text.count("\n") >= n, text


@pytest_twisted.ensureDeferred
async def test_adding_a_buried_key_returns_it_without_running_it_again(client, reactor, tmp_path):
    log = tmp_path / "runs.log"
    cmd = f"echo ran >> {log}; exit 3"
    (job,) = await client.add_jobs([{"cmd": cmd}])
    await wait_jobs(client, reactor, job["Key"], ("buried",))
    (again,) = await client.add_jobs([{"cmd": cmd}])
    assert again["State"] == "buried" and again["Exitcode"] == 3 and again["Attempts"] == 1
    await deferLater(reactor, 0.3, lambda: None)  # a wrongly re-queued job would have run by now
    assert log.read_text() == "ran\n"


# -- GET parameters --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_limit_state_search_and_env(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=ONE_CORE)
    async with daemon.client(reactor) as client:
        cwd = str(tmp_path)
        # 3 buried with exit 3, 2 buried with exit 4, 3 complete (0 cores: they run beside the blocker).
        await client.add_jobs([{"cmd": f"exit 3 # {i}"} for i in range(3)] + [{"cmd": f"exit 4 # {i}"} for i in range(2)]
                              + [{"cmd": f"true # {i}"} for i in range(3)], rep_grp="lim", cwd=cwd)
        await wait_jobs(client, reactor, "lim", ("buried", "complete"), count=8)
        # 1 running (the blocker takes the only core), then 3 ready behind it.
        gate = tmp_path / "gate"
        blocker = gated(gate, "lim")
        await client.add_jobs([{"cmd": blocker, "cpus": 1}], rep_grp="lim", cwd=cwd)
        await wait_jobs(client, reactor, wr_key(blocker), ("running",))
        await client.add_jobs([{"cmd": f"true # ready {i}", "cpus": 1} for i in range(3)], rep_grp="lim", cwd=cwd)
        await client.add_jobs([{"cmd": "true # elsewhere", "cpus": 1, "env": ["A=1", "B=two,three"]}],
                              rep_grp="xlimx", cwd=cwd)

        everything = await client.jobs("lim")
        assert len(everything) == 12
        groups = {}
        for job in everything:
            groups.setdefault((job["State"], job["Exitcode"], job["FailReason"]), []).append(job["Key"])
        assert sorted(len(v) for v in groups.values()) == [1, 2, 3, 3, 3]

        for limit in (1, 2, 5):
            shown = await client.jobs("lim", limit=str(limit))
            per_group: dict[Any, list[dict[str, Any]]] = {}
            for job in shown:
                per_group.setdefault((job["State"], job["Exitcode"], job["FailReason"]), []).append(job)
            assert set(per_group) == set(groups), limit
            for group, jobs in per_group.items():
                total = len(groups[group])
                assert len(jobs) == min(limit, total), (limit, group)
                # Only the last one shown of each group carries how many were left out.
                assert [j["Similar"] for j in jobs] == [0] * (len(jobs) - 1) + [total - len(jobs)], (limit, group)
        # Incomplete jobs only, grouped: buried (exit 3), buried (exit 4), running, ready.
        assert len(await client.jobs(limit="1")) == 4

        async def states(ids: str, state: str) -> list[str]:
            return sorted(j["State"] for j in await client.jobs(ids, state=state))

        assert await states("lim", "ready") == ["ready"] * 3
        assert await states("lim", "running") == ["running"]
        assert await states("lim", "buried") == ["buried"] * 5
        assert await states("lim", "complete") == ["complete"] * 3
        assert await states("lim", "deletable") == ["buried"] * 5 + ["ready"] * 3
        assert await states("", "ready") == ["ready"] * 4
        assert await states("", "complete") == []  # GET / is incomplete jobs only
        # state filters rep groups but not keys (as wr).
        assert len(await client.jobs(wr_key("true # 0"), state="ready")) == 1
        for bad in ("bogus", "Ready", "deleted"):
            for ids in ("", "lim"):
                reply = await client.get(JOBS + ids, params={"state": bad})
                assert reply.code == 400, (bad, reply)
                assert "state" in (await error_of(reply)).lower()
        for bad in ("abc", "-1", "1.5"):
            reply = await client.get(JOBS, params={"limit": bad})
            assert reply.code == 400, (bad, reply)
            await error_of(reply)

        # search: rep groups by substring.
        assert await client.jobs("li") == []
        assert len(await client.jobs("li", search="true")) == 13
        assert {j["RepGroup"] for j in await client.jobs("xlim", search="true")} == {"xlimx"}
        assert await client.jobs("nothing-like-it", search="true") == []

        # An id of 32 hex digits that is no job's key is taken as a rep group.
        hex_group = "0123456789abcdef" * 2
        (hexed,) = await client.add_jobs([{"cmd": "true # hex group", "cpus": 1}], rep_grp=hex_group, cwd=cwd)
        assert [j["Key"] for j in await client.jobs(hex_group)] == [hexed["Key"]]
        assert [j["Key"] for j in await client.jobs(f"{hexed['Key']},{hex_group}")] == [hexed["Key"]]

        # env: only with env=true, as given.
        (plain,) = await client.jobs("xlimx")
        assert plain["Env"] is None
        (with_env,) = await client.jobs("xlimx", env="true")
        assert with_env["Env"] == ["A=1", "B=two,three"]
        assert (await client.jobs(wr_key("true # 0"), env="true"))[0]["Env"] is None

        gate.touch()
        await wait_jobs(client, reactor, f"lim,xlimx,{hex_group}", ("complete", "buried"), count=14)


# -- DELETE ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_needs_a_state(client):
    await client.add_jobs([{"cmd": "echo kept"}], rep_grp="kept")
    for path in (JOBS, JOBS + "kept", JOBS + wr_key("echo kept")):
        for params in ({}, {"state": ""}, {"state": "complete"}, {"state": "ready"}, {"state": "bogus"}):
            reply = await client.delete(path, params=params)
            assert reply.code == 400, (path, params, reply)
            assert "state" in (await error_of(reply)).lower()
    assert len(await client.jobs("kept")) == 1


@pytest_twisted.ensureDeferred
async def test_delete_running_kills_the_whole_process_group(client, reactor, tmp_path):
    pids = tmp_path / "pids"
    cmd = f"sleep 60 & echo $$ $! > {pids}; wait"
    (job,) = await client.add_jobs([{"cmd": cmd, "rep_grp": "victim"}])
    shell, child = map(int, (await wait_file(reactor, pids)).split())
    (running,) = await wait_jobs(client, reactor, job["Key"], ("running",))
    assert running["Pid"] == shell and alive(child)

    # Only running jobs are touched by state=running; lost on a running job does nothing.
    reply = await client.delete(JOBS + "victim", params={"state": "lost"})
    assert reply.code == 202 and reply.json() == []
    reply = await client.delete(JOBS + job["Key"], params={"state": "deletable"})
    assert reply.code == 200 and reply.json() == []
    assert (await client.jobs(job["Key"]))[0]["State"] == "running"

    reply = await client.delete(JOBS + "victim", params={"state": "running"})
    assert reply.code == 202, reply
    assert [(j["Key"], j["State"]) for j in reply.json()] == [(job["Key"], "running")]
    (killed,) = await wait_jobs(client, reactor, job["Key"], ("buried",), timeout=10)
    assert killed["FailReason"] == "killed by user request" and killed["Attempts"] == 1
    assert killed["Ended"] >= killed["Started"] > 0
    await poll(reactor, _gone(shell, child), timeout=5, what="the job's processes to end")

    # Killing it again: it is no longer running, nothing is affected.
    reply = await client.delete(JOBS + job["Key"], params={"state": "running"})
    assert reply.code == 202 and reply.json() == []


def _gone(*pids: int) -> Callable[[], Awaitable[tuple[bool, Any]]]:
    async def check() -> tuple[bool, Any]:
        living = [pid for pid in pids if alive(pid)]
        return not living, living

    return check


@pytest_twisted.ensureDeferred
async def test_delete_running_kills_descendants_that_ignore_sigterm(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config="[jobs]\nkill_grace = 0.5\n")
    async with daemon.client(reactor) as client:
        pids = tmp_path / "pids"
        cmd = f"sh -c 'trap \"\" TERM; sleep 60' & echo $$ $! > {pids}; wait"
        (job,) = await client.add_jobs([{"cmd": cmd}])
        shell, stubborn = map(int, (await wait_file(reactor, pids)).split())
        await wait_jobs(client, reactor, job["Key"], ("running",))
        assert (await client.delete(JOBS + job["Key"], params={"state": "running"})).code == 202
        (killed,) = await wait_jobs(client, reactor, job["Key"], ("buried",), timeout=10)
        assert killed["FailReason"] == "killed by user request"
        try:
            await poll(reactor, _gone(shell, stubborn), timeout=4, what="the TERM-ignoring descendant to be killed")
        finally:
            if alive(stubborn):
                os.killpg(shell, 9)


@pytest_twisted.ensureDeferred
async def test_delete_deletable_removes_only_jobs_neither_running_nor_complete(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=ONE_CORE)
    async with daemon.client(reactor) as client:
        cwd = str(tmp_path)
        await client.add_jobs([{"cmd": "true # done"}, {"cmd": "exit 2 # failed"}], rep_grp="mix", cwd=cwd)
        await wait_jobs(client, reactor, "mix", ("complete", "buried"), count=2)
        gate = tmp_path / "gate"
        blocker = gated(gate, "mix")
        await client.add_jobs([{"cmd": blocker, "cpus": 1}], rep_grp="mix", cwd=cwd)
        await wait_jobs(client, reactor, wr_key(blocker), ("running",))
        await client.add_jobs([{"cmd": f"true # queued {i}", "cpus": 1} for i in range(3)], rep_grp="mix", cwd=cwd)
        assert await client.jobs("mix", state="ready") != []

        # By key: a running job and a complete one are not deletable.
        for cmd in (blocker, "true # done"):
            reply = await client.delete(JOBS + wr_key(cmd), params={"state": "deletable"})
            assert reply.code == 200 and reply.json() == [], cmd
        # One queued job by key.
        reply = await client.delete(JOBS + wr_key("true # queued 0"), params={"state": "deletable"})
        assert [(j["Key"], j["State"]) for j in reply.json()] == [(wr_key("true # queued 0"), "deleted")]
        # The rest of the group: the buried one and the other queued ones.
        reply = await client.delete(JOBS + "mix", params={"state": "deletable"})
        assert reply.code == 200, reply
        assert sorted(j["Cmd"] for j in reply.json()) == ["exit 2 # failed", "true # queued 1", "true # queued 2"]
        assert {j["State"] for j in reply.json()} == {"deleted"}
        left = await client.jobs("mix")
        assert sorted((j["Cmd"], j["State"]) for j in left) == sorted([(blocker, "running"), ("true # done", "complete")])
        assert await client.jobs(wr_key("true # queued 1")) == []
        # Deleted jobs are really gone: adding one again queues it afresh.
        (again,) = await client.add_jobs([{"cmd": "exit 2 # failed"}], cwd=cwd)
        assert again["State"] in ("ready", "running") and again["Attempts"] == 0

        # Without ids: all current deletable jobs.
        await client.add_jobs([{"cmd": "true # queued 3", "cpus": 1}], cwd=cwd)
        reply = await client.delete(JOBS, params={"state": "deletable"})
        assert wr_key("true # queued 3") in [j["Key"] for j in reply.json()]
        assert {j["State"] for j in reply.json()} == {"deleted"}
        gate.touch()
        await wait_jobs(client, reactor, wr_key(blocker), ("complete",))


# -- the environment jobs run in -------------------------------------------------------------------

SHELL_VARIABLES = {"PWD", "OLDPWD", "SHLVL", "_"}  # set by sh itself, not given to it


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest_twisted.ensureDeferred
async def test_job_environment_cwd_and_home(client, reactor, tmp_path):
    cwd = str(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    os.chmod(script, stat.S_IRUSR | stat.S_IWUSR)
    jobs = [
        {"cmd": f"env > {out}/given", "env": ["FOO=bar baz", "PATH=/usr/bin:/bin", "EMPTY="]},
        {"cmd": f"env > {out}/inherited"},
        {"cmd": f"echo \"$HOME\" > {out}/home; pwd -P > {out}/pwd; echo \"$TMPDIR\" > {out}/tmpdir; "
                f"ls -d \"$TMPDIR\" > {out}/tmp-existed", "change_home": True},
        {"cmd": f"echo \"$HOME\" > {out}/home-unchanged"},
        {"cmd": f"pwd -P > {out}/literal", "cwd": cwd, "cwd_matters": True},
        {"cmd": "true # nowhere", "cwd": str(tmp_path / "missing"), "cwd_matters": True},
        {"cmd": "no_such_command_wmgr_test"},
        {"cmd": str(script)},
        {"cmd": "kill -9 $$"},
    ]
    await client.add_jobs(jobs, rep_grp="env", cwd=cwd)
    await client.add_jobs([{"cmd": f"env > {out}/defaults"}], rep_grp="env", cwd=cwd, env="A=1,B=2")
    done = {j["Cmd"]: j for j in await wait_jobs(client, reactor, "env", count=len(jobs) + 1)}

    given = read_env(out / "given")
    assert given.pop("TMPDIR").startswith(cwd + "/wr_cwd/")
    assert {k: v for k, v in given.items() if k not in SHELL_VARIABLES} == {
        "FOO": "bar baz", "PATH": "/usr/bin:/bin", "EMPTY": ""}
    defaults = read_env(out / "defaults")
    assert {k: v for k, v in defaults.items() if k not in SHELL_VARIABLES | {"TMPDIR"}} == {"A": "1", "B": "2"}
    # Without env the job has the daemon's environment (and its own TMPDIR).
    inherited = read_env(out / "inherited")
    assert inherited.get("PATH") == os.environ.get("PATH") and inherited["TMPDIR"].startswith(cwd + "/wr_cwd/")

    home_job = done[jobs[2]["cmd"]]
    actual = cwd + home_job["Cwd"]
    assert home_job["State"] == "complete" and home_job["HomeChanged"] is True and home_job["CwdBase"] == cwd
    assert (out / "home").read_text().strip() == actual
    assert (out / "pwd").read_text().strip() == os.path.realpath(actual)
    tmpdir = (out / "tmpdir").read_text().strip()
    assert tmpdir == str(Path(actual).parent / "tmp") and (out / "tmp-existed").read_text().strip() == tmpdir
    assert not os.path.exists(tmpdir)  # removed when the job ended
    assert (out / "home-unchanged").read_text().strip() == os.environ.get("HOME", "")
    assert done[jobs[3]["cmd"]]["HomeChanged"] is False

    literal = done[jobs[4]["cmd"]]
    assert literal["State"] == "complete" and literal["Key"] == wr_key(jobs[4]["cmd"], cwd)
    assert (out / "literal").read_text().strip() == os.path.realpath(cwd)

    nowhere = done["true # nowhere"]
    assert (nowhere["State"], nowhere["FailReason"]) == ("buried", "working directory does not exist")
    assert nowhere["Key"] == wr_key("true # nowhere", str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()

    missing = done["no_such_command_wmgr_test"]
    assert (missing["State"], missing["Exitcode"], missing["FailReason"]) == ("buried", 127, "command not found")
    assert "no_such_command_wmgr_test" in (await client.jobs(missing["Key"], std="true"))[0]["StdErr"]
    denied = done[str(script)]
    assert (denied["State"], denied["Exitcode"], denied["FailReason"]) == ("buried", 126, "command permission problem")
    signalled = done["kill -9 $$"]
    assert signalled["State"] == "buried" and signalled["FailReason"] == "command failed to complete normally"


@pytest_twisted.ensureDeferred
async def test_output_is_kept_bounded(make_daemon, reactor):
    daemon = await make_daemon(config="[jobs]\noutput_limit = 16\n")
    async with daemon.client(reactor) as client:
        cmd = "printf 'HEAD%.0s' 1 2 3 4; printf 'x%.0s' $(seq 1000); printf 'TAIL%.0s' 1 2 3 4; exit 1"
        (job,) = await client.add_jobs([{"cmd": cmd}])
        (done,) = await wait_jobs(client, reactor, job["Key"], ("buried",), std="true")
        out = done["StdOut"]
        assert out.startswith("HEAD" * 4) and out.endswith("TAIL" * 4)
        assert "1000 bytes omitted" in out and len(out) < 100


@pytest_twisted.ensureDeferred
async def test_cpu_time_and_peak_ram_are_measured(make_daemon, reactor):
    """CPUtime counts the shell and the descendants it waited for; PeakRAM samples the whole tree."""
    daemon = await make_daemon(config="[jobs]\nsample_interval = 0.1\n")
    async with daemon.client(reactor) as client:
        burn = "sh -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done'"
        hog = (f"{sys.executable} -c 'import time; b = bytearray(80 * 1024 * 1024); "
               "b[::4096] = b\"x\" * len(b[::4096]); time.sleep(1)'")
        await client.add_jobs([{"cmd": burn}, {"cmd": f"{hog} & wait"}], rep_grp="measured")
        jobs = {j["Cmd"]: j for j in await wait_jobs(client, reactor, "measured", ("complete", "buried"), count=2)}
        burnt = jobs[burn]
        assert burnt["State"] == "complete"
        assert 0.1 <= burnt["CPUtime"] <= burnt["Walltime"] + 0.5, (burnt["CPUtime"], burnt["Walltime"])
        hogged = jobs[f"{hog} & wait"]
        assert hogged["State"] == "complete", hogged
        assert 80 <= hogged["PeakRAM"] < 1000, hogged["PeakRAM"]
