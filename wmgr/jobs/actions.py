"""What users do to jobs already queued: kill, confirm lost, retry, delete, forget, modify.

A mixin of JobQueue, as remote.py is: these methods touch the queue's state (its live jobs, runs,
indexes and journal) and use its transitions, but are kept apart because each is a rule of its own
that a reader looks up alone. Each saves what it changed durably before it returns, so a 2xx means
the change is on disk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wmgr.errors import Conflict, InvalidRequest
from wmgr.jobs import model
from wmgr.jobs.journal import dumps
from wmgr.jobs.limits import parse_limit_groups
from wmgr.jobs.model import Job
from wmgr.shield import shielded

if TYPE_CHECKING:
    from wmgr.jobs.queue import JobQueue

# Fields of a queued job that PATCH may change. The command and its cwd make the key: changing
# them is adding another job.
MODIFIABLE = ("priority", "retries", "memory", "time", "cpus", "disk", "override", "limit_grps", "env",
              "rep_grp", "req_grp", "on_failure", "on_success", "on_exit", "change_home")


class UserActions:
    """JobQueue's methods for users' actions on queued jobs (a mixin: the state is the queue's)."""

    # -- acting on jobs ------------------------------------------------------------------------

    async def kill(self: "JobQueue", jobs: list[Job]) -> list[Job]:
        """Kill running jobs' process groups; they end buried ("killed by user request")."""
        affected = []
        for job in jobs:
            run = self.runs.get(job.key)
            if run is not None and job.state in model.ACTIVE_STATES:
                run.kill(model.FAIL_KILLED)
                affected.append(job)
        return affected

    async def confirm_lost(self: "JobQueue", jobs: list[Job]) -> list[Job]:
        """Lost jobs really are gone: release them, to be retried or buried as retries allow."""
        affected = [job for job in jobs if job.state == model.LOST and self.live.get(job.key) is job]
        for job in affected:
            self._failed(job, model.FAIL_LOST)
            self.counters.failed -= 1  # counted when the run was lost
        if affected:
            await self._save(affected, strict=True, durable=True)
            self._reschedule()
        return affected

    async def retry(self: "JobQueue", jobs: list[Job]) -> list[Job]:
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

    async def delete(self: "JobQueue", jobs: list[Job]) -> list[Job]:
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
        self.journal.flush()  # so that `stored` below is what the store has
        items = [(job.key, job.stored) for job in doomed.values()]

        def deleted(_: Any) -> list[Job]:
            released: set[str] = set()
            for job in doomed.values():
                released |= self.deps.dependants(job)
                self._unindex(job)
                job.state = model.DELETED
            self._release_waiting(released)
            return list(doomed.values())

        # Applied in memory once committed, even if the caller is gone by then (wmgr/shield.py).
        return await shielded(self.journal.delete(items).addCallback(deleted))

    async def forget(self: "JobQueue", jobs: list[Job]) -> list[Job]:
        """Remove jobs that are not running, completed ones from the history too (pman's
        DBctl clear). As with delete, a job others wait for is refused unless they go too."""
        completed = [job for job in jobs if job.state == model.COMPLETE and job.key not in self.live]
        removed = await self.delete([job for job in jobs if job.state != model.COMPLETE])
        if completed:
            items = [(job.key, job.stored) for job in completed]

            def deleted(_: Any) -> None:
                for job in completed:
                    job.state = model.DELETED

            await shielded(self.journal.delete(items).addCallback(deleted))
        return removed + completed

    async def modify(self: "JobQueue", jobs: list[Job], changes: dict[str, Any]) -> list[Job]:
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
        specs = [(dumps(job.spec), job.key) for job in affected]
        await self._save(affected, specs=specs, limits=limits, strict=True, durable=True)
        self._reschedule()
        return affected
