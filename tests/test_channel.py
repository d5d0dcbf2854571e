"""The HTTP connection before any route (wmgr.api.channel): body limits as the body arrives, the
header deadline, and JSON bodies on the protocol-level refusals (issue 9, item 10)."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from wmgr.api.channel import BodyLimits, WmgrSite

LIMITS = BodyLimits([("/", 100), ("/big/", 10_000)])


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request):
        body = request.content.read()
        self.seen.append(request.path)
        return b"got %d" % len(body)


def connect(header_timeout: float = 5.0, observe=None):
    clock = Clock()
    resource = Echo()
    site = WmgrSite(resource, LIMITS, header_timeout, observe=observe, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, resource, channel, transport


def answer(transport: StringTransport) -> tuple[int, dict]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)


def test_headers_not_sent_in_time_get_a_408_even_when_trickled() -> None:
    clock, resource, channel, transport = connect()
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ":
        channel.dataReceived(bytes([byte]))
        clock.advance(0.1)
        if transport.value():
            break
    clock.advance(5)
    status, body = answer(transport)
    assert status == 408 and "headers" in body["error"]
    assert transport.disconnecting and resource.seen == []


def test_the_deadline_is_armed_again_for_the_next_request_on_a_kept_alive_connection() -> None:
    clock, resource, channel, transport = connect()
    clock.advance(4)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"got 0" in transport.value() and resource.seen == [b"/a"]
    transport.clear()
    clock.advance(4.9)
    assert transport.value() == b"" and not transport.disconnecting
    channel.dataReceived(b"GET /b HTTP/1.1\r\n")
    clock.advance(0.2)
    assert answer(transport)[0] == 408


def test_an_idle_connection_is_closed_without_an_answer() -> None:
    clock, resource, channel, transport = connect()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    transport.clear()
    clock.advance(5)
    # Not a 408: a client sending its next request right now would read it as that one's answer.
    assert transport.value() == b"" and transport.disconnecting


def test_a_body_announced_over_the_limit_is_refused_before_it_is_read() -> None:
    clock, resource, channel, transport = connect()
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, body = answer(transport)
    assert status == 413 and "101" in body["error"] and "100" in body["error"]
    assert transport.disconnecting
    channel.dataReceived(b"y" * 101)
    assert resource.seen == []


def test_a_chunked_body_is_refused_as_soon_as_it_goes_over() -> None:
    clock, resource, channel, transport = connect()
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n")
    assert answer(transport)[0] == 413 and resource.seen == []


def test_the_longest_prefix_sets_the_limit() -> None:
    assert LIMITS.for_path(b"/big/upload?x=1") == 10_000 and LIMITS.for_path(b"/bigger") == 100
    clock, resource, channel, transport = connect()
    channel.dataReceived(b"PUT /big/f HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000)
    assert b"got 5000" in transport.value() and resource.seen == [b"/big/f"]


@pytest.mark.parametrize("data", [
    b"NOT-HTTP\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad header line\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(501)) + b"\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_twisteds_own_400s_have_a_json_body(data: bytes) -> None:
    clock, resource, channel, transport = connect()
    channel.dataReceived(data)
    status, body = answer(transport)
    assert status == 400 and body["error"] and resource.seen == []


def test_every_answered_request_is_observed_with_its_latency() -> None:
    seen = []
    clock, resource, channel, transport = connect(observe=lambda *args: seen.append(args))
    channel.dataReceived(b"GET /a/b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen == [(b"GET", b"/a/b", 200, 0.0)]
    clock, resource, channel, transport = connect(observe=lambda *args: seen.append(args))
    channel.dataReceived(b"PUT /x?y=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    assert seen[-1] == (b"PUT", b"/x", 413, 0.0)


def test_body_limits_need_one_for_every_path() -> None:
    with pytest.raises(ValueError):
        BodyLimits([("/rest/", 10)])


class Args(Resource):
    """Answers with the names in request.args and the bytes still in request.content."""

    isLeaf = True

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"args": sorted(k.decode() for k in request.args),
                           "body": len(request.content.read())}).encode()


@pytest.mark.parametrize("content_type", [b"multipart/form-data; boundary=XX", b"application/x-www-form-urlencoded"])
def test_form_bodies_stay_in_their_spool_file_unparsed(content_type: bytes) -> None:
    # A table upload (/dbs/.../data) of any size is read part by part from the spool file by its
    # route; Twisted's own form parsing would read all of it into request.args first.
    body = b'--XX\r\nContent-Disposition: form-data; name="load-options"\r\n\r\ndelimiter=%09\r\n--XX--\r\n' \
        if content_type.startswith(b"multipart") else b"load-options=x&db=y"
    site = WmgrSite(Args(), BodyLimits([("/", 10_000)]), 5.0, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /dbs/d/tables/t/data?q=1 HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type +
                         b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    status, seen = answer(transport)
    assert status == 200 and seen == {"args": ["q"], "body": len(body)}


def test_a_connection_asks_its_transport_for_its_addresses_once() -> None:
    class Counting(StringTransport):
        asked = 0

        def getHost(self):
            self.asked += 1
            return super().getHost()

        def getPeer(self):
            self.asked += 1
            return super().getPeer()

    class Addresses(Resource):
        isLeaf = True

        def render(self, request):
            return b"%s %s" % (request.getHost().host.encode(), request.getClientAddress().host.encode())

    site = WmgrSite(Addresses(), LIMITS, 5.0, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = Counting()
    channel.makeConnection(transport)
    for _ in range(3):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().count(b"\r\n\r\n10.0.0.1 192.168.1.1") == 3
    assert transport.asked <= 2


def test_replies_are_sent_without_waiting_for_the_last_ones_acknowledgement() -> None:
    """TCP_NODELAY on every connection (see LimitedChannel.connectionMade); a transport that is
    not TCP is left as it is."""
    class TCP(StringTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    site = WmgrSite(Echo(), LIMITS, 5.0, reactor=Clock())
    tcp = TCP()
    site.buildProtocol(None).makeConnection(tcp)
    assert tcp.no_delay is True
    site.buildProtocol(None).makeConnection(StringTransport())  # no setTcpNoDelay: no error


def test_a_finished_request_leaves_its_headers_and_klein_adapter_to_reference_counting() -> None:
    # Klein keeps each request it renders in a reference cycle of its own; the request lets go
    # of what it refers to once answered, so that only that small cycle waits for the collector.
    import gc

    from klein import Klein

    app = Klein()

    @app.route("/k", methods=["POST"])
    async def k(request):
        return b"{}"

    clock = Clock()
    site = WmgrSite(app.resource(), LIMITS, 5.0, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            channel.dataReceived(b"POST /k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert transport.value().count(b"200 OK") == 5
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert "Headers" not in left and "KleinRequest" not in left and "MapAdapter" not in left, left
