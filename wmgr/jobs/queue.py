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

This module holds the state machine alone: what may happen to a job and when. Its neighbours:
journal.py (every store write, batched, and every SQL statement), recovery.py (what an earlier
daemon left), reads.py (finding jobs), runner.py and launcher.py (processes), and four mixins of
JobQueue kept in modules of their own: runs.py (a run's start and end), actions.py (users' kill,
retry, delete, modify...), upkeep.py (memory sampling, history pruning, applying recovery) and
remote.py (runs on workers).
"""

from __future__ import annotations

import os
from collections import ChainMap
from itertools import count, repeat
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from wmgr.errors import InvalidRequest
from wmgr.host import host_identity
from wmgr.jobs import model, reads
from wmgr.jobs.actions import UserActions
from wmgr.jobs.deps import DependencyIndex
from wmgr.jobs.journal import Journal, row_to_job
from wmgr.jobs.learning import ResourceLearner
from wmgr.jobs.limits import LimitGroups, parse_limit_groups
from wmgr.jobs.model import Job, stored_json
from wmgr.jobs.notices import Notices
from wmgr.jobs.policy import QueuePolicy
from wmgr.jobs.remote import RemoteRuns
from wmgr.jobs.runner import Run, spawn_in_session
from wmgr.jobs.runs import Runs
from wmgr.jobs.scheduler import Capacity, Scheduler
from wmgr.jobs.upkeep import Upkeep
from wmgr.shield import shielded
from wmgr.store import Store
from wmgr.turns import in_slices

log = Logger()

# Jobs per slice of a big add between reactor turns (when the caller gives turns): each slice
# is a few milliseconds of work.
ADD_SLICE = 500



class Counters:
    """Run outcomes since the daemon started (monotonic): runs started, completed, and failed
    (every failed attempt, lost and killed ones included)."""

    __slots__ = ("started", "completed", "failed")

    def __init__(self) -> None:
        self.started = self.completed = self.failed = 0


class JobQueue(Runs, UserActions, Upkeep, RemoteRuns, Service):
    """Live jobs, their transitions, and the local runs that carry them out. A Service: started,
    it loads the live jobs and settles what an earlier daemon left (`ready` fires then); stopped,
    it starts nothing more and writes what it holds."""

    name = "queue"

    # How long the scheduling pass after a run's end waits, so that the ends of that moment
    # share one pass: under a stream of short jobs each end otherwise had a reactor turn, a
    # pass and a write to a launcher of its own. Other passes (adds, user actions) go at once.
    schedule_delay = 0.002

    def __init__(self, store: Store, run_dir: Path, reactor: Any, capacity: Capacity,
                 policy: Optional[QueuePolicy] = None, spawn: Callable[..., Any] = spawn_in_session,
                 host: Optional[tuple[str, str]] = None, in_thread: Callable[..., Deferred[Any]] = deferToThread) -> None:
        self.run_dir = Path(run_dir)
        self._reactor = reactor
        self.policy = policy or QueuePolicy.from_config()
        self.scheduler = Scheduler(capacity)
        self.deps = DependencyIndex()
        self.limits = LimitGroups()
        self.learner = ResourceLearner()
        self.notices = Notices(reactor)
        self.journal = Journal(store, reactor, on_failure=self.notices.warn)
        self.counters = Counters()
        self._spawn = spawn
        self._in_thread = in_thread  # blocking work (psutil, listing the run directory)
        self.host, self.host_ip = host or host_identity()
        self.live: dict[str, Job] = {}
        self.by_rep_grp: dict[str, dict[str, None]] = {}
        self.runs: dict[str, Run] = {}
        self._delays: dict[str, Any] = {}
        self._adding: dict[str, Deferred[Any]] = {}
        self.ready: Optional[Deferred[None]] = None
        self._seq = 0
        self._schedule_call: Any = None
        self.paused = False  # no new starts; running jobs carry on
        self.draining = False  # no new starts, and the daemon stops once nothing runs
        self.on_drained: Callable[[], Any] = lambda: None
        self.running = False  # True between start() and stop()

    @property
    def store(self) -> Store:
        return self.journal.store

    @property
    def mode(self) -> str:
        return "draining" if self.draining else "paused" if self.paused else "started"

    # -- for metrics (plain numbers; the metrics module turns them into its own types) ---------

    def state_counts(self) -> dict[str, int]:
        """Jobs by wr state over all rep groups, as the store's committed counters say (kept in
        memory as they move: no scan)."""
        return self.journal.state_counts()

    def usage(self) -> dict[str, Any]:
        scheduler = self.scheduler
        return {
            "running": len(self.runs),
            "cores_used": scheduler.used_cores,
            "cores_total": scheduler.capacity.cores,
            "memory_used_mb": scheduler.used_memory,
            "memory_total_mb": scheduler.capacity.memory,
        }

    # -- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.ready = ensureDeferred(self.start())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self.stop())

    async def start(self) -> None:
        """Load live jobs, settle what was running when the daemon last stopped, then run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        loaded = await self.journal.load()
        self._seq = loaded["seq"]
        for name, limit in loaded["limits"]:
            self.limits.set_limit(name, limit)
        for req_grp, ram, secs in loaded["samples"]:
            self.learner.record(req_grp, ram, secs)
        for row in loaded["rows"]:
            job = row_to_job(row)
            self._learn_expectations(job)
            self._index(job)
        now = self._reactor.seconds()
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
        self.journal.flush()
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
        live, by_rep_grp = self.live, self.by_rep_grp
        for job in jobs:
            key, spec = job.key, job.spec
            rep_grp = spec["rep_grp"]
            job.stored = (rep_grp, job.state, job.exitcode, job.fail_reason)  # job.group_key
            old = live.get(key)
            if old is not None:
                self._unindex(old)  # the completed job it runs again
            live[key] = job
            group = by_rep_grp.get(rep_grp)
            if group is None:
                group = by_rep_grp[rep_grp] = {}
            group[key] = None
            if "dep_grps" in spec or "deps" in spec:
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
                  while_committing: Optional[Callable[[list[Job]], Awaitable[Any]]] = None,
                  turn: Optional[Callable[[], Deferred[None]]] = None) -> list[Job]:
        """Add jobs (specs as model.normalise leaves them); return, in request order, each job
        now in the queue (a job already queued is returned as it is; one that already completed
        is left out unless rerun).

        `while_committing(new_jobs)` is called while the store commits them (SQLite lets go of
        the GIL meanwhile): a caller can prepare its reply then, and the add waits for it too.
        The jobs are not queued yet. `turn`: waited for between slices of
        ADD_SLICE jobs (see wmgr/turns.py), so that a big add never holds the reactor for long;
        which keys are new is decided in one turn, and those keys are claimed from then until
        the jobs are queued (an add of the same keys meanwhile waits for this one)."""
        candidates: dict[str, dict[str, Any]] = {}
        limits: dict[str, int] = {}
        async for _, chunk in in_slices(specs, ADD_SLICE, turn):
            for spec in chunk:
                if spec.get("limit_grps"):
                    spec["limit_grps"], set_limits = parse_limit_groups(spec["limit_grps"])
                    limits.update(set_limits)
                if spec.get("cloud_script") and not os.path.isfile(os.path.expanduser(spec["cloud_script"])):
                    raise InvalidRequest(f"cloud_script {spec['cloud_script']!r} does not exist on this machine")
                candidates.setdefault(model.job_key(spec), spec)

        # Keys claimed by an add still under way count as queued: wait for it to land. What is
        # new is then decided, and claimed, in the turn that finds none claimed.
        while True:
            pending = {id(d): d for d in map(self._adding.get, candidates) if d is not None}
            if not pending:
                break
            for d in pending.values():
                await _quietly(d)
        live_jobs = self.live
        new_keys = [key for key, live in zip(candidates, map(live_jobs.get, candidates))
                    # A job that has just completed stays in memory until its end is committed;
                    # it is a completed job all the same (left alone, or run again with rerun).
                    if live is None or live.state == model.COMPLETE]
        landed: Deferred[None] = Deferred()
        self._adding.update(dict.fromkeys(new_keys, landed))
        first_seq = self._seq + 1
        self._seq += len(new_keys)

        async def land() -> list[Job]:
            try:
                return await self._add_claimed(candidates, new_keys, first_seq, limits, rerun, while_committing, turn)
            finally:
                for key in new_keys:
                    if self._adding.get(key) is landed:
                        del self._adding[key]
                landed.callback(None)

        # From here the add runs to its end even if its caller is cancelled (wmgr/shield.py):
        # stopped between its commit and its indexing, its jobs would be stored but never run.
        return await shielded(ensureDeferred(land()))

    async def _add_claimed(self, candidates: dict[str, dict[str, Any]], new_keys: list[str], first_seq: int,
                           limits: dict[str, int], rerun: bool,
                           while_committing: Optional[Callable[[list[Job]], Awaitable[Any]]],
                           turn: Optional[Callable[[], Deferred[None]]]) -> list[Job]:
        now = self._reactor.seconds()
        specs = [candidates[key] for key in new_keys]
        if any(spec.get("deps") for spec in specs):
            # Whether each job is ready or dependent (what is stored) needs the jobs first.
            new_jobs = await self._make_jobs(new_keys, specs, first_seq, turn)
            self._settle_dependencies(new_jobs)
            rows = await _rows([(job.key, job.spec, job.state, job.seq) for job in new_jobs], now, turn)
            committed = self.journal.insert(rows, rerun, limits)
        else:
            # All ready: the rows go to the store first, and the jobs are made while it commits
            # (SQLite lets go of the GIL): a big add's making is then off its critical path.
            rows = await _rows(list(zip(new_keys, specs, repeat(model.READY), count(first_seq))), now, turn)
            committed = self.journal.insert(rows, rerun, limits)
            new_jobs = await self._make_jobs(new_keys, specs, first_seq, turn)
        # Started now (a coroutine would only start when awaited, after the commit).
        preparing = ensureDeferred(while_committing(new_jobs)) if while_committing is not None else None
        added_keys = set(await committed)
        if preparing is not None:
            await preparing
        for name, limit in limits.items():
            self.limits.set_limit(name, limit)
        added = [job for job in new_jobs if job.key in added_keys]
        self._index_new(added)
        groups = {group for job in added for group in job.spec.get("dep_grps") or ()}
        if groups:
            await self._hold_back(groups)
        self._reschedule()
        return [job for job in map(self.live.get, candidates) if job is not None and job.state != model.COMPLETE]

    async def _make_jobs(self, keys: list[str], specs: list[dict[str, Any]], first_seq: int,
                         turn: Optional[Callable[[], Deferred[None]]]) -> list[Job]:
        """New ready jobs, with what learning expects of them, a slice per turn."""
        jobs = []
        # What learning expects of a job depends on four of its values: asked once per distinct
        # four within an add (as _learn_expectations does per job).
        expectations: dict[tuple[Any, ...], tuple[int, float]] = {}
        expected = self.learner.expected
        async for start, chunk in in_slices(keys, ADD_SLICE, turn):
            for seq, key, spec in zip(count(first_seq + start), chunk, specs[start:start + ADD_SLICE]):
                job = Job(key, spec, model.READY, seq)
                shape = (spec["req_grp"], spec["memory"], spec["time"], spec.get("override", 0))
                found = expectations.get(shape)
                if found is None:
                    found = expectations[shape] = expected(*shape)
                job.expected_ram, job.expected_time = found
                jobs.append(job)
        return jobs

    def _settle_dependencies(self, new_jobs: list[Job]) -> None:
        """Refuse a cycle; make dependent the new jobs whose dependencies are not complete."""
        self.deps.check_acyclic([*self.live.values(), *new_jobs])
        view = ChainMap({job.key: job for job in new_jobs}, self.live)
        for job in new_jobs:
            self.deps.add(job)
        for job in new_jobs:
            if self.deps.blocked(job, view):
                job.state = model.DEPENDENT
        for job in new_jobs:
            self.deps.remove(job)

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
        rows = await self.journal.resurrect(groups)
        revived = []
        for row in rows:
            job = self.live.get(row[0])
            if job is None:
                job = row_to_job(row)
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

    # -- looking up (reads.py) -----------------------------------------------------------------

    def incomplete(self, state: Optional[str] = None) -> list[Job]:
        return reads.incomplete(self.live, state)

    async def select(self, ids: list[str], state: Optional[str] = None, search: bool = False) -> list[Job]:
        return [job for job, _ in await self.status_of(ids, state, search, 0)]

    async def status_of(self, ids: list[str], state: Optional[str] = None, search: bool = False,
                        limit: int = 0) -> list[tuple[Job, int]]:
        return await reads.status_of(self.live, self.by_rep_grp, self.journal, ids, state, search, limit)

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

    def _failed(self, job: Job, reason: str, permanent: bool = False, immediate: bool = False) -> None:
        """A run failed: delayed for a retry while retries are left, else buried."""
        self.counters.failed += 1
        job.failures += 1
        job.fail_reason = reason
        if permanent or job.failures > job.spec.get("retries", 0):
            job.state = model.BURIED
            return
        if immediate:
            self._make_ready(job, save=False)
            return
        delay = self.policy.backoff(job.failures)
        job.state = model.DELAYED
        job.delay_until = self._reactor.seconds() + delay
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

    def _reschedule(self, delay: float = 0.0) -> None:
        """Ask for a scheduling pass soon; many events in one reactor turn (or in `delay`)
        share one pass."""
        if self.running and self._schedule_call is None:
            self._schedule_call = self._reactor.callLater(delay, self._schedule)

    def _schedule(self) -> None:
        self._schedule_call = None
        if self.paused or self.draining or not self.running or not self.policy.run_local:
            return
        for job in self.scheduler.pick(self.live.get, _is_ready, self._limits_permit):
            self.limits.take(job.spec.get("limit_grps") or ())
            self._start(job)

    def _limits_permit(self, job: Job) -> bool:
        return self.limits.permits(job.spec.get("limit_grps") or ())

    def _release(self, job: Job, local: bool = True) -> None:
        if local:
            self.scheduler.release(job)
        self.limits.release(job.spec.get("limit_grps") or ())

    def _save(self, jobs: list[Job], **kw: Any) -> Deferred[None]:
        return self.journal.save(jobs, **kw)



def _is_ready(job: Job) -> bool:
    return job.state == model.READY


async def _rows(jobs: list[tuple[str, dict[str, Any], str, int]], now: float,
                turn: Optional[Callable[[], Deferred[None]]]) -> list[tuple[Any, ...]]:
    """The store's rows (journal.insert) of new jobs given as (key, spec, state, seq), a slice per turn."""
    rows: list[tuple[Any, ...]] = []
    async for _, chunk in in_slices(jobs, ADD_SLICE, turn):
        rows += [(key, spec["rep_grp"], state, seq, stored_json(spec), now, spec.get("deps") or ())
                 for key, spec, state, seq in chunk]
    return rows


async def _quietly(d: Deferred[Any]) -> None:
    waiter: Deferred[Any] = Deferred()
    d.addBoth(lambda result: (waiter.callback(None), result)[1])
    await waiter
