"""What every API surface shares: JSON bodies in and out, and JSON errors.

Every Klein app gets its error handlers from `install_error_handlers`, so that werkzeug's HTML
404/405 pages and tracebacks never reach a client; each API passes the envelope its own clients
expect ({"error": ...} unless it says otherwise).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from klein import Klein
from twisted.web.http import parse_qs
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound as RouteNotFound

from wmgr.errors import Conflict, InvalidRequest, NotFound, Unauthorized, WmgrError

log = Logger()

STATUS_OF: dict[type, int] = {InvalidRequest: 400, Unauthorized: 401, NotFound: 404, Conflict: 409}

Envelope = Callable[[int, str], Any]


def error_envelope(code: int, reason: str) -> dict[str, Any]:
    return {"error": reason}


def json_response(request: Any, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def raw_json_response(request: Any, body: bytes, code: int = 200) -> bytes:
    """A body already encoded as JSON (UTF-8, e.g. by model.statuses_json), answered as
    json_response answers."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return body


def read_json(request: Any, what: str = "body") -> Any:
    data = request.content.read()
    return parse_json(data, what)


def parse_json(data: bytes | str, what: str = "body") -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise InvalidRequest(f"the {what} is not valid JSON: {e}") from None
    except RecursionError:  # arrays nested thousands deep: valid JSON, but no job or command
        raise InvalidRequest(f"the {what} is nested too deeply") from None


def url_query(request: Any) -> dict[str, list[str]]:
    """The URL's own query string (never the fields of a form-encoded body, which request.args
    also holds), names and values %-decoded as bytes and then read as UTF-8; bytes that are not
    UTF-8 become U+FFFD, so no query string can make a handler fail on its encoding. Root reads
    the token from this too: `?%74oken=` is the token for every reader alike."""
    _, _, raw = request.uri.partition(b"?")
    return {
        name.decode("utf-8", "replace"): [value.decode("utf-8", "replace") for value in values]
        for name, values in parse_qs(raw, keep_blank_values=True).items()
    }


def query(request: Any) -> dict[str, str]:
    """Query parameters as text, the first value of each."""
    return {name: values[0] for name, values in url_query(request).items() if values}


def flag(params: dict[str, str], name: str) -> bool:
    return params.get(name, "").lower() in ("true", "1", "yes")


def install_error_handlers(app: Klein, envelope: Envelope = error_envelope) -> None:
    # A Klein app declared on a class hands its handlers the instance first; these handlers do
    # not need it, so each takes (*instance, request, failure).
    @app.handle_errors(RouteNotFound)
    def route_not_found(*args: Any) -> bytes:
        request, failure = args[-2:]
        return json_response(request, envelope(404, f"no such path: {request.path.decode('utf-8', 'replace')}"), 404)

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(*args: Any) -> bytes:
        request, failure = args[-2:]
        allowed = ", ".join(getattr(failure.value, "valid_methods", None) or [])
        return json_response(
            request, envelope(405, f"{request.method.decode()} is not allowed here (allowed: {allowed})"), 405
        )

    @app.handle_errors(HTTPException)
    def http_error(*args: Any) -> bytes:
        request, failure = args[-2:]
        code = failure.value.code or 500
        return json_response(request, envelope(code, failure.value.description or failure.value.name), code)

    @app.handle_errors(WmgrError)
    def domain_error(*args: Any) -> bytes:
        request, failure = args[-2:]
        code = status_for(failure.value)
        return json_response(request, envelope(code, failure.value.reason), code)

    @app.handle_errors(Exception)
    def unexpected(*args: Any) -> bytes:
        request, failure = args[-2:]
        log.failure("unexpected error answering {method} {path}", failure,
                    method=request.method.decode(), path=request.path.decode("utf-8", "replace"))
        return json_response(request, envelope(500, "internal error: see the daemon's log"), 500)


def status_for(error: WmgrError) -> int:
    for kind, code in STATUS_OF.items():
        if isinstance(error, kind):
            return code
    return 400
