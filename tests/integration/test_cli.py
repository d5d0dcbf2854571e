"""The `wmgr` command against the real daemon: each verb, --json, live --wait, and one clear line and
exit code 3 for a daemon that is down, a bad token or a certificate mismatch."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest
import pytest_twisted

from tests.harness import until
from wmgr.tls import ensure_ca

pytestmark = pytest.mark.timeout(180)


def wmgr(data_dir: Path, *args: str, stdin: str = "", timeout: float = 60,
         env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, WMGR_DATA_DIR=str(data_dir), COLUMNS="160", **(env or {}))
    return subprocess.run([sys.executable, "-m", "wmgr.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=environment)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wmgr: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


async def jobs_of(client: Any, group: str) -> list[dict[str, Any]]:
    return await client.jobs(group)


@pytest_twisted.ensureDeferred
async def test_add_takes_commands_from_stdin_with_wr_add_options(daemon, client):
    result = wmgr(daemon.data_dir, "add", "-i", "cli", "--memory", "50M", "--time", "2m", "--priority", "7",
                  "--retries", "2", "--cpus", "0", "--env", "A=1", "--env", "B=2", "--limit-grps", "lg:3",
                  "--dep-grps", "mine", "--cwd", "/tmp",
                  stdin="echo one\n# a comment\n\necho two\t{\"priority\": 9}\n")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 job(s) queued in rep group cli" in result.stdout
    jobs = {job["Cmd"]: job for job in await jobs_of(client, "cli")}
    assert set(jobs) == {"echo one", "echo two"}
    one = jobs["echo one"]
    assert one["ExpectedRAM"] == 50 and one["DepGroups"] == ["mine"]
    spec_check = await client.get("rest/v1/jobs/cli", params={"env": "true"})
    assert all(job["Env"] == ["A=1", "B=2"] for job in spec_check.json())


@pytest_twisted.ensureDeferred
async def test_add_reads_a_file_and_prints_json_with_json(daemon, client, tmp_path):
    commands = tmp_path / "commands.txt"
    commands.write_text("echo from-file\n")
    result = wmgr(daemon.data_dir, "--json", "add", "-f", str(commands), "-i", "file")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert [job["Cmd"] for job in reply] == ["echo from-file"] and reply[0]["RepGroup"] == "file"


def test_add_refuses_nothing_and_bad_values_as_usage_errors(daemon):
    assert_one_clear_line(wmgr(daemon.data_dir, "add", stdin="\n# only a comment\n"), 2, "no commands")
    assert_one_clear_line(wmgr(daemon.data_dir, "add", "--memory", "5", stdin="true\n"), 2, "memory")
    assert_one_clear_line(wmgr(daemon.data_dir, "add", stdin="true\t[1]\n"), 2, "JSON object")
    assert wmgr(daemon.data_dir).returncode == 2  # no verb
    assert wmgr(daemon.data_dir, "status", "--no-such-flag").returncode == 2


@pytest_twisted.ensureDeferred
async def test_status_wait_follows_live_and_exits_by_outcome(daemon, client):
    await client.add_jobs([{"cmd": "sleep 1 && echo a"}, {"cmd": "echo b"}], rep_grp="good")
    result = wmgr(daemon.data_dir, "status", "--wait", "good")
    assert result.returncode == 0, result.stderr
    assert "good" in result.stderr and "2/2" in result.stderr

    await client.add_jobs([{"cmd": "sleep 1 && exit 3"}, {"cmd": "echo fine"}], rep_grp="bad")
    result = wmgr(daemon.data_dir, "--json", "status", "--wait", "bad")
    assert result.returncode == 1, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["groups"]["bad"]["buried"] == 1 and outcome["groups"]["bad"]["complete"] == 1
    assert outcome["buried"] == {"bad": 1}


@pytest_twisted.ensureDeferred
async def test_status_tables_and_json(daemon, client, reactor):
    await client.add_jobs([{"cmd": "exit 4"}, {"cmd": "true"}], rep_grp="tab")
    await until(reactor, lambda: _settled(client, "tab"))
    result = wmgr(daemon.data_dir, "status", "tab")
    assert result.returncode == 0, result.stderr
    assert "tab" in result.stdout and "command exited non-zero" in result.stdout and "exit 4" in result.stdout
    result = wmgr(daemon.data_dir, "--json", "status")
    assert json.loads(result.stdout)["groups"]["tab"]["buried"] == 1
    missing = wmgr(daemon.data_dir, "status", "no-such-group")
    assert missing.returncode == 1 and "no jobs in rep group no-such-group" in missing.stderr


async def _settled(client: Any, group: str) -> bool:
    jobs = await client.jobs(group)
    return bool(jobs) and all(job["State"] in ("complete", "buried") for job in jobs)


@pytest_twisted.ensureDeferred
async def test_kill_retry_remove(daemon, client, reactor):
    [job] = await client.add_jobs([{"cmd": "sleep 300"}], rep_grp="long")

    async def state() -> str:
        return (await client.jobs(job["Key"]))[0]["State"]

    await until(reactor, lambda: _is(state, "running"))
    result = wmgr(daemon.data_dir, "kill", job["Key"])
    assert result.returncode == 0 and "1 job(s) killed" in result.stdout, result.stderr
    await until(reactor, lambda: _is(state, "buried"))
    assert (await client.jobs(job["Key"]))[0]["FailReason"] == "killed by user request"

    assert_one_clear_line(wmgr(daemon.data_dir, "kill", "long"), 1, "no running job matched")
    result = wmgr(daemon.data_dir, "retry", "long")
    assert result.returncode == 0 and "1 job(s) back in the queue" in result.stdout, result.stderr
    await until(reactor, lambda: _is(state, "running"))
    assert wmgr(daemon.data_dir, "kill", "long").returncode == 0
    await until(reactor, lambda: _is(state, "buried"))
    result = wmgr(daemon.data_dir, "--json", "remove", "long")
    assert result.returncode == 0 and json.loads(result.stdout)[0]["State"] == "deleted"
    assert await client.jobs("long") == []
    assert_one_clear_line(wmgr(daemon.data_dir, "retry", "long"), 1, "no buried job matched")


async def _is(state: Any, wanted: str) -> bool:
    return await state() == wanted


def test_info_and_warnings(daemon):
    result = wmgr(daemon.data_dir, "info")
    assert result.returncode == 0 and "Version" in result.stdout and daemon.url in result.stdout
    info = json.loads(wmgr(daemon.data_dir, "--json", "info").stdout)
    assert info["Mode"] == "started" and info["URL"] == daemon.url
    result = wmgr(daemon.data_dir, "warnings")
    assert result.returncode == 0 and "no scheduler warnings" in result.stdout
    assert json.loads(wmgr(daemon.data_dir, "--json", "warnings").stdout) == []


def test_url_and_data_dir_options_find_the_daemon(daemon, tmp_path):
    result = wmgr(tmp_path / "elsewhere", "--data-dir", str(daemon.data_dir), "info")
    assert result.returncode == 0, result.stderr
    result = wmgr(daemon.data_dir, "--url", daemon.url, "--json", "info")
    assert result.returncode == 0 and json.loads(result.stdout)["URL"] == daemon.url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_daemon_is_one_clear_line_and_exit_3(tmp_path):
    assert_one_clear_line(wmgr(tmp_path / "none", "status"), 3, "no daemon found", "wmgr.url")
    data = tmp_path / "down"
    data.mkdir()
    (data / "wmgr.url").write_text(f"https://localhost:{free_port()}/\n")
    (data / "client.token").write_text("x" * 43)
    ensure_ca(data)
    assert_one_clear_line(wmgr(data, "info"), 3, "cannot reach the daemon", "connection refused")


def test_bad_token_is_one_clear_line_and_exit_3(daemon, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("wmgr.url", "ca.pem"):
        shutil.copy(daemon.data_dir / name, copy / name)
    (copy / "client.token").write_text("not-the-token\n")
    for verb in (["info"], ["status"], ["status", "--wait"], ["kill", "x"]):
        assert_one_clear_line(wmgr(copy, *verb), 3, "bad token")


def test_certificate_mismatch_is_one_clear_line_and_exit_3(daemon, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    ensure_ca(other)  # a CA that did not sign the daemon's certificate
    for name in ("wmgr.url", "client.token"):
        shutil.copy(daemon.data_dir / name, other / name)
    assert_one_clear_line(wmgr(other, "info"), 3, "certificate mismatch")


@pytest_twisted.ensureDeferred
async def test_an_interrupted_wait_exits_130_quietly(daemon, client, reactor):
    [job] = await client.add_jobs([{"cmd": "sleep 60"}], rep_grp="waited")
    port = int(daemon.url.rsplit(":", 1)[1].strip("/"))
    waiting = subprocess.Popen([sys.executable, "-m", "wmgr.cli", "status", "--wait", "waited"],
                               env=dict(os.environ, WMGR_DATA_DIR=str(daemon.data_dir)), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        async def following() -> bool:  # connected to the daemon: the stream is open
            process = psutil.Process(waiting.pid)
            connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6
            return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                       for c in connections())
        await until(reactor, following)
        waiting.send_signal(signal.SIGINT)
        _, err = waiting.communicate(timeout=20)
    finally:
        if waiting.poll() is None:
            waiting.kill()
        await client.delete(f"rest/v1/jobs/{job['Key']}", params={"state": "running"})
    assert waiting.returncode == 130, err
    assert err.strip().splitlines()[-1] == "wmgr: interrupted" and "Traceback" not in err

# -- the connection registry ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_lists_partitions_with_their_live_entries(daemon, client):
    assert wmgr(daemon.data_dir, "connections").stdout.strip() == "no partitions"
    for partition, count in (("ccTest", 2), ("other", 1)):
        body = {"partition": partition, "connections": [
            {"uid": f"DRO-{n:03d}-tp_to_trigger", "uri": f"tcp://127.0.0.1:{1234 + n}", "data_type": "TPSet",
             "connection_type": 0} for n in range(count)]}
        reply = await client.post("publish", body)
        assert reply.code == 200, reply
    result = wmgr(daemon.data_dir, "connections")
    assert result.returncode == 0, result.stderr
    assert re.search(r"ccTest\s+│\s+2", result.stdout) and re.search(r"other\s+│\s+1", result.stdout), result.stdout
    listing = json.loads(wmgr(daemon.data_dir, "--json", "connections").stdout)
    assert {p["partition"]: p["entries"] for p in listing["partitions"]} == {"ccTest": 2, "other": 1}

# -- Qserv services and databases ----------------------------------------------------------------

SERVICES = "[service:sleeper]\ncommand = /bin/sh -c \"exec sleep 1000\"\n"


@pytest_twisted.ensureDeferred
async def test_services_list_start_stop_restart(make_daemon, reactor):
    daemon = await make_daemon(config=SERVICES)
    try:
        result = wmgr(daemon.data_dir, "services")
        assert result.returncode == 0 and re.search(r"sleeper\s+│\s+active", result.stdout), result.stdout
        stopped = json.loads(wmgr(daemon.data_dir, "--json", "services", "stop", "sleeper").stdout)
        assert stopped["name"] == "sleeper" and stopped["state"] != "active"
        assert json.loads(wmgr(daemon.data_dir, "--json", "services").stdout)[0]["state"] == stopped["state"]
        started = wmgr(daemon.data_dir, "services", "start", "sleeper")
        assert started.returncode == 0 and "active" in started.stdout, started.stderr
        first = json.loads(wmgr(daemon.data_dir, "--json", "services").stdout)[0]["pid"]
        again = json.loads(wmgr(daemon.data_dir, "--json", "services", "restart", "sleeper").stdout)
        assert again["state"] == "active" and again["pid"] != first
        assert_one_clear_line(wmgr(daemon.data_dir, "services", "start", "nope"), 1, "nope")
        assert_one_clear_line(wmgr(daemon.data_dir, "services", "start"), 2, "which service")
    finally:
        assert await daemon.stop(reactor) == 0, daemon.log()


@pytest_twisted.ensureDeferred
async def test_dbs_lists_databases_and_their_tables(daemon, client):
    assert wmgr(daemon.data_dir, "dbs").stdout.strip() == "no databases"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert (await client.post("dbs", data=b"db=LSST", headers=form)).code == 201
    assert (await client.post("dbs", data=b"db=Empty", headers=form)).code == 201
    schema = "table=Object&schema=CREATE+TABLE+Object+(objectId+BIGINT+NOT+NULL+PRIMARY+KEY,+ra+DOUBLE)"
    assert (await client.post("dbs/LSST/tables", data=schema.encode(), headers=form)).code == 201
    result = wmgr(daemon.data_dir, "dbs")
    assert result.returncode == 0 and re.search(r"LSST\s+│\s+1\s+│\s+Object", result.stdout), result.stdout
    assert json.loads(wmgr(daemon.data_dir, "--json", "dbs").stdout) == {"Empty": [], "LSST": ["Object"]}
