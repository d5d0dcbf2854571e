"""The queue's upkeep: sampling running jobs' memory, pruning the history, and applying what
recovery.py decided about the runs an earlier daemon left.

A mixin of JobQueue, as remote.py is: timers in daemon.py call `sample` and `prune`, and
`JobQueue.start` calls `_recover` once its jobs are loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from wmgr.jobs import model, recovery
from wmgr.jobs.policy import limit_of
from wmgr.jobs.runner import measure_trees

if TYPE_CHECKING:
    from wmgr.jobs.queue import JobQueue

log = Logger()


class Upkeep:
    """JobQueue's periodic and start-up work (a mixin: the state it touches is the queue's)."""

    # -- sampling ------------------------------------------------------------------------------

    async def sample(self: "JobQueue") -> None:
        """Measure the memory of every running job's process tree (in a thread), stop runs over
        their memory limit, and notice adopted processes that have gone."""
        runs = dict(self.runs)
        if not runs:
            return
        runs = {key: run for key, run in runs.items() if run.pid}
        sizes = await self._in_thread(measure_trees, [run.pid for run in runs.values()])
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
            if self.policy.enforce_limits and size > limit_of(job.spec["memory"], job.memory) * (1 + self.policy.memory_margin):
                log.info("job {key} uses {size} MB, over its {memory} MB: stopping it",
                         key=key, size=size, memory=job.memory)
                run.kill(model.FAIL_RAM)

    # -- history -------------------------------------------------------------------------------

    async def prune(self: "JobQueue") -> int:
        """Remove completed jobs past the configured age or count; return how many went."""
        policy = self.policy
        if not policy.history_max_age and not policy.history_max_count:
            return 0
        cutoff = self._reactor.seconds() - policy.history_max_age if policy.history_max_age else None
        total = await self.journal.prune(cutoff, policy.history_max_count)
        if total:
            log.info("pruned {count} completed jobs from the history", count=total)
        return total

    # -- recovery after a restart --------------------------------------------------------------

    async def _recover(self: "JobQueue") -> None:
        """Settle every job an earlier daemon may have started (see recovery.py): mark lost the
        ones that never ran, adopt the ones still running, record the end of the others."""
        # Jobs a worker runs (HostID: the worker's registration) left no files here.
        remote = {key: job for key, job in self.live.items() if job.state in model.ACTIVE_STATES and job.host_id}
        local = {key: job for key, job in self.live.items() if key not in remote} if remote else self.live
        settlement = await recovery.survey(self.run_dir, local, self._reactor, self._in_thread)
        self._take_back_remote(remote.values())
        for job in settlement.lost:
            job.state, job.fail_reason = model.LOST, model.FAIL_LOST
            self.counters.failed += 1
            self._save([job])
        for adoption in settlement.adopted:
            job = adoption.job
            job.attempts = adoption.attempt
            self._cancel_delay(job)
            self.scheduler.take(job)
            self.limits.take(job.spec.get("limit_grps") or ())
            run = recovery.adopted_run(adoption, self.policy, self._reactor)
            job.state = model.RUNNING
            job.started = adoption.started
            job.pid = adoption.ran_as
            job.host, job.host_ip = self.host, self.host_ip  # its run directory is this host's
            self.runs[job.key] = run
            self._follow(job, run)
            if run.pid:
                log.info("adopted job {key} (pid {pid}) left running by an earlier daemon", key=job.key, pid=run.pid)
                self._save([job])
            else:
                run.gone()
