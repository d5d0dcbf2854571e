"""The queue's seam for jobs that run elsewhere: a worker that pulled them (wmgr.workers).

Where a job runs is one small interface: the queue's own runs start local processes
(JobQueue._start), and `hand_out` gives ready jobs to a remote run each, which the queue then
follows exactly as a local one (its `done` fires with a RunResult; `kill` asks for it to be
stopped). Only one run of a job exists at a time, in `JobQueue.runs`, so nothing runs twice at
once.

A job handed out is stored with its worker (Host, HostID) and attempt before the worker is told:
after a restart the queue's recovery gives it back to the worker registry (`remote_recovery`),
which puts it under a fresh lease awaiting that worker, instead of surveying this host's run
files for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from wmgr.jobs import model
from wmgr.jobs.model import Job
from wmgr.jobs.scheduler import Capacity

if TYPE_CHECKING:
    from wmgr.jobs.queue import JobQueue


class RemoteRuns:
    """JobQueue's methods for runs on workers (a mixin: the state they touch is the queue's)."""

    # Set by the worker registry: a fresh lease (a Run) for a job a worker ran when an earlier
    # daemon stopped. Without one such jobs are lost.
    remote_recovery: Optional[Callable[[Job], Any]] = None

    def hand_out(self: "JobQueue", capacity: Capacity, remote_run: Callable[[Job], Any], most: int = 0,
                 time_left: Optional[float] = None) -> list[Job]:
        """Give ready jobs that fit `capacity` (a worker's free room) to a remote run each:
        `remote_run(job)` returns a Run whose `done` fires when the worker reports the end or is
        lost. The jobs are running (reserved until the worker reports the start) and hold their
        limit groups; the local scheduler's own capacity is not touched. With `time_left`, a job
        expected to take longer (its time plus the time margin) waits for another worker."""
        if self.paused or self.draining or not self.running:
            return []
        view = self.scheduler.view(capacity)
        jobs = []
        permits = self._limits_permit
        if time_left is not None:
            margin = 1 + self.policy.time_margin
            permits = lambda job: job.expected_time * margin <= time_left and self._limits_permit(job)  # noqa: E731
        for job in view.pick(self.live.get, _is_ready, permits, hand_misfits=False):
            self.limits.take(job.spec.get("limit_grps") or ())
            run = remote_run(job)
            job.reset_run()
            self.counters.started += 1
            job.state = model.RESERVED
            job.attempts += 1
            job.host, job.host_ip, job.host_id = run.host, run.host_ip, run.host_id
            job.started = self._reactor.seconds()
            self.runs[job.key] = run
            self._follow(job, run)
            jobs.append(job)
            if most and len(jobs) >= most:
                break
        if jobs:
            self.journal.mark(jobs)
        return jobs

    def handed_out(self: "JobQueue", jobs: list[Job]) -> Any:
        """A Deferred that fires once the jobs' hand-out is committed: a worker is told of a job
        only then, so that a manager restart finds it (its worker, its attempt) and never gives
        it to another while it runs. Fails if the write did."""
        return self.committed()

    def _take_back_remote(self: "JobQueue", jobs: Iterable[Job]) -> None:
        """Jobs an earlier daemon gave to workers, stored as running: each under a fresh lease on
        its worker (see `remote_recovery`), or lost."""
        for job in jobs:
            run = self.remote_recovery(job) if self.remote_recovery is not None else None
            if run is None:
                job.state, job.fail_reason = model.LOST, model.FAIL_LOST
                self.counters.failed += 1
                self._save([job])
                continue
            self._cancel_delay(job)
            self.limits.take(job.spec.get("limit_grps") or ())
            self.runs[job.key] = run
            self._follow(job, run)

    def committed(self: "JobQueue") -> Any:
        """A Deferred that fires once every change made so far is committed (writes are
        committed in order); fails if the write did."""
        return self._save([], strict=True)

    def remote_started(self: "JobQueue", job: Job, run: Any, pid: int, started: float) -> None:
        """A worker reports that it started a job it was given."""
        if self.runs.get(job.key) is run and job.state in model.ACTIVE_STATES:
            job.pid, job.started, job.state = pid, started, model.RUNNING
            self.journal.mark([job])


def _is_ready(job: Job) -> bool:
    return job.state == model.READY
