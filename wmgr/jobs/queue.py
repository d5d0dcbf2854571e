"""The job queue: the state machine of jobs, kept in memory for live jobs and in the store for all.

Rules this module keeps:
- An add is committed before `add` returns; only then are the jobs visible and runnable.
- Every state change is written as it happens. The final state of a run is committed before the
  run's files are removed, so that after a crash either the store or the files tell the outcome.
- Completed jobs leave memory once their state is committed; the store answers for them.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from wmgr.errors import InvalidRequest, NotFound
from wmgr.jobs import model
from wmgr.jobs.model import Job
from wmgr.jobs.runner import (
    DEFAULT_OUTPUT_LIMIT,
    JobRun,
    RunFiles,
    RunResult,
    find_job_processes,
    host_identity,
    measure_trees,
    prepare_workspace,
    read_bounded,
    spawn_in_session,
)
from wmgr.jobs.scheduler import Capacity, Scheduler
from wmgr.store import Store

log = Logger()

# The store's columns for a job row, in the order the queries below use.
_COLUMNS = "key, spec, state, seq, run, stdout, stderr"
_CHUNK = 500  # keys per IN (...) query: well under SQLite's parameter limit


def _row_to_job(row: tuple[Any, ...]) -> Job:
    key, spec, state, seq, run, stdout, stderr = row
    job = Job(key, json.loads(spec), state, seq)
    job.restore_run(json.loads(run))
    job.stdout, job.stderr = stdout, stderr
    return job


def _chunks(items: list[Any], size: int = _CHUNK) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AdoptedRun:
    """A job process found alive after a restart. It is not our child, so it cannot be waited
    for: the sampler reports when it has gone, and its status file and output tell the rest."""

    def __init__(self, files: RunFiles, pid: int, started: float, output_limit: int) -> None:
        self.files = files
        self.pid = pid
        self.started = started
        self.output_limit = output_limit
        self.peak_ram = 0
        self.kill_reason = ""
        self.done: Deferred[RunResult] = Deferred()
        self.workspace = None

    def kill(self, reason: str) -> None:
        import signal

        from wmgr.jobs.runner import signal_group

        self.kill_reason = self.kill_reason or reason
        signal_group(self.pid, signal.SIGKILL)

    def gone(self) -> None:
        if self.done.called:
            return
        exitcode = self.files.exit_status()
        self.done.callback(
            RunResult(
                exitcode=exitcode,
                signal=None,
                started=self.started,
                ended=time.time(),
                peak_ram=self.peak_ram,
                stdout=read_bounded(self.files.out, self.output_limit),
                stderr=read_bounded(self.files.err, self.output_limit),
                kill_reason=self.kill_reason,
                lost=exitcode is None and not self.kill_reason,
            )
        )


class JobQueue:
    """Live jobs, their transitions, and the local runs that carry them out."""

    def __init__(
        self,
        store: Store,
        run_dir: Path,
        reactor: Any,
        capacity: Capacity,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        kill_grace: float = 5.0,
        spawn: Callable[..., Any] = spawn_in_session,
    ) -> None:
        self.store = store
        self.run_dir = Path(run_dir)
        self._reactor = reactor
        self.scheduler = Scheduler(capacity)
        self.output_limit = output_limit
        self.kill_grace = kill_grace
        self._spawn = spawn
        self.host, self.host_ip = host_identity()
        self.live: dict[str, Job] = {}
        self.by_rep_grp: dict[str, dict[str, None]] = {}
        self.runs: dict[str, Any] = {}
        self._adding: dict[str, Deferred[Any]] = {}
        self._seq = 0
        self._schedule_call: Any = None
        self.paused = False  # no new starts; running jobs carry on
        self.draining = False  # as paused, for a manager on its way down
        self.running = False  # True between start() and stop()

    @property
    def mode(self) -> str:
        return "draining" if self.draining else "paused" if self.paused else "started"

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load live jobs, settle what was running when the daemon last stopped, then run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rows, self._seq = await self.store.read(_load_live)
        for row in rows:
            self._index(_row_to_job(row))
        await self._recover()
        self.running = True
        self._reschedule()

    async def stop(self) -> None:
        """Stop starting jobs. Running jobs are left running: they write their outcome to their
        files, and the next start adopts them or records what they left."""
        self.running = False
        if self._schedule_call is not None and self._schedule_call.active():
            self._schedule_call.cancel()

    # -- indexes -------------------------------------------------------------------------------

    def _index(self, job: Job) -> None:
        self.live[job.key] = job
        self.by_rep_grp.setdefault(job.rep_grp, {})[job.key] = None
        if job.state == model.READY:
            self.scheduler.push(job)

    def _unindex(self, job: Job) -> None:
        self.live.pop(job.key, None)
        group = self.by_rep_grp.get(job.rep_grp)
        if group is not None:
            group.pop(job.key, None)
            if not group:
                del self.by_rep_grp[job.rep_grp]

    # -- adding --------------------------------------------------------------------------------

    async def add(self, specs: list[dict[str, Any]], rerun: bool = False) -> list[Job]:
        """Add jobs; return, in request order, each job now in the queue (a job already queued is
        returned as it is; one that already completed is left out unless rerun)."""
        candidates: dict[str, dict[str, Any]] = {}
        for spec in specs:
            spec = model.normalise(spec)
            key = model.job_key(spec)
            candidates.setdefault(key, spec)
        for key, spec in candidates.items():
            if spec.get("cloud_script") and not os.path.isfile(os.path.expanduser(spec["cloud_script"])):
                raise InvalidRequest(f"cloud_script {spec['cloud_script']!r} does not exist on this machine")

        # Keys being added by a request still committing count as queued: wait for it to land.
        for key in list(candidates):
            pending = self._adding.get(key)
            if pending is not None:
                await _quietly(pending)
        fresh = {key: spec for key, spec in candidates.items() if key not in self.live}
        now = time.time()
        rows = []
        for key, spec in fresh.items():
            self._seq += 1
            rows.append((key, spec["rep_grp"], model.READY, self._seq, json.dumps(spec, separators=(",", ":")), now))
        committed: Deferred[Any] = self.store.write(lambda conn: _insert_jobs(conn, rows, rerun))
        for key in fresh:
            self._adding[key] = committed
        try:
            added_keys = await committed
        finally:
            for key in fresh:
                if self._adding.get(key) is committed:
                    del self._adding[key]
        seqs = {row[0]: row[3] for row in rows}
        for key in added_keys:
            self._index(Job(key, fresh[key], model.READY, seqs[key]))
        self._reschedule()
        return [self.live[key] for key in candidates if key in self.live]

    # -- looking up ----------------------------------------------------------------------------

    def incomplete(self, state: Optional[str] = None) -> list[Job]:
        jobs = self.live.values()
        if state is None:
            return [job for job in jobs if job.state != model.COMPLETE]
        return [job for job in jobs if matches_state(job, state)]

    async def select(self, ids: list[str], state: Optional[str] = None, search: bool = False) -> list[Job]:
        """Jobs by key or rep group, completed ones included. A 32-hex id is tried as a key
        first, then as a rep group; `state` filters rep-group matches only (as wr does)."""
        found: dict[str, Job] = {}
        keys = [i for i in ids if model.is_key(i)]
        history = await self.store.read(lambda conn: _select(conn, keys, [i for i in ids], search))
        by_key = {job.key: job for job in history}
        for ident in ids:
            if model.is_key(ident):
                job = self.live.get(ident) or by_key.get(ident)
                if job is not None and job.key not in found:
                    found[job.key] = job
                    continue
            for job in self._rep_group_members(ident, history, search):
                if job.key not in found and (state is None or matches_state(job, state)):
                    found[job.key] = job
        return list(found.values())

    def _rep_group_members(self, name: str, history: list[Job], search: bool) -> list[Job]:
        if search:
            groups = [g for g in self.by_rep_grp if name in g]
            stored = [job for job in history if name in job.rep_grp]
        else:
            groups = [name] if name in self.by_rep_grp else []
            stored = [job for job in history if job.rep_grp == name]
        members = [self.live[key] for group in groups for key in self.by_rep_grp[group]]
        seen = {job.key for job in members}
        members.extend(job for job in stored if job.key not in seen)
        return members

    # -- cancelling ----------------------------------------------------------------------------

    async def kill(self, jobs: list[Job]) -> list[Job]:
        """DELETE state=running: kill the process groups; the jobs end buried."""
        affected = []
        for job in jobs:
            run = self.runs.get(job.key)
            if run is not None and job.state == model.RUNNING:
                run.kill(model.FAIL_KILLED)
                affected.append(job)
        return affected

    async def confirm_lost(self, jobs: list[Job]) -> list[Job]:
        """DELETE state=lost: the job is really gone; release it (it becomes buried)."""
        affected = [job for job in jobs if job.state == model.LOST and job.key in self.live]
        for job in affected:
            job.state = model.BURIED
            job.fail_reason = job.fail_reason or model.FAIL_LOST
        if affected:
            await self.store.write(lambda conn: _update_jobs(conn, affected))
        return affected

    async def delete(self, jobs: list[Job]) -> list[Job]:
        """DELETE state=deletable: remove jobs that are neither running nor complete."""
        doomed = [
            job for job in jobs
            if job.key in self.live and job.state not in model.ACTIVE_STATES and job.state != model.COMPLETE
        ]
        if not doomed:
            return []
        keys = [job.key for job in doomed]
        await self.store.write(lambda conn: _delete_jobs(conn, keys))
        for job in doomed:
            self._unindex(job)
            job.state = model.DELETED
        return doomed

    # -- running -------------------------------------------------------------------------------

    def _reschedule(self) -> None:
        """Ask for a scheduling pass soon; many events in one reactor turn share one pass."""
        if self.running and self._schedule_call is None:
            self._schedule_call = self._reactor.callLater(0, self._schedule)

    def _schedule(self) -> None:
        self._schedule_call = None
        if self.paused or self.draining or not self.running:
            return
        for job in self.scheduler.pick(self.live.get, lambda j: j.state == model.READY):
            self._start(job)

    def _start(self, job: Job) -> None:
        if self.scheduler.never_fits(job):
            self.scheduler.release(job)
            self._finish_without_run(job, model.FAIL_RESOURCES)
            return
        try:
            workspace = prepare_workspace(job.key, job.spec)
        except OSError as e:
            self.scheduler.release(job)
            self._finish_without_run(job, model.FAIL_CWD if e.errno == 2 else model.FAIL_START, str(e))
            return
        run = JobRun(self._reactor, RunFiles(self.run_dir, job.key), workspace, job.spec["cmd"],
                     output_limit=self.output_limit, kill_grace=self.kill_grace, spawn=self._spawn)
        try:
            run.start()
        except OSError as e:
            self.scheduler.release(job)
            run.files.remove()
            self._finish_without_run(job, model.FAIL_START, str(e))
            return
        job.reset_run()
        job.state = model.RUNNING
        job.attempts += 1
        job.pid, job.host, job.host_ip = run.pid, self.host, self.host_ip
        job.started = run.started
        job.actual_cwd = workspace.relative_cwd
        job.home_changed = workspace.home_changed
        self.runs[job.key] = run
        self._write(job)
        run.done.addCallback(self._run_ended, job, run)
        run.done.addErrback(lambda f: log.failure("job {key} run failed", f, key=job.key))

    def _finish_without_run(self, job: Job, reason: str, detail: str = "") -> None:
        job.state = model.BURIED
        job.fail_reason = reason
        job.stderr = detail
        self._write(job)

    def _run_ended(self, result: RunResult, job: Job, run: Any) -> Deferred[None]:
        self.runs.pop(job.key, None)
        self.scheduler.release(job)
        self._record(job, result)
        if getattr(run, "workspace", None) is not None and run.workspace.tmp:
            shutil.rmtree(run.workspace.tmp, ignore_errors=True)
        d = self.store.write(lambda conn: _update_jobs(conn, [job]))
        d.addCallback(lambda _: self._settled(job, run))
        d.addErrback(lambda f: log.failure("could not store the end of job {key}", f, key=job.key))
        self._reschedule()
        return d

    def _record(self, job: Job, result: RunResult) -> None:
        """Turn what a run left into the job's state and wr's fail reasons."""
        job.ended = result.ended
        job.cpu_time = round(result.cpu_time, 6)
        job.peak_ram = max(job.peak_ram, result.peak_ram)
        job.stdout, job.stderr = result.stdout, result.stderr
        job.exited = result.exitcode is not None
        job.exitcode = result.exitcode if result.exitcode is not None else -1
        if result.kill_reason:
            job.state, job.fail_reason = model.BURIED, result.kill_reason
        elif result.lost:
            job.state, job.fail_reason = model.LOST, model.FAIL_LOST
        elif result.exitcode == 0:
            job.state, job.fail_reason = model.COMPLETE, ""
        elif result.exitcode is None:
            job.state, job.fail_reason = model.BURIED, model.FAIL_SIGNAL
        elif result.exitcode == 126:
            job.state, job.fail_reason = model.BURIED, model.FAIL_PERMISSION
        elif result.exitcode == 127:
            job.state, job.fail_reason = model.BURIED, model.FAIL_NOT_FOUND
        else:
            job.state, job.fail_reason = model.BURIED, model.FAIL_NONZERO

    def _settled(self, job: Job, run: Any) -> None:
        """The end of a run is committed: its files may go, and a completed job leaves memory."""
        run.files.remove()
        if job.state == model.COMPLETE and self.live.get(job.key) is job:
            self._unindex(job)

    def _write(self, job: Job) -> None:
        d = self.store.write(lambda conn: _update_jobs(conn, [job]))
        d.addErrback(lambda f: log.failure("could not store job {key}", f, key=job.key))

    # -- sampling ------------------------------------------------------------------------------

    async def sample(self) -> None:
        """Measure the memory of every running job's process tree (in a thread), and notice
        adopted processes that have gone."""
        runs = dict(self.runs)
        if not runs:
            return
        sizes = await deferToThread(measure_trees, [run.pid for run in runs.values()])
        for key, run in runs.items():
            size = sizes.get(run.pid)
            job = self.live.get(key)
            if size is None:
                if isinstance(run, AdoptedRun):
                    run.gone()
                continue
            run.peak_ram = max(run.peak_ram, size)
            if job is not None:
                job.peak_ram = max(job.peak_ram, size)

    # -- recovery after a restart --------------------------------------------------------------

    async def _recover(self) -> None:
        """Settle every job that may have been started by an earlier daemon: adopt the ones still
        running, record the outcome of the ones that finished meanwhile, mark the rest lost."""
        names = await deferToThread(os.listdir, self.run_dir)
        with_files = {name.rsplit(".", 1)[0] for name in names}
        started = {key for key, job in self.live.items() if job.state in model.ACTIVE_STATES}
        if not (with_files | started):
            return
        alive = await deferToThread(find_job_processes, self.run_dir)
        for key in sorted(with_files | started):
            job = self.live.get(key)
            files = RunFiles(self.run_dir, key)
            if job is None or job.state in (model.COMPLETE, model.BURIED, model.LOST) and key not in alive:
                files.remove()  # a run whose end was committed before the files were removed
                continue
            if key not in with_files:
                job.state, job.fail_reason = model.LOST, model.FAIL_LOST
                self._write(job)
                continue
            if job.state == model.READY:
                # Started, but the daemon died before "running" was stored: it did run.
                job.attempts += 1
            self.scheduler.take(job)
            started_at = job.started or time.time()
            run = AdoptedRun(files, alive.get(key, 0), started_at, self.output_limit)
            job.state = model.RUNNING
            self.runs[key] = run
            run.done.addCallback(self._run_ended, job, run)
            if key in alive:
                job.pid = alive[key]
                log.info("adopted job {key} (pid {pid}) left running by an earlier daemon", key=key, pid=job.pid)
                self._write(job)
            else:
                run.gone()


def matches_state(job: Job, state: str) -> bool:
    if state == model.DELETABLE:
        return job.state not in model.ACTIVE_STATES and job.state != model.COMPLETE
    if state == model.RUNNING:
        return job.state in model.ACTIVE_STATES
    return job.state == state


async def _quietly(d: Deferred[Any]) -> None:
    waiter: Deferred[Any] = Deferred()
    d.addBoth(lambda result: (waiter.callback(None), result)[1])
    await waiter


# -- store operations (these run in the store's threads) -------------------------------------------


def _load_live(conn: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM jobs WHERE state != ? ORDER BY seq", (model.COMPLETE,)
    ).fetchall()
    (top,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
    return rows, top


def _insert_jobs(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], rerun: bool) -> list[str]:
    """Insert new jobs; a key already stored is a completed job (live ones were filtered out):
    left alone, or re-queued with rerun. Returns the keys now queued."""
    keys = [row[0] for row in rows]
    existing: set[str] = set()
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        existing.update(k for (k,) in conn.execute(f"SELECT key FROM jobs WHERE key IN ({marks})", chunk))
    conn.executemany(
        "INSERT INTO jobs (key, rep_grp, state, seq, spec, updated) VALUES (?, ?, ?, ?, ?, ?)",
        [row for row in rows if row[0] not in existing],
    )
    if rerun and existing:
        conn.executemany(
            "UPDATE jobs SET rep_grp = ?, state = ?, seq = ?, spec = ?, run = '{}', stdout = '', "
            "stderr = '', updated = ? WHERE key = ?",
            [row[1:] + (row[0],) for row in rows if row[0] in existing],
        )
        return keys
    return [key for key in keys if key not in existing]


def _update_jobs(conn: sqlite3.Connection, jobs: list[Job]) -> None:
    now = time.time()
    conn.executemany(
        "UPDATE jobs SET state = ?, run = ?, stdout = ?, stderr = ?, updated = ? WHERE key = ?",
        [
            (job.state, json.dumps(job.run_record(), separators=(",", ":")), job.stdout, job.stderr, now, job.key)
            for job in jobs
        ],
    )


def _delete_jobs(conn: sqlite3.Connection, keys: list[str]) -> None:
    for chunk in _chunks(keys):
        conn.execute(f"DELETE FROM jobs WHERE key IN ({','.join('?' * len(chunk))})", chunk)


def _select(conn: sqlite3.Connection, keys: list[str], groups: list[str], search: bool) -> list[Job]:
    """Stored jobs by key and by rep group (exact, or containing the text when searching)."""
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(keys):
        rows += conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
    for group in groups:
        if search:
            pattern = "%" + group.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows += conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE rep_grp LIKE ? ESCAPE '\\'", (pattern,)).fetchall()
        else:
            rows += conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE rep_grp = ?", (group,)).fetchall()
    return [_row_to_job(row) for row in rows]
