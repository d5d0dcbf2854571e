"""The daemon itself, started for real: TLS with its own CA, the token, restarts, shutdown, errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess

import pytest
import pytest_twisted
from openapi_spec_validator import validate

from tests.harness import twistd_command
from wmgr import __version__

pytestmark = pytest.mark.timeout(120)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True)


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest_twisted.ensureDeferred
async def test_first_start_makes_data_dir_ca_token_and_url(daemon, client):
    data = daemon.data_dir
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client.token", "wmgr.url", "wmgr.db"):
        assert (data / name).exists(), name
    for secret in ("ca.key", "server.key", "client.token"):
        assert stat.S_IMODE(os.stat(data / secret).st_mode) == 0o600, secret
    token = (data / "client.token").read_text().strip()
    assert len(token) == 43  # 32 bytes, URL-safe base64 without padding
    assert daemon.url.startswith("https://localhost:") and daemon.url.endswith("/")
    log = daemon.log()
    assert "ca.pem" in log and "client.token" in log and "curl --cacert" in log
    assert token not in log  # the curl line reads the token file instead of printing the secret


@pytest_twisted.ensureDeferred
async def test_version_needs_no_token_and_everything_else_does(client):
    reply = await client.get("rest/version/", token=False)
    assert reply.code == 200
    assert reply.json() == {"Version": __version__, "API": "1"}
    for path in ("rest/v1/info/", "rest/v1/jobs/", "openapi.json", "no/such/path"):
        reply = await client.get(path, token=False)
        assert reply.code == 401, path
        assert "error" in reply.json()
        reply = await client.get(path, token="wrong" * 8)
        assert reply.code == 401, path


@pytest_twisted.ensureDeferred
async def test_token_as_bearer_in_any_case_or_query_parameter(client):
    for scheme in ("Bearer", "bearer", "BEARER"):
        reply = await client.get("rest/v1/info/", token=False, headers={"Authorization": f"{scheme} {client.token}"})
        assert reply.code == 200, scheme
    reply = await client.get("rest/v1/info/", token=False, params={"token": client.token})
    assert reply.code == 200


@pytest_twisted.ensureDeferred
async def test_info_has_real_values(daemon, client):
    info = (await client.get("rest/v1/info/")).json()
    port = daemon.url.rsplit(":", 1)[1].strip("/")
    assert info["Port"] == port and info["WebPort"] == port
    assert info["PID"] == daemon.process.pid
    assert info["Host"] == socket.gethostname()
    assert info["Addr"] == f"localhost:{port}"
    assert info["Scheduler"] == "local" and info["Deployment"] == "production"
    assert info["Mode"] == "started"


@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_methods_answer_json(client):
    reply = await client.get("no/such/path")
    assert reply.code == 404 and "error" in reply.json()
    reply = await client.get("rest/v1/nothing-here")
    assert reply.code == 404 and "error" in reply.json()
    reply = await client.request("PUT", "rest/v1/info/")
    assert reply.code == 405 and "error" in reply.json()
    assert b"<html" not in reply.body.lower()


@pytest_twisted.ensureDeferred
async def test_openapi_document_is_valid_and_lists_the_routes(client):
    reply = await client.get("openapi.json")
    assert reply.code == 200
    doc = reply.json()
    validate(doc)
    for path in ("/rest/version/", "/rest/v1/info/", "/rest/v1/jobs/", "/rest/v1/jobs/{ids}", "/openapi.json"):
        assert path in doc["paths"], path


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_verifies_localhost_and_127_0_0_1_but_not_a_wrong_name(daemon):
    ca = str(daemon.data_dir / "ca.pem")
    port = daemon.url.rsplit(":", 1)[1].strip("/")
    for host in ("localhost", "127.0.0.1"):
        result = curl("--cacert", ca, f"https://{host}:{port}/rest/version/")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["API"] == "1"
    wrong = curl("--cacert", ca, "--resolve", f"wrong.example:{port}:127.0.0.1", f"https://wrong.example:{port}/rest/version/")
    assert wrong.returncode != 0
    unknown_ca = curl(f"https://localhost:{port}/rest/version/")
    assert unknown_ca.returncode != 0


def test_python_ssl_rejects_a_name_not_in_the_certificate(tmp_path):
    """The same check without curl, against a certificate issued the way the daemon issues it."""
    from wmgr.tls import ServerTLS

    tls = ServerTLS(tmp_path)
    context = ssl.create_default_context(cafile=str(tls.ca_path))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    for good in ("localhost", "127.0.0.1"):
        assert _handshake(context, server, good) is None
    assert "mismatch" in _handshake(context, server, "wrong.example").lower()


def _handshake(client_context, server_context, name):
    """Run a TLS handshake in memory; return the client's verification error, or None."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=name)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        for side, outgoing, peer_incoming in ((client, client_out, server_in), (server, server_out, client_in)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as e:
                return str(e)
            data = outgoing.read()
            if data:
                peer_incoming.write(data)
    return None


@pytest_twisted.ensureDeferred
async def test_plain_http_to_the_tls_port_gets_no_http_answer(daemon):
    port = int(daemon.url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /rest/version/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            answer = sock.recv(4096)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/")


@pytest_twisted.ensureDeferred
async def test_same_ca_and_token_after_restart(make_daemon, reactor):
    first = await make_daemon()
    ca, token = (first.data_dir / "ca.pem").read_bytes(), (first.data_dir / "client.token").read_text()
    assert await first.stop(reactor) == 0
    assert not first.url_file.exists()
    second = await make_daemon()
    assert (second.data_dir / "ca.pem").read_bytes() == ca
    assert (second.data_dir / "client.token").read_text() == token
    async with second.client(reactor) as client:
        assert (await client.get("rest/v1/info/")).code == 200
    assert await second.stop(reactor) == 0


@pytest_twisted.ensureDeferred
async def test_sigterm_exits_zero_within_seconds(make_daemon, reactor):
    d = await make_daemon()
    assert await d.stop(reactor, timeout=10) == 0
    assert "every write is committed" in d.log()


@pytest_twisted.ensureDeferred
async def test_plain_http_listener_serves_with_the_same_token(make_daemon, reactor):
    from wmgr.client import Client

    d = await make_daemon("--http-port", "0")
    port = d.http_port
    assert (d.data_dir / "wmgr.http.url").read_text() == f"http://localhost:{port}/\n"
    token = (d.data_dir / "client.token").read_text().strip()
    plain = Client(reactor, f"http://127.0.0.1:{port}/", None, token)
    try:
        assert (await plain.get("rest/v1/info/")).code == 200
        assert (await plain.get("rest/v1/info/", token=False)).code == 401
    finally:
        await plain.close()


@pytest_twisted.ensureDeferred
async def test_one_request_line_per_request_in_the_log(daemon, client):
    await client.get("rest/v1/info/")
    await client.get("no/such/thing")
    log = daemon.log()
    assert "GET /rest/v1/info/ 200" in log
    assert "GET /no/such/thing 404" in log


def test_twistd_help_lists_wmgr():
    result = subprocess.run(twistd_command() + ["--help"], capture_output=True, text=True, cwd="/")
    assert "wmgr" in result.stdout


def test_twistd_wmgr_help_documents_every_option():
    result = subprocess.run(twistd_command() + ["wmgr", "--help"], capture_output=True, text=True, cwd="/")
    for option in ("--config", "--data-dir", "--interface", "--port", "--http-port", "--manager", "--manager-ca",
                   "--manager-token-file", "--worker-name"):
        assert option in result.stdout, option
    # Only what is served: the APIs still to come appear when they land.
    text = " ".join((result.stdout + subprocess.run(twistd_command() + ["--help"], capture_output=True,
                                                    text=True, cwd="/").stdout).lower().split())
    for served in ("connection", "databases", "/worker/v1/", "tasks"):
        assert served in text, served
    assert "slurm" not in text  # not built yet


def test_bad_configuration_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.cnf"
    bad.write_text("[server]\nno_such_option = 1\n")
    result = subprocess.run(twistd_command() + ["-n", "--pidfile=", "wmgr", "--config", str(bad)],
                            capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    assert result.returncode != 0
    assert "no_such_option" in result.stdout + result.stderr


def _start_fails(command: list[str], cwd: str) -> tuple[int, str]:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=60)
    return done.returncode, done.stdout + done.stderr


@pytest_twisted.ensureDeferred
async def test_a_start_on_a_taken_port_exits_non_zero(daemon, tmp_path):
    code, log = _start_fails(twistd_command() + ["-n", "--pidfile=", "wmgr", "--data-dir", str(tmp_path / "other"),
                                                 "--port", daemon.url.rsplit(":", 1)[1].strip("/")], str(tmp_path))
    assert code == 1, log
    assert "could not start" in log


def test_a_start_with_an_unusable_data_dir_exits_non_zero(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    data_dir = str(tmp_path / "file" / "data")
    code, log = _start_fails(twistd_command() + ["-n", "--pidfile=", "wmgr", "--data-dir", data_dir, "--port", "0"],
                             str(tmp_path))
    assert code == 1, log
    assert "could not start" in log
