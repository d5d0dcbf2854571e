"""The manager's side of Slurm: runners submitted with sbatch for the queued work, and watched.

With `[scheduler] backend = slurm` the manager starts no job itself. Every `[slurm] poll_interval`
seconds this service (1) asks squeue about its runners, the Slurm jobs named `wmgr-<manager id>`;
(2) ends the worker of every runner whose Slurm job ended in failure (cancelled, timed out, out of
memory, node lost...), so that its jobs are lost with Slurm's reason and retried or buried as their
retries say; and (3) submits runners for the ready jobs that no runner is on its way to take: at
most `max_runners` at once, each sized for up to `pack` jobs of one shape (their cores, memory and
time, plus margins). A runner that has not registered yet counts as taking `pack` jobs of its
shape; one that has registered pulls from the whole queue like any worker.

A failed sbatch (or a runner that failed) holds submissions back for a growing delay, and the
scheduler warning says why (GET /rest/v1/warnings/). The name the runners carry is derived from the
manager's CA, so a restarted manager finds the runners it submitted before and counts them instead
of submitting more.
"""

from __future__ import annotations

import hashlib
import math
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from wmgr.runner import NEVER_REACHED
from wmgr.slurm.commands import ENDED_STATES, SlurmCommands, SlurmError, describe_end, slurm_minutes

log = Logger()

# A runner pending this long for a reason other than waiting its turn gets a warning.
PENDING_WARNING = 30.0


def manager_id(ca_pem: bytes) -> str:
    """A short name for this manager that survives its restarts: its CA's fingerprint."""
    return hashlib.sha256(ca_pem).hexdigest()[:12]


def runner_name(job_id: str) -> str:
    """The worker name a runner registers under: its Slurm job id."""
    return f"slurm-{job_id}"


@dataclass
class SlurmSettings:
    """The [slurm] section (its defaults are Config's; see etc/wmgr.cnf)."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    extra_args: list[str] = field(default_factory=list)
    max_runners: int = 4
    max_cpus: int = 2
    pack: int = 8
    idle_exit: float = 30.0
    poll_interval: float = 2.0
    min_time: float = 600.0
    runner_memory: int = 200
    memory_margin: float = 0.1
    time_margin: float = 0.1
    backoff_base: float = 5.0
    backoff_cap: float = 600.0
    python: str = sys.executable
    manager_url: str = ""
    output: str = "/dev/null"
    heartbeat: float = 2.0


@dataclass
class Runner:
    """One Slurm job of this manager's, as last seen."""

    job_id: str
    state: str = "PENDING"
    reason: str = ""
    node: str = ""
    cpus: int = 0
    memory: str = ""
    time_limit: str = ""
    submitted: float = 0.0
    takes: int = 0  # ready jobs it is counted as taking until it registers
    shape: Any = None
    ended: str = ""  # why it ended, once it has

    @property
    def name(self) -> str:
        return runner_name(self.job_id)


class SlurmRunners(Service):
    name = "slurm-runners"

    def __init__(self, reactor: Any, queue: Any, workers: Any, commands: SlurmCommands, settings: SlurmSettings,
                 identity: str, ca_pem: str, worker_token: str, bad_servers: Any = None) -> None:
        self._reactor = reactor
        self.queue = queue
        self.workers = workers
        self.commands = commands
        self.settings = settings
        self.job_name = f"wmgr-{identity}"
        self._ca_pem = ca_pem
        self._worker_token = worker_token
        self.bad_servers = bad_servers
        self.runners: dict[str, Runner] = {}
        self.failures = 0  # failed submissions or runners in a row
        self.hold_until = 0.0  # no submission before this time (back-off)
        self.submitted = 0
        self.submit_failures = 0
        self.runner_failures = 0
        self._polling: Any = None

    # -- for the API, CLI and metrics ----------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        out = []
        for runner in sorted(self.runners.values(), key=lambda r: int(r.job_id)):
            worker = self.workers.workers.get(runner.name)
            out.append({"job_id": runner.job_id, "name": runner.name, "state": runner.state, "reason": runner.reason,
                        "node": runner.node, "cpus": runner.cpus, "memory": runner.memory,
                        "time_limit": runner.time_limit, "registered": worker is not None,
                        "jobs": len(worker.leases) if worker is not None else 0, "ended": runner.ended})
        return out

    def held_for(self) -> float:
        """Seconds before the back-off lets a runner be submitted again (0: not held)."""
        return max(0.0, self.hold_until - self._reactor.seconds())

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for runner in self.runners.values():
            counts[runner.state] = counts.get(runner.state, 0) + 1
        return counts

    # -- the loop ------------------------------------------------------------------------------

    def poll(self) -> Any:
        """One round (a TimerService calls it); rounds never overlap."""
        if self._polling is not None:
            return self._polling
        self._polling = ensureDeferred(self._poll())
        self._polling.addBoth(self._polled)
        return self._polling

    def _polled(self, result: Any) -> Any:
        self._polling = None
        return result

    async def _poll(self) -> None:
        try:
            lines = await self.commands.squeue(self.job_name)
        except SlurmError as e:
            self.queue.notices.warn(f"squeue failed, runners are not watched: {e}")
            return
        await self._update(lines)
        await self._submit_for_demand()

    async def _update(self, lines: list[Any]) -> None:
        seen = set()
        for line in lines:
            seen.add(line.job_id)
            runner = self.runners.get(line.job_id)
            if runner is None:
                if line.state in ENDED_STATES:
                    continue  # ended before this manager knew it (an earlier run's)
                # Submitted by an earlier run of this manager: found again, not submitted anew.
                runner = self.runners[line.job_id] = Runner(line.job_id, takes=self.settings.pack,
                                                            submitted=self._reactor.seconds())
                log.info("found runner {name} (Slurm job {id}, {state}) submitted before a restart",
                         name=runner.name, id=line.job_id, state=line.state)
            runner.state, runner.reason, runner.node = line.state, line.reason, line.nodes
            runner.cpus, runner.memory, runner.time_limit = line.cpus, line.memory, line.time_limit
            if (line.state == "PENDING" and self._reactor.seconds() - runner.submitted > PENDING_WARNING
                    and line.reason not in ("Priority", "Resources", "None", "")):
                self.queue.notices.warn(f"Slurm: runner {runner.name} is pending: {line.reason}")
            if runner.name in self.workers.workers:
                if runner.takes:
                    self.failures = 0  # a runner got through: the way works
                runner.takes = 0
            if line.state in ENDED_STATES and not runner.ended:
                await self._ended(runner)
        # Known runners squeue no longer shows have been forgotten by Slurm (MinJobAge).
        for job_id in list(self.runners):
            runner = self.runners[job_id]
            if job_id not in seen:
                if not runner.ended:
                    await self._ended(runner)
                del self.runners[job_id]

    async def _ended(self, runner: Runner) -> None:
        fields = await self.commands.show_job(runner.job_id)
        state = fields.get("JobState", runner.state if runner.state in ENDED_STATES else "gone")
        runner.state = state if state in ENDED_STATES else runner.state
        runner.takes = 0
        runner.ended = describe_end(runner.job_id, state, fields, runner.reason)
        if state == "COMPLETED" or (state == "OUT_OF_MEMORY" and runner.name not in self.workers.workers):
            # A runner that ran dry left the manager (had it not, its jobs are lost all the same).
            # One that left and still ended OUT_OF_MEMORY saw a job killed by the allocation's
            # cgroup, and reported it as too much RAM: the runner itself did not fail.
            self.workers.end_worker(runner.name, runner.ended)
            return
        if fields.get("ExitCode", "").startswith(f"{NEVER_REACHED}:"):
            runner.ended += (f": the runner never reached the manager at {self.settings.manager_url} (is [slurm] "
                             "manager_url right, and do the nodes reach it and trust its certificate's names?)")
        log.info("runner {name}: {why}", name=runner.name, why=runner.ended)
        self.runner_failures += 1
        had_worker = self.workers.end_worker(runner.name, runner.ended)
        if self.bad_servers is not None and (had_worker or state != "CANCELLED"):
            self.bad_servers.report(runner.name, runner.name, fields.get("BatchHost", runner.node), runner.ended)
        if state != "CANCELLED":
            self._back_off(f"runner {runner.name}: {runner.ended}")

    def _back_off(self, why: str) -> None:
        self.failures += 1
        delay = min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** (self.failures - 1))
        self.hold_until = self._reactor.seconds() + delay
        self.queue.notices.warn(f"Slurm: {why}; no runner is submitted for {delay:g}s")

    # -- demand --------------------------------------------------------------------------------

    def active(self) -> list[Runner]:
        return [r for r in self.runners.values() if not r.ended and r.state not in ENDED_STATES]

    def plan(self) -> list[tuple[Any, int, float]]:
        """The runners to submit now: (shape, jobs it is sized for, seconds the longest takes)."""
        if self.queue.paused or self.queue.draining or self._reactor.seconds() < self.hold_until:
            return []
        active = self.active()
        room = self.settings.max_runners - len(active)
        if room <= 0:
            return []
        coming: dict[Any, int] = {}
        for runner in active:
            if runner.takes:
                coming[runner.shape] = coming.get(runner.shape, 0) + runner.takes
        # Runners found after a restart have no known shape: they count against any.
        anywhere = coming.pop(None, 0)
        plans = []
        for shape, count, seconds in self.queue.scheduler.ready_shapes(self.queue.live.get):
            uncovered = count - coming.pop(shape, 0)
            taken = min(anywhere, max(0, uncovered))
            uncovered, anywhere = uncovered - taken, anywhere - taken
            _, cores, _, _ = shape
            per_runner = self.settings.pack
            if cores > 0:  # as many as fit max_cpus, but always one, however many cores it needs
                per_runner = max(1, min(per_runner, int(self.settings.max_cpus // cores)))
            while uncovered > 0 and room > 0:
                # Jobs of no cores: always a full pack of slots (they cost no cpu, and a runner
                # sized for the one job there was would hold a place among max_runners while
                # pulling one job per round trip through a flood that follows).
                takes = per_runner if cores == 0 else min(per_runner, uncovered)
                plans.append((shape, takes, seconds))
                uncovered -= takes
                room -= 1
        return plans

    async def _submit_for_demand(self) -> None:
        for shape, takes, seconds in self.plan():
            if self._reactor.seconds() < self.hold_until or not self.running:
                return
            await self.submit(shape, takes, seconds)

    def sbatch_args(self, shape: Any, takes: int, seconds: float) -> tuple[list[str], dict[str, Any]]:
        """sbatch's options for a runner of `takes` jobs of `shape`, and the runner's own sizes."""
        s = self.settings
        _, cores, memory, _ = shape
        cpus = max(1, math.ceil(cores * takes - 1e-9))
        slots = takes if cores == 0 else 0
        job_memory = memory * takes
        mem = math.ceil(round(job_memory * (1 + s.memory_margin), 6)) + s.runner_memory
        limit = max(s.min_time, seconds * (1 + s.time_margin)) + s.idle_exit + 2 * s.heartbeat + 30
        minutes = slurm_minutes(limit)
        args = [f"--job-name={self.job_name}", f"--comment=wmgr manager {s.manager_url}",
                f"--cpus-per-task={cpus}", f"--mem={mem}M", f"--time={minutes}", f"--output={s.output}",
                "--nodes=1", "--ntasks=1"]
        for option, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
            if value:
                args.append(f"--{option}={value}")
        args.extend(s.extra_args)
        sizes = {"cores": cpus, "memory": job_memory, "slots": slots, "time_limit": minutes * 60}
        return args, sizes

    def script(self, sizes: dict[str, Any]) -> str:
        """The batch script: the runner, with the manager's CA and worker token inline (the
        script is readable by its owner and Slurm only; no shared filesystem is needed)."""
        s = self.settings
        argv = [s.python, "-m", "wmgr.runner", "--manager", s.manager_url, "--cores", str(sizes["cores"]),
                "--memory", str(sizes["memory"]), "--slots", str(sizes["slots"]),
                "--time-limit", str(sizes["time_limit"]), "--idle-exit", f"{s.idle_exit:g}",
                "--heartbeat", f"{s.heartbeat:g}"]
        return ("#!/bin/sh\n"
                "# A wmgr runner: pulls jobs from its manager over HTTPS and runs them here.\n"
                f"WMGR_RUNNER_TOKEN={shlex.quote(self._worker_token)}\n"
                f"WMGR_RUNNER_CA={shlex.quote(self._ca_pem)}\n"
                "export WMGR_RUNNER_TOKEN WMGR_RUNNER_CA\n"
                f"exec {' '.join(shlex.quote(a) for a in argv)}\n")

    async def submit(self, shape: Any, takes: int, seconds: float) -> Optional[Runner]:
        args, sizes = self.sbatch_args(shape, takes, seconds)
        try:
            job_id, warning = await self.commands.sbatch(args, self.script(sizes))
        except SlurmError as e:
            self.submit_failures += 1
            self._back_off(f"sbatch failed ({' '.join(args[2:5])}): {e.stderr or e}")
            return None
        if warning:
            self.queue.notices.warn(f"Slurm: sbatch warned: {warning}")
        self.submitted += 1
        runner = self.runners[job_id] = Runner(job_id, submitted=self._reactor.seconds(), takes=takes, shape=shape,
                                               cpus=sizes["cores"])
        log.info("submitted runner {name}: {cpus} cpus, {mem}, {mins} min, for {n} jobs", name=runner.name,
                 cpus=sizes["cores"], mem=args[3], mins=sizes["time_limit"] // 60, n=takes)
        return runner

    async def cancel_all(self) -> None:
        await self.commands.scancel([r.job_id for r in self.active()])
