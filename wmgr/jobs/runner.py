"""Running one job as a process: a thin ProcessProtocol, the process, and the owner of its policy.

Each job runs as `sh -c <wrapper>` in a new session, so it leads its own process group and a kill
reaches everything it started. Its stdout and stderr go to files in the run directory rather than
pipes, and the wrapper writes the shell's exit status to a third file as it exits: a job therefore
neither dies nor loses its outcome when the daemon is killed, and a restarted daemon can adopt it
or read what it left (see LocalRunner.recover).
"""

from __future__ import annotations

import errno
import os
import random
import secrets
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import psutil
from twisted.internet import error, process
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure


from wmgr.jobs.launcher import make_job_dirs, read_bounded, stdio_actions  # read_bounded: re-exported
from wmgr.jobs.spares import STATUS_WIDTH
from wmgr.jobs.model import FAIL_TIME  # the reason a time limit gives (re-exported)

log = Logger()


# The wrapper runs the command in the same shell (one exec per job, which matters for throughput)
# and records the status, and its own pid (the job's), with an EXIT trap, which runs on a normal
# end and on `exit N` alike. A job killed by a signal leaves no status file, or a blank one (the
# launcher puts a blank spare in its place before the start): either means "did not finish by
# itself". The pid lets a restarted daemon say which process ran a job whose
# start it never recorded.
# The record is written over the file in place (`1<>`: no truncation) at a fixed width: the
# launcher puts a blank one there before the start (spares.STATUS_BLANK), and keeps the file's
# block from one run to the next.
WRAPPER = (
    'cd -- "$1" || exit 1; _wmgr_rc=$2; _wmgr_cmd=$3; set --; '
    f"trap 'printf \"%-{STATUS_WIDTH - 1}s\\n\" \"$? $$\" 1<> \"$_wmgr_rc\"' EXIT; eval \"$_wmgr_cmd\""
)
# What earlier versions ran (echo, truncating): recovery still knows their jobs after an upgrade.
EARLIER_WRAPPERS = (
    'cd -- "$1" || exit 1; _wmgr_rc=$2; _wmgr_cmd=$3; set --; '
    "trap 'echo $? $$ > \"$_wmgr_rc\"' EXIT; eval \"$_wmgr_cmd\"",
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

    def __init__(self, reactor: Any, executable: str, argv: list[str], env: dict[str, str], protocol: Any,
                 stdio: tuple[str, str, str]) -> None:
        # stdin, stdout and stderr as paths, opened by the child itself; set before Twisted's
        # constructor, which spawns.
        self.stdio = stdio
        super().__init__(reactor, executable, argv, env, None, protocol, childFDs={})

    def _trySpawnInsteadOfFork(self, path, uid, gid, executable, args, environment, kwargs):  # type: ignore[override]
        # Always taken (wmgr never runs jobs as another user), so Twisted's fork path, which would
        # neither make a session nor open the stdio, is never used.
        # Only the child's 0, 1 and 2 are set up, opened by the child: so a run's files exist only
        # if its process did start, which recovery relies on. Every other descriptor of the
        # daemon is close-on-exec (Python and Twisted open them so, PEP 446), so unlike Twisted we
        # do not list and fcntl every open descriptor before each spawn: that was most of its cost.
        actions = stdio_actions(*self.stdio)
        self.pid = self.spawned_pid = os.posix_spawn(
            executable, args, os.environ if environment is None else environment,
            file_actions=actions, setsigdef=_ignored_signals(), setsid=True,
        )
        self.status = -1
        return True

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


_IGNORED: Optional[list[int]] = None


def _ignored_signals() -> list[int]:
    """Signals the daemon ignores, to be reset to their defaults in jobs. Asked once: twistd sets
    its dispositions before the reactor runs, and asking for every signal costs ~70 µs."""
    global _IGNORED
    if _IGNORED is None:
        _IGNORED = [s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN]
    return _IGNORED


def spawn_in_session(reactor: Any, protocol: Any, executable: str, argv: list[str], env: Optional[dict[str, str]],
                     extra: dict[str, str], stdio: tuple[str, str, str], remove: Optional[str] = None,
                     make: tuple[str, ...] = ()) -> SessionProcess:
    """Spawn a job from the daemon itself: a process in its own session.

    A spawner takes the environment as `env` (exactly these variables; None: the daemon's own)
    plus `extra` on top, and stdin, stdout and stderr as paths. The other spawner,
    wmgr.jobs.launcher, takes the same arguments; only it acts on `remove` (its transports say
    so with `removes_workdir`), and here the caller removes the directory itself. `make`: the
    job's directories to make first (see prepare_workspace).
    """
    if make:
        make_job_dirs(*make)
    full = dict(os.environ if env is None else env, **extra)
    return SessionProcess(reactor, executable, argv, full, protocol, tuple(stdio))


class JobProtocol(ProcessProtocol):
    """Tells its owner when the process runs and when it has ended; all policy lives in JobRun."""

    def __init__(self, run: "JobRun") -> None:
        self.run = run

    def connectionMade(self) -> None:
        self.run._process_started(self.transport)

    def processEnded(self, reason: Failure) -> None:
        self.run._process_ended(reason, getattr(self.transport, "rusage", None))

    def startFailed(self, why: str) -> None:
        """The launcher could not start the process at all (see LaunchedProcess.not_started)."""
        self.run._start_failed(why)


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
    start_error: str = ""  # the process could not be started: why
    host_lost: bool = False  # lost because the worker that ran it went silent or left


class RunFiles:
    """The files of one run in the run directory: <key>.<attempt>.out, .err and .rc. The attempt
    is in the name so that what is left of one run can never be taken for, or removed as, the
    files of the job's next run."""

    __slots__ = ("directory", "key", "attempt", "out", "err", "rc")

    def __init__(self, directory: Path | str, key: str, attempt: int = 0) -> None:
        self.directory = str(directory)
        self.key = key
        self.attempt = attempt
        base = os.path.join(self.directory, f"{key}.{attempt}")
        self.out, self.err, self.rc = base + ".out", base + ".err", base + ".rc"

    @property
    def paths(self) -> tuple[str, str, str]:
        return self.out, self.err, self.rc

    def remove(self) -> None:
        for path in (self.out, self.err, self.rc):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def exit_status(self) -> Optional[int]:
        return self.exit_record()[0]

    def exit_record(self) -> tuple[Optional[int], int]:
        """(exit status, pid of the job) from the status file; (None, 0) when there is none or
        it is blank (the job has not ended, or did not end by itself)."""
        try:
            with open(self.rc) as f:
                fields = f.read().split()
            return int(fields[0]), int(fields[1]) if len(fields) > 1 else 0
        except (OSError, ValueError, IndexError):
            return None, 0

    def created(self) -> Optional[float]:
        """The earliest modification time of the run's files: no later than the first output,
        and the start itself for a stream never written to (best known start of a run whose
        start was not recorded)."""
        times = []
        for path in (self.out, self.err, self.rc):
            try:
                times.append(os.stat(path).st_mtime)
            except OSError:
                pass
        return min(times) if times else None


@dataclass
class Workspace:
    """Where a job runs: its directory (and, when wmgr made a unique one, its tmp) and its
    environment: `exact_env` (the job's own variables; None: the daemon's) plus `extra_env`."""

    cwd: str
    relative_cwd: str
    tmp: Optional[str]
    exact_env: Optional[dict[str, str]]
    extra_env: dict[str, str]
    home_changed: bool
    root: Optional[str] = None  # the unique directory wmgr made (cwd and tmp are in it)
    base: Optional[str] = None  # the daemon user's own directory the unique ones are made in
    pending: tuple[str, ...] = ()  # (base, parent, root, cwd, tmp) when the spawner is to make them

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ if self.exact_env is None else self.exact_env, **self.extra_env)


_bases: dict[str, tuple[str, str]] = {}
# The random part of a job's unique directory name. Not secret (the directories are in a 0700
# base of the daemon user's own), only unlikely to repeat: a PRNG seeded from the OS, not a
# getrandom() system call per job as secrets.token_hex made.
_unique = random.Random(secrets.randbits(64))


def work_base(cwd: str) -> tuple[str, str]:
    """The directory under `cwd` in which this daemon's user makes jobs' unique directories, and
    its name: wr's `wr_cwd` when it is ours, else (another user made `wr_cwd`, in a shared /tmp)
    `wr_cwd.<uid>`. Made 0700; used only if it is a real directory owned by this user, so that
    nobody else can see into, or plant anything in, a job's directory."""
    found = _bases.get(cwd)
    if found is not None:
        return found
    uid = os.getuid()
    os.makedirs(cwd, exist_ok=True)  # as wr's runner does for a cwd that does not exist yet
    for name in ("wr_cwd", f"wr_cwd.{uid}"):
        path = os.path.join(cwd, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            if info.st_mode & 0o077:
                os.chmod(path, 0o700)
            _bases[cwd] = (path, name)
            return path, name
        log.warn("{path} belongs to another user (or is not a directory): not used for jobs", path=path)
    raise PermissionError(errno.EACCES, "no job directory of this user's can be made in", cwd)


def prepare_workspace(key: str, spec: dict[str, Any], make: bool = True) -> Workspace:
    """As wr does: a unique <cwd>/wr_cwd/k/e/y/<rest><random>/cwd with a sister tmp (exported as
    TMPDIR) unless cwd_matters, in which case the given cwd is used as it is and must exist.
    With make=False the unique directories are only named (Workspace.pending): a spawner that
    makes them (the launcher) does, just before it starts the job."""
    exact = dict(entry.split("=", 1) for entry in spec["env"]) if spec.get("env") else None
    base = spec["cwd"]
    if spec.get("cwd_matters"):
        if not os.path.isdir(base):
            raise FileNotFoundError(errno.ENOENT, "working directory does not exist", base)
        return Workspace(base, "", None, exact, {}, False)
    own, name = work_base(base)
    parent = os.path.join(own, key[0], key[1], key[2])
    unique = f"{key[3:]}{_unique.getrandbits(32):08x}"
    root = os.path.join(parent, unique)
    cwd, tmp = os.path.join(root, "cwd"), os.path.join(root, "tmp")
    extra = {"TMPDIR": tmp}
    home_changed = bool(spec.get("change_home"))
    if home_changed:
        extra["HOME"] = cwd
    workspace = Workspace(cwd, f"/{name}/{key[0]}/{key[1]}/{key[2]}/{unique}/cwd", tmp, exact, extra, home_changed,
                          root, own)
    workspace.pending = (own, parent, root, cwd, tmp)
    if make:
        make_job_dirs(*workspace.pending)
        workspace.pending = ()
    return workspace


def remove_workdir(root: str) -> None:
    """A job's unique directory, once it has ended (its parents are bounded: 4,096 at most)."""
    shutil.rmtree(root, ignore_errors=True)


def remove_tmp(tmp: str) -> None:
    try:
        os.rmdir(tmp)  # usually empty: one syscall
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


class GroupKill:
    """Killing a job's process group: TERM now, KILL once the grace period has passed (a pending
    KILL is left to fire even once the shell has gone: what it started may ignore the TERM)."""

    def __init__(self, clock: Any, grace: float) -> None:
        self._clock = clock
        self.grace = grace
        self._kill_call: Any = None

    def __call__(self, pid: int) -> None:
        signal_group(pid, signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._clock.callLater(self.grace, signal_group, pid, signal.SIGKILL)


class Run(Protocol):
    """What the queue needs of a run, local (JobRun) or adopted from an earlier daemon
    (AdoptedRun): `done` fires once with a RunResult."""

    files: RunFiles
    workspace: Optional[Workspace]
    pid: int
    peak_ram: int
    done: Deferred[RunResult]

    def kill(self, reason: str) -> None: ...

    def gone(self) -> None: ...

    def remove_files(self) -> None: ...


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
        remove_workdir: bool = False,
    ) -> None:
        self._reactor = reactor
        # Timers run on their own clock so that tests can drive them with task.Clock while the
        # process itself is real.
        self._clock = clock if clock is not None else reactor
        self.max_time = max_time
        # The job's directory goes when it ends (no behaviours of its own decide): a spawner that
        # can (the launcher) is asked to remove it, else the queue does.
        self.remove_workdir = remove_workdir
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
        self._group_kill = GroupKill(self._clock, kill_grace)
        self._finished = False
        self._transport: Any = None
        self.on_started: Optional[Callable[[int], None]] = None

    def start(self) -> int:
        """Start the process; return its pid. Raises OSError if it cannot be started."""
        extra: dict[str, Any] = {}
        if getattr(self._spawn, "handles_run_files", False):
            # The launcher removes an old status file and reads the output: per-job file work
            # off the reactor.
            extra["fresh"], extra["read"] = self.files.rc, self.output_limit
        else:
            try:
                os.unlink(self.files.rc)  # a status left by an earlier run must not be taken for this one's
            except FileNotFoundError:
                pass
        argv = [SHELL, "-c", WRAPPER, ARGV0, self.workspace.cwd, self.files.rc, self.cmd]
        self.started = self._reactor.seconds()
        if self.max_time is not None:
            self._time_call = self._clock.callLater(self.max_time, self.kill, FAIL_TIME)
        if self.remove_workdir and self.workspace.root is not None:
            extra["remove"] = self.workspace.root
        if self.workspace.pending:
            extra["make"] = self.workspace.pending
        self._transport = self._spawn(
            self._reactor, JobProtocol(self), SHELL, argv, self.workspace.exact_env, self.workspace.extra_env,
            (os.devnull, self.files.out, self.files.err), **extra,
        )
        return self.pid

    def remove_files(self) -> None:
        """Remove the run's files (once its end is committed): by the launcher that started it
        when there is one, in one request with the others of this reactor turn."""
        launcher = getattr(self._transport, "launcher", None)
        if launcher is not None:
            launcher.remove_later(self.files.paths)
        else:
            self.files.remove()

    @property
    def workdir_removed(self) -> bool:
        """Whether the spawner removes the job's directory itself once it has ended."""
        return bool(getattr(self._transport, "removes_workdir", False))

    def _process_started(self, transport: Any) -> None:
        """The process runs: its pid is known (at once when the daemon spawns it, when the
        launcher reports it otherwise)."""
        self.pid = transport.pid or getattr(transport, "spawned_pid", 0)
        if self.on_started is not None:
            self.on_started(self.pid)
        if self.kill_reason and not self._finished:
            self.kill(self.kill_reason)  # a kill asked for before the pid was known

    def gone(self) -> None:
        """The sampler found the process gone. Only a run whose launcher died needs telling:
        its end is read from its status file."""
        transport = self._transport
        if getattr(transport, "orphaned", False) and not self._finished:
            code = self.files.exit_status()
            transport.end(None if code is None else code << 8)

    def kill(self, reason: str) -> None:
        """TERM the whole process group now and KILL it after the grace period."""
        if self._finished:
            return
        self.kill_reason = self.kill_reason or reason
        if not self.pid:
            return  # not running yet: done as soon as it is (see _process_started)
        self._group_kill(self.pid)

    def _start_failed(self, why: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._time_call is not None and self._time_call.active():
            self._time_call.cancel()
        now = self._reactor.seconds()
        self.done.callback(RunResult(exitcode=None, signal=None, started=self.started, ended=now, start_error=why))

    def _process_ended(self, reason: Failure, rusage: Any) -> None:
        if self._finished:
            return
        self._finished = True
        if self._time_call is not None and self._time_call.active():
            self._time_call.cancel()
        # A pending KILL is left to fire: the shell has gone, but what it started may still be
        # ignoring the TERM, and the group is killed when the grace period ends all the same.
        exitcode = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if isinstance(reason.value, error.ProcessDone):
            exitcode, sig = 0, None
        # Neither an exit code nor a signal: how it ended is not known (its launcher died before
        # it was reported started), so it is lost rather than failed.
        lost = exitcode is None and sig is None
        # CPU time comes from wait4: the shell and every descendant it reaped. Peak memory comes
        # only from sampling: ru_maxrss is useless here, because a posix_spawn child shares the
        # daemon's memory until it execs and so reports at least the daemon's RSS.
        cpu = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
        peak = self.peak_ram
        outputs = getattr(self._transport, "outputs", None)
        if outputs is not None:
            stdout, stderr = outputs
        else:
            stdout = read_bounded(self.files.out, self.output_limit)
            stderr = read_bounded(self.files.err, self.output_limit)
        result = RunResult(
            exitcode=exitcode if sig is None else None,
            signal=sig,
            started=self.started,
            ended=self._reactor.seconds(),
            cpu_time=cpu,
            peak_ram=peak,
            stdout=stdout,
            stderr=stderr,
            kill_reason=self.kill_reason,
            lost=lost and not self.kill_reason,
        )
        self.done.callback(result)


class AdoptedRun:
    """A job process found alive after a restart, or whose end an earlier daemon never recorded.
    It is not our child, so it cannot be waited for: the sampler reports when it has gone, and
    its status file and output tell the rest."""

    workspace = None

    def __init__(self, files: RunFiles, pid: int, started: float, output_limit: int, clock: Any,
                 kill_grace: float) -> None:
        self.files = files
        self.pid = pid
        self.started = started
        self.output_limit = output_limit
        self._clock = clock
        self._group_kill = GroupKill(clock, kill_grace)
        self.peak_ram = 0
        self.kill_reason = ""
        self.done: Deferred[RunResult] = Deferred()

    def remove_files(self) -> None:
        self.files.remove()

    def kill(self, reason: str) -> None:
        if self.done.called or not self.pid:
            return
        self.kill_reason = self.kill_reason or reason
        self._group_kill(self.pid)

    def gone(self) -> None:
        if self.done.called:
            return
        exitcode, _pid = self.files.exit_record()
        self.done.callback(RunResult(
            exitcode=exitcode, signal=None, started=self.started, ended=self._clock.seconds(),
            peak_ram=self.peak_ram, stdout=read_bounded(self.files.out, self.output_limit),
            stderr=read_bounded(self.files.err, self.output_limit),
            kill_reason=self.kill_reason, lost=exitcode is None and not self.kill_reason,
        ))


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
            # A zombie leader has ended; it is only waiting for someone (init, for an adopted
            # job) to reap it.
            if leader.status() == psutil.STATUS_ZOMBIE:
                result[pid] = None
                continue
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


def run_files_in(run_dir: Path | str) -> dict[str, list[int]]:
    """The attempts that have files in the run directory, by job key, oldest first."""
    found: dict[str, set[int]] = {}
    for name in os.listdir(run_dir):
        key, _, rest = name.partition(".")
        attempt = rest.split(".", 1)[0]
        if attempt.isdigit():
            found.setdefault(key, set()).add(int(attempt))
    return {key: sorted(attempts) for key, attempts in found.items()}


def find_job_processes(run_dir: Path) -> dict[str, int]:
    """Job leaders started by a daemon with this run directory, by "<key>.<attempt>", found from
    their command lines (the wrapper's arguments name the status file). Used only at recovery."""
    prefix = str(run_dir) + os.sep
    found: dict[str, int] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if len(cmdline) >= 7 and (cmdline[2] == WRAPPER or cmdline[2] in EARLIER_WRAPPERS) and (
                cmdline[5].startswith(prefix)):
            name = os.path.basename(cmdline[5])
            if name.endswith(".rc"):
                found[name[:-3]] = proc.info["pid"]
    return found
