"""The wr REST API (/rest/...): parse, validate, translate to the job queue, answer in wr's shapes."""

from __future__ import annotations

import operator
import time
from typing import Any, Callable, Optional

from klein import Klein
from twisted.internet.defer import Deferred

from wmgr import __version__
from wmgr.api.common import flag, install_error_handlers, json_response, query, raw_json_response, read_json
from wmgr.errors import InvalidRequest, NotFound
from wmgr.jobs import model
from wmgr.jobs.queue import ADD_SLICE, JobQueue
from wmgr.jobs.status import json_array, status_parts
from wmgr.servers import BadServers
from wmgr.turns import Turns, in_slices
from wmgr.uploads import Uploads


_key_and_state = operator.attrgetter("key", "state")
# Bytes of a big add's reply written per reactor turn.
REPLY_SLICE = 1 << 20


class WrAPI:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, queue: JobQueue, info: Callable[[], dict[str, Any]], uploads: Uploads,
                 bad_servers: BadServers, turns: Optional[Turns] = None) -> None:
        self.queue = queue
        self.turns = turns
        self.info = info
        self.uploads = uploads
        self.bad_servers = bad_servers

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
        jobs = self.queue.incomplete(_state_filter(params))
        limit = _limit(params)
        pairs = model.grouped(jobs, limit) if limit else [(job, 0) for job in jobs]
        return self._statuses(request, pairs, params)

    @app.route("/rest/v1/jobs/<path:ids>", methods=["GET"])
    async def some_jobs(self, request: Any, ids: str) -> bytes:
        params = query(request)
        pairs = await self.queue.status_of(_ids(ids), _state_filter(params), flag(params, "search"), _limit(params))
        return self._statuses(request, pairs, params)

    @app.route("/rest/v1/jobs/", methods=["POST"], strict_slashes=False)
    async def add_jobs(self, request: Any) -> bytes:
        params = query(request)
        rerun = flag(params, "rerun")
        defaults = model.parse_defaults(params)
        body = read_json(request)
        if not isinstance(body, list):
            raise InvalidRequest("the body must be a JSON array of job objects")
        # A big add is parsed, made and answered a slice at a time, each slice in a reactor turn
        # of its own (wmgr/turns.py): 10,000 jobs are a quarter of a second of work.
        turn = self.turns.turn if self.turns is not None and len(body) > ADD_SLICE else None
        if turn is not None:
            await turn()  # the turn that read it answers other requests first
        parser = model.SpecParser(defaults)
        specs: list[dict[str, Any]] = []
        async for start, chunk in in_slices(body, ADD_SLICE, turn):
            specs += parser.parse(chunk, start)
        rerun = rerun or parser.rerun
        # The reply for jobs that are all new is encoded while the store commits them; it is used
        # if they are what the queue answers with, in the states they were encoded in.
        prepared: list[Any] = []

        async def prepare(new_jobs: list[model.Job]) -> None:
            states = list(map(_key_and_state, new_jobs))
            prepared[:] = [states, await self._statuses_json(new_jobs, turn)]

        jobs = await self.queue.add(specs, rerun=rerun, while_committing=prepare, turn=turn)
        if prepared and prepared[0] == list(map(_key_and_state, jobs)):
            body = prepared[1]
        else:
            body = await self._statuses_json(jobs, turn)
        if turn is None or len(body) <= REPLY_SLICE:
            return raw_json_response(request, body, 201)
        # Written a slice per turn too: TLS copies and encrypts what it is given in one piece
        # (60 MB for 100,000 jobs: a tenth of a second).
        raw_json_response(request, b"", 201)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        for start in range(0, len(body), REPLY_SLICE):
            await turn()
            request.write(body[start:start + REPLY_SLICE])
        return b""

    @staticmethod
    async def _statuses_json(jobs: list[model.Job], turn: Optional[Callable[[], Deferred[None]]]) -> bytes:
        """model.statuses_json of these jobs (none grouped), a slice per turn when given turns."""
        if turn is None or len(jobs) <= ADD_SLICE:
            return model.statuses_json([(job, 0) for job in jobs], time.time())
        parts: list[bytes] = []
        await turn()
        async for _, chunk in in_slices(jobs, ADD_SLICE, turn):
            parts += status_parts([(job, 0) for job in chunk], time.time())
        return json_array(parts)

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

    # -- beyond wr's REST: what its users ask for ------------------------------------------------

    @app.route("/rest/v1/jobs/<path:ids>/retry", methods=["POST"])
    async def retry_jobs(self, request: Any, ids: str) -> bytes:
        """Buried jobs go back to the queue with their retries renewed."""
        params = query(request)
        jobs = await self.queue.select(_ids(ids), model.BURIED, flag(params, "search"))
        affected = await self.queue.retry(jobs)
        return json_response(request, [job.status(time.time()) for job in affected])

    @app.route("/rest/v1/jobs/<path:ids>", methods=["PATCH"])
    async def modify_jobs(self, request: Any, ids: str) -> bytes:
        """Change properties of queued jobs (not running, not complete)."""
        params = query(request)
        changes = read_json(request)
        if not isinstance(changes, dict) or not changes:
            raise InvalidRequest("the body must be a JSON object of the properties to change")
        jobs = await self.queue.select(_ids(ids), _state_filter(params), flag(params, "search"))
        affected = await self.queue.modify(jobs, changes)
        return json_response(request, [job.status(time.time()) for job in affected])

    @app.route("/rest/v1/manager/<action>", methods=["POST"])
    def manage(self, request: Any, action: str) -> bytes:
        """pause: start nothing new; resume: start again; drain: start nothing new and stop the
        daemon once the running jobs have ended. Answers with the server info (Mode)."""
        operations = {"pause": self.queue.pause, "resume": self.queue.resume, "drain": self.queue.drain}
        if action not in operations:
            raise NotFound(f"no manager action {action!r} (pause, resume or drain)")
        operations[action]()
        return json_response(request, self.info())

    # -- uploads, warnings, servers --------------------------------------------------------------

    @app.route("/rest/v1/upload/", methods=["PUT"], strict_slashes=False)
    async def upload(self, request: Any) -> bytes:
        path = query(request).get("path")
        saved = await self.uploads.save(path, request.content)
        return json_response(request, {"path": saved})

    @app.route("/rest/v1/warnings/", methods=["GET"], strict_slashes=False)
    def warnings(self, request: Any) -> bytes:
        return json_response(request, self.queue.notices.take())

    @app.route("/rest/v1/servers/", methods=["GET"], strict_slashes=False)
    def servers(self, request: Any) -> bytes:
        return json_response(request, self.bad_servers.all())

    @app.route("/rest/v1/servers/", methods=["DELETE"], strict_slashes=False)
    def confirm_server(self, request: Any) -> bytes:
        server_id = query(request).get("id")
        if not server_id:
            raise InvalidRequest("id parameter is required")
        return json_response(request, self.bad_servers.confirm(server_id).status())

    def _statuses(self, request: Any, pairs: list[tuple[model.Job, int]], params: dict[str, str]) -> bytes:
        std, env = flag(params, "std"), flag(params, "env")
        return raw_json_response(request, model.statuses_json(pairs, time.time(), std, env))


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
