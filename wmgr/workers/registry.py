"""The manager's side of the worker protocol: who the workers are, what each holds, and whether it
is still alive.

A worker is known by its name (never its address: two workers behind one address are two
workers) and a session the manager gives it when it registers; every later request carries both.
Rules:
- A job is handed to one worker at a time, under a lease: the lease is the job's current run on
  the manager (a RemoteRun in the queue's `runs`), held by one (worker, session, attempt).
- Leases are renewed by the worker's heartbeats. A worker silent for longer than `timeout` goes
  offline: its leases end, its jobs are lost and go back to the queue at once (retried elsewhere,
  or buried when their retries are spent), and it is listed as a bad server.
- A pull is the grant: the worker starts what it was given. It asks "may I run" for what it
  runs after the manager comes back (and when it registers again); a heartbeat's reply names the jobs it runs without a lease (given away meanwhile: stop them)
  and the jobs to kill (killed or cancelled here).
- A report (start, end) counts only for the lease it names (job key and attempt); any other is a
  stale one, acknowledged and ignored, so that a report delivered twice changes nothing.
- A worker that registers again names the leases it still runs (`holding`): those it holds the
  current lease of carry over to its new session; the others of its name end (lost).
- Leases outlive a manager restart: which worker runs a job (its Host, HostID and attempt) is
  stored with the job, and the queue's recovery gives each such job a fresh lease on its worker
  (`recovered_lease`), as if the worker had just heartbeated. The worker's next heartbeat is
  refused (its session is gone), it registers again holding its jobs, and they carry over; its
  reports land meanwhile (they need no session). A worker not back within `timeout` goes offline
  and its jobs are lost, as usual.
- The workers the manager knows (name, Flamenco id, address, system, enabled) are stored
  (table workers), written before a reply says they are known: after a restart they are listed
  offline until they come back, under the same id. A worker that leaves is forgotten.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from wmgr.errors import Conflict, NotFound
from wmgr.jobs.model import Job
from wmgr.jobs.policy import limit_of
from wmgr.jobs.runner import RunResult
from wmgr.jobs.scheduler import Capacity

log = Logger()

ONLINE, OFFLINE = "online", "offline"


class _NoFiles:
    """A remote run keeps no files on the manager."""

    def remove(self) -> None:
        pass


@dataclass
class Worker:
    name: str
    session: str
    ip: str
    cores: float
    memory: int
    registered: float
    last_seen: float
    connection: str = ONLINE
    enabled: bool = True
    figures: dict[str, Any] = field(default_factory=dict)
    leases: dict[str, "RemoteRun"] = field(default_factory=dict)
    system: str = ""
    id: int = 0  # a small number for Flamenco's /workers/<id>, stored: the same across restarts
    instance: str = field(default_factory=lambda: secrets.token_hex(8))  # this registration: jobs' HostID
    # What a Flamenco worker reports about itself (PATCH /workers/<id>).
    port: int = 0
    status: Optional[str] = None
    activity: Optional[str] = None
    log: Optional[str] = None
    time_cost: Optional[int] = None


class RemoteRun:
    """A job's run on a worker, as the queue sees it: the lease. `done` fires once, with the
    result the worker reported, or lost when the worker went away."""

    remote = True
    workspace = None
    pid = 0  # no local process: the sampler leaves it alone
    peak_ram = 0

    def __init__(self, worker: Worker, job: Job, clock: Any, recovered: bool = False) -> None:
        self.worker = worker
        self.key = job.key
        if recovered:  # an earlier daemon's lease: the attempt and start it stored
            self.attempt = job.attempts
            self.host, self.host_ip, self.host_id = job.host, job.host_ip, job.host_id
            self.started = job.started or clock.seconds()
        else:
            self.attempt = job.attempts + 1
            self.host, self.host_ip, self.host_id = worker.name, worker.ip, worker.instance
            self.started = clock.seconds()
        self.files = _NoFiles()
        self.done: Deferred[RunResult] = Deferred()
        self.kill_reason = ""
        self.finished = False

    def kill(self, reason: str) -> None:
        """Killed here (a user, a cancelled task): the worker is told in its next heartbeat's
        reply and reports the end."""
        if not self.finished:
            self.kill_reason = self.kill_reason or reason

    def gone(self) -> None:
        pass

    def remove_files(self) -> None:
        """No files here: the worker removes its run's files once it has reported the end."""

    def end(self, result: RunResult) -> None:
        if self.finished:
            return
        self.finished = True
        if self.worker.leases.get(self.key) is self:
            del self.worker.leases[self.key]
        self.done.callback(result)

    def lose(self, now: float, reason: str = "") -> None:
        self.end(RunResult(exitcode=None, signal=None, started=self.started, ended=now, lost=True, host_lost=True,
                           stderr=reason))


class Workers(Service):
    """The registry of workers, their leases, and their liveness (`check`, run by a TimerService
    every `check_interval` seconds)."""

    name = "workers"

    def __init__(self, queue: Any, reactor: Any, timeout: float = 60.0, heartbeat: float = 5.0,
                 bad_servers: Any = None, new_session: Callable[[], str] = lambda: secrets.token_hex(16),
                 store: Any = None) -> None:
        self.queue = queue
        self._reactor = reactor
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.bad_servers = bad_servers
        self._new_session = new_session
        self.store = store
        self.workers: dict[str, Worker] = {}
        self._next_id = 1
        self._stored: dict[str, tuple[int, str, str, bool]] = {}  # what the store holds of each worker
        self._writes: dict[str, Deferred[None]] = {}  # the latest write of each worker's row, until done
        self._waiters: dict[int, list[Deferred[None]]] = {}  # replies waiting for a write
        # Observers of the output a worker forwards while a job runs: f(job key, text).
        self.output_observers: list[Callable[[str, str], None]] = []
        # The queue's recovery asks this registry for a lease of each job a worker was running.
        queue.remote_recovery = self.recovered_lease

    async def load(self) -> None:
        """The workers known before this start, offline until they come back (call before the
        queue starts: its recovery gives their jobs back to them)."""
        if self.store is None:
            return
        now = self._reactor.seconds()
        for name, worker_id, ip, system, enabled in await self.store.read(_load):
            self._stored[name] = (worker_id, ip, system, bool(enabled))
            self.workers[name] = Worker(name, self._new_session(), ip, 0, 0, now, now, connection=OFFLINE,
                                        enabled=bool(enabled), system=system, id=worker_id)
            self._next_id = max(self._next_id, worker_id + 1)

    def saved(self, worker: Worker) -> Deferred[None]:
        """Fires once what is known of this worker is stored (await it before replying); fails
        if that write did."""
        return self.saved_name(worker.name)

    def saved_name(self, name: str) -> Deferred[None]:
        d = self._writes.get(name)
        if d is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.setdefault(id(d), []).append(waiter)
        return waiter

    def _written(self, result: Any, name: str, d: Deferred[None]) -> None:
        waiters = self._waiters.pop(id(d), [])
        if self._writes.get(name) is d:
            del self._writes[name]
        if isinstance(result, Failure):
            self._stored.pop(name, None)  # written again next time
            if not waiters:
                log.failure("worker {name} could not be stored", result, name=name)
        for waiter in waiters:
            waiter.errback(result) if isinstance(result, Failure) else waiter.callback(None)

    def _new_id(self) -> int:
        worker_id = self._next_id
        self._next_id += 1
        return worker_id

    def _remember(self, worker: Worker) -> None:
        """Store the worker's row if it changed (in order with the other writes of its name)."""
        row = (worker.id, worker.ip, worker.system, worker.enabled)
        if self.store is None or self._stored.get(worker.name) == row:
            return
        self._stored[worker.name] = row
        name = worker.name
        self._write(name, lambda conn: _upsert(conn, name, row))

    def _forget(self, name: str) -> None:
        if self.store is None or self._stored.pop(name, None) is None:
            return
        self._write(name, lambda conn: _delete(conn, name))

    def _write(self, name: str, operation: Callable[[sqlite3.Connection], None]) -> None:
        d = self._writes[name] = self.store.write(operation)
        d.addBoth(self._written, name, d)

    # -- for metrics ---------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        online = sum(1 for w in self.workers.values() if w.connection == ONLINE)
        return {"online": online, "offline": len(self.workers) - online,
                "leases": sum(len(w.leases) for w in self.workers.values())}

    # -- the protocol --------------------------------------------------------------------------

    def register(self, name: str, ip: str, cores: float, memory: int, system: str = "",
                 holding: Iterable[tuple[str, int]] = ()) -> Worker:
        """A worker (re)joins with a new session. Of the leases its name held, those it says it
        still runs (`holding`: job key and attempt) carry over; the others end, and what ran
        under them is lost and runs elsewhere."""
        now = self._reactor.seconds()
        old = self.workers.get(name)
        enabled = old.enabled if old is not None else True
        worker = Worker(name, self._new_session(), ip, cores, memory, now, now, enabled=enabled, system=system,
                        id=old.id if old is not None else self._new_id())
        if old is not None:
            held = set(holding)
            for run in list(old.leases.values()):
                if (run.key, run.attempt) in held and not run.finished:
                    run.worker = worker
                    worker.leases[run.key] = run
                else:
                    run.lose(now)
            old.leases.clear()
            if worker.leases:
                log.info("worker {name} registered again holding {n} of its jobs: they carry on", name=name,
                         n=len(worker.leases))
        self.workers[name] = worker
        self._remember(worker)
        if self.bad_servers is not None:
            self.bad_servers.recovered(name)
        log.info("worker {name} ({ip}) registered: {cores:g} cores, {memory} MB", name=name, ip=ip,
                 cores=cores, memory=memory)
        return worker

    def announce(self, name: str, ip: str, system: str = "", port: int = 0,
                 figures: Optional[dict[str, Any]] = None) -> Worker:
        """A worker says it is there (Flamenco's POST /workers): known from now on, online,
        without touching the session or leases of a wmgr worker of that name."""
        now = self._reactor.seconds()
        worker = self.workers.get(name)
        if worker is None:
            worker = self.workers[name] = Worker(name, self._new_session(), ip, 0, 0, now, now, id=self._new_id())
        worker.ip, worker.last_seen, worker.port = ip, now, port or worker.port
        worker.system = system or worker.system
        if figures:
            worker.figures = figures
        self._online(worker)
        self._remember(worker)
        return worker

    def touch(self, worker: Worker) -> None:
        worker.last_seen = self._reactor.seconds()
        self._online(worker)

    def _online(self, worker: Worker) -> None:
        if worker.connection == OFFLINE:
            worker.connection = ONLINE
            if self.bad_servers is not None:
                self.bad_servers.recovered(worker.name)
            log.info("worker {name} is back online", name=worker.name)

    def by_id(self, worker_id: int) -> Worker:
        for worker in self.workers.values():
            if worker.id == worker_id:
                return worker
        raise NotFound(f"no worker {worker_id}")

    def session_of(self, name: str, session: str) -> Worker:
        worker = self.workers.get(name)
        if worker is None or not secrets.compare_digest(worker.session, session):
            raise Conflict(f"worker {name!r} has no such session: register again")
        return worker

    def beat(self, name: str, session: str, running: Iterable[str], figures: Optional[dict[str, Any]] = None,
             output: Optional[dict[str, str]] = None) -> dict[str, Any]:
        """A heartbeat: renews the worker's leases. It may carry the output its jobs wrote since
        the last one. The reply names the jobs it runs that are not its to run (stop them) and
        those to kill, with the reason."""
        worker = self.session_of(name, session)
        self.touch(worker)
        if figures:
            worker.figures = figures
        for key, text in (output or {}).items():
            if key in worker.leases:
                self._output(key, text)
        # `ready`: whether a pull could find work (an upper bound: the ready groups' sizes), so that
        # an idle worker of an idle manager heartbeats without pulling.
        return {"stop": [key for key in running if key not in worker.leases],
                "kill": {key: run.kill_reason for key, run in worker.leases.items() if run.kill_reason},
                "ready": self.ready(worker)}

    def ready(self, worker: Worker) -> int:
        """Whether a pull by this worker could find work: an upper bound (the ready groups' sizes)."""
        return self.queue.scheduler.waiting() if worker.enabled else 0

    async def pull(self, name: str, session: str, cores: float, memory: int, slots: int,
                   most: int = 0, turn: Optional[Callable[[], Deferred[None]]] = None,
                   time_left: Optional[float] = None) -> list[dict[str, Any]]:
        """Hand the worker as many ready jobs as fit its free room, each under a lease; with
        `time_left` (a batch runner's remaining seconds), only jobs expected to end within it.
        The worker is told once the hand-out is stored (a manager restart then finds its jobs).
        `turn`: waited for again once stored, before the reply is made (the commit of many pulls
        fires at once; their replies are then made a few at a time, see wmgr/turns.py)."""
        worker = self.session_of(name, session)
        worker.last_seen = self._reactor.seconds()
        if not worker.enabled or worker.connection != ONLINE:
            return []
        jobs = self.queue.hand_out(Capacity(cores, memory, slots), lambda job: self._lease(worker, job), most,
                                   time_left)
        if not jobs:
            return []
        leases = [worker.leases[job.key] for job in jobs]
        try:
            await self.queue.handed_out(jobs)
        except Exception:
            # Not stored: the worker is not told, and the jobs go back to the queue.
            for run in leases:
                run.lose(self._reactor.seconds())
            raise
        if turn is not None:
            await turn()
        # A lease may have ended while the write went on (the worker went offline): not sent.
        return [self._payload(job, run) for job, run in zip(jobs, leases) if not run.finished]

    def may_run(self, name: str, session: str, leases: Iterable[tuple[str, int]]) -> dict[str, list[str]]:
        """Which of these jobs the worker may (still) run: those it holds the current lease of."""
        worker = self.session_of(name, session)
        run, stop = [], []
        for key, attempt in leases:
            lease = worker.leases.get(key)
            ok = lease is not None and lease.attempt == attempt and not lease.kill_reason
            (run if ok else stop).append(key)
        return {"run": run, "stop": stop}

    def report(self, name: str, reports: Iterable[dict[str, Any]]) -> Deferred[Any]:
        """Starts, output and ends, each for the lease it names; stale ones are ignored. Fires
        once what they changed is stored: the worker forgets a report once it is answered, so an
        end acknowledged but lost to a manager crash would have its job run again."""
        changed = False
        for report in reports:
            run = self.queue.runs.get(report["key"])
            if not isinstance(run, RemoteRun) or run.worker.name != name or run.attempt != report["attempt"]:
                continue
            job = self.queue.live.get(report["key"])
            event = report["event"]
            if event == "start" and job is not None:
                self.queue.remote_started(job, run, report.get("pid", 0), report.get("started", run.started))
                changed = True
            elif event == "output":
                self._output(report["key"], report.get("text", ""))
            elif event == "end":
                self._output(report["key"], report.get("stdout", ""))
                run.end(RunResult(
                    exitcode=report.get("exitcode"), signal=report.get("signal"),
                    started=report.get("started", run.started), ended=report.get("ended", self._reactor.seconds()),
                    cpu_time=report.get("cpu_time", 0.0), peak_ram=report.get("peak_ram", 0),
                    stdout=report.get("stdout", ""), stderr=report.get("stderr", ""),
                    kill_reason=report.get("kill_reason", "") or run.kill_reason,
                    start_error=report.get("start_error", ""),
                    lost=report.get("exitcode") is None and report.get("signal") is None
                    and not report.get("kill_reason") and not report.get("start_error"),
                ))
                changed = True
        # The queue's writes are committed in order: once a write made after them all is.
        return self.queue.committed() if changed else succeed(None)

    def leave(self, name: str, session: str) -> None:
        worker = self.session_of(name, session)
        self._lose_leases(worker, self._reactor.seconds())
        del self.workers[name]
        self._forget(name)
        log.info("worker {name} left", name=name)

    def end_worker(self, name: str, reason: str) -> bool:
        """A batch system (wmgr.slurm) says this worker's process has ended, and why: its leases
        are lost with that reason (retried or buried as their retries say) and it is forgotten.
        False when no such worker was registered."""
        worker = self.workers.pop(name, None)
        if worker is None:
            return False
        now = self._reactor.seconds()
        for run in list(worker.leases.values()):
            run.lose(now, reason)
        worker.leases.clear()
        log.info("worker {name} ended: {why}", name=name, why=reason)
        return True

    # -- operators -----------------------------------------------------------------------------

    def get(self, name: str) -> Worker:
        worker = self.workers.get(name)
        if worker is None:
            raise NotFound(f"no worker {name!r}")
        return worker

    def set_enabled(self, name: str, enabled: bool) -> Worker:
        """A disabled worker gets no new work; what it runs carries on."""
        worker = self.get(name)
        worker.enabled = enabled
        self._remember(worker)
        return worker

    # -- after a restart -----------------------------------------------------------------------

    def recovered_lease(self, job: Job) -> RemoteRun:
        """A job an earlier daemon gave to a worker (job.host), stored as running: a fresh lease
        on that worker, which counts as just seen. Its session is new and given to nobody: the
        worker registers again, holding the job, or goes offline after `timeout` and the job is
        lost."""
        now = self._reactor.seconds()
        worker = self.workers.get(job.host)
        if worker is None:
            worker = self.workers[job.host] = Worker(job.host, self._new_session(), job.host_ip, 0, 0, now, now,
                                                     id=self._new_id())
            self._remember(worker)
        if worker.connection == OFFLINE:
            worker.connection, worker.last_seen = ONLINE, now
        run = RemoteRun(worker, job, self._reactor, recovered=True)
        worker.leases[job.key] = run
        return run

    # -- liveness ------------------------------------------------------------------------------

    def check(self) -> None:
        """Workers silent for longer than the timeout go offline and lose their leases."""
        now = self._reactor.seconds()
        for worker in list(self.workers.values()):
            if worker.connection == ONLINE and now - worker.last_seen > self.timeout:
                worker.connection = OFFLINE
                silent = now - worker.last_seen
                log.info("worker {name} silent for {secs:.0f}s: offline; its {n} jobs go back to the queue",
                         name=worker.name, secs=silent, n=len(worker.leases))
                if self.bad_servers is not None:
                    self.bad_servers.report(worker.name, worker.name, worker.ip,
                                            f"worker silent for {silent:.0f}s (timeout {self.timeout:g}s)")
                self._lose_leases(worker, now)

    # -- internals -----------------------------------------------------------------------------

    def _output(self, key: str, text: str) -> None:
        for observer in self.output_observers:
            try:
                observer(key, text)
            except Exception:
                log.failure("an output observer failed for job {key}", key=key)

    def _lose_leases(self, worker: Worker, now: float) -> None:
        for run in list(worker.leases.values()):
            run.lose(now)
        worker.leases.clear()

    def _lease(self, worker: Worker, job: Job) -> RemoteRun:
        run = RemoteRun(worker, job, self._reactor)
        worker.leases[job.key] = run
        return run

    def _payload(self, job: Job, run: RemoteRun) -> dict[str, Any]:
        policy = self.queue.policy
        spec = job.spec
        max_time = memory_limit = None
        if policy.enforce_limits:
            if spec["time"] > 0:
                max_time = limit_of(spec["time"], job.expected_time) * (1 + policy.time_margin)
            if spec["memory"] > 0:
                memory_limit = limit_of(spec["memory"], job.memory) * (1 + policy.memory_margin)
        return {"key": job.key, "attempt": run.attempt, "spec": spec, "cores": job.cores, "memory": job.memory,
                "max_time": max_time, "memory_limit": memory_limit}


def _load(conn: sqlite3.Connection) -> list[tuple[str, int, str, str, int]]:
    return conn.execute("SELECT name, id, ip, system, enabled FROM workers ORDER BY id").fetchall()


def _upsert(conn: sqlite3.Connection, name: str, row: tuple[int, str, str, bool]) -> None:
    worker_id, ip, system, enabled = row
    conn.execute("INSERT INTO workers (name, id, ip, system, enabled) VALUES (?, ?, ?, ?, ?) "
                 "ON CONFLICT (name) DO UPDATE SET id = excluded.id, ip = excluded.ip, system = excluded.system, "
                 "enabled = excluded.enabled", (name, worker_id, ip, system, int(enabled)))


def _delete(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM workers WHERE name = ?", (name,))
