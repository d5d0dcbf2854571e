"""The connection registry against the real daemon: the seed's curl examples as written (plain
HTTP with `open = true`; HTTPS with the token otherwise), every route, each malformed request of
the notes' bug list followed by a lookup that still answers, a restart (and a kill -9) keeping the
registry, and expiry. Every call opens a new connection, as the C++ client does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.harness import Daemon, until
from wmgr.client import Client

pytestmark = pytest.mark.timeout(120)

OPEN = "[connections]\nopen = true\n"
PUBLISH_JSON = """{
 "connections":[
  {
   "connection_type":0,
   "data_type":"TPSet",
   "uid":"DRO-000-tp_to_trigger",
   "uri":"tcp://192.168.1.100:1234"
  },
  {
   "connection_type":0,
   "data_type":"TPSet",
   "uid":"DRO-001-tp_to_trigger",
   "uri":"tcp://192.168.1.100:1235"
  }
 ],
 "partition":"ccTest"
}
"""
LOOKUP = {"uid_regex": "DRO.*", "data_type": "TPSet"}
EXPECTED = [
    {"uid": "DRO-000-tp_to_trigger", "uri": "tcp://192.168.1.100:1234", "connection_type": 0, "data_type": "TPSet"},
    {"uid": "DRO-001-tp_to_trigger", "uri": "tcp://192.168.1.100:1235", "connection_type": 0, "data_type": "TPSet"},
]


def plain(reactor: Any, daemon: Daemon) -> Client:
    """A client of the plain-HTTP listener that sends no token and a new connection per call."""
    return Client(reactor, f"http://127.0.0.1:{daemon.http_port}/", None, None, persistent=False)


async def curl(*args: str, cwd: Path) -> tuple[str, str]:
    result = await deferToThread(subprocess.run, ["curl", "-sS", "--max-time", "10", *args],
                                 capture_output=True, text=True, cwd=str(cwd))
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


async def open_daemon(make_daemon: Any, config: str = OPEN, name: str = "data") -> Daemon:
    return await make_daemon("--http-port", "0", config=config, name=name)


@pytest_twisted.ensureDeferred
async def test_the_seed_curl_examples_over_plain_http_when_open(make_daemon: Any, reactor: Any, tmp_path: Path) -> None:
    daemon = await open_daemon(make_daemon)
    (tmp_path / "publish.json").write_text(PUBLISH_JSON)
    base = f"http://127.0.0.1:{daemon.http_port}"
    out, _ = await curl("-d", "@publish.json", "-H", "content-type: application/json", f"{base}/publish", cwd=tmp_path)
    assert out == "OK"
    out, _ = await curl("-d", '{"uid_regex":"DRO.*","data_type":"TPSet"}', "-H", "content-type: application/json",
                        f"{base}/getconnection/ccTest", cwd=tmp_path)
    assert json.loads(out) == EXPECTED
    assert out.startswith('[{"uid":"DRO-000-tp_to_trigger","uri":"tcp://192.168.1.100:1234","connection_type":0,')
    # The older form of /retract-partition, as the seed describes it.
    out, _ = await curl("-d", "partition=ccTest", f"{base}/retract-partition", cwd=tmp_path)
    assert out == "OK"


@pytest_twisted.ensureDeferred
async def test_the_seed_curl_examples_with_the_token_over_https_when_closed(make_daemon: Any, reactor: Any,
                                                                           tmp_path: Path) -> None:
    daemon = await make_daemon("--http-port", "0")
    (tmp_path / "publish.json").write_text(PUBLISH_JSON)
    ca, token = daemon.data_dir / "ca.pem", (daemon.data_dir / "client.token").read_text().strip()
    auth = ["--cacert", str(ca), "-H", f"Authorization: Bearer {token}"]
    url = daemon.url.rstrip("/")
    out, _ = await curl(*auth, "-d", "@publish.json", "-H", "content-type: application/json", f"{url}/publish",
                        cwd=tmp_path)
    assert out == "OK"
    out, _ = await curl(*auth, "-d", '{"uid_regex":"DRO.*","data_type":"TPSet"}', "-H",
                        "content-type: application/json", f"{url}/getconnection/ccTest", cwd=tmp_path)
    assert json.loads(out) == EXPECTED
    # Without the token: refused, over HTTPS and over plain HTTP alike, and nothing changes.
    out, _ = await curl("--cacert", str(ca), "-w", " %{http_code}", "-d", '{"partition":"ccTest"}',
                        f"{url}/retract-partition", cwd=tmp_path)
    assert out.endswith(" 401") and "token" in out
    out, _ = await curl("-w", " %{http_code}", "-d", "partition=ccTest",
                        f"http://127.0.0.1:{daemon.http_port}/retract-partition", cwd=tmp_path)
    assert out.endswith(" 401")
    out, _ = await curl(*auth, "-d", '{"uid_regex":"DRO.*","data_type":"TPSet"}', f"{url}/getconnection/ccTest",
                        cwd=tmp_path)
    assert json.loads(out) == EXPECTED


@pytest_twisted.ensureDeferred
async def test_every_route(make_daemon: Any, reactor: Any) -> None:
    daemon = await open_daemon(make_daemon)
    client = plain(reactor, daemon)
    https = daemon.client(reactor)
    try:
        assert (await client.get("/ready")).text == "OK"
        assert (await client.get("/live")).text == "OK"
        reply = await client.post("/publish", json.loads(PUBLISH_JSON))
        assert (reply.code, reply.text) == (200, "OK")
        assert (await client.post("/getconnection/ccTest", LOOKUP)).json() == EXPECTED
        assert (await client.request("GET", "/getconnection/ccTest", body=LOOKUP)).json() == EXPECTED
        assert (await client.post("/getconnection/nowhere", LOOKUP)).code == 404
        assert (await client.get("/connections/partitions")).json() == {
            "partitions": [{"partition": "ccTest", "entries": 2}], "ttl": 10.0}
        page = await client.get("/")
        assert page.code == 200 and "Dump" in page.text and "DRO-001-tp_to_trigger" in page.text
        assert "2 calls to lookup" in (await client.get("/stats")).text
        metrics = (await https.get("/metrics")).text
        assert 'wmgr_connections{partition="ccTest"} 2.0' in metrics, metrics[-2000:]
        assert "1 calls to publish" in (await client.get("/resetStats")).text
        assert "0 calls to publish" in (await client.get("/stats")).text
        retract = {"partition": "ccTest", "connections": [{"connection_id": "DRO-000-tp_to_trigger",
                                                           "data_type": "TPSet"}]}
        assert (await client.post("/retract", retract)).text == "OK"
        assert (await client.post("/retract", retract)).code == 404
        assert (await client.post("/getconnection/ccTest", LOOKUP)).json() == EXPECTED[1:]
        # drunc's JSON form of /retract-partition; the urlencoded one is in the curl test.
        assert (await client.post("/retract-partition", {"partition": "ccTest"})).text == "OK"
        assert (await client.post("/retract-partition", {"partition": "ccTest"})).code == 404
        await client.post("/publish", json.loads(PUBLISH_JSON))
        assert (await client.get("/resetService")).code == 200
        assert (await client.post("/getconnection/ccTest", LOOKUP)).code == 404
        # The root's own routes keep wanting the token even when the registry is open.
        assert (await client.get("/openapi.json")).code == 401
        document = (await https.get("/openapi.json")).json()
        assert {"/publish", "/getconnection/{partition}", "/", "/connections/partitions"} <= set(document["paths"])
        assert (await https.post("/getconnection/ccTest", LOOKUP)).code == 404  # over HTTPS too
    finally:
        await client.close()
        await https.close()


# The notes' bug list: requests that made the original answer 500 and hang for good (publish
# without data_type, connection_type or connections; retract without connections or with an item
# without connection_id), or 500 (not JSON, invalid regex), and what else must be refused.
BUGS = [
    ("/publish", {"partition": "ccTest", "connections": [{"uid": "X", "uri": "tcp://h:1", "connection_type": 0}]}),
    ("/publish", {"partition": "ccTest", "connections": [{"uid": "X", "uri": "tcp://h:1", "data_type": "TPSet"}]}),
    ("/publish", {"partition": "ccTest"}),
    ("/publish", {"connections": []}),
    ("/publish", "not json"),
    ("/retract", {"partition": "ccTest"}),
    ("/retract", {"partition": "ccTest", "connections": [{"data_type": "TPSet"}]}),
    ("/retract", ""),
    ("/getconnection/ccTest", {"uid_regex": "DRO(", "data_type": "TPSet"}),
    ("/getconnection/ccTest", {"uid_regex": "D" * 5000, "data_type": "TPSet"}),
    ("/getconnection/ccTest", ""),
    ("/getconnection/ccTest", "{"),
    ("/retract-partition", ""),
    ("/publish", {"partition": "ccTest", "connections": [
        {"uid": f"X{i}", "uri": "u" * 1000, "data_type": "TPSet", "connection_type": 0} for i in range(10000)]}),
]


@pytest_twisted.ensureDeferred
async def test_each_malformed_request_is_400_and_the_registry_keeps_answering(make_daemon: Any, reactor: Any) -> None:
    daemon = await open_daemon(make_daemon)
    client = plain(reactor, daemon)
    try:
        await client.post("/publish", json.loads(PUBLISH_JSON))
        for path, body in BUGS:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            reply = await client.request("POST", path, data=data, headers={"Content-Type": "application/json"},
                                         timeout=5)
            assert reply.code == 400, (path, reply.text)
            assert reply.json()["error"]
            lookup = await client.post("/getconnection/ccTest", LOOKUP, timeout=2)
            assert lookup.json() == EXPECTED, (path, lookup.text)
        assert (await client.get("/connections/partitions")).json()["partitions"] == [
            {"partition": "ccTest", "entries": 2}]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_restart_and_a_kill_keep_the_registry(make_daemon: Any, reactor: Any) -> None:
    daemon = await open_daemon(make_daemon, OPEN + "ttl = 120\n")
    client = plain(reactor, daemon)
    await client.post("/publish", json.loads(PUBLISH_JSON))
    await client.post("/publish", {"partition": "empty", "connections": []})
    await client.post("/retract", {"partition": "ccTest", "connections": [{"connection_id": "DRO-000-tp_to_trigger"}]})
    await client.post("/publish", {"partition": "ccTest", "connections": [
        {"uid": "DRO-000-tp_to_trigger", "uri": "tcp://h:9", "data_type": "TPSet", "connection_type": 1}]})
    expected = [EXPECTED[1], {"uid": "DRO-000-tp_to_trigger", "uri": "tcp://h:9", "connection_type": 1,
                              "data_type": "TPSet"}]
    assert (await client.post("/getconnection/ccTest", LOOKUP)).json() == expected
    await client.close()
    assert await daemon.stop(reactor) == 0
    await daemon.start(reactor)
    client = plain(reactor, daemon)
    try:
        assert (await client.post("/getconnection/ccTest", LOOKUP)).json() == expected
        assert (await client.post("/getconnection/empty", LOOKUP)).text == "[]"
        await client.post("/publish", {"partition": "ccTest", "connections": [
            {"uid": "DRO-002-tp_to_trigger", "uri": "tcp://h:2", "data_type": "TPSet", "connection_type": 0}]})
    finally:
        await client.close()
    daemon.crash()  # kill -9: what was acknowledged is committed
    await daemon.start(reactor)
    client = plain(reactor, daemon)
    try:
        found = (await client.post("/getconnection/ccTest", LOOKUP)).json()
        assert [item["uid"] for item in found] == ["DRO-001-tp_to_trigger", "DRO-000-tp_to_trigger",
                                                   "DRO-002-tp_to_trigger"]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_entries_expire_and_are_purged(make_daemon: Any, reactor: Any) -> None:
    daemon = await open_daemon(make_daemon, OPEN + "ttl = 1\n")
    client = plain(reactor, daemon)
    try:
        await client.post("/publish", json.loads(PUBLISH_JSON))

        async def expired() -> bool:
            return (await client.post("/getconnection/ccTest", LOOKUP)).text == "[]"

        await until(reactor, expired, timeout=10)

        async def purged() -> bool:
            return (await client.get("/")).text.count("<strike>") == 0 and \
                "DRO-000" not in (await client.get("/")).text

        await until(reactor, purged, timeout=10)
        assert (await client.get("/connections/partitions")).json()["partitions"] == [
            {"partition": "ccTest", "entries": 0}]
    finally:
        await client.close()
    # Nothing expired comes back after a restart either.
    assert await daemon.stop(reactor) == 0
    await daemon.start(reactor)
    client = plain(reactor, daemon)
    try:
        assert (await client.post("/getconnection/ccTest", LOOKUP)).text == "[]"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_large_replies_over_both_listeners(make_daemon: Any, reactor: Any) -> None:
    """Replies past LARGE_REPLY have their headers sent ahead of the body: whole and valid, on
    plain TCP and on TLS, one after another on one kept-alive connection too."""
    daemon = await open_daemon(make_daemon)
    connections = [{"uid": f"DRO-{i:06d}-tp_to_trigger", "uri": f"tcp://192.168.1.100:{1024 + i}",
                    "data_type": "TPSet", "connection_type": 0} for i in range(5000)]
    client = plain(reactor, daemon)
    kept_alive = Client(reactor, f"http://127.0.0.1:{daemon.http_port}/", None, None)
    https = daemon.client(reactor)
    try:
        await client.post("/publish", {"partition": "big", "connections": connections})
        expected = [{"uid": c["uid"], "uri": c["uri"], "connection_type": 0, "data_type": "TPSet"}
                    for c in connections]
        for c in (client, kept_alive, kept_alive, https, https):
            reply = await c.post("/getconnection/big", LOOKUP)
            assert reply.code == 200 and len(reply.body) > 256 * 1024
            assert reply.json() == expected
    finally:
        for c in (client, kept_alive, https):
            await c.close()


def raw_exchange(port: int, requests: bytes, answers: int) -> bytes:
    """Send raw request bytes on one connection; read until `answers` replies, or with answers=0
    until the daemon closes the connection (a socket timeout if it does not)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(requests)
        received = b""
        while not answers or received.count(b"HTTP/1.1 ") < answers or not received.endswith(b"OK"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def raw_publish(uid: str, close: bool = False) -> bytes:
    body = json.dumps({"partition": "raw", "connections": [
        {"uid": uid, "uri": "tcp://h:1", "data_type": "TPSet", "connection_type": 0}]}).encode()
    headers = b"Connection: close\r\n" if close else b""
    return b"POST /publish HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (headers, len(body), body)


@pytest_twisted.ensureDeferred
async def test_publish_answers_on_kept_alive_pipelined_and_closing_connections(make_daemon: Any, reactor: Any) -> None:
    # A publish's answer is written to the socket as soon as it is committed (not at the
    # reactor's next poll): on a kept-alive connection, pipelined, and one that closes after it.
    daemon = await open_daemon(make_daemon)
    port = daemon.http_port
    several = await deferToThread(raw_exchange, port, b"".join(raw_publish(f"u{i}") for i in range(5)), 5)
    assert several.count(b"HTTP/1.1 200 OK\r\n") == 5 and several.count(b"Content-Length: 2\r\n") == 5
    closing = await deferToThread(raw_exchange, port, raw_publish("last", close=True), 0)
    assert closing.startswith(b"HTTP/1.1 200 OK\r\n") and closing.endswith(b"\r\n\r\nOK")
    client = plain(reactor, daemon)
    try:
        found = (await client.post("/getconnection/raw", {"uid_regex": ".*", "data_type": "TPSet"})).json()
        assert [item["uid"] for item in found] == ["u0", "u1", "u2", "u3", "u4", "last"]
    finally:
        await client.close()
