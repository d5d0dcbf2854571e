"""The wr REST API (/rest/...): parse, validate, translate to the job queue, answer in wr's shapes."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from klein import Klein

from wmgr import __version__
from wmgr.api.common import flag, install_error_handlers, json_response, query, read_json
from wmgr.errors import InvalidRequest
from wmgr.jobs import model
from wmgr.jobs.queue import JobQueue


class WrAPI:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, queue: JobQueue, info: Callable[[], dict[str, Any]]) -> None:
        self.queue = queue
        self.info = info

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/rest/version/", methods=["GET"], strict_slashes=False)
    def version(self, request: Any) -> bytes:
        return json_response(request, {"Version": __version__, "API": "1"})

    @app.route("/rest/v1/info/", methods=["GET"], strict_slashes=False)
    def server_info(self, request: Any) -> bytes:
        return json_response(request, self.info())

    # -- jobs ----------------------------------------------------------------------------------

    @app.route("/rest/v1/jobs/", methods=["GET"], strict_slashes=False)
    async def incomplete_jobs(self, request: Any) -> bytes:
        params = query(request)
        state = _state_filter(params)
        return self._statuses(request, self.queue.incomplete(state), params)

    @app.route("/rest/v1/jobs/<path:ids>", methods=["GET"])
    async def some_jobs(self, request: Any, ids: str) -> bytes:
        params = query(request)
        jobs = await self.queue.select(_ids(ids), _state_filter(params), flag(params, "search"))
        return self._statuses(request, jobs, params)

    @app.route("/rest/v1/jobs/", methods=["POST"], strict_slashes=False)
    async def add_jobs(self, request: Any) -> bytes:
        params = query(request)
        rerun = flag(params, "rerun")
        defaults = model.parse_defaults(params)
        body = read_json(request)
        if not isinstance(body, list):
            raise InvalidRequest("the body must be a JSON array of job objects")
        specs = []
        for index, raw in enumerate(body):
            try:
                spec = model.parse_spec(raw, defaults)
            except InvalidRequest as e:
                raise InvalidRequest(f"there was a problem interpreting your job {index}: {e.reason}") from None
            rerun = rerun or bool(spec.get("rerun"))
            specs.append(spec)
        jobs = await self.queue.add(specs, rerun=rerun)
        now = time.time()
        return json_response(request, [job.status(now) for job in jobs], 201)

    @app.route("/rest/v1/jobs/", methods=["DELETE"], strict_slashes=False)
    async def cancel_incomplete(self, request: Any) -> bytes:
        return await self._cancel(request, None)

    @app.route("/rest/v1/jobs/<path:ids>", methods=["DELETE"])
    async def cancel_some(self, request: Any, ids: str) -> bytes:
        return await self._cancel(request, _ids(ids))

    async def _cancel(self, request: Any, ids: Optional[list[str]]) -> bytes:
        params = query(request)
        action = params.get("state")
        if action not in (model.RUNNING, model.LOST, model.DELETABLE):
            raise InvalidRequest("state must be supplied as one of running|lost|deletable")
        if ids is None:
            jobs = self.queue.incomplete(action)
        else:
            jobs = await self.queue.select(ids, action, flag(params, "search"))
        now = time.time()
        if action == model.RUNNING:
            affected = await self.queue.kill(jobs)
            return json_response(request, [job.status(now) for job in affected], 202)
        if action == model.LOST:
            affected = await self.queue.confirm_lost(jobs)
            return json_response(request, [job.status(now) for job in affected], 202)
        affected = await self.queue.delete(jobs)
        return json_response(request, [job.status(now) for job in affected], 200)

    def _statuses(self, request: Any, jobs: list[model.Job], params: dict[str, str]) -> bytes:
        std, env = flag(params, "std"), flag(params, "env")
        limit = _limit(params)
        now = time.time()
        jobs.sort(key=lambda job: job.seq)
        if limit:
            body = [job.status(now, std, env, similar) for job, similar in model.grouped(jobs, limit)]
        else:
            body = [job.status(now, std, env) for job in jobs]
        return json_response(request, body)


def _ids(text: str) -> list[str]:
    ids = [part for part in text.split(",") if part]
    if not ids:
        raise InvalidRequest("no job keys or rep groups were given")
    return ids


def _state_filter(params: dict[str, str]) -> Optional[str]:
    state = params.get("state")
    if state in (None, ""):
        return None
    if state not in model.FILTER_STATES:
        raise InvalidRequest(f"state must be one of {'|'.join(model.FILTER_STATES)}")
    return state


def _limit(params: dict[str, str]) -> int:
    text = params.get("limit", "")
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidRequest(f"limit must be a whole number, not {text!r}")
    return int(text)
