"""Flamenco's 2015 manager API (/workers, /tasks) over wmgr.flamenco and the worker registry.

Requests come as form fields (as the 2015 server and workers sent them) or as a JSON object;
replies are JSON in Flamenco's shapes, errors as Flamenco's {"code": N, "message": "..."}.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import parse_qs

from klein import Klein

from wmgr.api.common import install_error_handlers, json_response
from wmgr.errors import InvalidRequest
from wmgr.flamenco import PARSERS, STATUSES, Flamenco
from wmgr.workers.registry import Worker, Workers

MAX_BODY = 1 << 20
MAX_FIELD = 65536
# What a worker may say it is doing (PATCH /workers/<id>); enabled/disabled come from operators.
WORKER_STATES = ("enabled", "disabled", "rendering", "available", "busy", "error")


def _envelope(code: int, reason: str) -> dict[str, Any]:
    return {"code": code, "message": reason}


def request_fields(request: Any) -> dict[str, Any]:
    """The request's fields: a JSON object, or form fields (the first value of each)."""
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    request.content.seek(0)
    data = request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise InvalidRequest(f"the body is larger than {MAX_BODY} bytes")
    if content_type == b"application/json":
        try:
            body = json.loads(data)
        except ValueError as e:
            raise InvalidRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        return body
    if content_type.startswith(b"multipart/"):
        raise InvalidRequest("file uploads (jobfile, taskfile) are not supported: send form fields or JSON")
    try:
        parsed = parse_qs(data.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise InvalidRequest("form fields must be UTF-8") from None
    return {name: values[0] for name, values in parsed.items()}


def _text(fields: dict[str, Any], name: str, required: bool = False, limit: int = MAX_FIELD) -> Optional[str]:
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"{name} is required")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidRequest(f"{name} must be a string of at most {limit} characters")
    return value


def _integer(fields: dict[str, Any], name: str, required: bool = False, low: int = -2**31,
             high: int = 2**31 - 1) -> Optional[int]:
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"{name} is required (an integer)")
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer") from None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return value


def _id(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 10:
        raise InvalidRequest(f"{what} id must be a whole number")
    return int(text)


def _hostname(fields: dict[str, Any]) -> str:
    name = _text(fields, "hostname", required=True, limit=200)
    assert name is not None
    if any(not c.isprintable() or c in "/ " for c in name):
        raise InvalidRequest("hostname must be printable, without / or spaces")
    return name


def _figures(fields: dict[str, Any]) -> dict[str, Any]:
    """What a worker reports in Flamenco's run_info shape, as the registry keeps heartbeats'."""
    figures: dict[str, Any] = {}
    for name in ("update_frequent", "update_less_frequent"):
        value = fields.get(name)
        if isinstance(value, str) and value:
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidRequest(f"{name} must be a JSON object") from None
        if value is None or value == "":
            continue
        if not isinstance(value, dict) or len(json.dumps(value)) > 10_000:
            raise InvalidRequest(f"{name} must be a small JSON object")
        figures.update(value)
    frequent = figures.pop("worker_cpu_percent", None)
    if frequent is not None:
        figures["cpu_percent"] = frequent
    for ours, theirs in (("architecture", "worker_architecture"), ("disk_percent", "worker_disk_percent"),
                         ("mem_percent", "worker_mem_percent"), ("num_cpus", "worker_num_cpus")):
        if theirs in figures:
            figures[ours] = figures.pop(theirs)
    mac = fields.get("mac_address")
    if mac not in (None, ""):
        figures["mac_address"] = mac if isinstance(mac, (int, str)) and len(str(mac)) <= 64 else None
    return figures


class FlamencoAPI:
    app = Klein()
    install_error_handlers(app, _envelope)

    def __init__(self, flamenco: Flamenco, workers: Workers) -> None:
        self.flamenco = flamenco
        self.workers = workers

    def resource(self) -> Any:
        return self.app.resource()

    # -- workers -------------------------------------------------------------------------------

    def _worker_summary(self, worker: Worker) -> dict[str, Any]:
        return {"activity": worker.activity, "connection": worker.connection,
                "current_task": self.flamenco.current_task(worker.name), "hostname": worker.name, "id": worker.id,
                "ip_address": worker.ip, "log": worker.log, "port": worker.port or None,
                "status": "enabled" if worker.enabled else "disabled", "system": worker.system or None,
                "time_cost": worker.time_cost}

    @app.route("/workers", methods=["GET"])
    def list_workers(self, request: Any) -> bytes:
        return json_response(request, {w.name: self._worker_summary(w) for w in self.workers.workers.values()})

    @app.route("/workers", methods=["POST"])
    async def register_worker(self, request: Any) -> bytes:
        fields = request_fields(request)
        worker = self.workers.announce(_hostname(fields), request.getClientAddress().host,
                                       _text(fields, "system", limit=200) or "",
                                       _integer(fields, "port", low=0, high=65535) or 0, _figures(fields))
        await self.workers.saved(worker)
        request.setResponseCode(204)
        return b""

    @app.route("/workers/<worker_id>", methods=["GET"])
    def worker_info(self, request: Any, worker_id: str) -> bytes:
        worker = self.workers.by_id(_id(worker_id, "worker"))
        figures = worker.figures
        return json_response(request, {
            "hostname": worker.name,
            "mac_address": figures.get("mac_address"),
            "system": worker.system or figures.get("system"),
            "connection": worker.connection,
            "update_frequent": {"load_average": figures.get("load_average"),
                                "worker_cpu_percent": figures.get("cpu_percent")},
            "update_less_frequent": {"worker_architecture": figures.get("architecture"),
                                     "worker_disk_percent": figures.get("disk_percent"),
                                     "worker_mem_percent": figures.get("mem_percent"),
                                     "worker_num_cpus": figures.get("num_cpus")},
        })

    @app.route("/workers/<worker_id>", methods=["PATCH"])
    async def update_worker(self, request: Any, worker_id: str) -> bytes:
        worker = self.workers.by_id(_id(worker_id, "worker"))
        fields = request_fields(request)
        status = _text(fields, "status", limit=32)
        if status is not None and status not in WORKER_STATES:
            raise InvalidRequest(f"status must be one of {', '.join(WORKER_STATES)}")
        time_cost = _integer(fields, "time_cost", low=0)
        activity, log_text = _text(fields, "activity"), _text(fields, "log")
        if status in ("enabled", "disabled"):
            self.workers.set_enabled(worker.name, status == "enabled")
        else:
            # A report from the worker itself: it is alive.
            self.workers.touch(worker)
            worker.status = status or worker.status
        worker.activity = activity if activity is not None else worker.activity
        worker.log = log_text[-4096:] if log_text is not None else worker.log
        worker.time_cost = time_cost if time_cost is not None else worker.time_cost
        await self.workers.saved(worker)
        return json_response(request, {"task_id": self.flamenco.current_task(worker.name)})

    # -- tasks ---------------------------------------------------------------------------------

    @app.route("/tasks", methods=["POST"])
    async def create_task(self, request: Any) -> bytes:
        fields = request_fields(request)
        settings = fields.get("settings") or "{}"
        if isinstance(settings, str):
            try:
                settings = json.loads(settings)
            except ValueError:
                raise InvalidRequest("settings must be a JSON object (a string of JSON in form fields)") from None
        if not isinstance(settings, dict):
            raise InvalidRequest("settings must be a JSON object")
        task = await self.flamenco.create(
            _integer(fields, "task_id", required=True, low=0),  # type: ignore[arg-type]
            _integer(fields, "job_id", low=0), _integer(fields, "priority") or 0,
            _text(fields, "type", required=True, limit=32),  # type: ignore[arg-type]
            settings, _text(fields, "parser", limit=32) or "none")
        return json_response(request, await self.flamenco.describe(task), 202)

    @app.route("/tasks", methods=["GET"])
    async def list_tasks(self, request: Any) -> bytes:
        tasks = [await self.flamenco.describe(task) for _, task in sorted(self.flamenco.tasks.items())]
        return json_response(request, tasks)

    @app.route("/tasks/<task_id>", methods=["GET"])
    async def task_info(self, request: Any, task_id: str) -> bytes:
        return json_response(request, await self.flamenco.describe(self.flamenco.get(_id(task_id, "task"))))

    @app.route("/tasks/<task_id>", methods=["PATCH"])
    async def update_task(self, request: Any, task_id: str) -> bytes:
        task = self.flamenco.get(_id(task_id, "task"))
        fields = request_fields(request)
        status = _text(fields, "status", limit=32)
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}")
        changes: dict[str, Any] = {"status": status}
        for name in ("log", "activity"):
            value = _text(fields, name)
            if value is not None:
                changes[name] = value
        time_cost = _integer(fields, "time_cost", low=0)
        if time_cost is not None:
            changes["time_cost"] = time_cost
        await self.flamenco.update(task.id, changes)
        request.setResponseCode(204)
        return b""

    @app.route("/tasks/<task_id>", methods=["DELETE"])
    async def cancel_task(self, request: Any, task_id: str) -> bytes:
        task = await self.flamenco.cancel(_id(task_id, "task"))
        return json_response(request, await self.flamenco.describe(task), 202)


_FLAMENCO_ERRORS = {"400": {"description": "a bad request: {code, message}"},
                    "404": {"description": "no such worker or task: {code, message}"}}


def _op(summary: str, code: str = "200", body: bool = False, params: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {code: {"description": "done"}, **_FLAMENCO_ERRORS}}
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}},
                                         "application/x-www-form-urlencoded": {"schema": {"type": "object"}}}}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True,
                             "schema": {"type": "string", "pattern": "^[0-9]{1,10}$"}} for p in params]
    return op


FLAMENCO_PATHS: dict[str, Any] = {
    "/workers": {
        "get": _op("every worker, keyed by hostname: activity, connection, current_task, hostname, id, "
                   "ip_address, log, port, status, system, time_cost"),
        "post": _op("a worker registers or updates itself: hostname, system, port, mac_address, "
                    "update_frequent, update_less_frequent", "204", body=True),
    },
    "/workers/{worker_id}": {
        "get": _op("a worker's figures from its last heartbeat", params=("worker_id",)),
        "patch": _op("status (enabled/disabled from an operator; a disabled worker gets no new work), activity, "
                     "log, time_cost; answers {task_id}", body=True, params=("worker_id",)),
    },
    "/tasks": {
        "get": _op("every task"),
        "post": _op("a task: task_id, job_id, priority, type (shell or frames), settings (JSON), parser "
                    f"({' or '.join(PARSERS)}); compiled into jobs of the queue", "202", body=True),
    },
    "/tasks/{task_id}": {
        "get": _op("a task: id, worker_id, priority, frame_start, frame_end, frame_current, status, format",
                   params=("task_id",)),
        "patch": _op("status, log, activity, time_cost from a worker (status canceled cancels)", "204", body=True,
                     params=("task_id",)),
        "delete": _op("cancel: its jobs are stopped wherever they run, the others removed", "202",
                      params=("task_id",)),
    },
}
