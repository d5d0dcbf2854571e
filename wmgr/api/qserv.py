"""What every route of the Qserv worker-manager API (/dbs, /xrootd, /services) shares.

Qserv's own client (`WmgrClient`) and its tools read these answers, so the shapes are the
original's: `{"results": [...]}` for collections, `{"result": ...}` for one item, compact JSON
with sorted keys; errors are `{"exception": <type>, "message": <text>}` with an optional
`"cause"`, where <type> keeps the original's error-type names (clients look at `exception`).
Inputs are form fields (urlencoded or multipart, on POST and PUT alike) or query parameters,
never JSON.

Routes raise the `QservError` subclasses below; a domain error (wmgr.errors) that reaches a
route's error handler is answered with its own class name when the domain gave it a specific one
(`class TableMissing(NotFound)`), else with the default name of its kind (`KIND_NAMES`).
"""

from __future__ import annotations

import json
import re
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import parse_qsl

from klein import Klein
from twisted.logger import Logger

from wmgr.api.common import install_error_handlers, status_for
from wmgr.errors import Conflict, InvalidRequest, NotFound, Unauthorized, WmgrError

log = Logger()

# Names of databases, tables and columns: the original's rule (ASCII only; \Z, not $, so that a
# trailing newline is refused too).
NAME_RE = re.compile(r"[A-Za-z_][0-9A-Za-z_]*\Z")

# A form body larger than this is refused: forms carry names, flags and a CREATE TABLE
# statement; table data goes through the streaming upload path, not through these helpers.
FORM_LIMIT = 1 << 20
MAX_FIELDS = 1000

FLAG_VALUES = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}


# -- errors ------------------------------------------------------------------------------------------


class QservError(WmgrError):
    """An error answered as `{"exception": <name>, "message": ..., "cause": ...}` with `code`.

    The class name is the `exception` name; `code` may be overridden per instance where the
    original used one name with two codes (DatabaseMissing: 404 under /dbs, 409 under /xrootd)."""

    code = 500

    def __init__(self, message: str, cause: Optional[str] = None, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.cause = cause
        if code is not None:
            self.code = code

    @property
    def exception(self) -> str:
        return type(self).__name__


def _error_class(name: str, code: int) -> type[QservError]:
    return type(name, (QservError,), {"code": code, "__doc__": f"The original's {name} ({code})."})


# The original's error types and their codes (the reference's list), so that `exception` keeps
# meaning what Qserv's tools expect.
MissingArgument = _error_class("MissingArgument", 400)
InvalidArgument = _error_class("InvalidArgument", 400)
ConflictingArgument = _error_class("ConflictingArgument", 400)
IllegalOption = _error_class("IllegalOption", 400)
MissingFileData = _error_class("MissingFileData", 400)
DatabaseMissing = _error_class("DatabaseMissing", 404)
TableMissing = _error_class("TableMissing", 404)
ChunkTableMissing = _error_class("ChunkTableMissing", 404)
ChunkDeleteFailed = _error_class("ChunkDeleteFailed", 404)
NoMatchingChunks = _error_class("NoMatchingChunks", 404)
InvalidService = _error_class("InvalidService", 404)
ChunkRegisterFailed = _error_class("ChunkRegisterFailed", 404)
NoWorkerIdFound = _error_class("NoWorkerIdFound", 404)
DatabaseExists = _error_class("DatabaseExists", 409)
TableExists = _error_class("TableExists", 409)
CommandFailure = _error_class("CommandFailure", 409)
CSSDisabled = _error_class("CSSDisabled", 409)
GrantFailed = _error_class("GrantFailed", 500)
CSSError = _error_class("CSSError", 500)
DbError = _error_class("DbError", 500)
FLushFailed = _error_class("FLushFailed", 500)  # sic: the original's spelling
NotImplemented_ = _error_class("NotImplemented", 501)

# The name a domain error of a bare kind is answered with.
KIND_NAMES: dict[type, str] = {
    InvalidRequest: "InvalidArgument",
    NotFound: "NotFound",
    Conflict: "Conflict",
    Unauthorized: "Unauthorized",
}

# The name of an error made by the framework (no route, wrong method, body too large...).
CODE_NAMES: dict[int, str] = {
    400: "InvalidArgument", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
    409: "Conflict", 413: "RequestTooLarge", 500: "InternalError", 501: "NotImplemented",
}


def error_body(exception: str, message: str, cause: Optional[str] = None) -> dict[str, str]:
    body = {"exception": exception, "message": message}
    if cause is not None:
        body["cause"] = cause
    return body


def qserv_envelope(code: int, reason: str) -> dict[str, str]:
    """The envelope of framework errors (install_error_handlers' `envelope`)."""
    return error_body(CODE_NAMES.get(code, "InternalError" if code >= 500 else "InvalidArgument"), reason)


def describe(error: WmgrError) -> tuple[int, dict[str, str]]:
    """(status code, body) of any error the domain or a route raised."""
    if isinstance(error, QservError):
        return error.code, error_body(error.exception, error.reason, error.cause)
    kind = type(error)
    name = KIND_NAMES.get(kind) or kind.__name__
    cause = getattr(error, "cause", None)
    return status_for(error), error_body(name, error.reason, None if cause is None else str(cause))


def install_qserv_error_handlers(app: Klein) -> None:
    """Every error of `app` in the Qserv envelope: these handlers come first (Klein tries them in
    order), then common's for unknown routes, wrong methods and unexpected failures."""

    @app.handle_errors(WmgrError)
    def qserv_error(*args: Any) -> bytes:
        request, failure = args[-2:]
        code, body = describe(failure.value)
        return answer(request, body, code)

    install_error_handlers(app, qserv_envelope)


# -- the OpenAPI pieces every Qserv surface uses (the document itself is wmgr.api.openapi's) ---------

QSERV_SCHEMAS: dict[str, Any] = {
    "QservError": {"type": "object", "required": ["exception", "message"], "properties": {
        "exception": {"type": "string", "description": "the original's error type, e.g. InvalidService"},
        "message": {"type": "string"}, "cause": {"type": "string"}}},
}
QSERV_ERROR_REPLY: dict[str, Any] = {"description": "an error in the Qserv envelope", "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/QservError"}}}}
# The bearer token, or Basic/Digest with the secret file's user (wmgr.api.qserv_auth).
QSERV_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"tokenQuery": []}, {"qservBasic": []},
                                             {"qservDigest": []}]


# -- answers -----------------------------------------------------------------------------------------


def answer(request: Any, body: Any, code: int = 200) -> bytes:
    """Compact JSON with sorted keys, as the original's Flask configuration produced."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def results(request: Any, items: Iterable[Any], code: int = 200) -> bytes:
    """A collection: `{"results": [...]}` (always a list: WmgrClient requires one)."""
    return answer(request, {"results": list(items)}, code)


def result(request: Any, item: Any, code: int = 200) -> bytes:
    """One item (an object or a string): `{"result": ...}`."""
    return answer(request, {"result": item}, code)


# -- inputs ------------------------------------------------------------------------------------------


def _decode_pairs(text: bytes, what: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(text.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        raise InvalidArgument(f"the {what} is not UTF-8 text in URL encoding") from None
    except ValueError as e:
        raise InvalidArgument(f"the {what} cannot be read: {e}") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)  # the first value of each, as Flask's request.form[...]
    return fields


def query_params(request: Any) -> dict[str, str]:
    """The URL's query parameters (only those: request.args also holds a POSTed form's fields)."""
    _, _, query_string = request.uri.partition(b"?")
    return _decode_pairs(query_string, "query string")


def form_fields(request: Any) -> dict[str, str]:
    """The body's form fields, urlencoded or multipart/form-data, on any method (Twisted parses
    only POST bodies itself). File parts of a multipart body are left out: uploads are streamed
    by their own routes."""
    content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
    media_type = content_type.partition(";")[0].strip().lower()
    request.content.seek(0)
    body = request.content.read(FORM_LIMIT + 1)
    if len(body) > FORM_LIMIT:
        raise InvalidArgument(f"the form is larger than {FORM_LIMIT} bytes")
    if not body.strip():
        return {}
    if media_type in ("", "application/x-www-form-urlencoded"):
        return _decode_pairs(body.strip(), "form")
    if media_type == "multipart/form-data":
        return _multipart_fields(content_type, body)
    raise InvalidArgument(f"form fields must be application/x-www-form-urlencoded or multipart/form-data, "
                          f"not {media_type}")


def _multipart_fields(content_type: str, body: bytes) -> dict[str, str]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise InvalidArgument("the multipart/form-data body cannot be read")
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name or part.get_param("filename", header="content-disposition") is not None:
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            fields.setdefault(str(name), payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(f"form field {name!r} is not UTF-8 text") from None
    return fields


def required(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name)
    if value is None or value == "":
        raise MissingArgument(f"{name} parameter is not specified")
    return value


def flag(fields: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean option: 0/1/yes/no/true/false (any case, trimmed), else 400 InvalidArgument."""
    value = fields.get(name)
    if value is None:
        return default
    try:
        return FLAG_VALUES[value.strip().lower()]
    except KeyError:
        raise InvalidArgument(f"Unexpected value of '{name}' option: {value}") from None


def valid_name(name: str) -> bool:
    return NAME_RE.match(name) is not None


def database_name(name: str) -> str:
    if not valid_name(name):
        raise InvalidArgument(f"Database name is invalid: '{name}'")
    return name


def table_name(name: str) -> str:
    if not valid_name(name):
        raise InvalidArgument(f"Table name is invalid: {name}")
    return name


def column_name(name: str) -> str:
    if not valid_name(name):
        raise InvalidArgument(f"Column name is invalid: {name}")
    return name
