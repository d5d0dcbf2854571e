"""The job queue: the state machine of jobs, kept in memory for live jobs and in the store for all.

Rules this module keeps:
- An add is committed before `add` returns; only then are the jobs visible and runnable.
- Every state change is written as it happens, with the store's per-rep-group counters moved in
  the same transaction. The end of a run is committed before the run's files are removed, so that
  after a crash either the store or the files tell the outcome.
- Completed jobs leave memory once their state is committed; the store answers for them.

    add ──> ready ──> running ──> complete
     │        ^  ^       │ └────> buried (no retries left, killed, 126/127) ──retry──> ready
     └> dependent │      ├──────> delayed (retries left; back-off) ──> ready
                  │      └──────> lost (vanished without a status) ──confirm──> delayed/buried
                  └── deps complete
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections import ChainMap, Counter
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from wmgr import compactjson
from wmgr.errors import Conflict, InvalidRequest
from wmgr.jobs import model
from wmgr.jobs.behaviours import behaviours_for, run_behaviours
from wmgr.jobs.deps import DependencyIndex
from wmgr.jobs.learning import WINDOW, ResourceLearner, memory_after_ram_failure
from wmgr.jobs.limits import LimitGroups, parse_limit_groups
from wmgr.jobs.model import Job
from wmgr.jobs.runner import (
    JobRun,
    RunFiles,
    RunResult,
    find_job_processes,
    host_identity,
    measure_trees,
    prepare_workspace,
    read_bounded,
    remove_tmp,
    run_files_in,
    signal_group,
    spawn_in_session,
)
from wmgr.jobs.scheduler import Capacity, Scheduler
from wmgr.store import Store

log = Logger()

# The store's columns for a job row, in the order the queries below use.
_COLUMNS = "key, spec, state, seq, run, stdout, stderr"
_CHUNK = 500  # keys per IN (...) query: well under SQLite's parameter limit
_PRUNE_CHUNK = 5000  # completed jobs removed per transaction when pruning history

# Fields of a queued job that PATCH may change. The command and its cwd make the key: changing
# them is adding another job.
MODIFIABLE = ("priority", "retries", "memory", "time", "cpus", "disk", "override", "limit_grps", "env",
              "rep_grp", "req_grp", "on_failure", "on_success", "on_exit", "change_home")


@dataclass
class QueuePolicy:
    """How the queue treats jobs; every number here is a setting in etc/wmgr.cnf."""

    output_limit: int = 4096
    kill_grace: float = 5.0
    # Retry back-off: base * 2^(failures-1), capped, plus up to `retry_jitter` of itself at random.
    retry_base: float = 30.0
    retry_cap: float = 1800.0
    retry_jitter: float = 0.25
    # Limits: a run over its memory or time by more than the margin is stopped.
    enforce_limits: bool = True
    memory_margin: float = 0.10
    time_margin: float = 0.10
    # History pruning: completed jobs older than max_age seconds, or beyond the newest max_count,
    # are removed (0: keep).
    history_max_age: float = 0.0
    history_max_count: int = 0

    def backoff(self, failures: int) -> float:
        delay = min(self.retry_cap, self.retry_base * 2 ** max(0, failures - 1))
        return delay + random.uniform(0, delay * self.retry_jitter)


class Notices:
    """Scheduler warnings for GET /rest/v1/warnings/: one entry per distinct message, with its
    first and last time and count; reading them removes them (as wr does)."""

    def __init__(self) -> None:
        self._entries: dict[str, list[Any]] = {}

    def warn(self, message: str) -> None:
        now = int(time.time())
        entry = self._entries.get(message)
        if entry is None:
            self._entries[message] = [now, now, 1]
            log.warn("{message}", message=message)
        else:
            entry[1] = now
            entry[2] += 1

    def take(self) -> list[dict[str, Any]]:
        entries, self._entries = self._entries, {}
        return [{"Msg": m, "FirstDate": e[0], "LastDate": e[1], "Count": e[2]} for m, e in entries.items()]


class AdoptedRun:
    """A job process found alive after a restart. It is not our child, so it cannot be waited
    for: the sampler reports when it has gone, and its status file and output tell the rest."""

    workspace = None

    def __init__(self, files: RunFiles, pid: int, started: float, output_limit: int, clock: Any,
                 kill_grace: float) -> None:
        self.files = files
        self.pid = pid
        self.started = started
        self.output_limit = output_limit
        self._clock = clock
        self.kill_grace = kill_grace
        self.peak_ram = 0
        self.kill_reason = ""
        self.done: Deferred[RunResult] = Deferred()

    def kill(self, reason: str) -> None:
        """As JobRun.kill: TERM the group now, KILL it after the grace period."""
        if self.done.called or not self.pid:
            return
        first = not self.kill_reason
        self.kill_reason = self.kill_reason or reason
        signal_group(self.pid, signal.SIGTERM)
        if first:
            self._clock.callLater(self.kill_grace, signal_group, self.pid, signal.SIGKILL)

    def gone(self) -> None:
        if self.done.called:
            return
        exitcode = self.files.exit_status()
        self.done.callback(RunResult(
            exitcode=exitcode, signal=None, started=self.started, ended=time.time(), peak_ram=self.peak_ram,
            stdout=read_bounded(self.files.out, self.output_limit),
            stderr=read_bounded(self.files.err, self.output_limit),
            kill_reason=self.kill_reason, lost=exitcode is None and not self.kill_reason,
        ))


class JobQueue:
    """Live jobs, their transitions, and the local runs that carry them out."""

    def __init__(self, store: Store, run_dir: Path, reactor: Any, capacity: Capacity,
                 policy: Optional[QueuePolicy] = None, spawn: Callable[..., Any] = spawn_in_session) -> None:
        self.store = store
        self.run_dir = Path(run_dir)
        self._reactor = reactor
        self.policy = policy or QueuePolicy()
        self.scheduler = Scheduler(capacity)
        self.deps = DependencyIndex()
        self.limits = LimitGroups()
        self.learner = ResourceLearner()
        self.notices = Notices()
        self._spawn = spawn
        self.host, self.host_ip = host_identity()
        self.live: dict[str, Job] = {}
        self.by_rep_grp: dict[str, dict[str, None]] = {}
        self.runs: dict[str, Any] = {}
        self._delays: dict[str, Any] = {}
        self._adding: dict[str, Deferred[Any]] = {}
        # Saves gathered in this reactor turn (see _save).
        self._dirty: dict[str, Job] = {}
        self._dirty_samples: list[tuple[str, int, float]] = []
        self._dirty_specs: list[tuple[str, str]] = []
        self._dirty_limits: dict[str, int] = {}
        self._flush_waiters: list[tuple[Deferred[None], bool]] = []
        self._flush_durable = False
        self._flush_call: Any = None
        self._seq = 0
        self._schedule_call: Any = None
        self.paused = False  # no new starts; running jobs carry on
        self.draining = False  # no new starts, and the daemon stops once nothing runs
        self.on_drained: Callable[[], Any] = lambda: None
        self.running = False  # True between start() and stop()
        self.counters = SimpleNamespace(started=0, completed=0, failed=0)  # runs, for the metrics

    def state_counts(self) -> dict[str, int]:
        """Live jobs by state (for the metrics; a scan: the core keeps these as counters)."""
        return dict(Counter(job.state for job in self.live.values()))

    def usage(self) -> dict[str, Any]:
        capacity = self.scheduler.capacity
        return {"running": len(self.runs), "cores_used": self.scheduler.used_cores, "cores_total": capacity.cores,
                "memory_used_mb": self.scheduler.used_memory, "memory_total_mb": capacity.memory}

    @property
    def mode(self) -> str:
        return "draining" if self.draining else "paused" if self.paused else "started"

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load live jobs, settle what was running when the daemon last stopped, then run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        loaded = await self.store.read(_load)
        self._seq = loaded["seq"]
        for name, limit in loaded["limits"]:
            self.limits.set_limit(name, limit)
        for req_grp, ram, secs in loaded["samples"]:
            self.learner.record(req_grp, ram, secs)
        for row in loaded["rows"]:
            job = _row_to_job(row)
            self._learn_expectations(job)
            self._index(job)
        now = time.time()
        for job in list(self.live.values()):
            if job.state == model.DELAYED:
                self._delays[job.key] = self._reactor.callLater(
                    max(0.0, (job.delay_until or now) - now), self._undelay, job.key)
            elif job.state == model.DEPENDENT and not self.deps.blocked(job, self.live):
                self._make_ready(job)
        await self._recover()
        self.running = True
        self._reschedule()

    async def stop(self) -> None:
        """Stop starting jobs. Running jobs are left running: they write their outcome to their
        files, and the next start adopts them or records what they left."""
        self.running = False
        self._flush()
        for call in [self._schedule_call, *self._delays.values()]:
            if call is not None and call.active():
                call.cancel()
        self._delays.clear()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = self.draining = False
        self._reschedule()

    def drain(self) -> None:
        """Start nothing new; once the running jobs have ended, call on_drained."""
        self.draining = True
        self._check_drained()

    def _check_drained(self) -> None:
        if self.draining and not self.runs:
            self.on_drained()

    # -- indexes -------------------------------------------------------------------------------

    def _index(self, job: Job) -> None:
        self.live[job.key] = job
        self.by_rep_grp.setdefault(job.rep_grp, {})[job.key] = None
        self.deps.add(job)
        if job.state == model.READY:
            self.scheduler.push(job)

    def _index_new(self, jobs: list[Job]) -> None:
        """_index for jobs just added (in seq order), in bulk: an add of 100,000 jobs spent a
        tenth of its time indexing them one by one."""
        for job in jobs:
            job.stored = job.group_key
            old = self.live.get(job.key)
            if old is not None:
                self._unindex(old)  # the completed job it runs again
        self.live.update((job.key, job) for job in jobs)
        by_rep_grp = self.by_rep_grp
        for job in jobs:
            group = by_rep_grp.get(job.spec["rep_grp"])
            if group is None:
                group = by_rep_grp[job.spec["rep_grp"]] = {}
            group[job.key] = None
            if "dep_grps" in job.spec or "deps" in job.spec:
                self.deps.add(job)
        self.scheduler.push_new([job for job in jobs if job.state == model.READY])

    def _unindex(self, job: Job) -> None:
        self.live.pop(job.key, None)
        self.deps.remove(job)
        group = self.by_rep_grp.get(job.rep_grp)
        if group is not None:
            group.pop(job.key, None)
            if not group:
                del self.by_rep_grp[job.rep_grp]
        call = self._delays.pop(job.key, None)
        if call is not None and call.active():
            call.cancel()

    def _learn_expectations(self, job: Job) -> None:
        spec = job.spec
        job.expected_ram, job.expected_time = self.learner.expected(
            spec["req_grp"], spec["memory"], spec["time"], spec.get("override", 0))

    # -- adding --------------------------------------------------------------------------------

    async def add(self, specs: list[dict[str, Any]], rerun: bool = False,
                  while_committing: Optional[Callable[[list[Job]], None]] = None) -> list[Job]:
        """Add jobs (specs as model.normalise leaves them); return, in request order, each job
        now in the queue (a job already queued is returned as it is; one that already completed
        is left out unless rerun).

        `while_committing(new_jobs)` is called while the store commits them (SQLite lets go of
        the GIL meanwhile): a caller can prepare its reply then. The jobs are not queued yet."""
        candidates: dict[str, dict[str, Any]] = {}
        limits: dict[str, int] = {}
        for spec in specs:
            if spec.get("limit_grps"):
                spec["limit_grps"], set_limits = parse_limit_groups(spec["limit_grps"])
                limits.update(set_limits)
            if spec.get("cloud_script") and not os.path.isfile(os.path.expanduser(spec["cloud_script"])):
                raise InvalidRequest(f"cloud_script {spec['cloud_script']!r} does not exist on this machine")
            candidates.setdefault(model.job_key(spec), spec)

        # Keys being added by a request still committing count as queued: wait for it to land.
        for key in list(candidates):
            pending = self._adding.get(key)
            if pending is not None:
                await _quietly(pending)
        new_jobs = []
        for key, spec in candidates.items():
            # A job that has just completed stays in memory until its end is committed; it is a
            # completed job all the same (left alone, or run again with rerun).
            live = self.live.get(key)
            if live is None or live.state == model.COMPLETE:
                self._seq += 1
                job = Job(key, spec, model.READY, self._seq)
                self._learn_expectations(job)
                new_jobs.append(job)
        if any(job.spec.get("deps") for job in new_jobs):
            self.deps.check_acyclic([*self.live.values(), *new_jobs])
            view = ChainMap({job.key: job for job in new_jobs}, self.live)
            for job in new_jobs:
                self.deps.add(job)
            for job in new_jobs:
                if self.deps.blocked(job, view):
                    job.state = model.DEPENDENT
            for job in new_jobs:
                self.deps.remove(job)

        now = time.time()
        rows = [(job.key, job.spec["rep_grp"], job.state, job.seq, _dumps(job.spec), now, job.spec.get("deps") or ())
                for job in new_jobs]
        committed: Deferred[Any] = self._write(lambda conn: _insert_jobs(conn, rows, rerun, limits))
        for job in new_jobs:
            self._adding[job.key] = committed
        if while_committing is not None:
            while_committing(new_jobs)
        try:
            added_keys = set(await committed)
        finally:
            for job in new_jobs:
                if self._adding.get(job.key) is committed:
                    del self._adding[job.key]
        for name, limit in limits.items():
            self.limits.set_limit(name, limit)
        added = [job for job in new_jobs if job.key in added_keys]
        self._index_new(added)
        groups = {group for job in added for group in job.spec.get("dep_grps") or ()}
        if groups:
            await self._hold_back(groups)
        self._reschedule()
        return [self.live[key] for key in candidates
                if key in self.live and self.live[key].state != model.COMPLETE]

    async def _hold_back(self, groups: set[str]) -> None:
        """New jobs joined these groups: jobs waiting for the groups wait again (live
        dependencies), and completed ones that waited for them run again, recursively."""
        changed = []
        for group in groups:
            for key in self.deps.waiting.get(group, ()):
                job = self.live[key]
                if job.state in (model.READY, model.DELAYED) and self.deps.blocked(job, self.live):
                    self._cancel_delay(job)
                    job.state = model.DEPENDENT
                    changed.append(job)
        if changed:
            self._save(changed)
        rows = await self._write(lambda conn: _resurrect(conn, groups))
        revived = []
        for row in rows:
            job = self.live.get(row[0])
            if job is None:
                job = _row_to_job(row)
            else:
                self._unindex(job)
            job.reset_run()
            job.failures = 0
            job.state = model.DEPENDENT
            job.stored = job.group_key
            self._learn_expectations(job)
            self._index(job)
            revived.append(job)
        for job in revived:
            if not self.deps.blocked(job, self.live):
                self._make_ready(job, save=False)
        if revived:
            log.info("re-running {count} completed jobs whose dependencies gained new jobs", count=len(revived))
            self._save(revived)

    # -- looking up ----------------------------------------------------------------------------

    def incomplete(self, state: Optional[str] = None) -> list[Job]:
        if state is None:
            return [job for job in self.live.values() if job.state != model.COMPLETE]
        return [job for job in self.live.values() if matches_state(job, state)]

    async def select(self, ids: list[str], state: Optional[str] = None, search: bool = False) -> list[Job]:
        """Jobs by key or rep group, completed ones included. A 32-hex id is tried as a key
        first, then as a rep group; `state` filters rep-group matches only (as wr does)."""
        return [job for job, _ in await self.status_of(ids, state, search, 0)]

    async def status_of(self, ids: list[str], state: Optional[str] = None, search: bool = False,
                        limit: int = 0) -> list[tuple[Job, int]]:
        """As select, grouped as wr's limit=N groups (see model.grouped) when limit > 0. With a
        limit, completed jobs are counted from the store's counters, never scanned."""
        keys = [i for i in ids if model.is_key(i)]
        want_history = state in (None, model.COMPLETE)
        history = await self.store.read(lambda conn: _history(conn, keys, ids, search, limit, want_history))
        found: dict[str, Job] = {}
        for ident in ids:
            if model.is_key(ident):
                job = self.live.get(ident) or history["keys"].get(ident)
                if job is not None:
                    found[job.key] = job
                    continue
            for group in self._matching_groups(ident, search):
                for key in self.by_rep_grp.get(group, ()):
                    job = self.live[key]
                    if state is None or matches_state(job, state):
                        found.setdefault(key, job)
        live = list(found.values())
        if not limit:
            stored = [job for job in history["jobs"] if job.key not in found]
            return [(job, 0) for job in live + stored]
        return _merge_groups(live, history["groups"], found, limit)

    def _matching_groups(self, name: str, search: bool) -> list[str]:
        if search:
            return [group for group in self.by_rep_grp if name in group]
        return [name] if name in self.by_rep_grp else []

    # -- acting on jobs ------------------------------------------------------------------------

    async def kill(self, jobs: list[Job]) -> list[Job]:
        """Kill running jobs' process groups; they end buried ("killed by user request")."""
        affected = []
        for job in jobs:
            run = self.runs.get(job.key)
            if run is not None and job.state in model.ACTIVE_STATES:
                run.kill(model.FAIL_KILLED)
                affected.append(job)
        return affected

    async def confirm_lost(self, jobs: list[Job]) -> list[Job]:
        """Lost jobs really are gone: release them, to be retried or buried as retries allow."""
        affected = [job for job in jobs if job.state == model.LOST and self.live.get(job.key) is job]
        for job in affected:
            self._failed(job, model.FAIL_LOST)
        if affected:
            await self._save(affected, strict=True, durable=True)
            self._reschedule()
        return affected

    async def retry(self, jobs: list[Job]) -> list[Job]:
        """Buried jobs go back to the queue with their retries renewed."""
        affected = [job for job in jobs if job.state == model.BURIED and self.live.get(job.key) is job]
        for job in affected:
            job.failures = 0
            job.kill_reason = ""
            self._make_ready(job, save=False)
        if affected:
            await self._save(affected, strict=True, durable=True)
            self._reschedule()
        return affected

    async def delete(self, jobs: list[Job]) -> list[Job]:
        """Remove jobs that are neither running nor complete. A job that others wait for is
        refused (409, nothing deleted) unless those others are deleted with it."""
        doomed = {job.key: job for job in jobs
                  if self.live.get(job.key) is job and job.state not in model.ACTIVE_STATES
                  and job.state != model.COMPLETE}
        if not doomed:
            return []
        refused = {}
        for job in doomed.values():
            outside = [key for key in self.deps.dependants(job) if key not in doomed]
            if outside:
                refused[job.key] = outside
        if refused:
            key, waiting = next(iter(refused.items()))
            raise Conflict(f"job {key} cannot be deleted: {len(waiting)} job(s) depend on it "
                           f"(e.g. {waiting[0]}); delete them in the same request")
        self._flush()  # so that `stored` below is what the store has
        items = [(job.key, job.stored) for job in doomed.values()]
        await self._write(lambda conn: _delete_jobs(conn, items))
        released: set[str] = set()
        for job in doomed.values():
            released |= self.deps.dependants(job)
            self._unindex(job)
            job.state = model.DELETED
        self._release_waiting(released)
        return list(doomed.values())

    async def forget(self, jobs: list[Job]) -> list[Job]:
        """Remove jobs that are not running, completed ones from the history too (pman's
        DBctl clear). As with delete, a job others wait for is refused unless they go too."""
        completed = [job for job in jobs if job.state == model.COMPLETE and job.key not in self.live]
        removed = await self.delete([job for job in jobs if job.state != model.COMPLETE])
        if completed:
            items = [(job.key, job.stored) for job in completed]
            await self._write(lambda conn: _delete_jobs(conn, items))
            for job in completed:
                job.state = model.DELETED
        return removed + completed

    async def modify(self, jobs: list[Job], changes: dict[str, Any]) -> list[Job]:
        """PATCH: change properties of queued jobs (not running, not complete)."""
        unknown = set(changes) - set(MODIFIABLE)
        if unknown:
            raise InvalidRequest(f"these properties cannot be modified: {', '.join(sorted(unknown))}")
        parsed = {name: model.PARSERS[name](value) for name, value in changes.items()}
        limits: dict[str, int] = {}
        if "limit_grps" in parsed:
            parsed["limit_grps"], limits = parse_limit_groups(parsed["limit_grps"])
        affected = [job for job in jobs if self.live.get(job.key) is job
                    and job.state not in model.ACTIVE_STATES and job.state != model.COMPLETE]
        if not affected:
            return []
        for job in affected:
            spec = dict(job.spec)
            spec.update(parsed)
            model.normalise(spec)
            self._unindex(job)
            job.spec = spec
            self._learn_expectations(job)
            self._index(job)
        for name, limit in limits.items():
            self.limits.set_limit(name, limit)
        specs = [(_dumps(job.spec), job.key) for job in affected]
        await self._save(affected, specs=specs, limits=limits, strict=True, durable=True)
        self._reschedule()
        return affected

    # -- transitions ---------------------------------------------------------------------------

    def _make_ready(self, job: Job, save: bool = True) -> None:
        """Ready to run, unless something it depends on is not complete yet."""
        self._cancel_delay(job)
        if self.deps.blocked(job, self.live):
            job.state = model.DEPENDENT
        else:
            job.state = model.READY
            self._learn_expectations(job)
            self.scheduler.push(job)
            self._reschedule()
        if save:
            self._save([job])

    def _failed(self, job: Job, reason: str, permanent: bool = False) -> None:
        """A run failed: delayed for a retry while retries are left, else buried."""
        job.failures += 1
        job.fail_reason = reason
        if permanent or job.failures > job.spec.get("retries", 0):
            job.state = model.BURIED
            return
        delay = self.policy.backoff(job.failures)
        job.state = model.DELAYED
        job.delay_until = time.time() + delay
        self._delays[job.key] = self._reactor.callLater(delay, self._undelay, job.key)

    def _undelay(self, key: str) -> None:
        self._delays.pop(key, None)
        job = self.live.get(key)
        if job is not None and job.state == model.DELAYED:
            job.delay_until = None
            self._make_ready(job)

    def _cancel_delay(self, job: Job) -> None:
        call = self._delays.pop(job.key, None)
        if call is not None and call.active():
            call.cancel()
        job.delay_until = None

    def _release_waiting(self, keys: Iterable[str]) -> None:
        """Jobs that were waiting may be free to run now."""
        for key in keys:
            job = self.live.get(key)
            if job is not None and job.state == model.DEPENDENT and not self.deps.blocked(job, self.live):
                self._make_ready(job)

    # -- running -------------------------------------------------------------------------------

    def _reschedule(self) -> None:
        """Ask for a scheduling pass soon; many events in one reactor turn share one pass."""
        if self.running and self._schedule_call is None:
            self._schedule_call = self._reactor.callLater(0, self._schedule)

    def _schedule(self) -> None:
        self._schedule_call = None
        if self.paused or self.draining or not self.running:
            return
        for job in self.scheduler.pick(self.live.get, _is_ready, self._limits_permit):
            self.limits.take(job.spec.get("limit_grps") or ())
            self._start(job)

    def _limits_permit(self, job: Job) -> bool:
        return self.limits.permits(job.spec.get("limit_grps") or ())

    def _release(self, job: Job) -> None:
        self.scheduler.release(job)
        self.limits.release(job.spec.get("limit_grps") or ())

    def _start(self, job: Job) -> None:
        if self.scheduler.never_fits(job):
            self._release(job)
            cap = self.scheduler.capacity
            self.notices.warn(f"a job needs {job.cores:g} cores and {job.memory} MB, more than this machine "
                              f"offers ({cap.cores:g} cores, {cap.memory} MB): it was buried")
            self._end_without_run(job, model.FAIL_RESOURCES)
            return
        try:
            workspace = prepare_workspace(job.key, job.spec)
        except OSError as e:
            self._release(job)
            self._end_without_run(job, model.FAIL_CWD if e.errno == 2 else model.FAIL_START, str(e))
            return
        max_time = None
        if self.policy.enforce_limits and job.spec["time"] > 0:
            max_time = _limit_of(job.spec["time"], job.expected_time) * (1 + self.policy.time_margin)
        run = JobRun(self._reactor, RunFiles(self.run_dir, job.key, job.attempts + 1), workspace, job.spec["cmd"],
                     output_limit=self.policy.output_limit, kill_grace=self.policy.kill_grace,
                     spawn=self._spawn, max_time=max_time)
        try:
            run.start()
        except OSError as e:
            self._release(job)
            run.files.remove()
            self.notices.warn(f"could not start a job's command: {e}")
            self._end_without_run(job, model.FAIL_START, str(e))
            return
        job.reset_run()
        # Reserved, as in wr, until the process is known to run (its pid reported).
        job.state = model.RUNNING if run.pid else model.RESERVED
        job.attempts += 1
        self.counters.started += 1
        job.pid, job.host, job.host_ip = run.pid, self.host, self.host_ip
        if not run.pid:
            run.on_started = lambda pid: self._started(job, run, pid)
        job.started = run.started
        job.actual_cwd = workspace.relative_cwd
        job.home_changed = workspace.home_changed
        self.runs[job.key] = run
        self._save([job])
        self._follow(job, run)

    def _started(self, job: Job, run: Any, pid: int) -> None:
        if self.runs.get(job.key) is run and job.state == model.RESERVED:
            job.pid = pid
            job.state = model.RUNNING
            self._save([job])

    def _follow(self, job: Job, run: Any) -> None:
        run.done.addCallback(lambda result: ensureDeferred(self._run_ended(result, job, run)))
        run.done.addErrback(lambda f: log.failure("the end of job {key} could not be recorded", f, key=job.key))

    def _end_without_run(self, job: Job, reason: str, detail: str = "") -> None:
        job.state = model.BURIED
        job.fail_reason = reason
        job.stderr = detail
        self._save([job])

    async def _run_ended(self, result: RunResult, job: Job, run: Any) -> None:
        succeeded = result.exitcode == 0 and not result.kill_reason and not result.lost
        behaviours = behaviours_for(job.spec, succeeded)
        remove = False
        if behaviours and run.workspace is not None:
            workspace = run.workspace
            root = os.path.dirname(workspace.cwd) if workspace.tmp else None
            outcome = await run_behaviours(self._reactor, behaviours, workspace.cwd, workspace.env, root,
                                           os.path.join(job.spec["cwd"], "wr_cwd"))
            remove = outcome.remove
        self.runs.pop(job.key, None)
        self._release(job)
        # The slot is free now: the next job need not wait for this one's end to be committed.
        self._reschedule()
        samples = self._record(job, result)
        if job.state == model.COMPLETE:
            self.counters.completed += 1
        else:
            self.counters.failed += 1
        if run.workspace is not None and run.workspace.tmp:
            remove_tmp(run.workspace.tmp)
        # Only once the end is committed may the files that also record it go (see _recover).
        await self._save([job], samples=samples, strict=True)
        run.files.remove()
        if job.state == model.COMPLETE:
            released = self.deps.dependants(job)
            if self.live.get(job.key) is job:
                self._unindex(job)
            self._release_waiting(released)
        elif remove and job.state == model.BURIED:
            try:
                await self.delete([job])
            except Conflict as e:
                log.info("job {key} was not removed: {why}", key=job.key, why=e.reason)
        self._reschedule()
        self._check_drained()

    def _record(self, job: Job, result: RunResult) -> list[tuple[str, int, float]]:
        """Turn what a run left into the job's state and wr's fail reasons; return what
        resource learning should keep."""
        job.ended = result.ended
        job.cpu_time = round(result.cpu_time, 6)
        job.peak_ram = max(job.peak_ram, result.peak_ram)
        job.stdout, job.stderr = result.stdout, result.stderr
        job.exited = result.exitcode is not None
        job.exitcode = result.exitcode if result.exitcode is not None else -1
        job.kill_reason = result.kill_reason
        walltime = job.walltime(result.ended)
        if result.kill_reason == model.FAIL_KILLED:
            self._failed(job, model.FAIL_KILLED, permanent=True)
        elif result.kill_reason in (model.FAIL_RAM, model.FAIL_TIME):
            if result.kill_reason == model.FAIL_RAM and job.spec.get("override", 0) != 2:
                job.memory_floor = memory_after_ram_failure(job.peak_ram, job.memory)
            self._failed(job, result.kill_reason)
            return [(job.spec["req_grp"], job.peak_ram, walltime)]
        elif result.lost:
            job.state, job.fail_reason = model.LOST, model.FAIL_LOST
        elif result.exitcode == 0:
            job.state, job.fail_reason = model.COMPLETE, ""
            self.learner.record(job.spec["req_grp"], job.peak_ram, walltime)
            return [(job.spec["req_grp"], job.peak_ram, walltime)]
        elif result.exitcode is None:
            self._failed(job, model.FAIL_SIGNAL)
        elif result.exitcode == 126:
            self._failed(job, model.FAIL_PERMISSION, permanent=True)
        elif result.exitcode == 127:
            self._failed(job, model.FAIL_NOT_FOUND, permanent=True)
        else:
            self._failed(job, model.FAIL_NONZERO)
        return []

    def _save(self, jobs: list[Job], samples: Iterable[tuple[str, int, float]] = (),
              specs: Iterable[tuple[str, str]] = (), limits: Optional[dict[str, int]] = None,
              strict: bool = False, durable: bool = False) -> Deferred[None]:
        """Write the jobs' current state (and counters), in order with every other write.

        Saves made in one reactor turn share one store operation, and a job saved twice in it is
        written once, as it is then (a short job's "running" and its end often meet so). The
        Deferred fires once committed. A failure is logged and surfaced as a warning; with
        `strict` it is also passed on, for callers that must not go on as if it were stored.
        `durable` when a client will be told it is done (see Store.write): job state changes
        that happen by themselves are not, the run's status file stands behind them.
        """
        for job in jobs:
            self._dirty[job.key] = job
        self._dirty_samples.extend(samples)
        self._dirty_specs.extend(specs)
        self._dirty_limits.update(limits or {})
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        waiter: Deferred[None] = Deferred()
        self._flush_waiters.append((waiter, strict))
        self._flush_durable = self._flush_durable or durable
        return waiter

    def _flush(self) -> None:
        """Send the saves gathered so far to the store as one operation."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._flush_waiters:
            return
        changes = []
        for job in self._dirty.values():
            new = job.group_key
            changes.append((new, job.stored, _dumps(job.run_record()), job.stdout, job.stderr, job.key))
            job.stored = new
        samples, specs, limits = self._dirty_samples, self._dirty_specs, self._dirty_limits
        waiters, durable = self._flush_waiters, self._flush_durable
        self._dirty, self._dirty_samples, self._dirty_specs, self._dirty_limits = {}, [], [], {}
        self._flush_waiters, self._flush_durable = [], False
        d = self.store.write(lambda conn: _apply(conn, changes, samples, specs, limits), durable=durable)
        d.addCallbacks(self._flushed, self._flush_failed, callbackArgs=(waiters,), errbackArgs=(waiters,))

    @staticmethod
    def _flushed(_: Any, waiters: list[tuple[Deferred[None], bool]]) -> None:
        for waiter, _strict in waiters:
            waiter.callback(None)

    def _flush_failed(self, failure: Any, waiters: list[tuple[Deferred[None], bool]]) -> None:
        log.failure("could not write job changes to the store", failure)
        self.notices.warn(f"could not write job changes to the store: {failure.getErrorMessage()}")
        for waiter, strict in waiters:
            if strict:
                waiter.errback(failure)
            else:
                waiter.callback(None)

    def _write(self, operation: Callable[[sqlite3.Connection], Any]) -> Deferred[Any]:
        """Any other store write: saves still gathering go first, so that the counters they
        move and the ones this moves stay in order."""
        self._flush()
        return self.store.write(operation)

    # -- sampling ------------------------------------------------------------------------------

    async def sample(self) -> None:
        """Measure the memory of every running job's process tree (in a thread), stop runs over
        their memory limit, and notice adopted processes that have gone."""
        runs = dict(self.runs)
        if not runs:
            return
        runs = {key: run for key, run in runs.items() if run.pid}
        sizes = await deferToThread(measure_trees, [run.pid for run in runs.values()])
        for key, run in runs.items():
            size = sizes.get(run.pid)
            job = self.live.get(key)
            if size is None:
                run.gone()  # adopted runs, and runs whose launcher died, learn their end so
                continue
            run.peak_ram = max(run.peak_ram, size)
            if job is None:
                continue
            job.peak_ram = max(job.peak_ram, size)
            if self.policy.enforce_limits and size > _limit_of(job.spec["memory"], job.memory) * (1 + self.policy.memory_margin):
                log.info("job {key} uses {size} MB, over its {memory} MB: stopping it",
                         key=key, size=size, memory=job.memory)
                run.kill(model.FAIL_RAM)

    # -- history -------------------------------------------------------------------------------

    async def prune(self) -> int:
        """Remove completed jobs past the configured age or count, a chunk per transaction so
        that other writes keep flowing; return how many went."""
        policy = self.policy
        if not policy.history_max_age and not policy.history_max_count:
            return 0
        cutoff = time.time() - policy.history_max_age if policy.history_max_age else None
        total = 0
        while True:
            removed = await self._write(
                lambda conn: _prune(conn, cutoff, policy.history_max_count, _PRUNE_CHUNK))
            total += removed
            if removed < _PRUNE_CHUNK:
                break
        if total:
            log.info("pruned {count} completed jobs from the history", count=total)
        return total

    # -- recovery after a restart --------------------------------------------------------------

    async def _recover(self) -> None:
        """Settle every job that may have been started by an earlier daemon: adopt the ones still
        running, record the outcome of the ones that finished meanwhile, mark the rest lost.

        A run's files are removed only after its end is committed, and their names carry the
        attempt, so: files of an attempt later than the stored one, or of the stored attempt of
        a job stored as running, belong to a run whose end is not stored; any others are
        leftovers of runs whose end is."""
        with_files = await deferToThread(run_files_in, self.run_dir)
        started = {key for key, job in self.live.items() if job.state in model.ACTIVE_STATES}
        if not (with_files.keys() | started):
            return
        alive = await deferToThread(find_job_processes, self.run_dir)
        for key in sorted(with_files.keys() | started):
            job = self.live.get(key)
            attempts = with_files.get(key, [])
            for old in attempts[:-1]:
                RunFiles(self.run_dir, key, old).remove()
            latest = attempts[-1] if attempts else None
            files = RunFiles(self.run_dir, key, latest or 0)
            current = job is not None and latest is not None and (
                latest > job.attempts or (latest == job.attempts and job.state in model.ACTIVE_STATES))
            if not current:
                if latest is not None:
                    files.remove()
                if job is not None and job.state in model.ACTIVE_STATES:
                    job.state, job.fail_reason = model.LOST, model.FAIL_LOST
                    self._save([job])
                continue
            job.attempts = latest  # type: ignore[assignment]
            self._cancel_delay(job)
            self.scheduler.take(job)
            self.limits.take(job.spec.get("limit_grps") or ())
            pid = alive.get(f"{key}.{latest}", 0)
            run = AdoptedRun(files, pid, job.started or time.time(), self.policy.output_limit, self._reactor,
                             self.policy.kill_grace)
            job.state = model.RUNNING
            self.runs[key] = run
            self._follow(job, run)
            if pid:
                job.pid = pid
                log.info("adopted job {key} (pid {pid}) left running by an earlier daemon", key=key, pid=pid)
                self._save([job])
            else:
                run.gone()


def _limit_of(requested: float, expected: float) -> float:
    """Limits are enforced at the larger of what was asked for and what is expected: learning may
    lower what the scheduler reserves, but never stops a job below what its owner asked for."""
    return max(requested, expected)


def _is_ready(job: Job) -> bool:
    return job.state == model.READY


def matches_state(job: Job, state: str) -> bool:
    if state == model.DELETABLE:
        return job.state not in model.ACTIVE_STATES and job.state != model.COMPLETE
    if state == model.RUNNING:
        return job.state in model.ACTIVE_STATES
    return job.state == state


def _merge_groups(live: list[Job], stored_groups: list[tuple[tuple[str, int, str], int, list[Job]]],
                  seen: dict[str, Job], limit: int) -> list[tuple[Job, int]]:
    """wr's limit grouping over live jobs and the store's counted groups of completed ones."""
    groups: dict[tuple[str, int, str], list[Any]] = {}
    for job, similar in model.grouped(live, limit):
        entry = groups.setdefault((job.state, job.exitcode, job.fail_reason), [[], 0])
        entry[0].append(job)
        entry[1] += similar
    for group_key, count, examples in stored_groups:
        entry = groups.setdefault(group_key, [[], 0])
        fresh = [job for job in examples if job.key not in seen]
        room = max(0, limit - len(entry[0]))
        entry[0].extend(fresh[:room])
        entry[1] += count - len(examples) + max(0, len(fresh) - room)
    result: list[tuple[Job, int]] = []
    for kept, hidden in groups.values():
        if kept:
            result.extend((job, 0) for job in kept[:-1])
            result.append((kept[-1], hidden))
    return result


_dumps = compactjson.dumps


async def _quietly(d: Deferred[Any]) -> None:
    waiter: Deferred[Any] = Deferred()
    d.addBoth(lambda result: (waiter.callback(None), result)[1])
    await waiter


def _row_to_job(row: tuple[Any, ...]) -> Job:
    key, spec, state, seq, run, stdout, stderr = row
    job = Job(key, json.loads(spec), state, seq)
    job.restore_run(json.loads(run))
    job.stdout, job.stderr = stdout, stderr
    job.stored = job.group_key
    return job


def _chunks(items: list[Any], size: int = _CHUNK) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(items: list[Any]) -> str:
    return ",".join("?" * len(items))


# -- store operations (these run in the store's threads) -------------------------------------------


def _load(conn: sqlite3.Connection) -> dict[str, Any]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state != ? ORDER BY seq", (model.COMPLETE,)).fetchall()
    (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
    samples = conn.execute(
        "SELECT req_grp, ram, secs FROM (SELECT req_grp, ram, secs, id, ROW_NUMBER() OVER "
        "(PARTITION BY req_grp ORDER BY id DESC) AS n FROM req_samples) WHERE n <= ? ORDER BY id", (WINDOW,)
    ).fetchall()
    limits = conn.execute("SELECT name, lim FROM limit_groups").fetchall()
    return {"rows": rows, "seq": seq, "samples": samples, "limits": limits}


def _count(conn: sqlite3.Connection, deltas: Counter) -> None:
    """Move the per-rep-group counters by the given deltas."""
    rows = [(*group, n, n) for group, n in deltas.items() if n]
    if rows:
        conn.executemany(
            "INSERT INTO rep_grp_states (rep_grp, state, exitcode, fail_reason, n) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (rep_grp, state, exitcode, fail_reason) DO UPDATE SET n = n + ?", rows)
        # Only the counters that went down can have reached zero: remove those, by key.
        conn.executemany(
            "DELETE FROM rep_grp_states WHERE rep_grp = ? AND state = ? AND exitcode = ? AND fail_reason = ? "
            "AND n <= 0", [group for group, n in deltas.items() if n < 0])


def _insert_jobs(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], rerun: bool,
                 limits: dict[str, int]) -> list[str]:
    """Insert new jobs; a key already stored is a completed job (live ones were filtered out):
    left alone, or re-queued with rerun. Returns the keys now queued."""
    existing: dict[str, tuple[str, str, int, str]] = {}
    keys = [row[0] for row in rows]
    for chunk in _chunks(keys):
        for key, *group in conn.execute(
                f"SELECT key, rep_grp, state, exitcode, fail_reason FROM jobs WHERE key IN ({_marks(chunk)})", chunk):
            existing[key] = tuple(group)  # type: ignore[assignment]
    deltas: Counter = Counter()
    fresh = [row for row in rows if row[0] not in existing]
    conn.executemany("INSERT INTO jobs (key, rep_grp, state, seq, spec, updated) VALUES (?, ?, ?, ?, ?, ?)",
                     [row[:6] for row in fresh])
    for row in fresh:
        deltas[(row[1], row[2], 0, "")] += 1
    queued = [row[0] for row in fresh]
    if rerun and existing:
        again = [row for row in rows if row[0] in existing]
        conn.executemany(
            "UPDATE jobs SET rep_grp = ?, state = ?, seq = ?, spec = ?, run = '{}', stdout = '', stderr = '', "
            "exitcode = 0, fail_reason = '', updated = ? WHERE key = ?",
            [(row[1], row[2], row[3], row[4], row[5], row[0]) for row in again])
        for row in again:
            deltas[existing[row[0]]] -= 1
            deltas[(row[1], row[2], 0, "")] += 1
        conn.executemany("DELETE FROM job_deps WHERE key = ?", [(row[0],) for row in again])
        fresh = fresh + again
        queued += [row[0] for row in again]
    conn.executemany("INSERT OR IGNORE INTO job_deps (dep_grp, key) VALUES (?, ?)",
                     [(group, row[0]) for row in fresh for group in row[6]])
    conn.executemany("INSERT INTO limit_groups (name, lim) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET lim = ?",
                     [(name, limit, limit) for name, limit in limits.items()])
    _count(conn, deltas)
    return queued


def _apply(conn: sqlite3.Connection, changes: list[tuple[Any, ...]], samples: list[tuple[str, int, float]],
           specs: list[tuple[str, str]], limits: dict[str, int]) -> None:
    now = time.time()
    if specs:
        conn.executemany("UPDATE jobs SET spec = ? WHERE key = ?", specs)
    conn.executemany(
        "UPDATE jobs SET rep_grp = ?, state = ?, exitcode = ?, fail_reason = ?, run = ?, stdout = ?, stderr = ?, "
        "updated = ? WHERE key = ?",
        [(*new, run, stdout, stderr, now, key) for new, _, run, stdout, stderr, key in changes])
    deltas: Counter = Counter()
    for new, old, *_ in changes:
        if new != old:
            deltas[new] += 1
            if old is not None:
                deltas[old] -= 1
    _count(conn, deltas)
    if samples:
        conn.executemany("INSERT INTO req_samples (req_grp, ram, secs) VALUES (?, ?, ?)", samples)
    if limits:
        conn.executemany("INSERT INTO limit_groups (name, lim) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET lim = ?",
                         [(name, limit, limit) for name, limit in limits.items()])


def _delete_jobs(conn: sqlite3.Connection, items: list[tuple[str, Any]]) -> None:
    keys = [key for key, _ in items]
    for chunk in _chunks(keys):
        conn.execute(f"DELETE FROM jobs WHERE key IN ({_marks(chunk)})", chunk)
        conn.execute(f"DELETE FROM job_deps WHERE key IN ({_marks(chunk)})", chunk)
    _count(conn, _tally(items))


def _tally(items: list[tuple[str, Any]]) -> Counter:
    deltas: Counter = Counter()
    for _, group in items:
        if group is not None:
            deltas[group] -= 1
    return deltas


def _resurrect(conn: sqlite3.Connection, groups: set[str]) -> list[tuple[Any, ...]]:
    """Completed jobs waiting for these groups become dependent again, and recursively those
    waiting for the groups they belong to. Returns their rows."""
    revived: list[tuple[Any, ...]] = []
    seen: set[str] = set()
    frontier = set(groups)
    while frontier:
        seen |= frontier
        batch = sorted(frontier)
        frontier = set()
        keys = [key for (key,) in conn.execute(
            f"SELECT DISTINCT key FROM job_deps WHERE dep_grp IN ({_marks(batch)})", batch)]
        for chunk in _chunks(keys):
            rows = conn.execute(
                f"SELECT {_COLUMNS}, rep_grp, exitcode, fail_reason FROM jobs WHERE state = ? AND key IN ({_marks(chunk)})",
                [model.COMPLETE, *chunk]).fetchall()
            deltas: Counter = Counter()
            for row in rows:
                conn.execute("UPDATE jobs SET state = ?, exitcode = 0, fail_reason = '' WHERE key = ?",
                             (model.DEPENDENT, row[0]))
                deltas[(row[7], model.COMPLETE, row[8], row[9])] -= 1
                deltas[(row[7], model.DEPENDENT, 0, "")] += 1
                revived.append(row[:7])
                frontier |= set(json.loads(row[1]).get("dep_grps") or ()) - seen
            _count(conn, deltas)
    return revived


def _history(conn: sqlite3.Connection, keys: list[str], groups: list[str], search: bool, limit: int,
             want_groups: bool) -> dict[str, Any]:
    """Stored jobs by key, and completed jobs of rep groups (exact, or containing the text when
    searching): all of them, or with a limit only the counts and a few examples per group."""
    by_key: dict[str, Job] = {}
    for chunk in _chunks(keys):
        for row in conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE key IN ({_marks(chunk)})", chunk):
            by_key[row[0]] = _row_to_job(row)
    names: list[str] = []
    if want_groups:
        for group in groups:
            if search:
                pattern = "%" + group.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                names += [n for (n,) in conn.execute(
                    "SELECT DISTINCT rep_grp FROM rep_grp_states WHERE state = ? AND rep_grp LIKE ? ESCAPE '\\'",
                    (model.COMPLETE, pattern))]
            else:
                names.append(group)
    jobs: list[Job] = []
    counted: list[tuple[tuple[str, int, str], int, list[Job]]] = []
    for name in dict.fromkeys(names):
        if not limit:
            jobs += [_row_to_job(row) for row in conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE rep_grp = ? AND state = ? ORDER BY seq", (name, model.COMPLETE))]
            continue
        for exitcode, fail_reason, n in conn.execute(
                "SELECT exitcode, fail_reason, n FROM rep_grp_states WHERE rep_grp = ? AND state = ?",
                (name, model.COMPLETE)).fetchall():
            examples = [_row_to_job(row) for row in conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE rep_grp = ? AND state = ? AND exitcode = ? AND fail_reason = ? "
                "ORDER BY seq LIMIT ?", (name, model.COMPLETE, exitcode, fail_reason, limit))]
            counted.append(((model.COMPLETE, exitcode, fail_reason), n, examples))
    return {"keys": by_key, "jobs": jobs, "groups": counted}


# Written out, not bound: SQLite uses the partial index jobs_completed only for a query whose
# WHERE names its condition literally.
_COMPLETED = f"state = '{model.COMPLETE}'"


def _prune(conn: sqlite3.Connection, cutoff: Optional[float], keep: int, chunk: int) -> int:
    """Remove up to `chunk` completed jobs older than cutoff or beyond the newest `keep`."""
    clauses, params = [], []
    if cutoff is not None:
        clauses.append("updated < ?")
        params.append(cutoff)
    if keep:
        # The newest `keep` by (updated, seq): jobs whose ends were committed together share
        # `updated`, and seq orders them.
        row = conn.execute(f"SELECT updated, seq FROM jobs WHERE {_COMPLETED} ORDER BY updated DESC, seq DESC "
                           "LIMIT 1 OFFSET ?", (keep - 1,)).fetchone()
        if row is not None:
            clauses.append("(updated, seq) < (?, ?)")
            params.extend(row)
    if not clauses:
        return 0
    rows = conn.execute(
        f"SELECT key, rep_grp, exitcode, fail_reason FROM jobs WHERE {_COMPLETED} AND ({' OR '.join(clauses)}) "
        "ORDER BY updated LIMIT ?", [*params, chunk]).fetchall()
    if not rows:
        return 0
    _delete_jobs(conn, [(key, (rep_grp, model.COMPLETE, exitcode, fail_reason)) for key, rep_grp, exitcode, fail_reason in rows])
    return len(rows)
