"""Issue 9 against the real daemon: encodings, the token, TLS suites, body limits, the header
deadline, the launcher and a bad job, and /metrics scraped and parsed."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import until

pytestmark = pytest.mark.timeout(120)

LIMITS = """
[http]
header_timeout = 1
body_limits = /=4K /rest/v1/upload/=64K

[metrics]
open = false
"""


def port_of(daemon) -> int:
    return int(daemon.url.rsplit(":", 1)[1].strip("/"))


def tls_context(daemon, ciphers: str = "", tls12_only: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(daemon.data_dir / "ca.pem"))
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def raw(daemon, data: bytes, wait: float = 10.0, context=None) -> bytes:
    """Send bytes over TLS; return everything the daemon answers before it closes or `wait` ends."""
    context = context or tls_context(daemon)
    with socket.create_connection(("127.0.0.1", port_of(daemon)), timeout=wait) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(data)
            received = b""
            deadline = time.monotonic() + wait
            try:
                while time.monotonic() < deadline:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except (socket.timeout, ssl.SSLError, ConnectionResetError):
                pass
    return received


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), answer[:300]
    return int(head.split(b" ", 2)[1]), json.loads(body)


def token_of(daemon) -> str:
    return (daemon.data_dir / "client.token").read_text().strip()


@pytest_twisted.ensureDeferred
async def test_non_ascii_query_strings_and_the_encoded_token_name(daemon, client):
    for query in ("x=%C3%A9", "x=%E9", "search=%C3%A9t%C3%A9"):
        reply = await client.get(f"rest/v1/info/?{query}")
        assert reply.code == 200 and reply.json()["Scheduler"] == "local", reply
        assert (await client.get(f"rest/v1/info/?{query}", token=False)).code == 401
    reply = await client.get(f"rest/v1/info/?%74oken={token_of(daemon)}", token=False)
    assert reply.code == 200
    reply = await client.get(f"api/v1/?%74oken={token_of(daemon)}", token=False)
    assert reply.code == 200 and token_of(daemon) not in reply.body.decode()


def test_tls12_offers_only_aead_suites(daemon):
    with pytest.raises(ssl.SSLError):
        raw(daemon, b"", context=tls_context(daemon, "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA",
                                             tls12_only=True))
    for good in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        answer = raw(daemon, b"GET /rest/version/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                     context=tls_context(daemon, good, tls12_only=True))
        assert answer.startswith(b"HTTP/1.1 200"), good
    answer = raw(daemon, b"GET /rest/version/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")  # TLS 1.3 as it is


@pytest_twisted.ensureDeferred
async def test_body_limits_slow_headers_and_protocol_errors_answer_json(make_daemon, reactor):
    daemon = await make_daemon(config=LIMITS)
    token = token_of(daemon)
    code, body = status_and_json(raw(daemon, (
        f"PUT /rest/v1/upload/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {200 << 20}\r\n\r\n").encode() + b"x" * 65536))
    assert code == 413 and str(64 * 1024) in body["error"]
    code, body = status_and_json(raw(daemon, (
        f"POST /rest/v1/jobs/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: 5000\r\n\r\n").encode() + b"[" * 5000))
    assert code == 413
    started = time.monotonic()
    code, body = status_and_json(raw(daemon, b"GET /rest/version/ HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1"))
    assert code == 408 and time.monotonic() - started < 5
    code, body = status_and_json(raw(daemon, b"GARBAGE\r\n\r\n"))
    assert code == 400 and body["error"]
    async with daemon.client(reactor) as client:
        reply = await client.put("rest/v1/upload/", data=b"y" * 60000)
        assert reply.code == 200, reply


@pytest_twisted.ensureDeferred
async def test_a_job_with_a_nul_in_its_env_is_refused_and_harms_no_other(daemon, client, reactor):
    reply = await client.post("rest/v1/jobs/", [{"cmd": "true", "env": ["A=b\u0000c"]}])
    assert reply.code == 400 and "NUL" in reply.json()["error"]
    await client.add_jobs([{"cmd": f"true #{i}", "rep_grp": "innocent"} for i in range(10)])

    async def all_complete():
        jobs = await client.jobs("innocent")
        return len(jobs) == 10 and all(job["State"] == "complete" for job in jobs)

    await until(reactor, all_complete, timeout=60)


def parse(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest_twisted.ensureDeferred
async def test_metrics_scraped_from_the_daemon(daemon, client, reactor):
    await client.add_jobs([{"cmd": f"true #{i}", "rep_grp": "metrics"} for i in range(3)])
    await client.get("rest/v1/jobs/metrics")
    await client.get("rest/v1/jobs/nosuchgroup")

    async def scraped():
        reply = await client.get("metrics")
        assert reply.code == 200 and reply.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        got = parse(reply.body.decode())
        return got if got[("wmgr_jobs_completed_total", ())] >= 3 else None

    got = await until(reactor, scraped, timeout=60)
    assert got[("wmgr_jobs_started_total", ())] >= 3
    assert got[("wmgr_launcher_restarts_total", ())] == 0
    assert got[("wmgr_runner_cores", ())] > 0
    assert got[("wmgr_store_commit_duration_seconds_count", ())] > 0
    routes = {dict(labels)["route"] for name, labels in got if name == "wmgr_http_requests_total"}
    assert "/rest/v1/jobs/{ids}" in routes and "/rest/v1/jobs/" in routes
    assert not any("metrics" in route and route != "/metrics" for route in routes)
    by_key = (("method", "GET"), ("route", "/rest/v1/jobs/{ids}"), ("status", "200"))
    assert got[("wmgr_http_requests_total", by_key)] == 2
    reply = await client.get("metrics", token=False)
    assert reply.code == 401 and "token" in reply.json()["error"]


@pytest_twisted.ensureDeferred
async def test_metrics_open_without_the_token_when_configured(make_daemon, reactor):
    daemon = await make_daemon(config="[metrics]\nopen = true\n")
    async with daemon.client(reactor) as client:
        reply = await client.get("metrics", token=False)
        assert reply.code == 200 and "wmgr_jobs_started_total" in reply.body.decode()
        assert (await client.get("rest/v1/info/", token=False)).code == 401
