"""A run's life as the queue sees it: starting a local run, and following any run (local,
adopted or on a worker) to its end, its behaviours and the record of its outcome.

A mixin of JobQueue, as remote.py is: the state it touches is the queue's (live jobs, runs,
scheduler, limit groups, journal), and the transitions it ends in (`_failed`, `_make_ready`) are the
queue's. The rules kept here: a freed slot starts the next job before the end is committed; the
end is committed before the run's files are removed; a run is ended once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from wmgr.errors import Conflict
from wmgr.jobs import model
from wmgr.jobs.behaviours import asks_removal, behaviours_for, has_behaviours, run_behaviours
from wmgr.jobs.learning import memory_after_ram_failure
from wmgr.jobs.model import Job
from wmgr.jobs.policy import limit_of
from wmgr.jobs.runner import JobRun, RunFiles, RunResult, prepare_workspace, remove_tmp, remove_workdir

if TYPE_CHECKING:
    from wmgr.jobs.queue import JobQueue

log = Logger()


class Runs:
    """JobQueue's methods for a run's start and end (a mixin: the state they touch is the queue's)."""

    def _start(self: "JobQueue", job: Job) -> None:
        if self.scheduler.never_fits(job):
            self._release(job)
            cap = self.scheduler.capacity
            self.notices.warn(f"a job needs {job.cores:g} cores and {job.memory} MB, more than this machine "
                              f"offers ({cap.cores:g} cores, {cap.memory} MB): it was buried")
            self._end_without_run(job, model.FAIL_RESOURCES)
            return
        try:
            # The launcher makes the job's directories (per-job work off the reactor).
            workspace = prepare_workspace(job.key, job.spec, make=not getattr(self._spawn, "makes_workspace", False))
        except (OSError, ValueError) as e:  # ValueError: a path the OS cannot take (a NUL byte...)
            self._release(job)
            self._end_without_run(job, model.FAIL_CWD if getattr(e, "errno", None) == 2 else model.FAIL_START, str(e))
            return
        max_time = None
        if self.policy.enforce_limits and job.spec["time"] > 0:
            max_time = limit_of(job.spec["time"], job.expected_time) * (1 + self.policy.time_margin)
        run = JobRun(self._reactor, RunFiles(self.run_dir, job.key, job.attempts + 1), workspace, job.spec["cmd"],
                     output_limit=self.policy.output_limit, kill_grace=self.policy.kill_grace,
                     spawn=self._spawn, max_time=max_time, remove_workdir=not has_behaviours(job.spec))
        try:
            run.start()
        except (OSError, ValueError) as e:  # E2BIG, a NUL byte or lone surrogate in env or cmd...
            self._release(job)
            run.files.remove()
            self.notices.warn(f"could not start a job's command: {e}")
            self._end_without_run(job, model.FAIL_START, str(e))
            return
        job.reset_run()
        self.counters.started += 1
        # Reserved, as in wr, until the process is known to run (its pid reported).
        job.state = model.RUNNING if run.pid else model.RESERVED
        job.attempts += 1
        job.pid, job.host, job.host_ip = run.pid, self.host, self.host_ip
        if not run.pid:
            run.on_started = lambda pid: self._started(job, run, pid)
        job.started = run.started
        job.actual_cwd = workspace.relative_cwd
        job.home_changed = workspace.home_changed
        self.runs[job.key] = run
        self.journal.mark([job])
        self._follow(job, run)

    def _started(self: "JobQueue", job: Job, run: Any, pid: int) -> None:
        if self.runs.get(job.key) is run and job.state == model.RESERVED:
            job.pid = pid
            job.state = model.RUNNING
            self.journal.mark([job])

    def _follow(self: "JobQueue", job: Job, run: Any) -> None:
        run.done.addCallback(self._run_ended, job, run)
        run.done.addErrback(lambda f: log.failure("the end of job {key} could not be recorded", f, key=job.key))

    def _end_without_run(self: "JobQueue", job: Job, reason: str, detail: str = "") -> None:
        self.counters.failed += 1
        job.state = model.BURIED
        job.fail_reason = reason
        job.stderr = detail
        self._save([job])

    def _run_ended(self: "JobQueue", result: RunResult, job: Job, run: Any) -> Deferred[None]:
        """A run has ended: record it; fires once its end is committed and followed up. Without
        behaviours (nearly every job) this is plain callbacks, not a coroutine: it runs once per
        job on the reactor."""
        succeeded = result.exitcode == 0 and not result.kill_reason and not result.lost
        behaviours = behaviours_for(job.spec, succeeded)
        if getattr(run, "remote", False):
            # Its worker ran the behaviours where the job ran; leaving the queue is ours to do.
            return self._end(result, job, run, behaviours, asks_removal(behaviours))
        if behaviours and run.workspace is not None:
            return ensureDeferred(self._behave_then_end(result, job, run, behaviours))
        return self._end(result, job, run, behaviours, False)

    async def _behave_then_end(self: "JobQueue", result: RunResult, job: Job, run: Any, behaviours: Any) -> None:
        workspace = run.workspace
        root = os.path.dirname(workspace.cwd) if workspace.tmp else None
        outcome = await run_behaviours(self._reactor, behaviours, workspace.cwd, workspace.env, root,
                                       workspace.base)
        await self._end(result, job, run, behaviours, outcome.remove)

    def _end(self: "JobQueue", result: RunResult, job: Job, run: Any, behaviours: Any, remove: bool) -> Deferred[None]:
        self.runs.pop(job.key, None)
        self._release(job, local=not getattr(run, "remote", False))
        # The slot is free now: the next job need not wait for this one's end to be committed.
        # The pass waits a moment so that the ends of that moment share it (one pass, one write
        # to each launcher, one reactor turn for several starts).
        self._reschedule(self.schedule_delay)
        samples = self._record(job, result)
        workspace = run.workspace
        if workspace is not None and workspace.tmp:
            # The job's own behaviours decide what becomes of its directory (cleanup removes it,
            # others such as {"nothing": true} keep it); without any it goes, as wr's CLI default.
            if behaviours or workspace.root is None:
                remove_tmp(workspace.tmp)
            elif not getattr(run, "workdir_removed", False):
                remove_workdir(workspace.root)
        # Only once the end is committed may the files that also record it go (see _recover).
        return self._save([job], samples=samples, strict=True).addCallback(self._end_committed, job, run, remove)

    def _end_committed(self: "JobQueue", _: Any, job: Job, run: Any, remove: bool) -> Any:
        run.remove_files()
        if job.state == model.COMPLETE:
            released = self.deps.dependants(job)
            if self.live.get(job.key) is job:
                self._unindex(job)
            self._release_waiting(released)
        elif remove and job.state == model.BURIED:
            return ensureDeferred(self._remove_buried(job))
        self._reschedule(self.schedule_delay)
        self._check_drained()
        return None

    async def _remove_buried(self: "JobQueue", job: Job) -> None:
        try:
            await self.delete([job])
        except Conflict as e:
            log.info("job {key} was not removed: {why}", key=job.key, why=e.reason)
        self._reschedule()
        self._check_drained()

    def _record(self: "JobQueue", job: Job, result: RunResult) -> list[tuple[str, int, float]]:
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
        if result.start_error:
            # Not the command's failure: it never ran (E2BIG...). Retrying cannot help.
            self.counters.failed += 1
            job.state, job.fail_reason, job.exited = model.BURIED, model.FAIL_START, False
            job.stderr = result.start_error
            return []
        if result.kill_reason == model.FAIL_KILLED:
            self._failed(job, model.FAIL_KILLED, permanent=True)
        elif result.kill_reason in (model.FAIL_RAM, model.FAIL_TIME):
            if result.kill_reason == model.FAIL_RAM and job.spec.get("override", 0) != 2:
                job.memory_floor = memory_after_ram_failure(job.peak_ram, job.memory)
            self._failed(job, result.kill_reason)
            return [(job.spec["req_grp"], job.peak_ram, walltime)]
        elif result.lost and getattr(result, "host_lost", False):
            # Its worker went silent: the job did not fail, its host did. It counts against the
            # retries, but is ready again at once (no back-off) for another worker.
            self._failed(job, model.FAIL_LOST, immediate=True)
        elif result.lost:
            self.counters.failed += 1
            job.state, job.fail_reason = model.LOST, model.FAIL_LOST
        elif result.exitcode == 0:
            self.counters.completed += 1
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
