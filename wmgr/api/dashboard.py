"""The dashboard surface (/ui/): the page's static files, login and logout, and the live counts.

The page is one more client of the daemon's public APIs: it lists, kills, retries and removes jobs
through the wr REST routes, authorised by the session cookie that POST /ui/login sets (see
wmgr.api.sessions). What only this surface serves is the live view: GET /ui/events, a stream of
Server-Sent Events with the per-rep-group counts by state and the scheduler warnings, pushed when
they change; GET /ui/counts answers the same snapshot once (for the `wmgr` command).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from wmgr.api.common import install_error_handlers, json_response
from wmgr.api.openapi import ERROR, reply
from wmgr.api.sessions import Sessions, same_origin
from wmgr.auth import token_matches
from wmgr.errors import InvalidRequest, Unauthorized
from wmgr.jobs.groupcounts import CountsFeed

log = Logger()

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_TYPES = {
    "index.html": b"text/html; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    # One script per view of another API: connections, Qserv services, Qserv databases, workers.
    "connections.js": b"text/javascript; charset=utf-8",
    "services.js": b"text/javascript; charset=utf-8",
    "dbs.js": b"text/javascript; charset=utf-8",
    "workers.js": b"text/javascript; charset=utf-8",
}
# The page loads nothing from anywhere else, runs no inline script, and may not be framed.
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle event stream
MAX_LOGIN_BODY = 4096


def _security_headers(request: Any) -> None:
    request.setHeader(b"Content-Security-Policy", CSP)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"same-origin")
    request.setHeader(b"Cache-Control", b"no-store")


class Dashboard(Service):
    """The /ui/ surface; as a service, stopping it ends the open event streams."""

    name = "dashboard"
    app = Klein()
    install_error_handlers(app)

    def __init__(self, token: str, sessions: Sessions, feed: CountsFeed, clock: Any,
                 static_dir: Path = STATIC_DIR) -> None:
        self._token = token
        self.sessions = sessions
        self.feed = feed
        self._clock = clock
        self._files = {name: (static_dir / name).read_bytes() for name in STATIC_TYPES}
        self._streams: set[Callable[[], None]] = set()  # each open event stream's finish()

    def resource(self) -> Any:
        return self.app.resource()

    # -- the page ------------------------------------------------------------------------------

    @app.route("/ui/", methods=["GET"])
    def index(self, request: Any) -> bytes:
        return self._static(request, "index.html")

    @app.route("/ui/<name>", methods=["GET"])
    def static(self, request: Any, name: str) -> bytes:
        if name not in STATIC_TYPES:
            return json_response(request, {"error": f"no such file: {name}"}, 404)
        return self._static(request, name)

    def _static(self, request: Any, name: str) -> bytes:
        _security_headers(request)
        request.setHeader(b"Content-Type", STATIC_TYPES[name])
        return self._files[name]

    # -- logging in and out --------------------------------------------------------------------

    @app.route("/ui/login", methods=["POST"])
    def login(self, request: Any) -> bytes:
        """The token from the page's form, in the body (never the URL), for a session cookie."""
        if not same_origin(request):
            return json_response(request, {"error": "cross-origin login refused"}, 403)
        body = request.content.read(MAX_LOGIN_BODY + 1)
        if len(body) > MAX_LOGIN_BODY:
            raise InvalidRequest("the login form is too large")
        token = _token_from(request, body)
        if not token_matches(self._token, token):
            raise Unauthorized("wrong token: it is in the daemon's data directory, file client.token")
        sid = self.sessions.create()
        self.sessions.set_cookie(request, sid)
        return json_response(request, {"ok": True, "expires_in": int(self.sessions.lifetime)})

    @app.route("/ui/logout", methods=["POST"])
    def logout(self, request: Any) -> bytes:
        # Root has refused a cross-origin logout made with a valid cookie already.
        self.sessions.end(self.sessions.session_of(request))
        self.sessions.clear_cookie(request)
        return json_response(request, {"ok": True})

    # -- live counts ---------------------------------------------------------------------------

    @app.route("/ui/counts", methods=["GET"])
    async def counts(self, request: Any) -> bytes:
        self._require_auth(request)
        return json_response(request, await self.feed.snapshot())

    @app.route("/ui/events", methods=["GET"])
    def events(self, request: Any) -> Any:
        """Server-Sent Events: one `counts` event with the snapshot whenever it changes."""
        self._require_auth(request)
        sid = self.sessions.session_of(request)
        if not self.sessions.valid(sid):
            sid = None  # authorised by the token
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.write(b"retry: 2000\n\n")

        def send(snapshot: dict[str, Any]) -> None:
            data = json.dumps(snapshot, separators=(",", ":"))
            request.write(b"event: counts\ndata: " + data.encode("utf-8") + b"\n\n")

        def beat() -> None:
            # A logged-out or expired session's stream ends; the bearer token's does not.
            if sid is not None and not self.sessions.valid(sid):
                finish()
            else:
                request.write(b": keep-alive\n\n")

        heartbeat = LoopingCall(beat)
        heartbeat.clock = self._clock
        unsubscribe = self.feed.subscribe(send)

        def cleanup() -> None:
            unsubscribe()
            if heartbeat.running:
                heartbeat.stop()
            self._streams.discard(finish)

        def finish() -> None:
            cleanup()
            if not done.called:
                done.callback(b"")

        done: Deferred[Any] = Deferred(lambda _: cleanup())  # cancelled when the client goes
        self._streams.add(finish)
        heartbeat.start(HEARTBEAT, now=False)
        return done

    def stopService(self) -> None:
        super().stopService()
        self.close()

    def close(self) -> None:
        """End every open event stream (the daemon is stopping)."""
        for finish in list(self._streams):
            finish()

    def _require_auth(self, request: Any) -> None:
        if not getattr(request, "wmgr_token_ok", False):
            raise Unauthorized("log in first (POST /ui/login) or send the token (Authorization: Bearer <token>)")


def _token_from(request: Any, body: bytes) -> Optional[bytes]:
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type == b"application/json":
        try:
            value = json.loads(body).get("token")
        except (ValueError, AttributeError):
            raise InvalidRequest("the body must be a JSON object with the token") from None
        return value.encode("utf-8") if isinstance(value, str) else None
    try:  # as text: parse_qs of bytes fails on a field name that decodes to non-ASCII
        fields = parse_qs(body.decode("ascii"), max_num_fields=10, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the login form is not a form of percent-encoded UTF-8 text") from None
    values = fields.get("token")
    return values[0].strip().encode("utf-8") if values else None


_HTML = {"text/html": {"schema": {"type": "string"}}}
_SNAPSHOT = {"type": "object", "properties": {
    "groups": {"type": "object", "description": "rep group → {state: count}", "additionalProperties": {
        "type": "object", "additionalProperties": {"type": "integer"}}},
    "warnings": {"type": "array", "items": {"$ref": "#/components/schemas/Warning"}}}}
_LOGIN_BODY = {"type": "object", "properties": {"token": {"type": "string"}}, "required": ["token"]}
_PUBLIC: list[Any] = []

DASHBOARD_PATHS: dict[str, Any] = {
    "/ui/": {"get": {"summary": "the dashboard page (no token needed: it asks for one)", "security": _PUBLIC,
                     "responses": {"200": {"description": "the page", "content": _HTML}}}},
    "/ui/{name}": {"get": {
        "summary": "the dashboard's static files: app.js, app.css, index.html", "security": _PUBLIC,
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": sorted(STATIC_TYPES)}}],
        "responses": {"200": {"description": "the file"}, "404": ERROR}}},
    "/ui/login": {"post": {
        "summary": "log in with the token (in the body, never the URL): sets an HttpOnly, Secure, "
                   "SameSite=Strict session cookie that stands for the token; Origin must be the daemon's",
        "security": _PUBLIC,
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": _LOGIN_BODY},
            "application/json": {"schema": _LOGIN_BODY}}},
        "responses": {"200": reply("logged in", {"type": "object"}), "400": ERROR, "401": ERROR, "403": ERROR}}},
    "/ui/logout": {"post": {
        "summary": "end the session and clear its cookie", "security": _PUBLIC,
        "responses": {"200": reply("logged out", {"type": "object"}), "403": ERROR}}},
    "/ui/counts": {"get": {
        "summary": "per-rep-group job counts by state (from the counters, never a scan) and the scheduler "
                   "warnings (left in place)",
        "responses": {"200": reply("the snapshot", _SNAPSHOT), "401": ERROR}}},
    "/ui/events": {"get": {
        "summary": "Server-Sent Events: a `counts` event with the /ui/counts snapshot now and whenever it "
                   "changes (at most four a second), keep-alive comments every 15 s",
        "responses": {"200": {"description": "an event stream",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                      "401": ERROR}}},
}
