"""The worker routes (/worker/v1/...): what a worker daemon (or a Slurm runner) says to its manager.

Every route is a POST of a JSON object naming the worker (`name`) and, once registered, the
`session` the manager gave it; it answers JSON. The worker token (DATA_DIR/worker.token) grants
these routes only; the client token grants them too. See wmgr/workers/registry.py for the rules.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from klein import Klein

from wmgr.api.common import install_error_handlers, json_response, read_json
from wmgr.errors import InvalidRequest
from wmgr.workers.registry import Workers
from wmgr.turns import Turns

MAX_NAME = 200
MAX_ITEMS = 100_000
MAX_TEXT = 1 << 20


def _text(body: dict[str, Any], name: str, limit: int = MAX_NAME, required: bool = True) -> str:
    value = body.get(name, "" if not required else None)
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise InvalidRequest(f"{name} must be a string of 1 to {limit} characters")
    return value


def _worker_name(body: dict[str, Any]) -> str:
    name = _text(body, "name")
    if any(not c.isprintable() or c in "/ " for c in name):
        raise InvalidRequest("name must be printable, without / or spaces")
    return name


def _number(body: dict[str, Any], name: str, low: float = 0, high: float = 1e12) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _keys(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise InvalidRequest(f"{what} must be a list of job keys")
    for key in value:
        if not _is_key(key):
            raise InvalidRequest(f"{what}: {key!r} is not a job key")
    return value


def _object(request: Any) -> dict[str, Any]:
    body = read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


# model.is_key's test, as one regex: a report batch checks two keys per job it ran.
_KEY = re.compile(r"[0-9a-f]{32}")


def _is_key(value: Any) -> bool:
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


def _lease(item: Any) -> tuple[str, int]:
    if (not isinstance(item, list) or len(item) != 2 or not _is_key(item[0])
            or isinstance(item[1], bool) or not isinstance(item[1], int) or item[1] < 1):
        raise InvalidRequest("jobs must be a list of [job key, attempt] pairs")
    return item[0], item[1]


def _leases(items: Any) -> list[tuple[str, int]]:
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise InvalidRequest("jobs must be a list of [job key, attempt] pairs")
    return [_lease(item) for item in items]


_OPTIONAL_NUMBERS = ("exitcode", "signal", "pid", "started", "ended", "cpu_time", "peak_ram")
_TEXTS = ("stdout", "stderr", "kill_reason", "start_error", "text")


def _report(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or item.get("event") not in ("start", "end", "output"):
        raise InvalidRequest("each report must be an object with event start, end or output")
    key, attempt = _lease([item.get("key"), item.get("attempt")])
    report: dict[str, Any] = {"key": key, "attempt": attempt, "event": item["event"]}
    for name in _OPTIONAL_NUMBERS:
        value = item.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e15:
            raise InvalidRequest(f"report {name} must be a number")
        report[name] = int(value) if name in ("exitcode", "signal", "pid", "peak_ram") else float(value)
    for name in _TEXTS:
        value = item.get(name, "")
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise InvalidRequest(f"report {name} must be a string of at most {MAX_TEXT} characters")
        if value:
            report[name] = value
    return report


class WorkersAPI:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, workers: Workers, turns: Optional[Turns] = None) -> None:
        self.workers = workers
        # Pulls and reports wait for turns of their own; heartbeats are answered at once.
        self.turns = turns

    def resource(self) -> Any:
        return self.app.resource()

    def _session(self, body: dict[str, Any]) -> tuple[str, str]:
        return _worker_name(body), _text(body, "session", 64)

    @app.route("/worker/v1/register", methods=["POST"])
    async def register(self, request: Any) -> bytes:
        body = _object(request)
        name = _worker_name(body)
        ip = _text(body, "ip", 64, required=False) or request.getClientAddress().host
        worker = self.workers.register(name, ip, _number(body, "cores"), int(_number(body, "memory")),
                                       _text(body, "system", 64, required=False), _leases(body.get("jobs", [])))
        await self.workers.saved(worker)
        return json_response(request, {"session": worker.session, "heartbeat": self.workers.heartbeat,
                                       "timeout": self.workers.timeout})

    @app.route("/worker/v1/heartbeat", methods=["POST"])
    def heartbeat(self, request: Any) -> bytes:
        body = _object(request)
        name, session = self._session(body)
        figures = body.get("figures") or {}
        if not isinstance(figures, dict) or len(repr(figures)) > 10_000:
            raise InvalidRequest("figures must be a small JSON object")
        output = body.get("output") or {}
        if (not isinstance(output, dict) or len(output) > MAX_ITEMS
                or not all(isinstance(text, str) and len(text) <= MAX_TEXT for text in output.values())):
            raise InvalidRequest("output must be an object of job key: text")
        _keys(list(output), "output")
        return json_response(request, self.workers.beat(name, session, _keys(body.get("running", []), "running"),
                                                        figures, output))

    @app.route("/worker/v1/pull", methods=["POST"])
    async def pull(self, request: Any) -> bytes:
        body = _object(request)
        name, session = self._session(body)
        most = int(_number(body, "most", 0, MAX_ITEMS)) if "most" in body else 0
        time_left = _number(body, "time_left") if body.get("time_left") is not None else None
        turn = self.turns.turn if self.turns is not None else None
        if turn is not None:
            await turn()
        jobs = await self.workers.pull(name, session, _number(body, "cores"), int(_number(body, "memory")),
                                       int(_number(body, "slots", 0, MAX_ITEMS)), most, turn, time_left)
        # `ready`, as a heartbeat's: a worker that just filled its room pulls again only if it may find some.
        worker = self.workers.workers.get(name)
        return json_response(request, {"jobs": jobs, "ready": self.workers.ready(worker) if worker else 0})

    @app.route("/worker/v1/may-run", methods=["POST"])
    def may_run(self, request: Any) -> bytes:
        body = _object(request)
        name, session = self._session(body)
        return json_response(request, self.workers.may_run(name, session, _leases(body.get("jobs"))))

    @app.route("/worker/v1/reports", methods=["POST"])
    async def reports(self, request: Any) -> bytes:
        # Reports count by the lease they name, so a worker that registered again since still
        # delivers what it kept: no session needed.
        body = _object(request)
        name = _worker_name(body)
        items = body.get("reports")
        if not isinstance(items, list) or len(items) > MAX_ITEMS:
            raise InvalidRequest("reports must be a list")
        reports = [_report(item) for item in items]
        if self.turns is None:
            await self.workers.report(name, reports)
        else:
            stored = []
            for start in range(0, len(reports), self.turns.slice_size):
                await self.turns.turn()
                stored.append(self.workers.report(name, reports[start:start + self.turns.slice_size]))
            for d in stored:  # committed in order: the last is the one that waits
                await d
        return json_response(request, {"accepted": len(reports)})

    @app.route("/worker/v1/leave", methods=["POST"])
    async def leave(self, request: Any) -> bytes:
        body = _object(request)
        name, session = self._session(body)
        self.workers.leave(name, session)
        await self.workers.saved_name(name)
        return json_response(request, {"left": True})


def _op(summary: str, request_schema: dict[str, Any], reply_schema: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {"200": {"description": "done", "content": {"application/json": {"schema": reply_schema}}},
                      "400": {"description": "a bad request, with its reason"},
                      "409": {"description": "no such session: register again"}},
    }}


def _body(required: tuple[str, ...], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME}
_SESSION = {"type": "string", "minLength": 1, "maxLength": 64}
_KEYS = {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}
_ROOM = {"type": "number", "minimum": 0}
_OBJ = {"type": "object"}
WORKER_PATHS: dict[str, Any] = {
    "/worker/v1/register": _op(
        "a worker joins: name, ip, cores, memory, system, and the jobs it still runs as [key, attempt] pairs "
        "(those it holds the lease of carry over); answers its session",
        _body(("name", "cores", "memory"), name=_NAME, ip={"type": "string", "maxLength": 64}, cores=_ROOM,
              memory=_ROOM, system={"type": "string", "maxLength": 64},
              jobs={"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2}}),
        {"type": "object", "properties": {"session": {"type": "string"}, "heartbeat": {"type": "number"},
                                          "timeout": {"type": "number"}}}),
    "/worker/v1/heartbeat": _op(
        "renews the worker's leases: name, session, running (job keys), figures, output ({key: new stdout}); "
        "answers stop (keys not its own) and kill ({key: reason})",
        _body(("name", "session"), name=_NAME, session=_SESSION, running=_KEYS, figures=_OBJ, output=_OBJ),
        {"type": "object", "properties": {"stop": _KEYS, "kill": _OBJ, "ready": {"type": "integer"}}}),
    "/worker/v1/pull": _op(
        "ready jobs that fit the worker's free cores, memory and zero-core slots (and, with time_left, "
        "end within that many seconds), each under a lease",
        _body(("name", "session", "cores", "memory", "slots"), name=_NAME, session=_SESSION, cores=_ROOM,
              memory=_ROOM, slots=_ROOM, most=_ROOM, time_left=_ROOM),
        {"type": "object", "properties": {"jobs": {"type": "array", "items": _OBJ}, "ready": {"type": "integer"}}}),
    "/worker/v1/may-run": _op(
        "may I run: jobs as [key, attempt] pairs; answers run and stop lists",
        _body(("name", "session", "jobs"), name=_NAME, session=_SESSION,
              jobs={"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2}}),
        {"type": "object", "properties": {"run": _KEYS, "stop": _KEYS}}),
    "/worker/v1/reports": _op(
        "starts, output and ends of leased jobs (stale ones are ignored)",
        _body(("name", "reports"), name=_NAME, reports={"type": "array", "items": _body(
            ("key", "attempt", "event"), key={"type": "string"}, attempt={"type": "integer", "minimum": 1},
            event={"type": "string", "enum": ["start", "end", "output"]})}),
        {"type": "object", "properties": {"accepted": {"type": "integer"}}}),
    "/worker/v1/leave": _op("the worker leaves; its leases end",
                            _body(("name", "session"), name=_NAME, session=_SESSION),
                            {"type": "object", "properties": {"left": {"type": "boolean"}}}),
}
