"""Recovery: settling, when the daemon starts, every job an earlier daemon may have started.

A run's files are removed only after its end is committed, and their names carry the attempt, so:
files of an attempt later than the stored one, or of the stored attempt of a job stored as
running, belong to a run whose end is not stored (adopt it: still running, or read what it left);
any others are leftovers of runs whose end is (remove them). A job stored as running with no such
files never started its process (a launcher dies before the child opens its stdio): lost.

This module decides; the queue applies the decisions as transitions of its state machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.internet.threads import deferToThread

from wmgr.jobs import model
from wmgr.jobs.model import Job
from wmgr.jobs.runner import AdoptedRun, RunFiles, find_job_processes, run_files_in


@dataclass
class Adoption:
    """A run of `job` (attempt `attempt`) whose end is not stored. `pid` is the job's process
    if it is still alive (0: it has ended), `ran_as` the pid it ran as, if known."""

    job: Job
    attempt: int
    files: RunFiles
    pid: int
    ran_as: int
    started: float


@dataclass
class Settlement:
    lost: list[Job] = field(default_factory=list)
    adopted: list[Adoption] = field(default_factory=list)


async def survey(run_dir: Path, live: dict[str, Job], clock: Any,
                 in_thread: Callable[..., Any] = deferToThread) -> Settlement:
    """What an earlier daemon left in run_dir, for the live jobs loaded from the store.
    Leftover files of runs whose end is stored are removed here."""
    settlement = Settlement()
    with_files = await in_thread(run_files_in, run_dir)
    started = {key for key, job in live.items() if job.state in model.ACTIVE_STATES}
    if not (with_files.keys() | started):
        return settlement
    alive = await in_thread(find_job_processes, run_dir)
    for key in sorted(with_files.keys() | started):
        job = live.get(key)
        attempts = with_files.get(key, [])
        for old in attempts[:-1]:
            RunFiles(run_dir, key, old).remove()
        latest = attempts[-1] if attempts else None
        files = RunFiles(run_dir, key, latest or 0)
        current = job is not None and latest is not None and (
            latest > job.attempts or (latest == job.attempts and job.state in model.ACTIVE_STATES))
        if not current:
            if latest is not None:
                files.remove()
            if job is not None and job.state in model.ACTIVE_STATES:
                settlement.lost.append(job)
            continue
        assert job is not None and latest is not None
        pid = alive.get(f"{key}.{latest}", 0)
        # The earlier daemon may have died before it stored this run's start (its pid, its start
        # time, its host): take them from what the run left, never leave them unset.
        _status, ran_as = files.exit_record()
        started = job.started if latest == job.attempts and job.started else None
        if started is None:
            started = files.created() or clock.seconds()
        settlement.adopted.append(Adoption(job, latest, files, pid, pid or ran_as or job.pid, started))
    return settlement


def adopted_run(adoption: Adoption, policy: Any, clock: Any) -> AdoptedRun:
    return AdoptedRun(adoption.files, adoption.pid, adoption.started, policy.output_limit, clock, policy.kill_grace)
