"""The worker role: this daemon runs jobs of another wmgr (its manager), pulled over HTTPS.

One cycle (every `heartbeat` seconds, and at once when a job ends or a report is made):
register if needed; heartbeat, only when one is due (every `heartbeat` seconds), with this
machine's figures (psutil, in a thread) and the jobs it runs, stopping those the reply says are not
its own any more; then, when there is room, pull in one request as many ready jobs as fit the
free cores and memory, and start them with the same runner as local jobs (the pull is the grant:
each comes under a lease of this session).
The reports waiting in the outbox go on a loop of their own, one batch in flight at a time.

When the manager does not answer, jobs carry on, reports stay in the outbox (durable), and
requests are retried with back-off; once it answers again, the worker asks "may I run" for every
job it runs and stops the ones given away meanwhile.

A Slurm runner is this same agent with a capacity of its allocation that leaves (`leave`) when
it has run dry.
"""

from __future__ import annotations

import functools
import os
import platform
import uuid
from typing import Any, Callable, Optional

import psutil
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from wmgr.jobs import model
from wmgr.jobs.behaviours import behaviours_for, has_behaviours, run_behaviours
from wmgr.jobs.runner import JobRun, RunFiles, RunResult, measure_trees, prepare_workspace, remove_tmp, remove_workdir
from wmgr.jobs.scheduler import Capacity
from wmgr.workers.outbox import Outbox

log = Logger()

PREFIX = "worker/v1/"
# A request the manager does not answer within this many seconds counts as unreachable.
REQUEST_TIMEOUT = 30.0
STOPPED = "given to another worker, or cancelled, while this worker was unreachable"
FENCED = "the manager was unreachable for as long as a lease lasts: stopped before it runs elsewhere"


def machine_figures() -> dict[str, Any]:
    """What a heartbeat tells the manager about this machine (psutil: call in a thread)."""
    load = os.getloadavg()
    return {
        "mac_address": uuid.getnode(),
        "load_average": {"1min": load[0], "5min": load[1], "15min": load[2]},
        "cpu_percent": psutil.cpu_percent(interval=None),
        "mem_percent": psutil.virtual_memory().percent,
        "disk_percent": psutil.disk_usage("/").percent,
        "num_cpus": psutil.cpu_count() or 1,
        "architecture": platform.machine(),
        "system": platform.system(),
    }


OUTPUT_TAIL = 4096


def new_output(files: list[tuple[str, str, int]]) -> dict[str, tuple[str, int]]:
    """What each job wrote to its stdout since `seen` bytes, at most the last OUTPUT_TAIL bytes:
    {key: (text, size now)} (call in a thread)."""
    found = {}
    for key, path, seen in files:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size <= seen:
                    continue
                f.seek(max(seen, size - OUTPUT_TAIL))
                found[key] = (f.read(size - max(seen, size - OUTPUT_TAIL)).decode("utf-8", "replace"), size)
        except OSError:
            continue
    return found


class Unreachable(Exception):
    """The manager did not answer (or answered with a server error)."""


class SessionLost(Unreachable):
    """The manager does not know this worker's session (it restarted, or the name registered
    again elsewhere): register again."""


class Slot:
    """A pulled job on this worker: its lease and its run."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.key: str = payload["key"]
        self.attempt: int = payload["attempt"]
        self.spec: dict[str, Any] = payload["spec"]
        self.cores: float = payload["cores"]
        self.memory: int = payload["memory"]
        self.max_time: Optional[float] = payload.get("max_time")
        self.memory_limit: Optional[float] = payload.get("memory_limit")
        self.run: Optional[JobRun] = None
        self.ended = False  # its command has exited
        self.output_seen = 0  # bytes of its stdout already forwarded


class WorkerAgent(Service):
    name = "worker-agent"

    def __init__(self, reactor: Any, client: Any, worker_name: str, host_ip: str, capacity: Capacity,
                 outbox: Outbox, run_dir: Any, spawn: Callable[..., Any], heartbeat: float = 5.0,
                 output_limit: int = 4096, kill_grace: float = 5.0,
                 in_thread: Callable[..., Deferred[Any]] = deferToThread,
                 figures: Callable[[], dict[str, Any]] = machine_figures) -> None:
        self._reactor = reactor
        self.client = client
        self.worker_name = worker_name
        self.host_ip = host_ip
        self.capacity = capacity
        self.outbox = outbox
        self.run_dir = run_dir
        self._makes_workspace = getattr(spawn, "makes_workspace", False)
        # Pulled jobs die with this daemon: once it is gone the manager gives them to another.
        self._spawn = spawn
        if getattr(spawn, "ties", False):
            tied: Any = functools.partial(spawn, tied=True)
            for flag in ("makes_workspace", "handles_run_files"):  # what the runner asks of a spawner
                setattr(tied, flag, getattr(spawn, flag, False))
            self._spawn = tied
        self.heartbeat = heartbeat
        self.output_limit = output_limit
        self.kill_grace = kill_grace
        self._in_thread = in_thread
        self._figures = figures
        self.session: Optional[str] = None
        self.slots: dict[str, Slot] = {}
        self._starts: list[tuple[Slot, dict[str, Any]]] = []  # starts not reported yet (see _started)
        self._sending: Optional[Deferred[None]] = None  # the report loop, while it runs
        self.stopping: set[str] = set()  # told to stop, not ended yet: nothing is pulled meanwhile
        self.manager_timeout = 60.0  # the manager's, told at registration
        self.last_contact = 0.0  # when the last heartbeat the manager answered was sent
        self.manager_has_work = True  # the last heartbeat's reply: some job is ready
        self.used_cores = 0.0
        self.used_memory = 0
        self.used_slots = 0
        self.reachable = True
        self.backoff = 0.0
        self._cycle_call: Any = None
        self._fence_call: Any = None
        self._timer_call: Any = None
        self._cycling: Optional[Deferred[None]] = None
        self._again = False
        self._beat_due = True  # the next cycle heartbeats (set every `heartbeat` seconds)
        self.ready: Optional[Deferred[None]] = None
        # A batch runner's end (reactor seconds): it pulls only jobs expected to end before it.
        self.deadline: Optional[float] = None

    # -- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.ready = ensureDeferred(self._begin())

    async def _begin(self) -> None:
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        await self.outbox.load()
        self._tick()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for call in (self._cycle_call, self._timer_call, self._fence_call):
            if call is not None and call.active():
                call.cancel()
        return ensureDeferred(self._leave())

    async def _leave(self) -> None:
        """Leave the manager: the pulled jobs still running die with this daemon's launchers
        (they are tied to it), so the manager may give them to another worker at once."""
        if self.session is not None:
            try:
                await self._post("leave", {})
            except Exception:
                pass
        await self.client.close()

    def _tick(self) -> None:
        """The periodic cycle: every `heartbeat` seconds, sooner while the manager is unreachable."""
        self._beat_due = True
        self._timer_call = self._reactor.callLater(self.backoff or self.heartbeat, self._tick)
        self.poke()

    def _arm_fence(self) -> None:
        """Unreachable: if it lasts nearly as long as the manager waits before it gives our jobs
        to another worker, stop them here first, so that no job runs twice at once."""
        if self._fence_call is not None and self._fence_call.active():
            return
        margin = self.kill_grace + self.heartbeat
        deadline = self.last_contact + max(self.manager_timeout / 2, self.manager_timeout - margin)
        self._fence_call = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), self._fence)

    def _fence(self) -> None:
        if not self.reachable:
            for key in list(self.slots):
                self._stop(key, FENCED)

    def poke(self) -> None:
        """Run a cycle soon; many events in one reactor turn share one."""
        if not self.running:
            return
        if self._cycling is not None:
            self._again = True
            return
        if self._cycle_call is None:
            self._cycle_call = self._reactor.callLater(0, self._start_cycle)

    def _start_cycle(self) -> None:
        self._cycle_call = None
        self._cycling = ensureDeferred(self.cycle())
        self._cycling.addErrback(lambda f: log.failure("worker cycle failed; it will run again", f))
        self._cycling.addBoth(self._cycle_done)

    def _cycle_done(self, _: Any) -> None:
        self._cycling = None
        if self._again:
            self._again = False
            self.poke()

    # -- one cycle -----------------------------------------------------------------------------

    async def cycle(self) -> None:
        try:
            try:
                await self._exchange()
            except SessionLost:
                # At once, not after a back-off: the manager answers, it just forgot us (a
                # restart). Registering names the jobs we run; their leases carry over.
                log.info("the manager does not know this worker's session: registering again")
                self._beat_due = True
                await self._exchange()
        except Unreachable as e:
            self._unreachable(e)

    def _unreachable(self, e: Exception) -> None:
        if self.reachable:
            log.info("the manager is unreachable ({why}); jobs carry on, reports are kept", why=str(e))
        self.reachable = False
        self._arm_fence()
        # Retried sooner at first (1 s, 2 s, 4 s...), never less often than the heartbeat, so
        # that a manager back within its timeout still finds this worker online.
        self.backoff = min(self.heartbeat, max(min(1.0, self.heartbeat), self.backoff * 2))

    async def _exchange(self) -> None:
        """One round with the manager: a heartbeat only when one is due (every `heartbeat` s) or
        while it is unreachable; then the next pull, while the waiting reports go on a loop of
        their own (one batch in flight at a time), so that a stream of short jobs costs about
        one round trip per batch rather than four, and a slow report batch does not hold up
        the next pull."""
        if self.session is None:
            # Reports first: they need no session, and registering again would end the leases
            # they are about.
            await self._reports_sent()
            await self._send_reports()
            await self._register()
        if self._beat_due or not self.reachable:
            self._beat_due = False
            await self._beat()
        if not self.reachable:
            self.reachable = True
            self.backoff = 0.0
            if self._fence_call is not None and self._fence_call.active():
                self._fence_call.cancel()
            log.info("the manager answers again")
            await self._recheck()
        self._kick_reports()
        await self._pull()

    def _kick_reports(self) -> None:
        if self._sending is None and (self.outbox.pending or self._starts):
            sending = ensureDeferred(self._report_loop())
            if not sending.called:  # (one that ended at once has cleared _sending already)
                self._sending = sending

    async def _report_loop(self) -> None:
        try:
            await self._send_reports()
        except Unreachable as e:
            self._unreachable(e)
        except Exception:
            log.failure("sending reports failed; they are kept and sent again")
        finally:
            self._sending = None

    async def _reports_sent(self) -> None:
        """Wait for the report batch in flight, if any (so that none is sent twice)."""
        while self._sending is not None:
            await self._sending

    async def _post(self, route: str, body: dict[str, Any], session: bool = True) -> Any:
        if session:
            body = dict(body, name=self.worker_name, session=self.session)
        try:
            reply = await self.client.post(PREFIX + route, body, timeout=REQUEST_TIMEOUT)
        except Exception as e:
            raise Unreachable(f"{type(e).__name__}: {e}") from None
        if reply.code == 409 and session:
            self.session = None  # the manager forgot us (restarted) or gave our name a new session
            raise SessionLost("the manager asks this worker to register again")
        if reply.code >= 500 or reply.code in (401, 403):
            raise Unreachable(f"{route}: {reply.code} {reply.text[:200]}")
        if reply.code >= 400:
            raise RuntimeError(f"the manager refused {route}: {reply.code} {reply.text[:200]}")
        return reply.json()

    async def _register(self) -> None:
        answer = await self._post("register", {
            "name": self.worker_name, "ip": self.host_ip, "cores": self.capacity.cores,
            "memory": self.capacity.memory, "system": platform.system(),
            # What it still runs (after a manager restart, say): those leases carry over.
            "jobs": [[key, slot.attempt] for key, slot in self.slots.items()],
        }, session=False)
        self.session = answer["session"]
        self.manager_timeout = float(answer.get("timeout", self.manager_timeout))
        log.info("registered with the manager as worker {name}", name=self.worker_name)
        await self._recheck()

    async def _beat(self) -> None:
        try:
            figures = await self._in_thread(self._figures)
        except Exception:
            figures = {}
        running = {key: slot for key, slot in self.slots.items() if slot.run is not None}
        try:
            files = [(key, slot.run.files.out, slot.output_seen)  # type: ignore[union-attr]
                     for key, slot in running.items()]
            tails = await self._in_thread(new_output, files)
        except Exception:
            tails = {}
        sent = self._reactor.seconds()
        answer = await self._post("heartbeat", {"running": list(running), "figures": figures,
                                                "output": {key: text for key, (text, _) in tails.items()}})
        for key, (_, size) in tails.items():
            if key in running:
                running[key].output_seen = size
        self.last_contact = sent
        self.manager_has_work = answer.get("ready", 1) > 0
        for key in answer.get("stop", []):
            self._stop(key, STOPPED)
        for key, reason in answer.get("kill", {}).items():
            self._stop(key, reason or model.FAIL_KILLED)

    async def _recheck(self) -> None:
        """May I (still) run what I run? Those given away meanwhile are stopped."""
        held = [[key, slot.attempt] for key, slot in self.slots.items()]
        if not held:
            return
        answer = await self._post("may-run", {"jobs": held})
        for key in answer["stop"]:
            self._stop(key, STOPPED)

    async def _send_reports(self) -> None:
        await self._keep_starts()
        while self.outbox.pending:
            await self._keep_starts()
            batch = self.outbox.batch()
            await self._post("reports", {"name": self.worker_name, "reports": [report for _, report in batch]},
                             session=False)
            await self.outbox.acknowledged([row_id for row_id, _ in batch])

    def room(self) -> tuple[float, int, int]:
        cap = self.capacity
        return (max(0.0, cap.cores - self.used_cores), max(0, cap.memory - self.used_memory),
                max(0, cap.zero_core_slots - self.used_slots))

    async def _pull(self) -> None:
        cores, memory, slots = self.room()
        if (memory <= 0 or (cores < 0.01 and slots <= 0) or not self.running or self.stopping
                or not self.manager_has_work):
            return
        room: dict[str, Any] = {"cores": cores, "memory": memory, "slots": slots}
        if self.deadline is not None:
            room["time_left"] = self.deadline - self._reactor.seconds()
            if room["time_left"] <= 0:
                return
        answer = await self._post("pull", room)
        self.manager_has_work = answer.get("ready", 1) > 0
        pulled = [Slot(payload) for payload in answer["jobs"]]
        if not pulled:
            return
        # The pull is the grant: each job came under a lease held by this session, stored before
        # the reply. (A lease ended since, say by a kill, is named in the next heartbeat's
        # reply, as for any running job; may-run is for what runs across an unreachable spell.)
        for slot in pulled:
            self._take(slot)
            if self.running:
                self._start(slot)
            else:
                self._release(slot)
        self.poke()  # there may be more

    # -- running -------------------------------------------------------------------------------

    def _take(self, slot: Slot) -> None:
        self.slots[slot.key] = slot
        self.used_memory += slot.memory
        if slot.cores == 0:
            self.used_slots += 1
        else:
            self.used_cores += slot.cores

    def _release(self, slot: Slot) -> None:
        if self.slots.get(slot.key) is not slot:
            return
        del self.slots[slot.key]
        self.used_memory -= slot.memory
        if slot.cores == 0:
            self.used_slots -= 1
        else:
            self.used_cores -= slot.cores

    def _start(self, slot: Slot) -> None:
        try:
            workspace = prepare_workspace(slot.key, slot.spec, make=not self._makes_workspace)
            run = JobRun(self._reactor, RunFiles(self.run_dir, slot.key, slot.attempt), workspace, slot.spec["cmd"],
                         output_limit=self.output_limit, kill_grace=self.kill_grace, spawn=self._spawn,
                         max_time=slot.max_time, remove_workdir=not has_behaviours(slot.spec))
            run.start()
        except (OSError, ValueError) as e:
            self._release(slot)
            now = self._reactor.seconds()
            self._report(slot, "end", {"exitcode": None, "signal": None, "started": now, "ended": now,
                                       "start_error": str(e)})
            return
        slot.run = run
        started = {"started": run.started}
        if run.pid:
            self._started(slot, dict(started, pid=run.pid))
        else:
            run.on_started = lambda pid: self._started(slot, dict(started, pid=pid))
        run.done.addCallback(lambda result: ensureDeferred(self._ended(slot, result)))
        run.done.addErrback(lambda f: log.failure("the end of pulled job {key} was not reported", f, key=slot.key))

    async def _ended(self, slot: Slot, result: RunResult) -> None:
        """The job's command has exited: its behaviours run here, where it ran (as wr's runners
        do), before its slot is free and its end reported. A run stopped because the job is no
        longer this worker's has no outcome of its own: no behaviours, its directory goes."""
        slot.ended = True
        run = slot.run
        workspace = run.workspace if run is not None else None
        ours = result.kill_reason not in (STOPPED, FENCED)
        succeeded = result.exitcode == 0 and not result.kill_reason and not result.lost
        behaviours = behaviours_for(slot.spec, succeeded) if ours else []
        if behaviours and workspace is not None:
            root = os.path.dirname(workspace.cwd) if workspace.tmp else None
            try:
                await run_behaviours(self._reactor, behaviours, workspace.cwd, workspace.env, root, workspace.base)
            except Exception:
                log.failure("the behaviours of pulled job {key} failed", key=slot.key)
        self._release(slot)
        self.stopping.discard(slot.key)
        if run is not None and workspace is not None and workspace.tmp:
            # As the queue does for its own jobs: behaviours decide what becomes of the directory
            # (cleanup removes it, {"nothing": true} keeps it); without any it goes.
            if behaviours or workspace.root is None:
                remove_tmp(workspace.tmp)
            elif not run.workdir_removed:
                remove_workdir(workspace.root)
        self._report(slot, "end", {
            "exitcode": result.exitcode, "signal": result.signal, "started": result.started, "ended": result.ended,
            "cpu_time": result.cpu_time, "peak_ram": max(result.peak_ram, run.peak_ram if run else 0),
            "stdout": result.stdout, "stderr": result.stderr, "kill_reason": result.kill_reason,
            "start_error": result.start_error,
        })
        if run is not None:
            run.files.remove()

    def _stop(self, key: str, reason: str) -> None:
        slot = self.slots.get(key)
        if slot is None:
            return
        if slot.run is None:
            self._release(slot)  # pulled but not started
        else:
            self.stopping.add(key)
            slot.run.kill(reason)

    def _started(self, slot: Slot, fields: dict[str, Any]) -> None:
        """A start is reported with the next batch of reports, unless the job has ended by then:
        its end says when it started, and a stream of short jobs then costs the manager one
        report (and one write) per job rather than two."""
        self._starts.append((slot, fields))
        self.poke()

    async def _keep_starts(self) -> None:
        starts, self._starts = self._starts, []
        for slot, fields in starts:
            if not slot.ended:
                await self.outbox.put(dict(fields, key=slot.key, attempt=slot.attempt, event="start"))

    def _report(self, slot: Slot, event: str, fields: dict[str, Any]) -> None:
        report = dict(fields, key=slot.key, attempt=slot.attempt, event=event)
        d = ensureDeferred(self.outbox.put(report))
        d.addCallback(lambda _: self.poke())
        d.addErrback(lambda f: log.failure("a report for job {key} could not be kept", f, key=slot.key))

    # -- sampling ------------------------------------------------------------------------------

    async def sample(self) -> None:
        """Peak memory of each pulled job (psutil, in a thread); one over its limit is stopped."""
        runs = {key: slot for key, slot in self.slots.items() if slot.run is not None and slot.run.pid}
        if not runs:
            return
        pids = [slot.run.pid for slot in runs.values()]  # type: ignore[union-attr]
        sizes = await self._in_thread(measure_trees, pids)
        for slot in runs.values():
            run = slot.run
            assert run is not None
            size = sizes.get(run.pid)
            if size is None:
                continue
            run.peak_ram = max(run.peak_ram, size)
            if slot.memory_limit is not None and size > slot.memory_limit:
                run.kill(model.FAIL_RAM)
