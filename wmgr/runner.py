"""A runner: a worker that a batch system (Slurm) started, which leaves when it runs dry.

    python -m wmgr.runner --manager URL --cores N --memory MB [--slots N] [--time-limit S]
                          [--idle-exit S] [--heartbeat S] [--name NAME] [--dir DIR]

It is the worker role's agent (wmgr.workers.agent) with the capacity of its allocation: it
registers with the manager, pulls jobs that fit, runs them with the same runner code as local jobs
(own process group, limits, peak RAM, CPU time, output), reports them through its durable outbox,
and exits once it has had no work for `--idle-exit` seconds. It pulls only jobs expected to end
before its `--time-limit` (from its start) runs out, so Slurm's limit does not cut a job short.

The manager's worker token and CA come in the environment (WMGR_RUNNER_TOKEN, WMGR_RUNNER_CA:
the PEM text), which the batch script sets; they are taken out of the environment before any job
starts. `--token-file` and `--ca` read them from files instead. Its name is `slurm-$SLURM_JOB_ID`,
which is how the manager ties it to its Slurm job. Its jobs' run files live in `--dir` (default
$TMPDIR/wmgr-runner-NAME, node-local), removed when it exits; its reports wait in memory while
the manager is unreachable (see MemoryOutbox).

SIGTERM is Slurm ending the job (scancel, time limit): the runner exits at once without reporting
or leaving; the manager learns from Slurm why its jobs were lost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from wmgr.jobs.model import FAIL_RAM

log = Logger()

IDLE_CHECK = 1.0
# The exit status of a runner that never reached its manager (see wmgr.slurm.service).
NEVER_REACHED = 3
# Seconds kept free before the time limit: the last job's report and the leave need them.
END_MARGIN = 15.0


def memory_cgroups(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> list[str]:
    """The memory cgroup directories this process is in, from its own up to its Slurm job's (where
    Slurm's task/cgroup sets the job's memory limit); [] without cgroups."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    path = ""
    for line in lines:
        _, controllers, where = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            path = os.path.join(root, "memory") + where  # cgroup v1
            break
        if controllers == "" and line.startswith("0::"):
            path = root + where  # cgroup v2 (unified)
    dirs = []
    while path and path.startswith(root) and len(path) > len(root) + len("/memory"):
        dirs.append(path)
        if os.path.basename(path).startswith("job_"):
            break
        path = os.path.dirname(path)
    return dirs


def oom_kills(dirs: list[str]) -> int:
    """How many processes the kernel has killed for memory in these cgroups (call in a thread)."""
    total = 0
    for directory in dirs:
        for name in ("memory.oom_control", "memory.events"):  # v1, v2
            try:
                with open(os.path.join(directory, name)) as f:
                    for line in f:
                        if line.startswith("oom_kill "):
                            total += int(line.split()[1])
            except (OSError, ValueError):
                continue
    return total


def oom_counter() -> Any:
    """An async count of this runner's cgroups' OOM kills, or None where there are no cgroups."""
    from twisted.internet.threads import deferToThread

    dirs = memory_cgroups()
    if not dirs:
        return None
    return lambda: deferToThread(oom_kills, dirs)


class MemoryOutbox:
    """The agent's outbox (wmgr.workers.outbox's interface) in memory. A worker daemon keeps its
    reports in its store so that they survive its restarts; a runner is never restarted (Slurm
    starts a new one, with a new name, and this one's directory goes with it), so writing them
    to disk, each with an fsync, would buy nothing. While the manager is unreachable they are
    kept here, and sent when it answers.

    With `oom_kills` (an async count of the allocation's OOM kills), a job that ended by SIGKILL
    that nobody asked for while that count rose is reported as having used too much RAM: Slurm's
    cgroup killed it for growing past the allocation faster than the agent's sampler saw."""

    def __init__(self, oom_kills: Optional[Callable[[], Any]] = None) -> None:
        self.pending: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._oom_kills = oom_kills
        self._oom_seen = 0

    async def load(self) -> None:
        if self._oom_kills is not None:
            self._oom_seen = await self._oom_kills()

    async def put(self, report: dict[str, Any]) -> None:
        if (self._oom_kills is not None and report["event"] == "end" and not report.get("kill_reason")
                and not report.get("start_error") and (report.get("signal") == 9 or report.get("exitcode") == 137)):
            kills = await self._oom_kills()
            if kills > self._oom_seen:
                self._oom_seen += 1
                report = dict(report, kill_reason=FAIL_RAM)
        self._next += 1
        self.pending[self._next] = report

    async def acknowledged(self, ids: list[int]) -> None:
        for row_id in ids:
            self.pending.pop(row_id, None)

    def batch(self, most: int = 500) -> list[tuple[int, dict[str, Any]]]:
        return list(self.pending.items())[:most]


class RunnerService(MultiService):
    """The runner's parts (launcher, agent) and the watch that ends it when idle."""

    def __init__(self, reactor: Any, agent: Any, idle_exit: float, deadline: Optional[float],
                 on_exit: Any) -> None:
        super().__init__()
        self._reactor = reactor
        self.agent = agent
        self.idle_exit = idle_exit
        self.deadline = deadline
        self._on_exit = on_exit
        self.idle_since: Optional[float] = None
        self.exiting = False

    def check_idle(self) -> None:
        """Exit when there has been no work for idle_exit seconds (and every report is
        delivered), when the manager has been gone for longer than it keeps a silent worker's
        jobs (they run elsewhere by now), or when the time limit is near and nothing runs."""
        if self.exiting:
            return
        agent, now = self.agent, self._reactor.seconds()
        if agent.slots:
            self.idle_since = None
            return
        self.idle_since = now if self.idle_since is None else self.idle_since
        idle = now - self.idle_since
        why = ""
        if idle >= self.idle_exit and not agent.outbox.pending and agent.reachable:
            why = f"no work for {idle:.0f}s"
        elif not agent.reachable and idle >= self.idle_exit and now - agent.last_contact > agent.manager_timeout:
            why = "the manager has not answered for longer than its worker timeout"
        elif self.deadline is not None and now >= self.deadline:
            why = "the Slurm time limit is near"
        if why:
            self.exiting = True
            log.info("runner {name} exits: {why}", name=agent.worker_name, why=why)
            self._on_exit()


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m wmgr.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--manager", required=True, help="the manager's URL")
    p.add_argument("--ca", help="the manager's CA certificate (default: $WMGR_RUNNER_CA, the PEM text)")
    p.add_argument("--token-file", help="the manager's worker.token (default: $WMGR_RUNNER_TOKEN)")
    p.add_argument("--name", help="the worker name (default: slurm-$SLURM_JOB_ID)")
    p.add_argument("--cores", type=float, required=True)
    p.add_argument("--memory", type=int, required=True, help="MB for jobs")
    p.add_argument("--slots", type=int, default=0, help="jobs of no cores at once")
    p.add_argument("--time-limit", type=float, default=0, help="seconds this runner may live (0: no limit)")
    p.add_argument("--idle-exit", type=float, default=30.0)
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--dir", help="node-local directory for the jobs' run files")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    token = os.environ.pop("WMGR_RUNNER_TOKEN", "")
    ca_text = os.environ.pop("WMGR_RUNNER_CA", "")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    ca = Path(args.ca).read_bytes() if args.ca else (ca_text.encode() or None)
    if not token:
        print("wmgr.runner: no worker token: set WMGR_RUNNER_TOKEN or --token-file", file=sys.stderr)
        return 2
    job_id = os.environ.get("SLURM_JOB_ID", "")
    name = args.name or (f"slurm-{job_id}" if job_id else f"runner-{os.uname().nodename}-{os.getpid()}")
    base = Path(args.dir) if args.dir else Path(os.environ.get("TMPDIR") or "/tmp") / f"wmgr-runner-{name}"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    from twisted.internet import reactor

    from wmgr.client import Client
    from wmgr.host import host_address
    from wmgr.jobs.launcher import LauncherPool
    from wmgr.jobs.scheduler import Capacity
    from wmgr.workers.agent import WorkerAgent

    started = reactor.seconds()
    deadline = started + args.time_limit - END_MARGIN if args.time_limit > 0 else None
    launcher = LauncherPool(reactor, max(1, min(4, int(args.cores))))
    client = Client(reactor, args.manager, ca, token, idle_timeout=8.0)
    capacity = Capacity(float(args.cores), args.memory, args.slots)
    agent = WorkerAgent(reactor, client, name, host_address(), capacity, MemoryOutbox(oom_counter()), base / "run",
                        launcher.spawn, heartbeat=args.heartbeat)
    agent.deadline = deadline

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    top = RunnerService(reactor, agent, args.idle_exit, deadline, stop)
    for part in (launcher, agent):
        part.setServiceParent(top)
    def sample() -> Any:
        return ensureDeferred(agent.sample()).addErrback(lambda f: log.failure("sampling failed", f))

    for interval, body in ((1.0, sample), (IDLE_CHECK, top.check_idle)):
        timer = TimerService(interval, body)
        timer.clock = reactor
        timer.setServiceParent(top)

    def slurm_ends(signum: int, frame: Any) -> None:
        # No report, no leave: the manager hears from Slurm why (see the module's docstring).
        os._exit(128 + signum)

    def begin() -> None:
        signal.signal(signal.SIGTERM, slurm_ends)
        top.startService()
        log.info("runner {name}: {cores:g} cores, {mb} MB, {slots} slots, manager {url}", name=name,
                 cores=capacity.cores, mb=capacity.memory, slots=capacity.zero_core_slots, url=args.manager)

    reactor.callWhenRunning(begin)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    shutil.rmtree(base, ignore_errors=True)
    if not agent.last_contact:
        # Its Slurm job then ends FAILED with this code, which the manager explains.
        print(f"wmgr.runner: never reached the manager at {args.manager}", file=sys.stderr)
        return NEVER_REACHED
    return 0


if __name__ == "__main__":
    sys.exit(main())
