"""The Qserv services routes through the real daemon: a real supervised command, real init.d-style
scripts (one that hangs), Basic and Digest with curl on both listeners, and the seed's examples."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue

from tests.harness import until
from wmgr.client import Client

USER, PASSWORD = "qsmaster", "s3cret:with:colons"

INIT_SCRIPT = """#!/bin/sh
# An init.d-style script: its daemon is a sleep whose pid is in the pid file.
PIDFILE={pidfile}
case "$1" in
  status) [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null ;;
  start) echo starting; sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > "$PIDFILE" ;;
  stop) [ -f "$PIDFILE" ] && kill "$(cat "$PIDFILE")"; rm -f "$PIDFILE"; echo stopped ;;
  restart) "$0" stop; "$0" start ;;
  *) exit 2 ;;
esac
"""

HUNG_SCRIPT = """#!/bin/sh
# Hangs on every call, with a child in its process group.
sleep 1000 &
echo $$ $! > {pids}
wait
"""


def write_script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def services_config(tmp_path: Path, auth: str = "basic digest") -> str:
    secret = tmp_path / "wmgr.secret"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    mysqld = write_script(tmp_path / "mysqld.init", INIT_SCRIPT.format(pidfile=tmp_path / "mysqld.pid"))
    hung = write_script(tmp_path / "hung.init", HUNG_SCRIPT.format(pids=tmp_path / "hung.pids"))
    return (f"[qserv]\nauth = {auth}\nsecret_file = {secret}\n"
            "[services]\nscript_timeout = 2\nkill_grace = 1\nrestart_min_delay = 0.2\nrestart_max_delay = 1\n"
            f"[service:xrootd]\ncommand = /bin/sh -c \"echo xrootd up; exec sleep 1000\"\n"
            f"[service:mysqld]\nscript = {mysqld}\n"
            f"[service:hung]\nscript = {hung}\n")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_script_daemon(tmp_path: Path) -> None:
    pidfile = tmp_path / "mysqld.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass


@pytest_twisted.async_yield_fixture
async def start_daemon(make_daemon: Any, reactor: Any) -> Any:
    """make_daemon, but stopped with SIGTERM at the end even when the test fails: a kill -9 would
    leave the supervised command behind."""
    started: list[Any] = []

    async def start(*args: str, **kw: Any) -> Any:
        started.append(await make_daemon(*args, **kw))
        return started[-1]

    yield start
    for daemon in started:
        await daemon.stop(reactor)


async def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """curl's status code, the last response's headers and its body (never blocks the reactor)."""
    out, err, code = await getProcessOutputAndValue("curl", ["-s", "-i", "--max-time", "20", *args], env=os.environ)
    assert code == 0, err
    blocks = out.split(b"\r\n\r\n")
    # curl -i prints every response of a Digest round trip: the last header block is the answer's.
    heads = [i for i, block in enumerate(blocks) if block.startswith(b"HTTP/")]
    head, body = blocks[heads[-1]], b"\r\n\r\n".join(blocks[heads[-1] + 1:])
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return int(lines[0].split()[1]), headers, body


@pytest_twisted.ensureDeferred
async def test_a_supervised_command_is_restarted_and_obeys_put(start_daemon, reactor, tmp_path):
    daemon = await start_daemon(config=services_config(tmp_path))
    client = daemon.client(reactor)
    try:
        async def xrootd() -> Any:
            return (await client.get("services/xrootd")).json()["result"]

        first = await until(reactor, lambda: _active(xrootd))
        assert first["restarts"] == 0 and alive(first["pid"])
        log = daemon.data_dir / "services" / "xrootd.log"
        await until(reactor, lambda: _contains(log, "stdout: xrootd up"))

        os.kill(first["pid"], signal.SIGKILL)  # procmon starts it again
        second = await until(reactor, lambda: _active(xrootd, not_pid=first["pid"]))
        assert second["restarts"] == 1
        metrics = (await client.get("metrics")).text
        assert 'wmgr_service_up{name="xrootd"} 1.0' in metrics
        assert 'wmgr_service_restarts_total{name="xrootd"} 1.0' in metrics

        stopped = await client.put("services/xrootd", data=b"action=stop",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert stopped.code == 200, stopped
        assert stopped.json()["result"]["state"] == "stopped" and not alive(second["pid"])
        assert (await xrootd())["state"] == "stopped"

        started = (await client.put("services/xrootd", data=b"action=start",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})).json()["result"]
        assert started["state"] == "active" and alive(started["pid"])
        restarted = (await client.put("services/xrootd", data=b"action=restart",
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})).json()["result"]
        assert restarted["state"] == "active" and restarted["pid"] != started["pid"] and not alive(started["pid"])
        last = restarted["pid"]
    finally:
        await client.close()
    assert await daemon.stop(reactor) == 0, daemon.log()
    assert not alive(last)  # stopping wmgr stops what it supervises


async def _active(get: Any, not_pid: Any = None) -> Any:
    state = await get()
    return state if state["state"] == "active" and state["pid"] != not_pid else None


async def _contains(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()


@pytest_twisted.ensureDeferred
async def test_init_scripts_and_a_hung_one(start_daemon, reactor, tmp_path):
    daemon = await start_daemon(config=services_config(tmp_path))
    client = daemon.client(reactor)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        assert (await client.get("services/mysqld")).json()["result"]["state"] == "stopped"
        started = await client.put("services/mysqld", data=b"action=start", headers=form)
        assert (started.code, started.json()["result"]["state"]) == (200, "active")
        pid = int((tmp_path / "mysqld.pid").read_text())
        assert alive(pid)
        assert (await client.get("services/mysqld")).json() == {"result": {
            "name": "mysqld", "state": "active", "uri": "/services/mysqld", "pid": None, "uptime": None,
            "restarts": None}}
        stopped = await client.put("services/mysqld", data=b"action=stop", headers=form)
        assert stopped.json()["result"]["state"] == "stopped"
        await until(reactor, lambda: _dead(pid))
        assert "starting" in (daemon.data_dir / "services" / "mysqld.log").read_text()

        # A hung script: 409 after the timeout (2 s), and meanwhile the daemon answers.
        hanging = ensureDeferred(client.put("services/hung", data=b"action=start", headers=form))
        other = await client.get("services/xrootd")
        assert other.code == 200 and not hanging.called
        failed = await hanging
        assert failed.code == 409, failed
        body = failed.json()
        assert body["exception"] == "CommandFailure" and "did not finish within 2s" in body["cause"]
        leader, child = map(int, (tmp_path / "hung.pids").read_text().split())
        await until(reactor, lambda: _dead(leader, child))  # the whole group was killed
        bad = await client.put("services/mysqld", data=b"action=reload", headers=form)
        assert (bad.code, bad.json()["exception"]) == (400, "InvalidArgument")
        missing = await client.put("services/nope", data=b"action=start", headers=form)
        assert (missing.code, missing.json()["exception"]) == (404, "InvalidService")
    finally:
        await client.close()
        stop_script_daemon(tmp_path)
    assert await daemon.stop(reactor) == 0, daemon.log()


async def _dead(*pids: int) -> bool:
    return not any(alive(pid) for pid in pids)


def digest_header(challenge: str, uri: str, nc: int) -> str:
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    md5 = lambda text: hashlib.md5(text.encode()).hexdigest()  # noqa: E731
    ha1, ha2 = md5(f"{USER}:{params['realm']}:{PASSWORD}"), md5(f"GET:{uri}")
    count, cnonce = f"{nc:08x}", "c0ffee"
    response = md5(f"{ha1}:{params['nonce']}:{count}:{cnonce}:auth:{ha2}")
    return (f'Digest username="{USER}", realm="{params["realm"]}", nonce="{params["nonce"]}", uri="{uri}", '
            f'opaque="{params["opaque"]}", qop=auth, nc={count}, cnonce="{cnonce}", response="{response}"')


@pytest_twisted.ensureDeferred
async def test_basic_and_digest_on_both_listeners(start_daemon, reactor, tmp_path):
    daemon = await start_daemon("--http-port", "0", config=services_config(tmp_path))
    plain = f"http://127.0.0.1:{daemon.http_port}"
    tls = daemon.url.rstrip("/")
    ca = str(daemon.data_dir / "ca.pem")
    for base, extra in ((plain, []), (tls, ["--cacert", ca])):
        code, headers, body = await curl(*extra, f"{base}/services")
        assert code == 401 and json.loads(body)["exception"] == "Unauthorized"
        assert headers["content-type"] == "application/json"
        for scheme in ("--digest", "--basic"):
            code, _, body = await curl(*extra, scheme, "-u", f"{USER}:{PASSWORD}", f"{base}/services/xrootd")
            assert code == 200, body
            assert json.loads(body)["result"]["name"] == "xrootd"
            code, _, _ = await curl(*extra, scheme, "-u", f"{USER}:wrong", f"{base}/services")
            assert code == 401
        # Basic/Digest reaches the Qserv routes only
        code, _, _ = await curl(*extra, "--basic", "-u", f"{USER}:{PASSWORD}", f"{base}/rest/v1/info/")
        assert code == 401

    # A Digest answer replayed is refused; the next nonce count is accepted.
    client = Client(reactor, plain + "/", None, None)
    try:
        challenge = (await client.get("services")).headers.getRawHeaders("www-authenticate")[-1]
        first = digest_header(challenge, "/services", 1)
        assert (await client.get("services", headers={"Authorization": first})).code == 200
        replay = await client.get("services", headers={"Authorization": first})
        assert replay.code == 401 and replay.json()["exception"] == "Unauthorized"
        assert (await client.get("services", headers={"Authorization": digest_header(challenge, "/services", 2)})
                ).code == 200
    finally:
        await client.close()
    assert await daemon.stop(reactor) == 0, daemon.log()


@pytest_twisted.ensureDeferred
async def test_the_seeds_curl_examples(start_daemon, reactor, tmp_path):
    # The seed's examples send no credentials: the original's "none" configuration.
    daemon = await start_daemon("--http-port", "0", config=services_config(tmp_path, auth="none"))
    base = f"http://127.0.0.1:{daemon.http_port}"
    try:
        code, headers, body = await curl(base + "/services")
        assert (code, headers["content-type"]) == (200, "application/json")
        assert json.loads(body) == {"results": [{"name": "xrootd", "uri": "/services/xrootd"},
                                                {"name": "mysqld", "uri": "/services/mysqld"},
                                                {"name": "hung", "uri": "/services/hung"}]}
        code, _, body = await curl("-X", "PUT", "-d", "action=start", base + "/services/mysqld")
        assert code == 200, body
        code, headers, body = await curl(base + "/services/mysqld")
        answer = json.loads(body)
        assert (code, headers["content-type"]) == (200, "application/json")
        assert {key: answer["result"][key] for key in ("name", "state", "uri")} == {
            "name": "mysqld", "state": "active", "uri": "/services/mysqld"}
        # unknown routes and wrong methods answer in the envelope, not HTML
        code, headers, body = await curl(base + "/services/mysqld/nothing")
        assert code == 404 and json.loads(body)["exception"] == "NotFound"
        code, headers, body = await curl("-X", "DELETE", base + "/services/mysqld")
        assert code == 405 and json.loads(body)["exception"] == "MethodNotAllowed"
    finally:
        stop_script_daemon(tmp_path)
    assert await daemon.stop(reactor) == 0, daemon.log()
