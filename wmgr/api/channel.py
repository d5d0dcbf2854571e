"""The HTTP connection itself, before any route: body limits, a header deadline, JSON refusals.

twisted.web reads a request's body whole before a resource sees it (into memory up to 100 KB,
into a temporary file beyond), so a limit checked by a route would come too late: it is checked
here as the body arrives. The limit is the one of the longest configured path prefix the request
line names; a body announced bigger (Content-Length) is refused before a byte of it is read, a
chunked one as soon as it goes over. Either way the client gets a 413 with a JSON reason and the
connection closes (the rest of the body is never read).

A client must send its request line and headers within `header_timeout` seconds of connecting
(or of its previous response, on a kept-alive connection), or it gets a 408 and is disconnected
(an idle connection, with no byte of a request yet, is closed without an answer): Twisted's own
timeout is reset by every byte, so a client trickling header bytes (slowloris) would hold its
connection for ever.

Twisted answers what it cannot parse (a bad request line, a bad header, too many headers) with a
bare 400 and no body; here those 400s carry a JSON reason like every other error.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Optional

from twisted.web.http import HTTPChannel, responses
from twisted.web.server import Request

from wmgr.api.root import QuietSite

IDLE_TIMEOUT = 60.0

# (method, path, status, seconds) of every answered request; see wmgr.metrics.
RequestObserver = Callable[[bytes, bytes, int, float], None]


class BodyLimits:
    """Bytes a request body may have, by path prefix (the longest matching prefix wins)."""

    def __init__(self, limits: Iterable[tuple[str, int]]) -> None:
        self.limits = sorted(((prefix.encode("utf-8"), size) for prefix, size in limits),
                             key=lambda item: len(item[0]), reverse=True)
        if not any(prefix == b"/" for prefix, _ in self.limits):
            raise ValueError("the body limits need one for / (every other path)")

    def for_path(self, path: bytes) -> int:
        path = path.partition(b"?")[0]
        for prefix, size in self.limits:
            if path.startswith(prefix):
                return size
        return 0  # unreachable: "/" matches every path a request line can carry


class LimitedRequest(Request):
    """A request whose body is refused as soon as it goes over its path's limit."""

    _limit = 0
    _received = 0
    _refused = False

    def gotLength(self, length: Optional[int]) -> None:
        channel = self.channel
        # The request line's target is known to the channel only (the request gets its uri when
        # the whole body has arrived): HTTPChannel keeps it as _path until then.
        self._limit = channel.body_limits.for_path(getattr(channel, "_path", b"/"))
        self.wmgr_started = channel.site.reactor.seconds()  # for the latency metric
        if length is not None and length > self._limit:
            self._refused = True
            super().gotLength(0)
            channel.refuse(413, f"the request body is {length} bytes; this path accepts at most {self._limit}")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refused = True
            self.channel.refuse(413, f"the request body is more than this path accepts ({self._limit} bytes)")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:  # answered already; the connection is closing
            return
        super().requestReceived(command, path, version)

    def _cleanup(self) -> None:
        super()._cleanup()
        # Answered, logged and counted: let go of what the request refers to. Klein keeps each
        # request it renders in a reference cycle (a closure of KleinResource.render that names
        # itself), so a finished request waited for the garbage collector together with its
        # headers, its Klein adapter and URL matcher: some 40 objects per request, which with
        # 1,000 workers heartbeating made young collections of tens of milliseconds. Twisted
        # itself has let go of the channel and the body by now.
        self._adapterCache.clear()
        self.requestHeaders = self.responseHeaders = None  # type: ignore[assignment]
        self.args = self.prepath = self.postpath = None  # type: ignore[assignment]


class LimitedChannel(HTTPChannel):
    body_limits = BodyLimits([("/", 1 << 20)])
    header_timeout = 10.0

    _deadline: Any = None
    _refused = False
    _request_begun = False  # bytes of the awaited request have arrived
    _host: Any = None
    _peer: Any = None

    # Every request asks for both addresses, which do not change while the connection lasts:
    # TCP's getHost is a getsockname system call, and each answer a new address object.
    def getHost(self) -> Any:
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def connectionMade(self) -> None:
        super().connectionMade()
        # Replies go out as soon as they are written. With Nagle's algorithm a reply written
        # while the client has not yet acknowledged the last one waits for that acknowledgement,
        # which the client may delay by up to 200 ms (delayed ACK): kept-alive connections with
        # a request every few seconds (worker heartbeats) saw exactly that as their latency.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket (a UNIX one in a test)
                pass
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if data:
            self._request_begun = True
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._disarm()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # Armed before the next pipelined request (already buffered) is parsed, which disarms it.
        self._arm()
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        self._request_begun = False
        if self.header_timeout:
            self._deadline = self.callLater(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._request_begun:
            # An idle connection (kept alive, or opened and never used): close it without an
            # answer, which a client could take for the answer to a request it is sending now.
            self._refused = True
            self.loseConnection()
            self.callLater(1.0, self._abort)
            return
        self.refuse(408, f"the request's headers did not arrive within {self.header_timeout:g} seconds")
        # A client that sends slowly may read slowly too: do not wait for it to take the answer.
        self.callLater(1.0, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and self.transport.connected:
            self.transport.abortConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refuse(400, "the request is not valid HTTP (request line, headers or chunked body)")

    def _send100Continue(self) -> None:
        if not self._refused:  # a refused body is not to be sent
            super()._send100Continue()

    def refuse(self, code: int, reason: str) -> None:
        """Answer `code` with a JSON reason and close the connection, whatever state it is in."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        site = getattr(self, "site", None)
        if site is not None:  # counted like any answer (the request line, if it came, is kept as _command/_path)
            site.observe_refusal(getattr(self, "_command", b""), getattr(self, "_path", b""), code)
        body = json.dumps({"error": reason}).encode("utf-8")
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (code, responses.get(code, b"Error"), len(body), body))
        self.loseConnection()


class WmgrSite(QuietSite):
    """The daemon's Site: connections are LimitedChannels; every answered request is reported to
    `observe` (the metrics) with the seconds since its headers arrived."""

    protocol = LimitedChannel
    requestFactory = LimitedRequest

    def __init__(self, resource: Any, body_limits: BodyLimits, header_timeout: float,
                 observe: Optional[RequestObserver] = None, **kw: Any) -> None:
        # No form parsing: it would read a form-labelled body (pfurl labels its JSON so) into
        # memory as request.args, and no route reads request.args (common.url_query parses the
        # URL's query string itself). A connection silent for IDLE_TIMEOUT while sending its body
        # is dropped (Twisted's default is twelve hours).
        kw.setdefault("timeout", IDLE_TIMEOUT)
        super().__init__(resource, parsePOSTFormSubmission=False, **kw)
        self.body_limits = body_limits
        self.header_timeout = header_timeout
        self._observe = observe

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.body_limits = self.body_limits
        channel.header_timeout = self.header_timeout
        return channel

    def observe_refusal(self, method: bytes, path: bytes, code: int) -> None:
        if self._observe is not None:
            self._observe(method, path.partition(b"?")[0], code, 0.0)

    def log(self, request: Any) -> None:
        if self._observe is not None:
            started = getattr(request, "wmgr_started", None)
            seconds = self.reactor.seconds() - started if started is not None else 0.0
            self._observe(request.method, request.path, request.code, seconds)
