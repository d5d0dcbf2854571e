"""The connectivity-server API (wmgr.api.connections) through Root, in memory (StubTreq): the
original's success shapes, JSON 400s that change nothing, the token rule and the open mode, and
that / belongs to this surface while /openapi.json still reaches the root's own app."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from tests.test_connections import FakeStore
from wmgr.api.connections import SEGMENTS, ConnectionsAPI
from wmgr.api.openapi import ROOT_PATHS, document
from wmgr.api.root import Root, RootApp, Surface
from wmgr.connections.service import ConnectionService

TOKEN = "conn-Test_token"
BASE = "http://wmgr.test"
AUTH = {b"Authorization": [f"Bearer {TOKEN}".encode()]}
JSON = {b"Content-Type": [b"application/json"]}
PUBLISH = {"connections": [
    {"connection_type": 0, "data_type": "TPSet", "uid": "DRO-000-tp_to_trigger", "uri": "tcp://192.168.1.100:1234"},
    {"connection_type": 0, "data_type": "TPSet", "uid": "DRO-001-tp_to_trigger", "uri": "tcp://192.168.1.100:1235"},
], "partition": "ccTest"}
LOOKUP = {"uid_regex": "DRO.*", "data_type": "TPSet"}
EXPECTED = (b'[{"uid":"DRO-000-tp_to_trigger","uri":"tcp://192.168.1.100:1234","connection_type":0,"data_type":"TPSet"},'
            b'{"uid":"DRO-001-tp_to_trigger","uri":"tcp://192.168.1.100:1235","connection_type":0,"data_type":"TPSet"}]')


class Api:
    def __init__(self, open_access: bool = True, **limits: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.service = ConnectionService(FakeStore(), self.clock)
        api = ConnectionsAPI(self.service, open_access, **limits)
        fallback = RootApp(document([ROOT_PATHS])).app.resource()
        self.stub = StubTreq(Root(TOKEN, [Surface(SEGMENTS, api.resource(), own_auth=True, quiet=True)], fallback))

    async def call(self, method: str, path: str, body: Any = None, data: bytes = b"",
                   headers: Any = None, token: bool = False) -> tuple[int, bytes]:
        all_headers = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            all_headers.update(JSON)
        if token:
            all_headers.update(AUTH)
        pending = self.stub.request(method, BASE + path, data=data or None, headers=all_headers)
        self.clock.advance(0)  # the reactor's next iteration: writes go to the store
        self.stub.flush()
        response = await pending
        return response.code, await response.content()

    async def lookup(self, partition: str = "ccTest", query: Any = None) -> tuple[int, bytes]:
        return await self.call("POST", f"/getconnection/{partition}", query or LOOKUP)


@pytest.fixture
def api() -> Api:
    return Api()


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


@pytest_twisted.ensureDeferred
async def test_the_seed_examples_publish_and_look_up(api: Api) -> None:
    assert await api.call("POST", "/publish", PUBLISH) == (200, b"OK")
    assert await api.lookup() == (200, EXPECTED)
    assert await api.call("GET", "/getconnection/ccTest", LOOKUP) == (200, EXPECTED)
    assert await api.lookup(query={"uid_regex": "DUMMY.*", "data_type": "TPSet"}) == (200, b"[]")


@pytest_twisted.ensureDeferred
async def test_lookup_errors(api: Api) -> None:
    code, body = await api.lookup("nowhere")
    assert code == 404 and "nowhere" in error_of(body)
    assert (await api.call("POST", "/getconnection/bad/con", LOOKUP))[0] == 404
    assert (await api.call("POST", "/getconnection/", LOOKUP))[0] == 404


@pytest_twisted.ensureDeferred
async def test_retract_and_retract_partition(api: Api) -> None:
    await api.call("POST", "/publish", PUBLISH)
    retract = {"partition": "ccTest", "connections": [{"connection_id": "DRO-000-tp_to_trigger", "data_type": "x"}]}
    assert await api.call("POST", "/retract", retract) == (200, b"OK")
    code, body = await api.call("POST", "/retract", dict(retract, connections=[
        {"connection_id": "DRO-000-tp_to_trigger"}, {"connection_id": "DRO-001-tp_to_trigger"}]))
    assert code == 404 and "DRO-000" in error_of(body)
    assert (await api.lookup())[0] == 404  # the last entry took the partition with it
    assert (await api.call("POST", "/retract", retract))[0] == 404
    # /retract-partition: the urlencoded form of older clients, and drunc's JSON.
    await api.call("POST", "/publish", PUBLISH)
    form = {b"Content-Type": [b"application/x-www-form-urlencoded"]}
    assert await api.call("POST", "/retract-partition", data=b"partition=ccTest", headers=form) == (200, b"OK")
    assert (await api.call("POST", "/retract-partition", data=b"partition=ccTest", headers=form))[0] == 404
    await api.call("POST", "/publish", PUBLISH)
    assert await api.call("POST", "/retract-partition", {"partition": "ccTest"}) == (200, b"OK")
    assert (await api.call("POST", "/retract-partition", {"partition": "ccTest"}))[0] == 404
    # A %-encoded form field that is not ASCII is text like any other (schemathesis found a 500).
    await api.call("POST", "/publish", {**PUBLISH, "partition": "été"})
    assert await api.call("POST", "/retract-partition", data=b"x=%C3%A9&partition=%C3%A9t%C3%A9",
                          headers=form) == (200, b"OK")
    assert (await api.call("POST", "/retract-partition", data=b"partition=%FF", headers=form))[0] == 400


# Every malformed request of the notes' bug list (several of which hang the original for good),
# and more: each is a 400 with a JSON reason, changes nothing, and the next lookup still answers.
MALFORMED = [
    ("/publish", b"not json"),
    ("/publish", b""),
    ("/publish", b"[1, 2]"),
    ("/publish", json.dumps({"connections": PUBLISH["connections"]}).encode()),  # no partition
    ("/publish", json.dumps({"partition": "ccTest"}).encode()),  # no connections
    ("/publish", json.dumps({"partition": "ccTest", "connections": [
        {"uid": "NEW", "uri": "tcp://h:1", "connection_type": 0}]}).encode()),  # no data_type
    ("/publish", json.dumps({"partition": "ccTest", "connections": [
        {"uid": "NEW", "uri": "tcp://h:1", "data_type": "TPSet"}]}).encode()),  # no connection_type
    ("/publish", json.dumps({"partition": "ccTest", "connections": [
        {"uri": "tcp://h:1", "data_type": "TPSet", "connection_type": 0}]}).encode()),  # no uid
    ("/publish", json.dumps({"partition": "ccTest", "connections": [
        {"uid": "NEW", "data_type": "TPSet", "connection_type": 0}]}).encode()),  # no uri
    ("/publish", json.dumps({"partition": "ccTest", "connections": [
        {"uid": 7, "uri": "tcp://h:1", "data_type": "TPSet", "connection_type": 0}]}).encode()),
    ("/publish", json.dumps({"partition": "ccTest", "connections": [
        {"uid": "NEW", "uri": "tcp://h:1", "data_type": "TPSet", "connection_type": True}]}).encode()),
    ("/publish", json.dumps({"partition": "ccTest", "connections": [
        {"uid": "NEW", "uri": "tcp://h:1", "data_type": "TPSet", "connection_type": 0}, "junk"]}).encode()),
    ("/publish", b"[" * 100000 + b"]" * 100000),
    ("/getconnection/ccTest", b""),
    ("/getconnection/ccTest", b"{oops"),
    ("/getconnection/ccTest", json.dumps({"data_type": "TPSet"}).encode()),
    ("/getconnection/ccTest", json.dumps({"uid_regex": "DRO.*"}).encode()),
    ("/getconnection/ccTest", json.dumps({"uid_regex": "DRO(", "data_type": "TPSet"}).encode()),
    ("/getconnection/ccTest", json.dumps({"uid_regex": "[", "data_type": "Nothing"}).encode()),
    ("/getconnection/ccTest", json.dumps({"uid_regex": "x" * 2000, "data_type": "TPSet"}).encode()),
    ("/retract", b""),
    ("/retract", b"nope"),
    ("/retract", json.dumps({"partition": "ccTest"}).encode()),  # no connections
    ("/retract", json.dumps({"connections": [{"connection_id": "DRO-000-tp_to_trigger"}]}).encode()),
    ("/retract", json.dumps({"partition": "ccTest", "connections": [
        {"connection_id": "DRO-000-tp_to_trigger"}, {"data_type": "TPSet"}]}).encode()),  # an item without id
    ("/retract-partition", b""),
    ("/retract-partition", json.dumps({"session": "ccTest"}).encode()),
    ("/retract-partition", json.dumps({"partition": 5}).encode()),
    ("/retract-partition", b"%C3%BF%EC=1&partition=ccTest"),  # a name that decodes to non-ASCII (was a 500)
    ("/retract-partition", "partition=ccé".encode()),  # not percent-encoded
]


@pytest.mark.parametrize("path,data", MALFORMED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(MALFORMED)])
@pytest_twisted.ensureDeferred
async def test_malformed_requests_are_400_and_change_nothing(path: str, data: bytes) -> None:
    api = Api()
    await api.call("POST", "/publish", PUBLISH)
    code, body = await api.call("POST", path, data=data, headers=JSON)
    assert code == 400, body
    assert error_of(body)
    assert await api.lookup() == (200, EXPECTED)
    assert await api.lookup(query={"uid_regex": "NEW", "data_type": "TPSet"}) == (200, b"[]")


@pytest_twisted.ensureDeferred
async def test_a_form_with_escapes_beyond_ascii_is_read_as_utf8(api: Api) -> None:
    # Found by schemathesis: parse_qs of bytes failed (500) on a %-escape over 0x7f.
    form = {b"Content-Type": [b"application/x-www-form-urlencoded"]}
    code, body = await api.call("POST", "/retract-partition", data=b"=%F1%B6%B6%A8x&partition=%C2%B4", headers=form)
    assert code == 404 and "\u00b4" in error_of(body)
    code, body = await api.call("POST", "/retract-partition", data=b"partition=%C2", headers=form)
    assert code == 400 and "UTF-8" in error_of(body)


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_refused() -> None:
    api = Api(max_body=300)
    big = dict(PUBLISH, connections=PUBLISH["connections"] * 3)
    code, body = await api.call("POST", "/publish", big)
    assert code == 400 and "limit" in error_of(body)
    assert (await api.lookup())[0] == 404
    assert await api.call("POST", "/publish", PUBLISH) == (200, b"OK")


@pytest_twisted.ensureDeferred
async def test_pages_and_probes(api: Api) -> None:
    await api.call("POST", "/publish", PUBLISH)
    await api.lookup()
    code, page = await api.call("GET", "/")
    assert code == 200 and b"Dump" in page and b"DRO-001-tp_to_trigger" in page and b"ccTest" in page
    code, stats = await api.call("GET", "/stats")
    assert code == 200 and b"1 calls to publish" in stats and b"1 calls to lookup" in stats
    assert b"Maximum entries in partition ccTest = 2" in stats
    code, before = await api.call("GET", "/resetStats")
    assert code == 200 and b"1 calls to publish" in before
    assert b"0 calls to publish" in (await api.call("GET", "/stats"))[1]
    assert (await api.call("POST", "/resetStats"))[0] == 405
    assert await api.call("GET", "/live") == (200, b"OK")
    assert await api.call("GET", "/ready") == (200, b"OK")
    assert json.loads((await api.call("GET", "/connections/partitions"))[1]) == {
        "partitions": [{"partition": "ccTest", "entries": 2}], "ttl": 10.0}
    code, _ = await api.call("GET", "/resetService")
    assert code == 200 and (await api.lookup())[0] == 404
    assert json.loads((await api.call("GET", "/connections/partitions"))[1])["partitions"] == []


@pytest_twisted.ensureDeferred
async def test_the_dump_page_escapes_what_clients_published(api: Api) -> None:
    await api.call("POST", "/publish", {"partition": "<b>p</b>", "connections": [
        {"uid": "<script>", "uri": "u", "data_type": "T", "connection_type": 0}]})
    page = (await api.call("GET", "/"))[1]
    assert b"<script>" not in page and b"&lt;script&gt;" in page and b"<b>p</b>" not in page


@pytest_twisted.ensureDeferred
async def test_closed_by_default_the_token_is_required() -> None:
    api = Api(open_access=False)
    for method, path, body in [("POST", "/publish", PUBLISH), ("POST", "/getconnection/ccTest", LOOKUP),
                               ("GET", "/", None), ("GET", "/stats", None), ("GET", "/resetService", None)]:
        code, reply = await api.call(method, path, body)
        assert code == 401 and "token" in error_of(reply), path
    assert api.service.partitions() == []
    assert await api.call("POST", "/publish", PUBLISH, token=True) == (200, b"OK")
    assert await api.call("POST", "/getconnection/ccTest", LOOKUP, token=True) == (200, EXPECTED)


@pytest_twisted.ensureDeferred
async def test_open_serves_without_a_token_and_with_one(api: Api) -> None:
    assert await api.call("POST", "/publish", PUBLISH) == (200, b"OK")
    assert await api.call("POST", "/getconnection/ccTest", LOOKUP, token=True) == (200, EXPECTED)


@pytest_twisted.ensureDeferred
async def test_only_the_bare_root_belongs_to_this_surface(api: Api) -> None:
    code, body = await api.call("GET", "/openapi.json")
    assert code == 401  # the root's own app, which wants the token even when the registry is open
    code, body = await api.call("GET", "/openapi.json", token=True)
    assert code == 200 and json.loads(body)["openapi"].startswith("3.")
    assert (await api.call("GET", "/no-such-thing", token=True))[0] == 404
    assert (await api.call("POST", "/"))[0] == 405


@pytest_twisted.ensureDeferred
async def test_publish_answers_alike_on_the_direct_path_and_through_klein(api: Api) -> None:
    # POST /publish itself skips Klein; other spellings of the path (Klein merges slashes) and
    # other methods still go through Klein's route, with the same answers.
    assert await api.call("POST", "/publish", PUBLISH) == (200, b"OK")
    assert await api.call("POST", "//publish", dict(PUBLISH, partition="other")) == (200, b"OK")
    assert json.loads((await api.call("GET", "/connections/partitions"))[1])["partitions"] == [
        {"partition": "ccTest", "entries": 2}, {"partition": "other", "entries": 2}]
    for path in ("/publish", "//publish"):
        code, body = await api.call("POST", path, data=b"[1]", headers=JSON)
        assert (code, error_of(body)) == (400, "the body must be a JSON object")
    code, body = await api.call("GET", "/publish")
    assert (code, error_of(body)) == (405, "GET is not allowed here (allowed: POST)")
    assert (await api.call("POST", "/publish/"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_publish_the_store_fails_is_a_json_500(api: Api) -> None:
    api.service._store.broken = True
    for path in ("/publish", "//publish"):
        code, body = await api.call("POST", path, PUBLISH)
        assert (code, error_of(body)) == (500, "internal error: see the daemon's log")


def test_a_client_gone_before_the_commit_gets_no_answer_and_nothing_fails() -> None:
    import gc

    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogPublisher
    from twisted.python.failure import Failure
    from twisted.web.server import Site

    api = Api()
    root = Root(TOKEN, [Surface(SEGMENTS, ConnectionsAPI(api.service, True).resource(), own_auth=True, quiet=True)],
                RootApp(document([ROOT_PATHS])).app.resource())
    channel = Site(root, reactor=api.clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    failures: list[Any] = []
    observer = lambda event: failures.append(event) if event.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        body = json.dumps(PUBLISH).encode()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        channel.connectionLost(Failure(ConnectionDone()))
        api.clock.advance(0)  # the batch goes to the store, which commits at once
        gc.collect()  # an unhandled error in a Deferred is logged when it is collected
    finally:
        globalLogPublisher.removeObserver(observer)
    assert transport.value() == b""
    assert failures == []
    assert api.service._store.rows()[0][1] == "DRO-000-tp_to_trigger"  # committed all the same
