"""The DUNE DAQ connectivity-server API: publish, look up and retract connections (the domain is
wmgr.connections).

The original's clients (the C++ iomanager ConfigClient, drunc) only look at the status code, and
at the body of a lookup, so successes keep the original's shapes exactly ("OK", a compact JSON
array with keys uid, uri, connection_type, data_type in that order) while every failure is JSON
({"error": reason}): a malformed request is a 400 that changed nothing, an unknown partition a
404. Bodies are read as JSON whatever their Content-Type says, as the original read them
(`request.data`), except that /retract-partition also takes the urlencoded form of older clients.

DAQ clients send no token: with `[connections] open = true` this surface serves them without one;
otherwise it wants the daemon's token like every other surface.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs as parse_text_qs  # of text: parse_qs of bytes fails on non-ASCII names

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from wmgr.api.common import install_error_handlers, json_response, status_for
from wmgr.api.openapi import ERROR, json_content, path_param, reply
from wmgr.connections.registry import Connection
from wmgr.connections.service import ConnectionService
from wmgr.errors import InvalidRequest, WmgrError

log = Logger()

# The first path segments this surface owns ("" is GET / alone, drunc's readiness probe).
SEGMENTS = ("", "publish", "getconnection", "retract", "retract-partition", "stats", "resetStats",
            "resetService", "live", "ready", "connections")

HTML = b"text/html; charset=utf-8"
JSON = b"application/json"
DUMP_LIMIT = 200  # entries shown per partition by GET /
LARGE_REPLY = 256 * 1024  # bytes from which a reply's headers are sent ahead of it


class ConnectionsAPI:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, service: ConnectionService, open_access: bool = False,
                 max_body: int = 8 << 20, max_regex: int = 1024) -> None:
        self.service = service
        self.open_access = open_access
        self.max_body = max_body
        self.max_regex = max_regex

    def resource(self) -> Resource:
        return _Guard(self.app.resource(), self.open_access, self.publish_direct)

    # -- the original's routes ------------------------------------------------------------------------

    @app.route("/publish", methods=["POST"])
    def publish(self, request: Any) -> "Deferred[bytes]":
        # Klein sees only the other spellings of this path (it merges slashes: //publish) and
        # the methods it refuses: _Guard hands POST /publish itself to publish_direct.
        return self._publish(request)

    def publish_direct(self, request: Any) -> Any:
        """POST /publish without Klein: every DAQ application calls it every 2 s, and Klein's
        per-request machinery (URL map binding, two notifyFinish Deferreds, the coroutine, its
        error-handler chain) cost as much as the publication itself. Answers as the Klein route
        does: "OK" once committed, or the JSON error its handlers would give."""
        try:
            done = self._publish(request)
        except WmgrError as e:
            return _error(request, e)
        done.addCallbacks(_answer, _failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET

    def _publish(self, request: Any) -> "Deferred[bytes]":
        """Validate and apply a publication; the Deferred fires with the reply once it is durable."""
        body = self._json(request)
        partition = _text(body, "partition")
        items = body.get("connections")
        if not isinstance(items, list):
            raise InvalidRequest('"connections" must be a list of connections')
        connections = [_connection(item, n) for n, item in enumerate(items)]
        return self.service.publish(partition, connections).addCallback(lambda _: _ok(request))

    @app.route("/getconnection/<partition>", methods=["GET", "POST"])
    def getconnection(self, request: Any, partition: str) -> bytes:
        body = self._json(request)
        uid_regex = _text(body, "uid_regex", empty=True)
        if len(uid_regex) > self.max_regex:
            raise InvalidRequest(f"uid_regex is longer than {self.max_regex} characters")
        data_type = _text(body, "data_type", empty=True)
        answer = self.service.lookup(partition, uid_regex, data_type)
        request.setHeader(b"Content-Type", JSON)
        # With a length, Twisted writes the (often cached, up to megabytes) reply as it is;
        # without one it would copy it into a chunk.
        request.setHeader(b"Content-Length", b"%d" % len(answer))
        if len(answer) >= LARGE_REPLY:
            _flush_headers(request)
        return answer

    @app.route("/retract", methods=["POST"])
    async def retract(self, request: Any) -> bytes:
        body = self._json(request)
        partition = _text(body, "partition")
        items = body.get("connections")
        if not isinstance(items, list):
            raise InvalidRequest('"connections" must be a list of {"connection_id": uid}')
        uids = []
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidRequest(f"connections[{n}] must be an object")
            uids.append(_text(item, "connection_id", f"connections[{n}]"))
        await self.service.retract(partition, uids)
        return _ok(request)

    @app.route("/retract-partition", methods=["POST"])
    async def retract_partition(self, request: Any) -> bytes:
        await self.service.retract_partition(self._partition_of(request))
        return _ok(request)

    @app.route("/", methods=["GET"])
    def dump(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", HTML)
        return self._dump_page().encode("utf-8")

    @app.route("/stats", methods=["GET"])
    def stats(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", HTML)
        return self._stats_page().encode("utf-8")

    @app.route("/resetStats", methods=["GET"])
    def reset_stats(self, request: Any) -> bytes:
        page = self._stats_page()
        self.service.reset_stats()
        request.setHeader(b"Content-Type", HTML)
        return page.encode("utf-8")

    @app.route("/resetService", methods=["GET"])
    async def reset_service(self, request: Any) -> bytes:
        await self.service.reset()
        request.setHeader(b"Content-Type", HTML)
        return self._stats_page().encode("utf-8")

    @app.route("/live", methods=["GET"])
    def live(self, request: Any) -> bytes:
        return _ok(request)

    @app.route("/ready", methods=["GET"])
    def ready(self, request: Any) -> bytes:
        # The surface is mounted only once the registry has been loaded from the store.
        return _ok(request)

    # -- beyond the original ------------------------------------------------------------------------

    @app.route("/connections/partitions", methods=["GET"])
    def partitions(self, request: Any) -> bytes:
        return json_response(request, {"partitions": self.service.partitions(), "ttl": self.service.ttl})

    # -- reading requests ---------------------------------------------------------------------------

    def _raw(self, request: Any) -> bytes:
        content = request.content
        content.seek(0, 2)
        size = content.tell()
        if size > self.max_body:
            raise InvalidRequest(f"the body is {size} bytes, more than the limit of {self.max_body}")
        content.seek(0)
        return content.read()

    def _json(self, request: Any) -> dict[str, Any]:
        raw = self._raw(request)
        if not raw.strip():
            raise InvalidRequest("the body is empty; a JSON object is required")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise InvalidRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        return body

    def _partition_of(self, request: Any) -> str:
        """The JSON body newer clients (drunc) send, or the urlencoded form field of older ones."""
        raw = self._raw(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict):
            return _text(body, "partition")
        # The urlencoded form of older clients: the site parses no form bodies (see
        # wmgr.api.channel), so it is read here, from the bytes already in hand.
        # Parsed as text: parse_qs of bytes fails (500) on a field name that decodes to non-ASCII.
        try:
            values = parse_text_qs(raw.decode("ascii"), errors="strict").get("partition")
        except UnicodeDecodeError:
            raise InvalidRequest("the form is not percent-encoded UTF-8 text") from None
        if not values:
            raise InvalidRequest('give the partition as JSON {"partition": P} or as the form field partition=P')
        partition = values[0]
        if not partition:
            raise InvalidRequest("the partition is empty")
        return partition

    # -- pages --------------------------------------------------------------------------------------

    def _stats_page(self) -> str:
        s = self.service.stats
        parts = ["<h1>Connection server statistics</h1>", f"<p>Since {_when(s.since)}</p>"]
        for name, calls, seconds in (("publish", s.publishes, s.publish_seconds),
                                     ("lookup", s.lookups, s.lookup_seconds)):
            average = seconds / calls * 1e6 if calls else 0.0
            parts.append(f"<p>{calls} calls to {name} in total time {seconds:.6f} s "
                         f"(average {average:.1f} &micro;s per call)</p>")
        parts.append(f"<p>Maximum number of partitions active = {s.max_partitions}</p>")
        for name, most in s.max_entries.items():
            parts.append(f"<p>Maximum entries in partition {html.escape(name)} = {most}</p>")
        return "".join(parts)

    def _dump_page(self) -> str:
        parts = ["<h1>Dump of connection server</h1>",
                 "<table><tr><th>Partition</th><th>Entries</th></tr>"]
        listing = self.service.partitions()
        for item in listing:
            parts.append(f"<tr><td>{html.escape(item['partition'])}</td><td>{item['entries']}</td></tr>")
        parts.append("</table>")
        for item in listing:
            name = item["partition"]
            parts.append(f"<h2>Partition {html.escape(name)}</h2>")
            entries = self.service.entries(name)
            for connection, published, live in entries[:DUMP_LIMIT]:
                line = html.escape(f"{connection.uid}: Connection(uri={connection.uri}, data_type="
                                   f"{connection.data_type}, connection_type={connection.connection_type}, "
                                   f"time={_when(published)})")
                parts.append(f"{line}</br>" if live else f"<strike>{line}</strike></br>")
            if len(entries) > DUMP_LIMIT:
                parts.append(f"<p>... and {len(entries) - DUMP_LIMIT} more</p>")
        parts.append("<hr>")
        parts.append(self._stats_page())
        return "".join(parts)


class _Guard(Resource):
    """Refuses requests without the daemon's token unless the registry is configured open (Root
    mounts this surface with own_auth and says whether the token came); sends POST /publish to
    its direct handler and everything else to the Klein app."""

    isLeaf = True

    def __init__(self, inner: Resource, open_access: bool, publish: Any) -> None:
        super().__init__()
        self._inner = inner
        self._open = open_access
        self._publish = publish

    def render(self, request: Any) -> Any:
        if not self._open and not getattr(request, "wmgr_token_ok", False):
            return json_response(request, {"error": "a valid token is required (Authorization: Bearer <token>); "
                                                    "or set [connections] open = true"}, 401)
        if request.path == b"/publish" and request.method == b"POST":
            return self._publish(request)
        return self._inner.render(request)


def _answer(body: bytes, request: Any) -> None:
    if not request._disconnected:  # the client left before the commit: nobody to answer
        transport = request.channel.transport
        request.write(body)
        request.finish()
        # Sent now rather than when the reactor next polls: the client (its next publication
        # waits for this answer) hears a reactor iteration sooner.
        _send_now(transport)


def _failed(failure: Failure, request: Any) -> None:
    log.failure("unexpected error answering POST /publish", failure)
    if not request._disconnected:
        request.write(json_response(request, {"error": "internal error: see the daemon's log"}, 500))
        request.finish()


def _error(request: Any, error: WmgrError) -> bytes:
    return json_response(request, {"error": error.reason}, status_for(error))


def _flush_headers(request: Any) -> None:
    """Send the status line and headers of a large reply to the socket before its body is written.

    A TCP transport joins everything waiting in its buffer into one bytes object before sending;
    with the headers there, that is a copy of the whole body (10.9 MB for 100,000 entries: more
    than half of what such a lookup cost). With the buffer empty, the body is sent from the cached
    bytes as they are. TLS transports have no doWrite and encrypt (so copy) anyway."""
    transport = getattr(request.channel, "transport", None)
    if getattr(transport, "doWrite", None) is not None:
        request.write(b"")
        _send_now(transport)


def _send_now(transport: Any) -> None:
    """Write what a TCP transport holds to its socket at once instead of at the reactor's next
    poll. Not once the connection is closing: doWrite would then end it and return the reason,
    which only the reactor knows to act on. A TLS transport has no doWrite (nothing is done); a
    write that fails leaves the data queued, and the reactor meets the error when it polls."""
    flush = getattr(transport, "doWrite", None)
    if flush is not None and not transport.disconnecting:
        flush()


def _ok(request: Any) -> bytes:
    request.setHeader(b"Content-Type", HTML)
    request.setHeader(b"Content-Length", b"2")  # else Twisted sends the two bytes as a chunk
    return b"OK"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).isoformat(sep=" ")


def _text(body: dict[str, Any], name: str, where: str = "the body", empty: bool = False) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f'{where} needs "{name}" (a string)')
    if not value and not empty:
        raise InvalidRequest(f'"{name}" in {where} is empty')
    return value


def _connection(item: Any, n: int) -> Connection:
    where = f"connections[{n}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be an object")
    connection_type = item.get("connection_type")
    if isinstance(connection_type, bool) or not isinstance(connection_type, (int, str)):
        raise InvalidRequest(f'{where} needs "connection_type" (an integer, or a string)')
    return Connection(_text(item, "uid", where), _text(item, "uri", where), _text(item, "data_type", where),
                      connection_type)


# -- the OpenAPI description ---------------------------------------------------------------------------

_OK = {"description": "done: the body is OK", "content": {"text/html": {"schema": {"type": "string"}}}}
_PAGE = {"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
_OPEN = " No token is needed when [connections] open = true."
_LOOKUP_BODY = {"required": True, "content": json_content({"type": "object", "required": ["uid_regex", "data_type"],
                                                           "properties": {"uid_regex": {"type": "string"},
                                                                          "data_type": {"type": "string"}}})}
_LOOKUP = {"summary": "connections of data_type whose uid matches uid_regex (fullmatch, or search with "
                      "[connections] match = search), live ones only, in first-publication order." + _OPEN,
           "parameters": [path_param("partition", "the partition (session)")],
           "requestBody": _LOOKUP_BODY,
           "responses": {"200": reply("the matching connections", {"type": "array", "items": {
               "type": "object", "properties": {"uid": {"type": "string"}, "uri": {"type": "string"},
                                                "connection_type": {}, "data_type": {"type": "string"}}}}),
                         "400": ERROR, "401": ERROR, "404": ERROR}}


def _page(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary + _OPEN, "responses": {"200": _PAGE, "401": ERROR}}}


CONNECTIONS_PATHS: dict[str, Any] = {
    "/publish": {"post": {
        "summary": "publish (add or replace, by uid) connections of a partition; they expire [connections] ttl "
                   "seconds after their last publication." + _OPEN,
        "requestBody": {"required": True, "content": json_content({
            "type": "object", "required": ["partition", "connections"], "properties": {
                "partition": {"type": "string"},
                "connections": {"type": "array", "items": {
                    "type": "object", "required": ["uid", "uri", "data_type", "connection_type"],
                    "properties": {"uid": {"type": "string"}, "uri": {"type": "string"},
                                   "data_type": {"type": "string"}, "connection_type": {}}}}}})},
        "responses": {"200": _OK, "400": ERROR, "401": ERROR}}},
    "/getconnection/{partition}": {"post": _LOOKUP, "get": dict(_LOOKUP)},
    "/retract": {"post": {
        "summary": "remove connections by uid; 404 if the partition or any uid is unknown (the others are "
                   "still removed); the partition goes with its last entry." + _OPEN,
        "requestBody": {"required": True, "content": json_content({
            "type": "object", "required": ["partition", "connections"], "properties": {
                "partition": {"type": "string"},
                "connections": {"type": "array", "items": {"type": "object", "required": ["connection_id"],
                                                            "properties": {"connection_id": {"type": "string"}}}}}})},
        "responses": {"200": _OK, "400": ERROR, "401": ERROR, "404": ERROR}}},
    "/retract-partition": {"post": {
        "summary": "remove a partition with all its connections." + _OPEN,
        "requestBody": {"required": True, "content": {
            **json_content({"type": "object", "required": ["partition"],
                            "properties": {"partition": {"type": "string"}}}),
            "application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["partition"], "properties": {"partition": {"type": "string"}}}}}},
        "responses": {"200": _OK, "400": ERROR, "401": ERROR, "404": ERROR}}},
    "/": _page("a dump of the registry (partitions, entries, statistics): drunc's readiness probe."),
    "/stats": _page("publish and lookup statistics."),
    "/resetStats": _page("the statistics, which are then zeroed."),
    "/resetService": _page("forget every partition and zero the statistics; answers the statistics."),
    "/live": {"get": {"summary": "OK while the daemon runs." + _OPEN, "responses": {"200": _OK, "401": ERROR}}},
    "/ready": {"get": {"summary": "OK once the registry is loaded." + _OPEN, "responses": {"200": _OK, "401": ERROR}}},
    "/connections/partitions": {"get": {
        "summary": "every partition with its number of live entries, and the TTL (beyond the original)." + _OPEN,
        "responses": {"200": reply("partitions", {"type": "object", "properties": {
            "ttl": {"type": "number"},
            "partitions": {"type": "array", "items": {"type": "object", "properties": {
                "partition": {"type": "string"}, "entries": {"type": "integer"}}}}}}),
            "401": ERROR}}},
}
