"""Starting job processes from a helper process, so that the reactor never waits for an exec.

Why: CPython (before 3.12, and never for os.posix_spawn) holds the GIL while a vfork'ed child
execs, and on a busy machine that child may wait for a core: the daemon's reactor thread stood
still for most of each job start. The launcher is a small Python process, started once with a
ProcessProtocol, that reads spawn requests (JSON lines on its stdin), starts each job with
posix_spawn in a new session with its stdio opened by the child itself, reaps it with wait4 and
reports (JSON lines on its stdout) its pid and then its exit status and CPU time.

Nothing is lost if the launcher dies: jobs are session leaders writing to files, so they carry
on; the runs it had started are then watched by pid and settled from their status files, and a
new launcher takes over new starts.

It also does the per-job file work that needs nothing of the daemon's state, so that the
reactor does not: it makes the job's directories, replaces a status file left by an earlier
attempt with a blank one, reads the bounded output once the job has ended (sent with its end),
and removes the job's directory, and later (once the daemon has committed the end) its run files.
What it would remove it keeps, emptied, for the next jobs when nothing can still reach it, and
renames it into place instead of making new directories and files (wmgr.jobs.spares: on this
machine's ext4 a new inode had come to cost more CPU than the job). It runs in one thread
(LauncherLoop), woken by requests and by SIGCHLD.

Requests:  {"id": 7, "argv": [...], "env": {...} | null, "extra": {...}, "stdio": [in, out, err],
            "fresh": rc, "read": limit, "make": [...], "remove": dir}   ("fresh" and after optional)
           {"unlink": [path, ...]}
Events:    {"id": 7, "pid": 1234} | {"id": 7, "error": "..."}
           | {"pid": 1234, "status": 0, "cpu": 0.01, "out": "...", "err": "..."}  (out, err: if not empty)
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import select
import shutil
import stat
import signal
import sys
import threading
import time
from queue import SimpleQueue
from types import SimpleNamespace
from typing import Any, Iterable, Optional

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure

from wmgr import compactjson
from wmgr.jobs.spares import SpareDirs, SpareFiles

log = Logger()

_OPEN_OUT = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
# After this long with nothing running, a launcher removes the directories and files it kept for
# the next jobs (wmgr.jobs.spares). The variable is for tests, which make a launcher idle often.
IDLE_SECONDS = float(os.environ.get("WMGR_LAUNCHER_IDLE_SECONDS", "0.5"))


def stdio_actions(stdin: str, stdout: str, stderr: str, truncate: bool = True) -> list[tuple[Any, ...]]:
    """posix_spawn file actions that open a job's stdio in the child itself: so a run's files
    exist only if its process did start, which recovery relies on. truncate=False: the caller
    has made sure stdout and stderr are empty or absent (see the launcher's handle)."""
    flags = _OPEN_OUT if truncate else _OPEN_OUT & ~os.O_TRUNC
    return [
        (os.POSIX_SPAWN_OPEN, 0, stdin, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, stdout, flags, 0o600),
        (os.POSIX_SPAWN_OPEN, 2, stderr, flags, 0o600),
    ]


def make_job_dirs(base: str, parent: str, root: str, cwd: str, tmp: str, spare: Optional[str] = None) -> None:
    """Make a job's unique directories in the daemon user's own base (runner.work_base), which is
    checked again first: a base removed since (a /tmp cleaner) and made again by another user is
    never written into. `spare`: a finished job's directory in `base`, emptied (spares.SpareDirs),
    renamed into place instead of making three new ones."""
    try:
        info = os.lstat(base)
    except FileNotFoundError:  # removed since it was checked: made again, ours
        try:
            os.mkdir(base, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(errno.EACCES, "the job directory base is not this user's own", base)
    if spare is not None:
        try:
            _making_parent(parent, os.rename, spare, root)
            return
        except OSError:
            shutil.rmtree(spare, ignore_errors=True)
    _making_parent(parent, os.mkdir, root)
    os.mkdir(cwd)
    os.mkdir(tmp)


def _making_parent(parent: str, make: Any, *args: str) -> None:
    """make(*args), making `parent` first if it is missing (it usually exists: one of 4,096)."""
    try:
        make(*args)
    except FileNotFoundError:
        os.makedirs(parent, exist_ok=True)
        make(*args)


def read_bounded(path: str, limit: int) -> str:
    """The first and last `limit` bytes of a file, with a marker saying how much was left out."""
    try:
        if os.stat(path).st_size == 0:
            return ""  # most jobs write nothing to one stream or both: a stat instead of an open
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


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:  # not ours to fail on: the daemon's recovery tidies what is left
            sys.stderr.write(f"could not remove {path}: {e}\n")


# -- the launcher process ------------------------------------------------------------------------


def main() -> None:
    """The launcher's own loop (runs in the child process)."""
    os.setsid()  # a terminal's Ctrl-C for the daemon is not ours: the daemon closes our stdin
    LauncherLoop().run()


def _no_op(signum: int, frame: Any) -> None:
    """SIGCHLD's handler: its only work is the byte the signal writes to the wakeup pipe."""


class LauncherLoop:
    """One thread, woken by requests on stdin and by SIGCHLD (through a wakeup pipe), that starts
    jobs, reaps them and reports both.

    One thread, not a reader and a reaper: handing each job from one thread to the other (a
    condition, a lock, the GIL) cost more system calls and context switches than the job's
    start itself. A directory that cannot be kept as a spare is removed by a thread of its own
    (a job may leave a big tree), so that no removal holds up a start or a report.
    """

    def __init__(self) -> None:
        self.ignored = [s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN]
        self.base_env = dict(os.environ)
        self.out = sys.stdout.buffer
        self.daemon = os.getppid()
        self.running = 0
        self.idle_deadline: Optional[float] = None  # when the spares go if nothing starts meanwhile
        # pid -> (the directory to remove once it has ended, and when the launcher made it: its
        # (base, parent, root, cwd, tmp), so that it may be kept as a spare)
        self.removals: dict[int, tuple[str, Optional[list[str]]]] = {}
        self.outputs: dict[int, tuple[str, str, int]] = {}  # pid -> (stdout, stderr, limit) to read at its end
        # Jobs that must not outlive the daemon (a worker's pulled jobs: once the worker is gone
        # the manager gives them to another, so one left running here would run twice at once).
        self.tied: set[int] = set()
        self.spare_dirs, self.spare_files = SpareDirs(), SpareFiles()
        self.remover = _Remover()
        # Events wait here and are written together once a turn of the loop: the starts of one
        # batch of requests and the ends reaped with them in one write. Each write wakes the
        # daemon's reactor for a turn of its own, so fewer writes are less of its time per job.
        self.pending: list[bytes] = []

    def run(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _no_op)
        poller = select.epoll()
        poller.register(0, select.EPOLLIN)
        poller.register(wake_r, select.EPOLLIN)
        rest = b""
        try:
            while True:
                events = poller.poll(self._timeout())
                if not events:
                    self._idle()
                    continue
                for fd, _ in events:
                    if fd == wake_r:
                        _drain(wake_r)
                        continue
                    chunk = os.read(0, 1 << 16)
                    if not chunk:
                        return  # the daemon has gone (stopped, or killed: either way our stdin ends)
                    *lines, rest = (rest + chunk).split(b"\n")
                    for line in lines:
                        if os.getppid() != self.daemon:
                            # The daemon died (kill -9) with requests still in the pipe. Starting
                            # them now could run a job twice: the next daemon queues again what
                            # it finds no trace of.
                            return
                        if line:
                            self.handle(line)
                # Reaped after the requests: a process that ends at once is reported started
                # first (its start is already pending).
                ended = self.reap()
                self.flush()
                self.tidy(ended)
        finally:
            for pid in self.tied:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.spare_dirs.clear()
            self.spare_files.clear()

    def _timeout(self) -> float:
        if self.idle_deadline is None:
            return -1
        return max(0.0, self.idle_deadline - time.monotonic())

    def _idle(self) -> None:
        """Nothing has run for a while: what was kept for the next jobs goes (they may be long in
        coming, and spares left behind would puzzle a reader)."""
        self.idle_deadline = None
        if self.running == 0:
            self.spare_dirs.clear()
            self.spare_files.clear()

    def emit(self, event: dict[str, Any]) -> None:
        self.pending.append(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    def flush(self) -> None:
        if self.pending:
            self.out.write(b"".join(self.pending))
            self.out.flush()
            self.pending.clear()

    def handle(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            if "unlink" in request:
                # Run files whose end the daemon has committed (see Launcher.remove_later).
                for path, e in self.spare_files.remove(request["unlink"]):
                    sys.stderr.write(f"could not remove {path}: {e}\n")
                if self.running == 0 and self.idle_deadline is None:
                    self.idle_deadline = time.monotonic() + IDLE_SECONDS  # these too go if idle
                return
            env = request["env"] if request["env"] is not None else self.base_env.copy()
            env.update(request["extra"])
            stdin, stdout, stderr = request["stdio"]
            truncate = True
            make = request.get("make")
            if make:
                make_job_dirs(*make, spare=self.spare_dirs.take(make[0]))
            if "fresh" in request:
                # A status file left by an earlier run must not be taken for this one's: a blank
                # spare replaces it (the shell's write at the job's end then makes no inode, and
                # blank reads as "not ended"), or it goes.
                if not self.spare_files.place(request["fresh"]):
                    try:
                        os.unlink(request["fresh"])
                    except FileNotFoundError:
                        pass
                # A spare (empty) there saves an inode; else what an earlier run left goes. Either
                # way the child need not truncate: on ext4 a truncate marks the file to be written
                # out when it is closed (auto_da_alloc), a block allocation and a write per job.
                for path in (stdout, stderr):
                    if not self.spare_files.place(path):
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            pass
                truncate = False
            pid = os.posix_spawn(
                request["argv"][0], request["argv"], env,
                file_actions=stdio_actions(stdin, stdout, stderr, truncate),
                setsid=True, setsigdef=self.ignored,
            )
        except Exception as e:
            # Whatever one request makes posix_spawn (or its arguments) raise -- E2BIG, a NUL
            # byte or a lone surrogate in a value, a malformed request -- fails that job only.
            self.emit({"id": _request_id(line), "error": _describe(e)})
            return
        if request.get("remove"):
            self.removals[pid] = (request["remove"], make if make and make[2] == request["remove"] else None)
        if "read" in request:
            self.outputs[pid] = (stdout, stderr, request["read"])
        if request.get("tied"):
            self.tied.add(pid)
        self.running += 1
        self.idle_deadline = None
        self.emit({"id": request["id"], "pid": pid})

    def reap(self) -> list[tuple[int, Optional[tuple[str, Optional[list[str]]]]]]:
        """Report the processes that have ended; (pid, its directory to remove) of each."""
        ended = []
        while self.running:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            self.running -= 1
            self.tied.discard(pid)
            event = {"pid": pid, "status": status, "cpu": usage.ru_utime + usage.ru_stime}
            output = self.outputs.pop(pid, None)
            if output is not None:
                # Read here, not by the daemon: two stats (and, rarely, reads) per job off the
                # reactor.
                stdout, stderr, limit = output
                text = read_bounded(stdout, limit)
                if text:
                    event["out"] = text
                text = read_bounded(stderr, limit)
                if text:
                    event["err"] = text
            self.emit(event)
            ended.append((pid, self.removals.pop(pid, None)))
        if ended and self.running == 0:
            self.idle_deadline = time.monotonic() + IDLE_SECONDS
        return ended

    def tidy(self, ended: list[tuple[int, Optional[tuple[str, Optional[list[str]]]]]]) -> None:
        """After the ends are reported, so that they are not held up (a job whose directory is to
        go has no behaviours that could still need it, and a retry gets a new directory)."""
        for pid, removal in ended:
            if removal is not None:
                directory, made = removal
                if made is None or not _group_gone(pid) or not self.spare_dirs.keep(made[0], *made[2:]):
                    self.remover.remove(directory)


class _Remover:
    """Removes directories in a thread of its own, started when first needed."""

    def __init__(self) -> None:
        self._queue: Optional[SimpleQueue[str]] = None

    def remove(self, directory: str) -> None:
        if self._queue is None:
            self._queue = SimpleQueue()
            threading.Thread(target=self._work, args=(self._queue,), name="remover", daemon=True).start()
        self._queue.put(directory)

    @staticmethod
    def _work(directories: "SimpleQueue[str]") -> None:
        while True:
            shutil.rmtree(directories.get(), ignore_errors=True)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _group_gone(pgid: int) -> bool:
    """Whether no process is left in a job's process group (nothing it started still runs)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def _request_id(line: bytes) -> Optional[int]:
    try:
        return int(json.loads(line)["id"])
    except Exception:
        match = re.search(rb'"id":(\d+)', line)
        return int(match.group(1)) if match else None


def _describe(e: Exception) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return f"{os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
    if isinstance(e, (ValueError, UnicodeError)):
        return f"invalid value: {e}"
    return f"{type(e).__name__}: {e}"


# -- the daemon's side ---------------------------------------------------------------------------


class Usage:
    """What the launcher tells of a finished process's resource use (as os.wait4's rusage)."""

    def __init__(self, cpu: float) -> None:
        self.ru_utime, self.ru_stime = cpu, 0.0


class LaunchedProcess:
    """The transport of one job started by the launcher. Its protocol is connected once the
    launcher reports the pid, and ended once it reports the exit status. If the launcher dies
    first the process is an orphan: whoever watches it by pid calls end() with what its status
    file says."""

    def __init__(self, protocol: Any, launcher: Optional["Launcher"] = None) -> None:
        self.proto = protocol
        self.launcher = launcher  # who can remove the run's files later (Launcher.remove_later)
        self.pid: int = 0
        self.rusage: Optional[Usage] = None
        self.ended = False
        self.orphaned = False
        self.removes_workdir = False
        self.reads_output = False
        # (stdout, stderr) as the launcher read them at the end; None: not read (the caller reads)
        self.outputs: Optional[tuple[str, str]] = None

    def started(self, pid: int) -> None:
        self.pid = pid
        self.proto.makeConnection(self)

    def not_started(self, why: str) -> None:
        """The launcher could not start it (E2BIG, a value posix_spawn refuses...)."""
        if self.ended:
            return
        self.ended = True
        self.proto.startFailed(why)

    def end(self, status: Optional[int], cpu: float = 0.0, outputs: Optional[tuple[str, str]] = None) -> None:
        """status: as from wait4; None when it is not known how the process ended. outputs: the
        bounded stdout and stderr, when the launcher read them."""
        if self.ended:
            return
        self.ended = True
        self.rusage = Usage(cpu)
        self.outputs = outputs
        reason: BaseException
        if status is None:
            reason = error.ProcessTerminated(None, None, None)
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            reason = error.ProcessDone(status)
        elif os.WIFEXITED(status):
            reason = error.ProcessTerminated(os.WEXITSTATUS(status), None, status)
        else:
            reason = error.ProcessTerminated(None, os.WTERMSIG(status), status)
        self.proto.processEnded(Failure(reason))

    def signalProcess(self, name: str) -> None:
        if self.pid:
            os.kill(self.pid, getattr(signal, f"SIG{name}"))

    def loseConnection(self) -> None:
        pass


class _EventLines(LineOnlyReceiver):
    """The launcher's stdout, framed into lines: one JSON event each. LineOnlyReceiver, not
    LineReceiver: the launcher writes events in bursts, and LineReceiver splits its buffer once
    per line (copying what is left each time: a quarter of the reactor's time went there)."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, owner: "Launcher") -> None:
        self.owner = owner
        # LineOnlyReceiver asks its transport whether it is closing before each line; the
        # launcher's stdout is read until the process ends, and nothing here closes it.
        self.transport = SimpleNamespace(disconnecting=False)

    def lineReceived(self, line: bytes) -> None:
        if line:
            self.owner.event(json.loads(line.decode()))  # str: json would sniff a bytes' encoding

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("the job launcher wrote a line of {n} bytes; ignored", n=len(line))


class LauncherProtocol(ProcessProtocol):
    """The launcher process's protocol: JSON lines of events in, to its owner."""

    def __init__(self, owner: "Launcher") -> None:
        self.owner = owner
        self.lines = _EventLines(owner)

    def outReceived(self, data: bytes) -> None:
        self.lines.dataReceived(data)

    def errReceived(self, data: bytes) -> None:
        log.warn("job launcher: {text}", text=data.decode("utf-8", "replace").rstrip())

    def outConnectionLost(self) -> None:
        # Its stdout closed: the launcher has gone (its stdin is not watched to notice it; see
        # Launcher.start). Its stdin is closed too, so that the process ends for Twisted (which
        # waits for every pipe) and processEnded reports it.
        if self.transport is not None:
            self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self.owner.died(reason)


class Launcher:
    """Owns the launcher process: starts it, sends it spawn requests, routes its events, and
    restarts it if it dies (the runs it had started become orphans, see LaunchedProcess)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._ids = itertools.count(1)
        self._starting: dict[int, LaunchedProcess] = {}
        self._running: dict[int, LaunchedProcess] = {}
        self._protocol: Optional[LauncherProtocol] = None
        self._stopping = False
        self.restarts = 0
        self._unlinks: list[str] = []
        self._unlink_call: Any = None

    def start(self) -> None:
        self._stopping = False
        self._protocol = LauncherProtocol(self)
        transport = self._reactor.spawnProcess(
            self._protocol, sys.executable, [sys.executable, "-m", "wmgr.jobs.launcher"],
            env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"},
        )
        # Twisted watches a child's stdin pipe for readability between writes, to notice the
        # child closing it (ProcessWriter.enableReadHack): two epoll_ctl calls more each time
        # requests are written. The launcher's end is known from its stdout closing instead
        # (LauncherProtocol.outConnectionLost).
        writer = getattr(transport, "pipes", {}).get(0)
        if getattr(writer, "enableReadHack", False):
            writer.enableReadHack = False
            writer.stopReading()

    def stop(self) -> None:
        """Close the launcher's stdin: it exits, and the jobs it started carry on."""
        if self._unlink_call is not None and self._unlink_call.active():
            self._unlink_call.cancel()
            self._send_unlinks()
        self._stopping = True
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.closeStdin()

    def spawn(self, reactor: Any, protocol: Any, executable: str, argv: list[str], env: Optional[dict[str, str]],
              extra: dict[str, str], stdio: tuple[str, str, str], remove: Optional[str] = None,
              make: tuple[str, ...] = (), fresh: Optional[str] = None, read: Optional[int] = None,
              tied: bool = False) -> LaunchedProcess:
        """Ask for a process; the returned transport connects its protocol once it runs.
        `remove`: a directory the launcher removes once the process has ended and it has said so
        (a job's own directory: per-job work that needs nothing of the daemon's state); `make`: the
        job's (base, parent, root, cwd, tmp) directories, made by the launcher just before the start;
        `fresh`: a file removed before the start (an earlier run's status file); `read`: read the
        first and last `read` bytes of stdout and stderr at the end (the transport's `outputs`);
        `tied`: the launcher kills the process group when the daemon goes (stopped or killed)."""
        if self._protocol is None or self._protocol.transport is None:
            raise OSError("the job launcher is not running")
        process = LaunchedProcess(protocol, self)
        process.removes_workdir = remove is not None
        process.reads_output = read is not None
        ident = next(self._ids)
        self._starting[ident] = process
        request = {"id": ident, "argv": [executable, *argv[1:]], "env": env, "extra": extra, "stdio": list(stdio)}
        if remove is not None:
            request["remove"] = remove
        if make:
            request["make"] = list(make)
        if fresh is not None:
            request["fresh"] = fresh
        if read is not None:
            request["read"] = read
        if tied:
            request["tied"] = True
        self._protocol.transport.write(compactjson.dumps(request).encode() + b"\n")
        return process

    def remove_later(self, paths: Iterable[str]) -> None:
        """Have the launcher remove these files; the removals asked for in one reactor turn go as
        one request. If the launcher is not running they are removed here."""
        self._unlinks.extend(paths)
        if self._unlink_call is None:
            self._unlink_call = self._reactor.callLater(0, self._send_unlinks)

    def _send_unlinks(self) -> None:
        self._unlink_call = None
        paths, self._unlinks = self._unlinks, []
        if self._stopping or self._protocol is None or self._protocol.transport is None:
            _unlink_all(paths)
        else:
            self._protocol.transport.write(compactjson.dumps({"unlink": paths}).encode() + b"\n")

    def event(self, event: dict[str, Any]) -> None:
        if "id" in event:
            process = self._starting.pop(event["id"], None)
            if process is None:
                return
            if "error" in event:
                log.warn("the launcher could not start a job: {error}", error=event["error"])
                process.not_started(event["error"])
                return
            self._running[event["pid"]] = process
            process.started(event["pid"])
        else:
            process = self._running.pop(event["pid"], None)
            if process is not None:
                process.end(event["status"], event["cpu"],
                            (event.get("out", ""), event.get("err", "")) if process.reads_output else None)

    def died(self, reason: Failure) -> None:
        self._protocol = None
        for process in self._running.values():
            process.orphaned = True  # still running, or ended unreported: watched by pid now
        self._running.clear()
        for process in self._starting.values():
            process.end(None)  # never reported started: it may or may not have run
        self._starting.clear()
        if not self._stopping:
            log.error("the job launcher died ({why}); starting a new one", why=reason.getErrorMessage())
            self.restarts += 1
            self.start()



class LauncherPool(Service):
    """Several launchers, one per core by default: each is one spawner (its own exec waits hold
    its own GIL), so starts proceed in parallel. A spawn goes to the launcher with the fewest
    processes still starting. A Service: stopping it closes the launchers' stdin (the jobs they
    started carry on, and the next daemon adopts them)."""

    name = "launchers"

    def __init__(self, reactor: Any, size: int) -> None:
        self.launchers = [Launcher(reactor) for _ in range(max(1, size))]

    @property
    def restarts(self) -> int:
        """Launchers restarted after dying, since the daemon started."""
        return sum(launcher.restarts for launcher in self.launchers)

    def start(self) -> None:
        for launcher in self.launchers:
            launcher.start()

    def stop(self) -> None:
        for launcher in self.launchers:
            launcher.stop()

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> None:
        super().stopService()
        self.stop()

    def spawn(self, *args: Any, **kw: Any) -> LaunchedProcess:
        launcher = min(self.launchers, key=lambda each: len(each._starting))
        return launcher.spawn(*args, **kw)

    spawn.makes_workspace = True  # type: ignore[attr-defined]  # see runner.prepare_workspace
    spawn.handles_run_files = True  # type: ignore[attr-defined]  # takes fresh= and read= (see JobRun.start)
    spawn.ties = True  # type: ignore[attr-defined]  # takes tied=True (see Launcher.spawn)


if __name__ == "__main__":
    main()
