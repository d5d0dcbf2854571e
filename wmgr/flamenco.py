"""Flamenco's tasks and workers (the 2015 manager's API) on the job queue and the worker registry.

A task is compiled into jobs of the queue (a thin layer, as pman is): the `shell` compiler makes
one job of `settings.command`; the `frames` compiler cuts `settings.frames` ("1-10,15,20-22")
into chunks of `settings.chunk_size` frames and makes one job per chunk, with `{frame_start}`,
`{frame_end}` and `{frames}` in the command filled for that chunk. The jobs' rep group is
`flamenco.<task id>`; each carries the task id as its `unique`, so two tasks with one command are
two jobs.

A task's status comes from its jobs: `canceled` once cancelled, `failed` once one is buried,
`completed` when all are, `active` while one runs, else `waiting` (so a task whose worker went
offline is waiting again until another worker takes its jobs). The `frames` parser reads the
output workers forward as jobs run (and each job's final output) with `frame_regex` (default
`Fra:(\\d+)`, as Blender prints) and moves `frame_current` and `activity`.

The task records themselves (what Flamenco's server sent, and what workers PATCHed) are kept in
the store (table flamenco_tasks), so that they survive restarts with their jobs.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from wmgr.errors import Conflict, InvalidRequest, NotFound
from wmgr.jobs import model
from wmgr.jobs.model import Job
from wmgr.shield import shielded

log = Logger()

WAITING, ACTIVE, COMPLETED, FAILED, CANCELED = "waiting", "active", "completed", "failed", "canceled"
STATUSES = (WAITING, ACTIVE, COMPLETED, FAILED, CANCELED)
COMPILERS = ("shell", "frames")
PARSERS = ("none", "frames")
DEFAULT_FRAME_REGEX = r"Fra:(\d+)"
MAX_FRAMES = 100_000
MAX_JOBS = 10_000
REP_PREFIX = "flamenco."


def parse_frames(text: str) -> list[int]:
    """"1-10,15,20-22" -> the frames, in order, without repeats."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("settings.frames must be a frame list such as \"1-10,15,20-22\"")
    frames: dict[int, None] = {}
    for part in text.replace(" ", "").split(","):
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not match:
            raise InvalidRequest(f"settings.frames: {part!r} is neither a frame nor a range a-b")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start or end - start >= MAX_FRAMES or len(frames) + end - start >= MAX_FRAMES:
            raise InvalidRequest(f"settings.frames: {part!r} is backwards or too long (at most {MAX_FRAMES} frames)")
        for frame in range(start, end + 1):
            frames[frame] = None
    return list(frames)


def chunk_text(frames: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5"."""
    parts, start = [], frames[0]
    for previous, frame in zip(frames, frames[1:] + [None]):  # type: ignore[operator]
        if frame != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = frame
    return ",".join(parts)


def compile_task(compiler: str, settings: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(command, frame_start, frame_end) of each job of a task."""
    command = settings.get("command")
    if not isinstance(command, str) or not command.strip():
        raise InvalidRequest("settings.command must be a non-empty string")
    if compiler == "shell":
        return [(command, 0, 0)]
    frames = parse_frames(settings.get("frames"))  # type: ignore[arg-type]
    size = settings.get("chunk_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_FRAMES:
        raise InvalidRequest("settings.chunk_size must be a whole number from 1")
    chunks = [frames[i:i + size] for i in range(0, len(frames), size)]
    if len(chunks) > MAX_JOBS:
        raise InvalidRequest(f"the task would make {len(chunks)} jobs (at most {MAX_JOBS}): a larger chunk_size")
    jobs = []
    for chunk in chunks:
        try:
            filled = command.format(frame_start=chunk[0], frame_end=chunk[-1], frames=chunk_text(chunk))
        except (KeyError, IndexError, ValueError) as e:
            raise InvalidRequest(f"settings.command: placeholders are {{frame_start}}, {{frame_end}} and "
                                 f"{{frames}} ({e})") from None
        jobs.append((filled, chunk[0], chunk[-1]))
    return jobs


@dataclass
class Task:
    id: int
    job_id: Optional[int]
    priority: int
    type: str
    settings: dict[str, Any]
    parser: str
    keys: list[str]
    frame_start: int = 0
    frame_end: int = 0
    frame_current: int = 0
    canceled: bool = False
    log: str = ""
    activity: str = ""
    time_cost: Optional[int] = None
    format: str = ""
    frame_regex: str = DEFAULT_FRAME_REGEX
    extra: dict[str, Any] = field(default_factory=dict)


class Flamenco(Service):
    name = "flamenco"

    def __init__(self, queue: Any, workers: Any, store: Any) -> None:
        self.queue = queue
        self.workers = workers
        self.store = store
        self.tasks: dict[int, Task] = {}
        self._by_key: dict[str, int] = {}
        self.ready: Optional[Deferred[None]] = None
        workers.output_observers.append(self.output)

    def startService(self) -> None:
        super().startService()
        self.ready = ensureDeferred(self._load())

    async def _load(self) -> None:
        for (body,) in await self.store.read(lambda conn: conn.execute(
                "SELECT body FROM flamenco_tasks ORDER BY id").fetchall()):
            self._index(Task(**json.loads(body)))

    def _index(self, task: Task) -> None:
        self.tasks[task.id] = task
        for key in task.keys:
            self._by_key[key] = task.id

    async def _save(self, task: Task) -> None:
        body = json.dumps(asdict(task))
        await self.store.write(lambda conn: _upsert(conn, task.id, body))

    def get(self, task_id: int) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    # -- tasks ---------------------------------------------------------------------------------

    async def create(self, task_id: int, job_id: Optional[int], priority: int, compiler: str,
                     settings: dict[str, Any], parser: str) -> Task:
        if task_id in self.tasks:
            raise Conflict(f"task {task_id} exists already (Duplicated task)")
        if compiler not in COMPILERS:
            raise InvalidRequest(f"type must be one of {', '.join(COMPILERS)}")
        if parser not in PARSERS:
            raise InvalidRequest(f"parser must be one of {', '.join(PARSERS)}")
        regex = settings.get("frame_regex", DEFAULT_FRAME_REGEX)
        try:
            if not isinstance(regex, str) or re.compile(regex).groups < 1:
                raise InvalidRequest("settings.frame_regex must capture the frame number in a group")
        except re.error as e:
            raise InvalidRequest(f"settings.frame_regex: {e}") from None
        retries = settings.get("retries", 3)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 255:
            raise InvalidRequest("settings.retries must be a whole number from 0 to 255")
        compiled = compile_task(compiler, settings)
        specs = []
        for command, _, _ in compiled:
            spec = model.parse_spec({"cmd": command, "rep_grp": f"{REP_PREFIX}{task_id}",
                                     "priority": max(0, min(255, priority)), "retries": retries}, {})
            spec["unique"] = f"flamenco-task-{task_id}"
            specs.append(model.normalise(spec))
        task = Task(task_id, job_id, priority, compiler, settings, parser, [model.job_key(s) for s in specs],
                    frame_start=min(c[1] for c in compiled), frame_end=max(c[2] for c in compiled),
                    frame_regex=regex)
        task.frame_current = task.frame_start

        async def store() -> None:
            await self._save(task)  # before its jobs, so that none is ever without its task
            self._index(task)
            await self.queue.add(specs)

        # Whole even if the caller goes away meanwhile (wmgr/shield.py): never a task without its jobs.
        await shielded(ensureDeferred(store()))
        log.info("Flamenco task {id} ({type}) queued as {n} jobs", id=task_id, type=compiler, n=len(specs))
        return task

    async def update(self, task_id: int, fields: dict[str, Any]) -> None:
        """What a worker reports (log, activity, time_cost); status canceled cancels."""
        task = self.get(task_id)
        for name in ("log", "activity"):
            if name in fields:
                task.__dict__[name] = fields[name][-4096:]
        if "time_cost" in fields:
            task.time_cost = fields["time_cost"]
        if fields.get("status") == CANCELED:
            await self.cancel(task_id)
            return
        await self._save(task)

    async def cancel(self, task_id: int) -> Task:
        """Stopped wherever its jobs run (a worker is told in its next heartbeat's reply), and
        the ones not started removed."""
        task = self.get(task_id)
        task.canceled = True

        async def stop() -> None:
            await self._save(task)
            jobs = await self.queue.select(task.keys)
            await self.queue.kill([job for job in jobs if job.state in model.ACTIVE_STATES])
            waiting = [job for job in jobs if job.state not in model.ACTIVE_STATES and job.state != model.COMPLETE]
            await self.queue.delete(waiting)

        # Whole even if the caller goes away meanwhile (wmgr/shield.py): never a canceled task
        # whose jobs go on.
        await shielded(ensureDeferred(stop()))
        return task

    # -- what tasks look like ------------------------------------------------------------------

    async def describe(self, task: Task) -> dict[str, Any]:
        jobs = await self.queue.select(task.keys)
        status = self.status_of(task, jobs)
        worker_id = None
        for job in jobs:
            if job.state in model.ACTIVE_STATES and job.host in self.workers.workers:
                worker_id = self.workers.workers[job.host].id
        frame_current = task.frame_end if status == COMPLETED and task.parser == "frames" else task.frame_current
        return {"id": task.id, "worker_id": worker_id, "priority": task.priority, "frame_start": task.frame_start,
                "frame_end": task.frame_end, "frame_current": frame_current, "status": status,
                "format": task.format, "job_id": task.job_id, "type": task.type, "parser": task.parser,
                "log": task.log, "activity": task.activity, "time_cost": task.time_cost}

    @staticmethod
    def status_of(task: Task, jobs: list[Job]) -> str:
        if task.canceled:
            return CANCELED
        states = [job.state for job in jobs]
        if any(state == model.BURIED for state in states):
            return FAILED
        if len(jobs) == len(task.keys) and all(state == model.COMPLETE for state in states):
            return COMPLETED
        if any(state in model.ACTIVE_STATES for state in states):
            return ACTIVE
        return WAITING

    def current_task(self, worker_name: str) -> Optional[int]:
        worker = self.workers.workers.get(worker_name)
        if worker is None:
            return None
        for key in worker.leases:
            if key in self._by_key:
                return self._by_key[key]
        return None

    # -- the frames parser ---------------------------------------------------------------------

    def output(self, key: str, text: str) -> None:
        task_id = self._by_key.get(key)
        if task_id is None or not text:
            return
        task = self.tasks[task_id]
        if task.parser != "frames" or task.canceled:
            return
        frames = re.findall(task.frame_regex, text)
        if not frames:
            return
        try:
            frame = int(frames[-1] if isinstance(frames[-1], str) else frames[-1][0])
        except ValueError:
            return
        if frame != task.frame_current:
            task.frame_current = frame
            task.activity = json.dumps({"current_frame": frame})


def _upsert(conn: sqlite3.Connection, task_id: int, body: str) -> None:
    conn.execute("INSERT INTO flamenco_tasks (id, body) VALUES (?, ?) "
                 "ON CONFLICT (id) DO UPDATE SET body = excluded.body", (task_id, body))
