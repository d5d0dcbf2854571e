"""The pman API (/api/v1/...): pman's request and reply shapes over the pman domain (wmgr.pman).

pman answered every request with 200 and said in the body whether it worked (`status`); its
clients (pfurl, scripts) rely on that, so this surface keeps it: an unknown action or a payload
of the wrong shape gets 200 with `"status": false` and a `message` (where pman hung the
connection). Only a body that is not JSON at all gets a 400, with a JSON reason.

pfurl labels its JSON `application/x-www-form-urlencoded`, so the body is read as JSON whatever the
Content-Type says.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional
from urllib.parse import unquote, unquote_plus

from klein import Klein
from twisted.logger import Logger

from wmgr.api.common import install_error_handlers, json_response
from wmgr.api.openapi import json_content, path_param, reply
from wmgr.errors import InvalidRequest
from wmgr.pman import Pman

log = Logger()

PREFIX = "/api/v1"

# How long after a quit's reply is written the daemon is stopped: the reply must leave the socket
# buffer before the reactor starts shutting connections down.
QUIT_DELAY = 0.2


def pman_error(code: int, reason: str) -> dict[str, Any]:
    return {"status": False, "error": reason}


class PmanAPI:
    app = Klein()
    install_error_handlers(app, pman_error)

    def __init__(self, queue: Any, reactor: Any, allow_quit: bool = False, pman: Optional[Pman] = None,
                 shutdown: Optional[Callable[[str], None]] = None) -> None:
        self.pman = pman or Pman(queue, allow_quit=allow_quit)
        self._reactor = reactor
        # The daemon's one way to stop (WmgrService.shutdown); a bare reactor stop without one.
        self._shutdown = shutdown or (lambda why: self._reactor.stop())

    def resource(self) -> Any:
        return self.app.resource()

    # strict_slashes=False: /api/v1/cmd and /api/v1/cmd/ alike, with no redirect (pfurl and
    # pman's README use both, and a redirected POST is not re-sent by every client).
    @app.route("/api/v1/cmd/", methods=["POST", "PUT"], strict_slashes=False)
    async def command(self, request: Any) -> bytes:
        raw = _body(request)
        answer = envelope(request, raw)
        payload, problem = parse_payload(raw)
        if problem:
            answer["message"] = problem
            return json_response(request, answer)
        assert payload is not None
        action, meta = payload["action"], payload["meta"]
        answer.update(action=action, meta=meta, payloadsize=len(raw))
        verb = request.method.decode("ascii", "replace")
        if verb == "PUT" and action == "run" and str(meta.get("context", "")).lower() == "db":
            # pman before DBctl: PUT {"action": "run", "meta": {"context": "db", "operation": ...}}.
            action, meta = "DBctl", dict(meta, do=meta.get("operation", "save"))
        result = await self.pman.perform(action, meta, payload)
        answer["status"] = result.status
        answer["d_ret"] = result.d_ret
        answer.update(result.extra)
        if result.message:
            answer["message"] = result.message
        if result.stop:
            self._stop_after(request)
        return json_response(request, answer)

    # Each rule its own endpoint: Klein keeps one executor per endpoint name.
    @app.route("/api/v1/", methods=["GET"], strict_slashes=False, endpoint="pman_jobs")
    @app.route("/api/v1/<path:path>", methods=["GET"], endpoint="pman_tree")
    async def tree(self, request: Any, path: str = "") -> bytes:
        answer = envelope(request, _body(request))
        # The raw path, not Klein's variable: segments are split before they are unescaped, so
        # an escaped slash stays inside its segment.
        below = request.path.decode("utf-8", "replace")[len(PREFIX):]
        segments = [unquote(segment) for segment in below.split("/") if segment]
        found, value = await self.pman.get(segments)
        answer["status"] = found
        answer["GET"] = value
        if not found:
            answer["message"] = "no such path in the job tree"
        return json_response(request, answer)

    def _stop_after(self, request: Any) -> None:
        def stop(_: Any) -> None:
            self._reactor.callLater(QUIT_DELAY, self._shutdown, "pman quit")

        request.notifyFinish().addBoth(stop)


def _body(request: Any) -> str:
    # Twisted has already read a form-labelled body into request.args; the bytes are still there.
    request.content.seek(0)
    data = request.content.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the body is not UTF-8 text") from None


def parse_payload(raw: str) -> tuple[Optional[dict[str, Any]], str]:
    """The request body -> ({"action", "meta", ...}, "") or (None, what is wrong with its shape).
    Text that is not JSON raises InvalidRequest (a 400)."""
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    shape = 'the body must be {"payload": {"action": ..., "meta": {...}}}'
    if not isinstance(body, dict):
        return None, shape
    if "payload" in body:
        payload = body["payload"]
        # `http ... payload='{...}'` (= instead of :=) sends the payload as a JSON string.
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except (ValueError, RecursionError):
                return None, shape + "; payload is a string that is not JSON"
    elif "action" in body:
        # Without pfurl's --jsonwrapper the payload comes unwrapped: take it as it is.
        payload = body
    else:
        return None, shape
    if not isinstance(payload, dict):
        return None, shape
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        return None, "the payload needs an action (a string), such as run, status or hello"
    meta = payload.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return None, "the payload's meta must be a JSON object"
    return dict(payload, action=action, meta=meta), ""


_SECRET_HEADERS = {b"authorization"}


def envelope(request: Any, raw: str) -> dict[str, Any]:
    """The keys every pman reply has, from the request as received. pman echoed the raw request;
    the token is not echoed back (replies end up in logs), and the query string is left out of
    `path` (pman kept it, which broke its own path lookups)."""
    verb = request.method.decode("ascii", "replace")
    uri = _redacted_uri(request.uri.decode("utf-8", "replace"))
    proto = request.clientproto.decode("ascii", "replace")
    path = request.path.decode("utf-8", "replace")
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    header = f"{verb} {uri} {proto}\r"
    lines = [header]
    for name, values in request.requestHeaders.getAllRawHeaders():
        for value in values:
            shown = b"<not echoed>" if name.lower() in _SECRET_HEADERS else value
            lines.append(f"{name.decode('latin-1')}: {shown.decode('latin-1')}\r")
    lines += ["\r", raw]
    return {
        "status": False,
        "RESTheader": header,
        "RESTverb": verb,
        "action": "",
        "path": path,
        "receivedByServer": lines,
        "client_json_payload": raw,
        "client_json_len": len(raw),
    }


def _redacted_uri(uri: str) -> str:
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    # Split and decode names as Root's token check does (twisted.web.http.parse_qs: `&` and `;`
    # separate, `%74oken` and `t%6Fken` are `token`), so whatever authenticated is never shown.
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        if unquote_plus(parts[i].split("=", 1)[0]) == "token":
            parts[i] = "token=<not echoed>"
    return path + "?" + "".join(parts)


# -- the OpenAPI description -----------------------------------------------------------------------

_OBJECT = {"type": "object"}
_PMAN_ERROR = reply("not JSON, or not authorised", {
    "type": "object", "properties": {"status": {"type": "boolean"}, "error": {"type": "string"}}})
_REPLY = {
    "type": "object",
    "description": "pman's reply envelope; always 200, success is in `status`",
    "properties": {
        "status": {"type": "boolean"},
        "RESTheader": {"type": "string"},
        "RESTverb": {"type": "string"},
        "action": {"type": "string"},
        "path": {"type": "string"},
        "receivedByServer": {"type": "array", "items": {"type": "string"}},
        "client_json_payload": {"type": "string"},
        "client_json_len": {"type": "integer"},
        "payloadsize": {"type": "integer"},
        "meta": _OBJECT,
        "d_ret": {},
        "GET": {},
        "message": {"type": "string"},
    },
    "required": ["status", "RESTheader", "RESTverb", "action", "path"],
}
_COMMAND = {
    "summary": "a pman action: hello, run, status, done, info, search, get, kill, quit or DBctl",
    "description": "The body is JSON whatever the Content-Type says (pfurl sends "
                   "application/x-www-form-urlencoded). Unknown actions and payloads of the wrong "
                   "shape answer 200 with status false and a message.",
    "requestBody": {"required": True, "content": json_content({
        "type": "object",
        "properties": {"payload": {
            "type": "object", "required": ["action"],
            "properties": {
                "action": {"type": "string", "enum": list(Pman.ACTIONS)},
                "meta": _OBJECT,
                "exec": {"type": "object", "properties": {"cmd": {"type": "string"}}},
            }}},
    })},
    "responses": {"200": reply("the action's outcome", _REPLY), "400": _PMAN_ERROR, "401": _PMAN_ERROR},
}
_TREE = {"200": reply("the sub-tree, nested under its path, in `GET`; status false if the path "
                      "does not exist", _REPLY), "401": _PMAN_ERROR}

PMAN_PATHS: dict[str, Any] = {
    "/api/v1/cmd/": {"post": _COMMAND, "put": dict(_COMMAND, summary="as POST; also pman's older "
                                                                     "PUT run with context db")},
    "/api/v1/": {"get": {"summary": "the pman jobs: one empty object per job root, oldest first",
                         "responses": _TREE}},
    "/api/v1/{path}": {"get": {
        "summary": "a path in the pman job tree, such as _0/endInfo/0/returncode",
        "parameters": [path_param("path", "a job root name or _N (the N-th job, 0 first) and the "
                                          "path below it")],
        "responses": _TREE}},
}
