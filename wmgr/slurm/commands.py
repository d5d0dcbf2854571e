"""Slurm's commands as processes through the reactor, and their output parsed defensively.

Every call is `reactor.spawnProcess` (never blocking the reactor); what a command prints is
parsed line by line, and a line that does not parse is skipped, not trusted. A command that
cannot be started (not installed, not executable) fails the Deferred with SlurmMissing.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

# States after which a Slurm job holds no process any more (COMPLETING is not one of them: its
# processes are still being killed).
ENDED_STATES = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})
# How squeue is asked to print a job: one line, fields separated by '|' (no field holds one).
SQUEUE_FORMAT = "%i|%T|%r|%N|%C|%m|%l"
COMMAND_TIMEOUT = 60.0


class SlurmMissing(Exception):
    """A Slurm command is not there (or cannot be run)."""


class SlurmError(Exception):
    """A Slurm command failed: its exit status and what it wrote to stderr."""

    def __init__(self, argv: list[str], status: Optional[int], stderr: str) -> None:
        self.status, self.stderr = status, stderr.strip()
        super().__init__(f"{os.path.basename(argv[0])} exited {status}: {self.stderr or '(no message)'}")


@dataclass
class Output:
    status: Optional[int]  # None: killed by a signal
    stdout: str
    stderr: str


class _Collect(ProcessProtocol):
    def __init__(self, stdin: bytes, done: Deferred[Output]) -> None:
        self._stdin, self._done = stdin, done
        self._out: list[bytes] = []
        self._err: list[bytes] = []

    def connectionMade(self) -> None:
        if self._stdin:
            self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err.append(data)

    def processEnded(self, reason: Any) -> None:
        status = getattr(reason.value, "exitCode", None)
        if getattr(reason.value, "signal", None) is not None:
            status = None
        self._done.callback(Output(status, b"".join(self._out).decode("utf-8", "replace"),
                                   b"".join(self._err).decode("utf-8", "replace")))


def resolve(program: str) -> Optional[str]:
    """The absolute path of a command given as a name (looked up on PATH) or a path."""
    found = shutil.which(program)
    return os.path.abspath(found) if found else None


class SlurmCommands:
    """sbatch, squeue, scontrol and scancel, each a path (or a name on PATH)."""

    def __init__(self, reactor: Any, sbatch: str = "sbatch", squeue: str = "squeue", scontrol: str = "scontrol",
                 scancel: str = "scancel") -> None:
        self._reactor = reactor
        self.paths = {"sbatch": sbatch, "squeue": squeue, "scontrol": scontrol, "scancel": scancel}

    def check(self) -> None:
        """At start-up: every command must be there, or the daemon does not start."""
        for name, program in self.paths.items():
            path = resolve(program)
            if path is None:
                raise SlurmMissing(f"[scheduler] backend = slurm, but {name} ({program!r}) was not found on PATH "
                                   f"or is not executable: install Slurm's client commands or set [slurm] {name}")
            self.paths[name] = path

    def run(self, name: str, args: list[str], stdin: bytes = b"") -> Deferred[Output]:
        argv = [self.paths[name], *args]
        done: Deferred[Output] = Deferred()
        try:
            process = self._reactor.spawnProcess(_Collect(stdin, done), argv[0], argv, env=dict(os.environ))
        except OSError as e:
            raise SlurmMissing(f"cannot run {argv[0]}: {e}") from None
        # A controller that hangs must not hold the service for ever: the command is killed.
        timer = self._reactor.callLater(COMMAND_TIMEOUT, _kill, process)
        done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return done

    async def sbatch(self, args: list[str], script: str) -> tuple[str, str]:
        """Submit `script` (on stdin); the new job's id and any warning sbatch printed."""
        out = await self.run("sbatch", ["--parsable", *args], script.encode())
        job_id = parse_sbatch(out.stdout)
        if out.status != 0 or job_id is None:
            raise SlurmError([self.paths["sbatch"]], out.status, out.stderr or out.stdout)
        return job_id, out.stderr.strip()

    async def squeue(self, name: str) -> list["JobLine"]:
        """Every job named `name`, ended ones too (while Slurm remembers them)."""
        out = await self.run("squeue", ["-h", "-t", "all", "-n", name, "-o", SQUEUE_FORMAT])
        if out.status != 0:
            raise SlurmError([self.paths["squeue"]], out.status, out.stderr)
        return parse_squeue(out.stdout)

    async def show_job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of one job ({} once Slurm has forgotten it)."""
        out = await self.run("scontrol", ["-o", "show", "job", job_id])
        if out.status != 0:
            return {}
        return parse_scontrol(out.stdout)

    async def scancel(self, job_ids: list[str]) -> None:
        if job_ids:
            out = await self.run("scancel", job_ids)
            if out.status != 0:
                raise SlurmError([self.paths["scancel"]], out.status, out.stderr)


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except Exception:
        pass


_JOB_ID = re.compile(r"^(\d+)(?:_\d+)?(?:;\S+)?$")


def parse_sbatch(stdout: str) -> Optional[str]:
    """`sbatch --parsable` prints "ID" or "ID;CLUSTER" on its last line."""
    for line in reversed(stdout.strip().splitlines()):
        match = _JOB_ID.match(line.strip())
        if match:
            return match.group(1)
    return None


@dataclass
class JobLine:
    """One job as squeue shows it."""

    job_id: str
    state: str
    reason: str
    nodes: str
    cpus: int
    memory: str
    time_limit: str


def parse_squeue(stdout: str) -> list[JobLine]:
    jobs = []
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 7 or not parts[0].isdigit() or not re.fullmatch(r"[A-Z_]+", parts[1]):
            continue
        try:
            cpus = int(parts[4])
        except ValueError:
            cpus = 0
        jobs.append(JobLine(parts[0], parts[1], parts[2], parts[3], cpus, parts[5], parts[6]))
    return jobs


_FIELD = re.compile(r"(\w[\w/:]*)=(\S*)")


def parse_scontrol(stdout: str) -> dict[str, str]:
    """`scontrol -o show job` prints Key=Value pairs on one line."""
    line = stdout.strip().splitlines()[0] if stdout.strip() else ""
    return {key: value for key, value in _FIELD.findall(line)}


def slurm_minutes(seconds: float) -> int:
    """--time in whole minutes (Slurm's smallest unit), rounded up, at least one."""
    return max(1, math.ceil(seconds / 60))


def describe_end(job_id: str, state: str, fields: dict[str, str], reason: str = "") -> str:
    """Why a runner's Slurm job ended, in Slurm's words: its state, exit code and reason."""
    state = fields.get("JobState", state) or state
    if state not in ENDED_STATES and not fields:
        return f"Slurm job {job_id} ended; Slurm no longer knows how (MinJobAge passed)"
    text = f"Slurm job {job_id} ended {state}"
    if fields.get("ExitCode"):
        text += f" (exit code {fields['ExitCode']})"
    why = fields.get("Reason", reason)
    if why and why not in ("None", "(null)"):
        text += f", reason {why}"
    return text
