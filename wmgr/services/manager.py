"""Services: their state and the start/stop/restart actions, never blocking the reactor.

A `command` service is a process wmgr supervises itself with `twisted.runner.procmon`: restarted
when it dies (after a delay that doubles while it keeps dying within a second, from
`restart_min_delay` up to `restart_max_delay`), its stdout and stderr written line by line to
`<log_dir>/<name>.log` (rotated at 10 MB). Stopping it takes it out of supervision (TERM, then
KILL after `kill_grace`); starting it puts it back.

A `script` service is an init.d-style script called as `<script> status|start|stop|restart`,
as Qserv did: `status` exiting 0 means active, anything else stopped; an action exiting non-zero
is a CommandFailure. Each call runs in its own session with its output appended to the service's
log; one that has not ended after `script_timeout` seconds has its whole process group sent TERM,
then KILL after `kill_grace`, and is a CommandFailure. Actions on one service run one at a time.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, globalLogPublisher
from twisted.python.logfile import LogFile
from twisted.runner.procmon import ProcessMonitor

from wmgr.errors import Conflict, NotFound
from wmgr.services.spec import ServiceSpec

log = Logger()

ACTIONS = ("start", "stop", "restart")
ACTIVE, STOPPED = "active", "stopped"
LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3
# How often a stop looks whether the supervised process has ended yet.
EXIT_POLL = 0.02

# Runs a script as the leader of a new session, so that a hung one is killed with everything it
# started (Twisted's spawnProcess cannot ask for setsid itself).
SESSION_TRAMPOLINE = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


class InvalidService(NotFound):
    """No service of that name is configured."""


class CommandFailure(Conflict):
    """A service action failed: the script exited non-zero, hung, or could not be run."""

    def __init__(self, message: str, cause: Optional[str] = None) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class ServiceState:
    name: str
    kind: str
    state: str
    pid: Optional[int] = None
    uptime: Optional[float] = None
    restarts: Optional[int] = None


class CountingMonitor(ProcessMonitor):
    """ProcessMonitor that counts how often it started each process."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.starts: dict[str, int] = {}

    def startProcess(self, name: str) -> None:
        if name not in self.protocols:
            self.starts[name] = self.starts.get(name, 0) + 1
        super().startProcess(name)


class _ScriptRun(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[Any] = Deferred()
        self.timed_out = False

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


class ServiceManager(Service):
    """Owns the configured services. The reactor is injected (spawnProcess and the clock)."""

    def __init__(self, specs: Iterable[ServiceSpec], reactor: Any, log_dir: Path, script_timeout: float = 30.0,
                 kill_grace: float = 5.0, restart_min_delay: float = 1.0, restart_max_delay: float = 60.0,
                 killpg: Callable[[int, int], None] = os.killpg) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._reactor = reactor
        self._log_dir = Path(log_dir)
        self._script_timeout = script_timeout
        self._kill_grace = kill_grace
        self._killpg = killpg
        self._locks = {name: DeferredLock() for name in self._specs}
        self._logs: dict[str, LogFile] = {}
        self._supervised: set[str] = set()
        self.monitor = CountingMonitor(reactor)
        self.monitor.killTime = kill_grace
        self.monitor.minRestartDelay = restart_min_delay
        self.monitor.maxRestartDelay = restart_max_delay
        self.monitor.log = Logger(namespace="wmgr.services", observer=self._monitor_event)
        for spec in self._specs.values():
            if spec.command:
                self._supervise(spec)

    # -- the service's life ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._specs:
            self._log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.monitor.startService()

    async def _stop(self) -> None:
        self.monitor.stopService()
        await self._until_exited(list(self.monitor.protocols), self._kill_grace + 1)
        for log_file in self._logs.values():
            log_file.close()
        self._logs.clear()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    # -- queries and actions ----------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ServiceSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise InvalidService(f"Service name not known: {name}") from None

    def supervised_states(self) -> list[ServiceState]:
        """The state of every `command` service, known without running anything (the metrics
        read it when scraped; a `script` service's state costs a run of its script)."""
        return [self._command_state(spec) for spec in self._specs.values() if spec.command]

    async def state(self, name: str) -> ServiceState:
        spec = self.spec(name)
        if spec.command:
            return self._command_state(spec)
        code = await self._run_script(spec, "status")
        return ServiceState(name, spec.kind, ACTIVE if code == 0 else STOPPED)

    async def act(self, name: str, action: str) -> ServiceState:
        """Start, stop or restart `name`; its state afterwards."""
        spec = self.spec(name)
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        lock = self._locks[name]
        await lock.acquire()
        try:
            if spec.command:
                if action in ("stop", "restart"):
                    await self._unsupervise(spec)
                if action in ("start", "restart"):
                    self._supervise(spec)
                return self._command_state(spec)
            code = await self._run_script(spec, action)
            if code != 0:
                raise CommandFailure(f"Failed to {action} service {name}", cause=self._exit_text(spec, action, code))
            return await self.state(name)
        finally:
            lock.release()

    async def restart_if_running(self, name: str) -> bool:
        """Restart `name` if it is configured and active (the xrootd chunk-list reload):
        True if it was restarted; a failed restart raises CommandFailure."""
        if name not in self._specs or (await self.state(name)).state != ACTIVE:
            return False
        await self.act(name, "restart")
        return True

    # -- supervised commands ----------------------------------------------------------------------

    def _supervise(self, spec: ServiceSpec) -> None:
        """Put `spec` under supervision (started now if the monitor runs); if it already is, leave
        it be, even while procmon waits to restart it."""
        assert spec.command is not None
        if spec.name in self._supervised:
            return
        self._supervised.add(spec.name)
        self.monitor.starts[spec.name] = 0
        self.monitor.addProcess(spec.name, list(spec.command), env=dict(os.environ))

    async def _unsupervise(self, spec: ServiceSpec) -> None:
        if spec.name not in self._supervised:
            return
        self._supervised.discard(spec.name)
        pending = self.monitor.restart.get(spec.name)
        if pending is not None and pending.active():
            pending.cancel()
        self.monitor.removeProcess(spec.name)
        await self._until_exited([spec.name], self._kill_grace + 1)

    async def _until_exited(self, names: list[str], timeout: float) -> None:
        deadline = self._reactor.seconds() + timeout
        while any(name in self.monitor.protocols for name in names) and self._reactor.seconds() < deadline:
            await deferLater(self._reactor, EXIT_POLL, lambda: None)

    def _command_state(self, spec: ServiceSpec) -> ServiceState:
        protocol = self.monitor.protocols.get(spec.name)
        restarts = max(self.monitor.starts.get(spec.name, 0) - 1, 0)
        if protocol is None or protocol.transport is None:
            return ServiceState(spec.name, spec.kind, STOPPED, restarts=restarts)
        started = self.monitor.timeStarted.get(spec.name, self._reactor.seconds())
        return ServiceState(spec.name, spec.kind, ACTIVE, pid=protocol.transport.pid,
                            uptime=round(self._reactor.seconds() - started, 3), restarts=restarts)

    def _monitor_event(self, event: dict[str, Any]) -> None:
        """procmon's log: a supervised process's output lines go to its log file, the rest (its
        failures) to the daemon's log."""
        if "line" in event and "tag" in event:
            log_file = self._log_file(event["tag"])
            log_file.write(f"{event.get('stream', 'stdout')}: {event['line']}\n")
            log_file.flush()
        else:
            globalLogPublisher(event)

    def _log_file(self, name: str) -> LogFile:
        if name not in self._logs:
            self._logs[name] = LogFile(f"{name}.log", str(self._log_dir), rotateLength=LOG_ROTATE_BYTES,
                                       maxRotatedFiles=LOG_KEEP, defaultMode=0o600)
        return self._logs[name]

    # -- init.d-style scripts ---------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self._log_dir / f"{name}.log"

    async def _run_script(self, spec: ServiceSpec, action: str) -> int:
        """`<script> <action>` in its own session; its exit status (negative: killed by a signal)."""
        assert spec.script is not None
        run = _ScriptRun()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = os.open(self.log_path(spec.name), flags, 0o600)
        except OSError as e:
            os.close(null)
            raise CommandFailure(_failed(action, spec.name), cause=f"log file: {e.strerror}") from None
        try:
            transport = self._reactor.spawnProcess(
                run, sys.executable, [sys.executable, "-S", "-c", SESSION_TRAMPOLINE, spec.script, action],
                env=dict(os.environ), childFDs={0: null, 1: out, 2: out})
        except OSError as e:
            raise CommandFailure(_failed(action, spec.name), cause=str(e)) from None
        finally:
            os.close(null)
            os.close(out)
        pid = transport.pid
        timer = self._reactor.callLater(self._script_timeout, self._kill_hung, run, pid)
        try:
            ended = await run.ended
        finally:
            if timer.active():
                timer.cancel()
        if run.timed_out:
            raise CommandFailure(
                _failed(action, spec.name),
                cause=f"{spec.script} {action} did not finish within {self._script_timeout:g}s and was killed")
        if isinstance(ended, ProcessDone):
            return 0
        if isinstance(ended, ProcessTerminated):
            return ended.exitCode if ended.exitCode is not None else -(ended.signal or 0)
        return -1

    def _kill_hung(self, run: _ScriptRun, pid: int) -> None:
        run.timed_out = True
        log.warn("service script (pid {pid}) hung: TERM to its process group", pid=pid)
        self._signal_group(pid, signal.SIGTERM)
        self._reactor.callLater(self._kill_grace, self._signal_group, pid, signal.SIGKILL)

    def _signal_group(self, pgid: int, sig: int) -> None:
        try:
            self._killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warn("not allowed to signal process group {pgid}", pgid=pgid)

    def _exit_text(self, spec: ServiceSpec, action: str, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return f"{spec.script} {action} {how} (its output is in {self.log_path(spec.name)})"


def _failed(action: str, name: str) -> str:
    return f"Failed to get the state of service {name}" if action == "status" else f"Failed to {action} service {name}"
