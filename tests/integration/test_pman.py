"""The pman API against the real daemon over its plain-HTTP listener, as pman clients use it:
the seed's run-then-endInfo example, every action, path GETs down to leaves, kill, restarts,
quit, and the pfurl client from PyPI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.harness import Daemon, until
from wmgr.client import Client

pytestmark = pytest.mark.timeout(120)

SEED_PAYLOAD = {"exec": {"cmd": "cal 7 1970"}, "action": "run",
                "meta": {"jid": "123-456-1", "auid": "rudolphpienaar"}}
FINAL = ("finishedSuccessfully", "finishedWithError")


def the_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Pman:
    """A pman client over plain HTTP that sends what pfurl sends: JSON labelled as a form, and
    `Authorization: bearer` in lower case."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.port = daemon.http_port
        self.token = (daemon.data_dir / "client.token").read_text().strip()
        self.client = Client(the_reactor(), f"http://127.0.0.1:{self.port}/", None, self.token)

    async def post(self, payload: Any, content_type: str = "application/x-www-form-urlencoded",
                   path: str = "api/v1/cmd", raw: Optional[bytes] = None) -> Any:
        data = raw if raw is not None else json.dumps({"payload": payload}).encode()
        return await self.client.request("POST", path, data=data, token=False, headers={
            "Authorization": f"bearer {self.token}", "Content-Type": content_type})

    async def action(self, action: str, **meta: Any) -> dict:
        reply = await self.post({"action": action, "meta": meta})
        assert reply.code == 200, reply
        return reply.json()

    async def get(self, path: str) -> dict:
        reply = await self.client.get("api/v1/" + path.lstrip("/"))
        assert reply.code == 200, reply
        return reply.json()

    async def run(self, cmd: str, jid: str = "", auid: str = "tester") -> str:
        reply = await self.action("run", cmd=cmd, jid=jid, auid=auid, threaded=True)
        assert reply["status"] is True, reply
        return reply["d_ret"]["jobRoot"]

    async def wait(self, root: str, words: tuple = FINAL, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.action("status", key="jobRoot", value=root)
            word = reply["d_ret"]["l_status"][0]
            if word in words:
                return word
            assert time.monotonic() < deadline, f"job {root} still {word}"
            await deferLater(the_reactor(), 0.05, lambda: None)

    async def close(self) -> None:
        await self.client.close()


@pytest_twisted.async_yield_fixture(scope="module")
async def pman(tmp_path_factory: Any) -> Any:
    """One daemon for the module (a start costs about a second)."""
    daemon = Daemon(tmp_path_factory.mktemp("pman") / "data", "--http-port", "0")
    await daemon.start(the_reactor())
    client = Pman(daemon)
    try:
        yield client
    finally:
        await client.close()
        code = await daemon.stop(the_reactor())
        daemon.kill_quietly()
        assert code == 0, daemon.log()


# -- the seed ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_seed_run_then_end_info(pman: Pman) -> None:
    """The README of pman 0.5: POST the run (HTTPie's `payload:='{...}'` body, JSON labelled as
    JSON), then `GET /api/v1/_01/endInfo` for the pid and status of job 1 (the second job: pman
    counts from 0)."""
    listing = (await pman.get(""))["GET"]
    if not listing:
        await pman.wait(await pman.run("true", jid="before-the-seed"))
    reply = await pman.post(SEED_PAYLOAD, content_type="application/json", path="api/v1/cmd/")
    assert reply.code == 200
    answer = reply.json()
    assert answer["status"] is True and answer["action"] == "run" and answer["meta"] == SEED_PAYLOAD["meta"]
    root = answer["d_ret"]["jobRoot"]
    await pman.wait(root)
    index = list((await pman.get(""))["GET"]).index(root)
    alias = f"_{index:02d}"  # _01 when the module runs in order
    got = await pman.get(f"{alias}/endInfo")
    assert got["status"] is True and got["RESTverb"] == "GET" and got["path"] == f"/api/v1/{alias}/endInfo"
    end = got["GET"][root]["endInfo"]
    assert end["allJobsDone"] is True
    record = end["0"]
    assert record["cmd"] == "cal 7 1970" and record["done"] is True and "pid" in record
    expected = 0 if shutil.which("cal") else 127  # `cal` is not installed everywhere
    assert record["returncode"] == expected
    status = await pman.action("status", key="jid", value="123-456-1")
    assert status["d_ret"]["l_status"][-1] == ("finishedSuccessfully" if expected == 0 else "finishedWithError")


# -- every action -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_action_and_path_gets(pman: Pman) -> None:
    # hello
    stamp = await pman.action("hello", askAbout="timestamp")
    assert stamp["status"] is True and len(stamp["d_ret"]["timestamp"]["now"]) == 21
    echo = await pman.action("hello", askAbout="echoBack", echoBack="are you there?")
    assert echo["d_ret"]["echoBack"] == {"msg": "are you there?"}
    sysinfo = (await pman.action("hello", askAbout="sysinfo"))["d_ret"]["sysinfo"]
    assert sysinfo["cpucount"] == os.cpu_count() and len(sysinfo["loadavg"]) == 3 and sysinfo["memory"][0] > 0
    assert (await pman.action("hello"))["status"] is False

    # run: the exit status is the whole command's (pman looked at the first `;` part only)
    failing = await pman.run("echo out; echo err >&2; exit 3", jid="job-actions", auid="alice")
    passing = await pman.run("echo fine", jid="job-actions", auid="alice")
    assert await pman.wait(failing) == "finishedWithError"
    assert await pman.wait(passing) == "finishedSuccessfully"

    status = await pman.action("status", key="jid", value="job-actions")
    assert status["status"] is True and status["action"] == "status"
    assert status["d_ret"]["l_status"] == ["finishedWithError", "finishedSuccessfully"]
    assert status["d_ret"]["0.end"] == {"jobRoot": failing, "returncode": [3]}
    assert status["d_ret"]["1.start"] == {"jobRoot": passing, "startTrigger": [True]}
    done = await pman.action("done", key="auid", value="alice")
    assert done["status"] is True and done["d_ret"]["1.end"]["returncode"] == [0]
    info = await pman.action("info", key="jid", value="job-actions")
    assert info["d_ret"]["0.1"][failing]["endInfo"]["0"]["stderr"] == "err\n"
    nothing = await pman.action("info", key="jid", value="no-such-job")
    assert nothing["status"] is False and "-1" in nothing["d_ret"]
    search = await pman.action("search", key="jid", value="job-actions", job=0, when="end", field="stdout")
    assert search["d_ret"]["1"] == {passing: {"end": {"0": {"endInfo": {"0": {"stdout": "fine\n"}}}}}}
    get = await pman.action("get", path=f"/{failing}/jid")
    assert get["status"] is True and get["d_ret"] == {failing: {"jid": "job-actions"}}

    # path GETs, down to single leaves
    index = list((await pman.get(""))["GET"]).index(failing)
    for leaf, check in [("returncode", lambda v: v == 3), ("stdout", lambda v: v == "out\n"),
                        ("stderr", lambda v: v == "err\n"), ("pid", lambda v: v is None or v > 0),
                        ("startstamp", lambda v: v.startswith("20")), ("endstamp", lambda v: v.startswith("20"))]:
        for path in (f"_{index}/endInfo/0/{leaf}", f"_{index}/end/0/endInfo/0/{leaf}", f"{failing}/endInfo/0/{leaf}"):
            reply = await pman.get(path)
            assert reply["status"] is True, path
            value = reply["GET"][failing]
            for name in path.split("/")[1:]:
                value = value[name]
            assert check(value), (path, value)
    assert (await pman.get(f"_{index}/jobCount"))["GET"] == {failing: {"jobCount": 1}}
    for missing in (f"_{index}/endInfo/0/nothing", "_999/endInfo", "not-a-root/jid", f"_{index}/cmd/deeper"):
        reply = await pman.get(missing)
        assert reply["status"] is False, missing

    # the jobs are wr jobs of the rep group pman
    jobs = await pman.client.jobs("pman")
    assert {job["RepGroup"] for job in jobs} == {"pman"}
    assert len(jobs) == len((await pman.get(""))["GET"])

    # DBctl, quit (not allowed by default), unknown actions and bad bodies
    for do in ("save", "load"):
        assert (await pman.action("DBctl", do=do))["status"] is True
    refused = await pman.action("quit", saveDB=True)
    assert refused["status"] is False and "allow_quit" in refused["message"]
    unknown = await pman.action("teleport")
    assert unknown["status"] is False and "teleport" in unknown["message"]
    wrong_shape = await pman.post(None, raw=b'{"no": "payload"}')
    assert wrong_shape.code == 200 and wrong_shape.json()["status"] is False
    bad = await pman.post(None, raw=b"{this is not json")
    assert bad.code == 400 and bad.json()["status"] is False and "JSON" in bad.json()["error"]
    assert b"Traceback" not in bad.body and b"<html" not in bad.body.lower()
    # and the daemon still answers after all of it
    assert (await pman.action("hello", askAbout="timestamp"))["status"] is True


@pytest_twisted.ensureDeferred
async def test_kill_stops_the_jobs_process_group(pman: Pman, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    root = await pman.run(f"sleep 60 & echo $! > {pid_file}; wait", jid="to-kill")
    await pman.wait(root, ("started",))
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        await deferLater(the_reactor(), 0.05, lambda: None)
    child = int(pid_file.read_text())
    assert psutil.pid_exists(child)

    killed = await pman.action("kill", key="jid", value="to-kill")
    assert killed["status"] is True and killed["d_ret"]["0"]["killed"] is True
    assert await pman.wait(root) == "finishedWithError"
    assert await _gone(child), "the backgrounded child outlived the kill"
    tree = (await pman.get(f"{root}"))["GET"][root]
    assert tree["endInfo"]["0"]["returncode"] == -1 and tree["failReason"] == "killed by user request"
    again = await pman.action("kill", key="jid", value="to-kill")
    assert again["status"] is False


async def _gone(pid: int) -> bool:
    async def gone() -> bool:
        # A killed child that nobody reaped yet (our parent is not its parent) is a zombie: gone.
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return await until(the_reactor(), gone, timeout=5)


# -- pfurl ------------------------------------------------------------------------------------------


def pfurl_command() -> Optional[list[str]]:
    script = Path(sys.executable).with_name("pfurl")
    if script.exists():
        return [str(script)]
    found = shutil.which("pfurl")
    return [found] if found else None


@pytest_twisted.ensureDeferred
async def test_pfurl_hello_run_and_status(pman: Pman) -> None:
    command = pfurl_command()
    if command is None:
        pytest.skip("pfurl is not installed (pip install pfurl; it is in the test extra)")

    async def pfurl(msg: dict) -> dict:
        argv = command + ["--verb", "POST", "--raw", "--http", f"127.0.0.1:{pman.port}/api/v1/cmd",
                          "--jsonwrapper", "payload", "--msg", json.dumps(msg), "--quiet",
                          "--authToken", pman.token]
        # In a thread: pfurl is a blocking program and this test's reactor serves nothing it needs,
        # but waiting in a thread keeps the test's own timers honest.
        result = await deferToThread(subprocess.run, argv, capture_output=True, text=True, timeout=30,
                                     cwd=str(pman.daemon.data_dir.parent))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    hello = await pfurl({"action": "hello", "meta": {"askAbout": "sysinfo", "echoBack": "x"}})
    assert hello["status"] is True and "sysinfo" in hello["d_ret"]
    run = await pfurl({"action": "run", "meta": {"cmd": "echo from pfurl", "jid": "pfurl-1", "auid": "pf",
                                                 "threaded": True}})
    assert run["status"] is True and run["action"] == "run"
    await pman.wait(run["d_ret"]["jobRoot"])
    status = await pfurl({"action": "status", "meta": {"key": "jid", "value": "pfurl-1"}})
    assert status["status"] is True and status["d_ret"]["l_status"] == ["finishedSuccessfully"]


# -- restarts and quit ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dbctl_clear_forgets_finished_jobs_only(pman: Pman, tmp_path: Path) -> None:
    """Last of the module's tests on the shared daemon: it empties pman's history."""
    gate = tmp_path / "gate"
    finished = await pman.run("true")
    await pman.wait(finished)
    running = await pman.run(f"while [ ! -e {gate} ]; do sleep 0.05; done")
    try:
        await pman.wait(running, ("started",))

        # pman says "started" from the moment the job is reserved; wr says running once its pid is known.
        async def running_in_wr() -> bool:
            states = [job["State"] for job in await pman.client.jobs("pman")]
            return "running" in states and "reserved" not in states

        await until(the_reactor(), running_in_wr, timeout=10)
        reply = await pman.action("DBctl", do="clear")
        assert reply["status"] is True, reply
        assert list((await pman.get(""))["GET"]) == [running]
        assert [job["State"] for job in await pman.client.jobs("pman")] == ["running"]
    finally:
        gate.touch()  # a failed assertion must not leave the job waiting for ever (the daemon adopts it)
    assert await pman.wait(running) == "finishedSuccessfully"


@pytest_twisted.ensureDeferred
async def test_jobs_and_their_order_survive_a_restart_and_quit_stops_when_allowed(make_daemon: Any, reactor: Any) -> None:
    config = "[pman]\nallow_quit = true\n"
    first = await make_daemon("--http-port", "0", config=config)
    client = Pman(first)
    try:
        roots = [await client.run(f"echo {i}; exit {i}", jid=f"restart-{i}") for i in range(3)]
        for root in roots:
            await client.wait(root)
        before = (await client.get("_1/endInfo/0/returncode"))["GET"]
    finally:
        await client.close()
    assert before == {roots[1]: {"endInfo": {"0": {"returncode": 1}}}}
    assert await first.stop(reactor) == 0

    second = await make_daemon("--http-port", "0", config=config)
    client = Pman(second)
    try:
        assert list((await client.get(""))["GET"]) == roots
        assert (await client.get("_01/endInfo/0/returncode"))["GET"] == before
        status = await client.action("status", key="jid", value="restart-2")
        assert status["d_ret"]["l_status"] == ["finishedWithError"] and status["d_ret"]["0.end"]["returncode"] == [2]
        quit_reply = await client.action("quit", saveDB=True)
        assert quit_reply["status"] is True
    finally:
        await client.close()
    assert await second.wait(reactor, 15) == 0, second.log()
