"""Running one job as a process: a thin ProcessProtocol, the process, and the owner of its policy.

Each job runs as `sh -c <wrapper>` in a new session, so it leads its own process group and a kill
reaches everything it started. Its stdout and stderr go to files in the run directory rather than
pipes, and the wrapper writes the shell's exit status to a third file as it exits: a job therefore
neither dies nor loses its outcome when the daemon is killed, and a restarted daemon can adopt it
or read what it left (see LocalRunner.recover).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
from twisted.internet import error, process
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# The fail reason given when a run goes past its time limit (wr's wording).
FAIL_TIME = "command used too much time"

# The wrapper runs the command in the same shell (one exec per job, which matters for throughput)
# and records the status with an EXIT trap, which runs on a normal end and on `exit N` alike. A
# job killed by a signal leaves no status file: its absence means "did not finish by itself".
WRAPPER = (
    'cd -- "$1" || exit 1; _wmgr_rc=$2; _wmgr_cmd=$3; set --; '
    "trap 'echo $? > \"$_wmgr_rc\"' EXIT; eval \"$_wmgr_cmd\""
)
SHELL = "/bin/sh"
ARGV0 = "wmgr-job"

# How much of each stream is kept: this many bytes from the start and as many from the end.
DEFAULT_OUTPUT_LIMIT = 4096


class SessionProcess(process.Process):
    """A Process that starts in a new session and keeps its resource usage when reaped.

    Twisted starts processes with posix_spawn when it can, which is many times faster than fork
    for a large daemon; posix_spawn can also make the child a session leader, which Twisted does
    not ask for, so this class asks. Reaping uses wait4 so that the CPU time of the whole (reaped)
    tree is known. Both hooks are private to Twisted; tests pin the behaviour.
    """

    rusage: Optional[Any] = None
    # Twisted clears `pid` once the process is reaped, which for an instant command can happen
    # before the constructor returns; the pid it had is kept here.
    spawned_pid: int = 0

    def _trySpawnInsteadOfFork(self, path, uid, gid, executable, args, environment, kwargs):  # type: ignore[override]
        if uid is not None or gid is not None:
            return False
        fd_state = []
        for fd in process._listOpenFDs():
            try:
                fd_state.append((fd, fcntl.fcntl(fd, fcntl.F_GETFD, fcntl.FD_CLOEXEC)))
            except OSError:
                pass
        ignored = [s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN]
        self.pid = self.spawned_pid = os.posix_spawnp(
            executable,
            args,
            os.environ if environment is None else environment,
            file_actions=process._getFileActions(
                fd_state, kwargs.get("fdmap"), doClose=process._PS_CLOSE, doDup2=process._PS_DUP2
            ),
            setsigdef=ignored,
            setsid=True,
        )
        self.status = -1
        return True

    def _setupChild(self, fdmap):  # type: ignore[override]
        # Only reached where posix_spawn is unavailable: the forked child makes its own session.
        os.setsid()
        super()._setupChild(fdmap)

    def reapProcess(self) -> None:
        try:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        except OSError:
            log.failure("failed to reap process {pid}", pid=self.pid)
            pid = 0
        if pid:
            self.rusage = rusage
            process.unregisterReapProcessHandler(pid, self)
            self.processEnded(status)


def spawn_in_session(reactor, protocol, executable, argv, env, child_fds) -> SessionProcess:
    """The default spawner: a real process in its own session."""
    return SessionProcess(reactor, executable, argv, env, None, protocol, childFDs=child_fds)


class JobProtocol(ProcessProtocol):
    """Forwards the end of the process to its owner; all policy lives in JobRun."""

    def __init__(self, run: "JobRun") -> None:
        self.run = run

    def processEnded(self, reason: Failure) -> None:
        self.run._process_ended(reason, getattr(self.transport, "rusage", None))


@dataclass
class RunResult:
    """What a finished (or abandoned) process left behind. exitcode is None when it did not exit
    by itself (signal, or unknown after a restart)."""

    exitcode: Optional[int]
    signal: Optional[int]
    started: float
    ended: float
    cpu_time: float = 0.0
    peak_ram: int = 0
    stdout: str = ""
    stderr: str = ""
    kill_reason: str = ""
    lost: bool = False


@dataclass
class RunFiles:
    """The files of one run in the run directory, named after the job's key."""

    directory: Path
    key: str

    @property
    def out(self) -> Path:
        return self.directory / f"{self.key}.out"

    @property
    def err(self) -> Path:
        return self.directory / f"{self.key}.err"

    @property
    def rc(self) -> Path:
        return self.directory / f"{self.key}.rc"

    def remove(self) -> None:
        for path in (self.out, self.err, self.rc):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def exit_status(self) -> Optional[int]:
        try:
            return int(self.rc.read_text().strip())
        except (OSError, ValueError):
            return None


def read_bounded(path: Path, limit: int) -> str:
    """The first and last `limit` bytes of a file, with a marker saying how much was left out."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= 2 * limit:
                data = f.read()
            else:
                head = f.read(limit)
                f.seek(size - limit)
                tail = f.read(limit)
                data = head + f"\n... [{size - 2 * limit} bytes omitted] ...\n".encode() + tail
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="replace")


@dataclass
class Workspace:
    """Where a job runs: its directory (and, when wmgr made a unique one, its tmp) and env."""

    cwd: str
    relative_cwd: str
    tmp: Optional[str]
    env: dict[str, str]
    home_changed: bool


def prepare_workspace(key: str, spec: dict[str, Any]) -> Workspace:
    """As wr does: a unique <cwd>/wr_cwd/k/e/y/<rest><random>/cwd with a sister tmp (exported as
    TMPDIR) unless cwd_matters, in which case the given cwd is used as it is and must exist."""
    if spec.get("env"):
        env = dict(entry.split("=", 1) for entry in spec["env"])
    else:
        env = dict(os.environ)
    base = spec["cwd"]
    if spec.get("cwd_matters"):
        if not os.path.isdir(base):
            raise FileNotFoundError(errno.ENOENT, "working directory does not exist", base)
        return Workspace(base, "", None, env, False)
    unique = os.path.join("wr_cwd", key[0], key[1], key[2], key[3:] + secrets.token_hex(4))
    root = os.path.join(base, unique)
    cwd, tmp = os.path.join(root, "cwd"), os.path.join(root, "tmp")
    os.makedirs(cwd)
    os.mkdir(tmp)
    env["TMPDIR"] = tmp
    home_changed = bool(spec.get("change_home"))
    if home_changed:
        env["HOME"] = cwd
    return Workspace(cwd, "/" + unique + "/cwd", tmp, env, home_changed)


class JobRun:
    """The owner of one running process: starts it, kills it (TERM, then KILL after a grace
    period, to the whole process group), and fires `done` exactly once with a RunResult."""

    def __init__(
        self,
        reactor: Any,
        files: RunFiles,
        workspace: Workspace,
        cmd: str,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        kill_grace: float = 5.0,
        spawn: Callable[..., Any] = spawn_in_session,
        clock: Any = None,
        max_time: Optional[float] = None,
    ) -> None:
        self._reactor = reactor
        # Timers run on their own clock so that tests can drive them with task.Clock while the
        # process itself is real.
        self._clock = clock if clock is not None else reactor
        self.max_time = max_time
        self._time_call: Any = None
        self.files = files
        self.workspace = workspace
        self.cmd = cmd
        self.output_limit = output_limit
        self.kill_grace = kill_grace
        self._spawn = spawn
        self.done: Deferred[RunResult] = Deferred()
        self.pid = 0
        self.started = 0.0
        self.peak_ram = 0
        self.kill_reason = ""
        self._kill_call: Any = None
        self._finished = False

    def start(self) -> int:
        """Start the process; return its pid. Raises OSError if it cannot be started."""
        self.files.remove()
        with open(os.devnull, "rb") as stdin, open(self.files.out, "wb") as out, open(self.files.err, "wb") as err:
            argv = [SHELL, "-c", WRAPPER, ARGV0, self.workspace.cwd, str(self.files.rc), self.cmd]
            self.started = time.time()
            transport = self._spawn(
                self._reactor, JobProtocol(self), SHELL, argv, self.workspace.env,
                {0: stdin.fileno(), 1: out.fileno(), 2: err.fileno()},
            )
        self.pid = transport.pid or getattr(transport, "spawned_pid", 0)
        if self.max_time is not None:
            self._time_call = self._clock.callLater(self.max_time, self.kill, FAIL_TIME)
        return self.pid

    def kill(self, reason: str) -> None:
        """TERM the whole process group now and KILL it after the grace period."""
        if self._finished or not self.pid:
            return
        self.kill_reason = self.kill_reason or reason
        signal_group(self.pid, signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._clock.callLater(self.kill_grace, signal_group, self.pid, signal.SIGKILL)

    def _process_ended(self, reason: Failure, rusage: Any) -> None:
        if self._finished:
            return
        self._finished = True
        for call in (self._kill_call, self._time_call):
            if call is not None and call.active():
                call.cancel()
        exitcode = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if isinstance(reason.value, error.ProcessDone):
            exitcode, sig = 0, None
        # CPU time comes from wait4: the shell and every descendant it reaped. Peak memory comes
        # only from sampling: ru_maxrss is useless here, because a posix_spawn child shares the
        # daemon's memory until it execs and so reports at least the daemon's RSS.
        cpu = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
        peak = self.peak_ram
        result = RunResult(
            exitcode=exitcode if sig is None else None,
            signal=sig,
            started=self.started,
            ended=time.time(),
            cpu_time=cpu,
            peak_ram=peak,
            stdout=read_bounded(self.files.out, self.output_limit),
            stderr=read_bounded(self.files.err, self.output_limit),
            kill_reason=self.kill_reason,
        )
        self.done.callback(result)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warn("not allowed to signal process group {pgid}", pgid=pgid)


# -- measuring running jobs (called in a thread: psutil reads /proc) ----------------------------------


def measure_trees(pids: list[int]) -> dict[int, Optional[int]]:
    """RSS in MB of each process tree; None for a leader that no longer exists."""
    result: dict[int, Optional[int]] = {}
    for pid in pids:
        try:
            leader = psutil.Process(pid)
            members = [leader] + leader.children(recursive=True)
        except psutil.NoSuchProcess:
            result[pid] = None
            continue
        rss = 0
        for member in members:
            try:
                rss += member.memory_info().rss
            except psutil.Error:
                pass
        result[pid] = rss // (1024 * 1024)
    return result


def find_job_processes(run_dir: Path) -> dict[str, int]:
    """Job leaders started by a daemon with this run directory, by job key, found from their
    command lines (the wrapper's arguments name the status file). Used only at recovery."""
    prefix = str(run_dir) + os.sep
    found: dict[str, int] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if len(cmdline) >= 7 and cmdline[2] == WRAPPER and cmdline[5].startswith(prefix):
            name = os.path.basename(cmdline[5])
            if name.endswith(".rc"):
                found[name[:-3]] = proc.info["pid"]
    return found


def host_identity() -> tuple[str, str]:
    """This machine's name and an address other hosts could reach it by (best effort)."""
    host = socket.gethostname()
    address = "127.0.0.1"
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family == socket.AF_INET and not entry.address.startswith("127."):
                return host, entry.address
    return host, address
