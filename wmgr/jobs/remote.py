"""The queue's seam for jobs that run elsewhere: a worker that pulled them (wmgr.workers).

Where a job runs is one small interface: the queue's own runs start local processes
(JobQueue._start), and `hand_out` gives ready jobs to a remote run each, which the queue then
follows exactly as a local one (its `done` fires with a RunResult; `kill` asks for it to be
stopped). Only one run of a job exists at a time, in `JobQueue.runs`, so nothing runs twice at
once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from wmgr.jobs import model
from wmgr.jobs.model import Job
from wmgr.jobs.scheduler import Capacity

if TYPE_CHECKING:
    from wmgr.jobs.queue import JobQueue


class RemoteRuns:
    """JobQueue's methods for runs on workers (a mixin: the state they touch is the queue's)."""

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
            self._save(jobs)
        return jobs

    def remote_started(self: "JobQueue", job: Job, run: Any, pid: int, started: float) -> None:
        """A worker reports that it started a job it was given."""
        if self.runs.get(job.key) is run and job.state in model.ACTIVE_STATES:
            job.pid, job.started, job.state = pid, started, model.RUNNING
            self._save([job])


def _is_ready(job: Job) -> bool:
    return job.state == model.READY
