"""The root of the HTTP tree: authentication, the request log, and dispatch to the API surfaces.

Each API surface is its own Klein app whose routes are full paths; the root picks the surface by
the first path segment and hands it the request untouched. Anything no surface claims goes to the
root's own app, which serves /openapi.json and answers every other path with a JSON 404.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from wmgr.api.common import install_error_handlers, json_response, url_query
from wmgr.api.sessions import CROSS_ORIGIN, SESSION_OK, Sessions
from wmgr.auth import presented_token, token_matches

log = Logger()

# Paths anyone may ask for, with or without the trailing slash.
PUBLIC_PATHS = frozenset({b"/rest/version/", b"/rest/version"})


class RootApp:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, openapi: Mapping[str, Any]) -> None:
        self.openapi = openapi

    @app.route("/openapi.json", methods=["GET"])
    def openapi_document(self, request: Any) -> bytes:
        return json_response(request, self.openapi)


@dataclass(frozen=True)
class Surface:
    """One API surface: the first path segments it owns and the resource that serves them.

    With `own_auth`, Root does not refuse a request without the token: it records whether the
    token was presented as `request.wmgr_token_ok` and leaves the decision to the surface (an API
    whose legacy clients authenticate otherwise, or that may be configured open)."""

    segments: tuple[str, ...]
    resource: Any
    own_auth: bool = False
    # Log only failed requests (status >= 400): for APIs whose clients poll many times a second
    # (DAQ applications republish and look up every 2 s each), where a line per success is noise
    # and a quarter of the cost of a request.
    quiet: bool = False
    # Serves every request, token or not (an own_auth surface configured open): Root then spends
    # nothing on the token or the session, which the surface would not look at.
    open: bool = False


SurfaceLike = Union[Surface, tuple[Iterable[str], Any]]


class Root(Resource):
    """Checks the token, logs one line per request, and dispatches by the first path segment."""

    isLeaf = True

    def __init__(self, token: str, surfaces: Iterable[SurfaceLike], fallback: Any,
                 sessions: Optional[Sessions] = None, segment_tokens: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._token = token
        self._sessions = sessions
        # A second token that grants one first path segment only (the worker token: /worker/).
        self._segment_tokens = {segment.encode(): value for segment, value in (segment_tokens or {}).items()}
        self._fallback = Surface((), fallback)
        self._surfaces: dict[bytes, Surface] = {}
        for surface in surfaces:
            if not isinstance(surface, Surface):
                segments, resource = surface
                surface = Surface(tuple(segments), resource)
            for segment in surface.segments:
                self._surfaces[segment.encode()] = surface

    def render(self, request: Any) -> Any:
        started = time.monotonic()
        first = request.postpath[0] if request.postpath else b""
        surface = self._surfaces.get(first, self._fallback)
        request.notifyFinish().addBoth(self._log, request, started, surface.quiet)
        try:  # Klein answers a path or host that is not UTF-8 with a plain-text 400
            b"/".join(request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return json_response(request, {"error": "the path (once %-decoded) or the Host is not UTF-8 text"}, 400)
        if surface.open:
            return surface.resource.render(request)
        token_ok = request.path in PUBLIC_PATHS or self._authorised(request, first)
        if not token_ok and self._sessions is not None:
            # A dashboard login stands for the token, except for a state-changing request that
            # another site's page made the browser send (see wmgr.api.sessions).
            verdict = self._sessions.authorise(request)
            if verdict == CROSS_ORIGIN:
                return json_response(request, {"error": "cross-origin request refused: its Origin is not "
                                                        "this daemon's"}, 403)
            token_ok = verdict == SESSION_OK
        if surface.own_auth:
            request.wmgr_token_ok = token_ok
        elif not token_ok:
            return json_response(request, {"error": "a valid token is required (Authorization: Bearer <token>)"}, 401)
        return surface.resource.render(request)

    def _authorised(self, request: Any, first: bytes) -> bool:
        # Only the URL's own query string counts: request.args also holds the fields of a
        # form-encoded body, which is what pfurl labels its JSON as, and a command in that body
        # could then pose as the token.
        query_token = url_query(request).get("token", [""])[0].encode("utf-8")
        presented = presented_token(request.getHeader(b"authorization"), query_token)
        limited = self._segment_tokens.get(first)
        return token_matches(self._token, presented) or (limited is not None and token_matches(limited, presented))

    @staticmethod
    def _log(_: Any, request: Any, started: float, quiet: bool = False) -> None:
        if quiet and request.code < 400:
            return
        log.info(
            "{method} {path} {status} {ms:.1f}ms",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            status=request.code,
            ms=(time.monotonic() - started) * 1000,
        )


class QuietSite(Site):
    """A Site whose access log is our structured one (Root._log), not the combined-log file."""

    def log(self, request: Any) -> None:
        pass
