"""The daemon as one service tree: store, launchers, job queue, timers, HTTP listeners.

Start order matters: the store opens and the queue settles what an earlier daemon left running
before anything listens, so no client ever sees a half-loaded queue; the URL file is written last,
once the listeners are up, which is what scripts and tests wait for. Each part is a child Service
added in that order, and stopService stops them in the reverse order, each once the one after it
has stopped: listeners, timers, queue, launchers, store. Every way of stopping (SIGTERM, drain,
pman quit) stops the reactor, which runs that one path.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger

from wmgr.api.flamenco import FLAMENCO_PATHS, FlamencoAPI
from wmgr.api.openapi import ROOT_PATHS, WR_PATHS, document
from wmgr.api.connections import CONNECTIONS_PATHS, ConnectionsAPI
from wmgr.api.connections import SEGMENTS as CONNECTION_SEGMENTS
from wmgr.api.dashboard import DASHBOARD_PATHS, Dashboard
from wmgr.api.pman import PMAN_PATHS, PmanAPI
from wmgr.api.channel import BodyLimits, WmgrSite
from wmgr.api.metrics import METRICS_PATHS, MetricsAPI
from wmgr.api.qserv import QSERV_SCHEMAS
from wmgr.api.qserv_auth import QservAuth
from wmgr.api.qserv_dbs import QSERV_DBS_PATHS, QservDbsAPI
from wmgr.api.qserv_services import QSERV_SERVICES_PATHS, QservServicesAPI
from wmgr.api.root import Root, RootApp, Surface
from wmgr.api.sessions import Sessions
from wmgr.api.slurm import SLURM_PATHS, SlurmAPI
from wmgr.api.workers import WORKER_PATHS, WorkersAPI
from wmgr.api.wr import WrAPI
from wmgr.auth import TOKEN_FILE, WORKER_TOKEN_FILE, ensure_token
from wmgr.config import Config
from wmgr.connections.service import ConnectionService
from wmgr.jobs.groupcounts import CountsFeed
from wmgr.dbs import Databases, make_backend
from wmgr.jobs.launcher import LauncherPool
from wmgr.jobs.queue import JobQueue, QueuePolicy
from wmgr.servers import BadServers
from wmgr.services import ServiceManager
from wmgr.uploads import Uploads
from wmgr.jobs.scheduler import Capacity
from wmgr.metrics import GcPauses, Metrics, ReactorLag
from wmgr.store import Store
from wmgr.files import write_public
from wmgr.flamenco import Flamenco
from wmgr.host import host_address, host_name
from wmgr.tls import ServerTLS
from wmgr.workers.registry import Workers
from wmgr.turns import Turns

log = Logger()

URL_FILE = "wmgr.url"
LISTEN_BACKLOG = 1024
WORKER_IDLE_TIMEOUT = 8.0
# The plain-HTTP listener's URL, when there is one: written before URL_FILE, so a script that
# waits for URL_FILE finds it too.
HTTP_URL_FILE = "wmgr.http.url"


def guarded(name: str, body: Callable[[], Any]) -> Callable[[], Deferred[None]]:
    """A timer body that never lets an exception stop its loop (a LoopingCall stops for good on
    the first one)."""

    async def tick() -> None:
        try:
            result = body()
            if isinstance(result, (Deferred, Awaitable)):
                await result
        except Exception:
            log.failure("periodic task {name} failed; it will run again", name=name)

    return lambda: ensureDeferred(tick())


def url_host(interface: str) -> str:
    if interface in ("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"):
        return "localhost"
    return f"[{interface}]" if ":" in interface else interface


class Listener(Service):
    """A listening port as a service: stopping it stops listening."""

    def __init__(self, port: Any) -> None:
        self.port = port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return maybeDeferred(self.port.stopListening)


# The collector's thresholds for a daemon (Python's: 700, 10, 10). A young collection once
# 10,000 more objects are tracked, not 700: what a request or a job's start makes in flight has
# mostly gone by then (freed, or a cycle collected young) instead of being promoted, and each
# young collection stays short (a few ms). A full collection only after 50 collections of the
# middle generation, not 10 (and, as always, once the old generation has grown by a quarter).
GC_THRESHOLDS = (10_000, 10, 50)


def settle_heap() -> int:
    """Collect once, take everything that exists out of later collections (gc.freeze), and set
    the daemon's thresholds (GC_THRESHOLDS); the number of objects frozen.

    Why: every thread stops while a collection runs, and a request that arrives meanwhile waits
    in its socket. A full collection walks every object the collector tracks: a started daemon
    holds some hundreds of thousands (its modules, Twisted, TLS, the loaded queue) that live as
    long as it does, and with Python's thresholds a manager with a thousand workers ran several
    full collections a second while jobs flowed, each 50-200 ms: the heartbeats' tail (issue 11).
    After this, collections walk only what came later, and full ones are rare."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return gc.get_freeze_count()


class WmgrService(MultiService):
    def __init__(self, config: Config, reactor: Any, settle: bool = False) -> None:
        """`settle`: once started, settle_heap() (the daemon process; not a test's)."""
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._settle = settle
        self.port = 0
        self.http_port: Optional[int] = None
        self.url = ""
        self.store: Optional[Store] = None
        self.queue: Optional[JobQueue] = None
        self.launcher: Optional[LauncherPool] = None
        self.workers: Optional[Workers] = None
        self.agent: Any = None
        self.slurm: Any = None  # wmgr.slurm's runners, with [scheduler] backend = slurm
        self._started: Optional[Deferred[None]] = None
        self.dashboard: Optional[Dashboard] = None
        self.start_failure: Optional[Any] = None  # the Failure that stopped the start (tap.py exits 1)
        # Hosts that stopped answering; the worker role reports them here.
        self.bad_servers = BadServers(reactor)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def startService(self) -> None:
        super().startService()
        self._started = ensureDeferred(self._start())
        self._started.addErrback(self._failed_to_start)

    def _failed_to_start(self, failure: Any) -> None:
        log.failure("wmgr could not start", failure)
        self.start_failure = failure
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    async def _start(self) -> None:
        config = self.config
        first_start = not (self.data_dir / TOKEN_FILE).exists()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        token = ensure_token(self.data_dir)
        worker_token = ensure_token(self.data_dir, WORKER_TOKEN_FILE)
        self.tls = ServerTLS(self.data_dir, config.tls_names)

        slurm_commands = self._slurm_commands()  # before anything starts: no Slurm, no start
        self.store = Store(self.data_dir / "wmgr.db", self._reactor)
        self.store.setServiceParent(self)
        capacity = Capacity.detect(config.max_cores, config.max_memory, config.zero_core_slots)
        self.launcher = LauncherPool(self._reactor, config.launchers or os.cpu_count() or 1)
        self.launcher.setServiceParent(self)
        self.queue = JobQueue(self.store, self.data_dir / "run", self._reactor, capacity,
                              QueuePolicy.from_config(config, run_local=config.run_local and slurm_commands is None),
                              spawn=self.launcher.spawn)
        self.queue.on_drained = self._drained
        # The workers first: the queue's recovery gives the jobs workers ran back to them.
        self.workers = Workers(self.queue, self._reactor, config.workers_timeout, config.worker_heartbeat,
                               self.bad_servers, store=self.store)
        await self.workers.load()
        self.queue.setServiceParent(self)
        await self.queue.ready
        self.workers.setServiceParent(self)
        self.flamenco = Flamenco(self.queue, self.workers, self.store)
        self.flamenco.setServiceParent(self)
        await self.flamenco.ready

        self._add_timer(config.sample_interval, "sample running jobs", self.queue.sample)
        self._add_timer(config.renew_check_interval, "renew the server certificate", self.tls.renew_if_due)
        self._add_timer(config.prune_interval, "prune the job history", self.queue.prune)
        self._add_timer(config.workers_check_interval, "check workers' liveness", self.workers.check)
        if config.manager_url:
            await self._become_worker()

        if slurm_commands is not None:
            self._make_slurm(slurm_commands, worker_token)
        uploads = Uploads(self.data_dir / "uploads", config.upload_roots)
        openapi = document([WR_PATHS, PMAN_PATHS, WORKER_PATHS, FLAMENCO_PATHS, CONNECTIONS_PATHS, QSERV_SERVICES_PATHS,
                            QSERV_DBS_PATHS, DASHBOARD_PATHS, ROOT_PATHS, METRICS_PATHS]
                           + ([SLURM_PATHS] if self.slurm is not None else []), [QSERV_SCHEMAS])
        self.metrics = Metrics(openapi["paths"])
        GcPauses(self.metrics.registry).setServiceParent(self)
        ReactorLag(self.metrics.registry, self._reactor).setServiceParent(self)
        self.metrics.watch(self.queue, self.launcher, self.store)
        self.metrics.watch_workers(self.workers)
        # One queue of bulk work for the whole daemon (pulls, reports, big adds), each piece in
        # reactor turns of its own, so that no request waits for all of it (wmgr/turns.py).
        turns = Turns(self._reactor)
        surfaces = [(("rest",), WrAPI(self.queue, self.info, uploads, self.bad_servers, turns).resource()),
                    (("api",), PmanAPI(self.queue, self._reactor, config.pman_allow_quit,
                                       shutdown=self.shutdown).resource()),
                    # Quiet: a line per heartbeat, pull and report cost a fifth of each request's
                    # CPU with many workers (failures are still logged; timings are in /metrics).
                    Surface(("worker",), WorkersAPI(self.workers, turns).resource(), quiet=True),
                    (("workers", "tasks"), FlamencoAPI(self.flamenco, self.workers).resource()),
                    Surface(("metrics",), MetricsAPI(self.metrics, config.metrics_open).resource(), own_auth=True)]
        if self.slurm is not None:
            surfaces.append((("slurm",), SlurmAPI(self.slurm).resource()))
            self.metrics.watch_slurm(self.slurm)
        connections = ConnectionService(self.store, self._reactor, config.connections_ttl, config.connections_match)
        await connections.load()
        connections.setServiceParent(self)
        self.metrics.watch_connections(connections)
        surfaces.append(Surface(CONNECTION_SEGMENTS, ConnectionsAPI(
            connections, config.connections_open, config.connections_max_body, config.connections_max_regex,
        ).resource(), own_auth=True, quiet=True, open=config.connections_open))
        if config.connections_open:
            log.warn("[connections] open = true: the connection registry's routes answer without a token")
        # The Qserv worker manager: its routes take the token or Basic/Digest (self.qserv_auth
        # guards every Qserv surface, so a digest nonce is good on all of them).
        self.qserv_auth = QservAuth.from_config(config, self._reactor)
        self.service_manager = ServiceManager(
            config.services.values(), self._reactor, self.data_dir / "services",
            script_timeout=config.services_script_timeout, kill_grace=config.services_kill_grace,
            restart_min_delay=config.services_restart_min_delay, restart_max_delay=config.services_restart_max_delay)
        self.service_manager.setServiceParent(self)
        self.metrics.watch_services(self.service_manager)
        services_api = QservServicesAPI(self.service_manager).resource()
        surfaces.append(Surface(("services",), self.qserv_auth.protect(services_api), own_auth=True))
        # The Qserv databases (/dbs, /xrootd) on SQLite or MySQL, behind the same guard.
        backend = make_backend(config.dbs_backend, self.data_dir, config.dbs_url, config.dbs_xrootd_db)
        self.databases = Databases(backend, self._reactor, restart_if_running=self.service_manager.restart_if_running,
                                   proxy_url=config.dbs_proxy_url or None)
        self.databases.setServiceParent(self)
        surfaces.append(Surface(("dbs", "xrootd"), self.qserv_auth.protect(QservDbsAPI(self.databases).resource()),
                                own_auth=True))
        sessions = Sessions(self._reactor)
        # A service, before the listeners: stopped right after them, it ends the open event streams.
        self.dashboard = Dashboard(token, sessions, CountsFeed(self.store, self._reactor, self.queue.notices.peek),
                                   self._reactor)
        self.dashboard.setServiceParent(self)
        surfaces.append(Surface(("ui",), self.dashboard.resource(), own_auth=True))
        fallback = RootApp(openapi).app.resource()
        site = WmgrSite(Root(token, surfaces, fallback, sessions, segment_tokens={"worker": worker_token}),
                        BodyLimits(config.body_limits),
                        config.header_timeout, observe=self.metrics.observe_request, reactor=self._reactor)

        # A manager with many workers takes many connections at once; with Twisted's default
        # backlog (50) the kernel drops SYNs beyond it and each client waits a 1 s retransmit.
        self.port = await self._listen(SSL4ServerEndpoint(self._reactor, config.port, self.tls, backlog=LISTEN_BACKLOG,
                                                          interface=config.interface), site)
        if config.http_port is not None:
            plain = TCP6ServerEndpoint if ":" in config.interface else TCP4ServerEndpoint
            self.http_port = await self._listen(plain(self._reactor, config.http_port, backlog=LISTEN_BACKLOG,
                                                      interface=config.interface), site)

        self.url = f"https://{url_host(config.interface)}:{self.port}/"
        if self.http_port is not None:
            http_url = f"http://{url_host(config.interface)}:{self.http_port}/"
            write_public(self.data_dir / HTTP_URL_FILE, http_url.encode() + b"\n")
        if self.slurm is not None:
            self._watch_slurm()
        write_public(self.data_dir / URL_FILE, self.url.encode() + b"\n")
        self._announce(first_start)
        if self._settle:
            log.info("start-up's {n} objects are out of the garbage collector's way", n=settle_heap())

    def _slurm_commands(self) -> Any:
        """With [scheduler] backend = slurm: Slurm's commands, each found, or the start fails."""
        if self.config.scheduler_backend != "slurm":
            return None
        from wmgr.slurm.commands import SlurmCommands

        c = self.config
        commands = SlurmCommands(self._reactor, c.slurm_sbatch, c.slurm_squeue, c.slurm_scontrol, c.slurm_scancel)
        commands.check()
        return commands

    def _make_slurm(self, commands: Any, worker_token: str) -> None:
        """Runners submitted to Slurm run the queue (wmgr.slurm); see _watch_slurm."""
        import sys

        from wmgr.slurm.service import SlurmRunners, SlurmSettings, manager_id

        c = self.config
        assert self.queue is not None and self.workers is not None
        ca_pem = (self.data_dir / "ca.pem").read_bytes()
        settings = SlurmSettings(
            partition=c.slurm_partition, account=c.slurm_account, qos=c.slurm_qos, extra_args=c.slurm_extra_args,
            max_runners=c.slurm_max_runners, max_cpus=c.slurm_max_cpus, pack=c.slurm_pack, idle_exit=c.slurm_idle_exit,
            poll_interval=c.slurm_poll_interval, min_time=c.slurm_min_time, runner_memory=c.slurm_runner_memory,
            memory_margin=c.slurm_memory_margin, time_margin=c.slurm_time_margin,
            backoff_base=c.slurm_backoff_base, backoff_cap=c.slurm_backoff_cap, python=c.slurm_python or sys.executable,
            manager_url=c.slurm_manager_url, output=c.slurm_output, heartbeat=c.slurm_heartbeat)
        self.slurm = SlurmRunners(self._reactor, self.queue, self.workers, commands, settings, manager_id(ca_pem),
                                  ca_pem.decode(), worker_token, self.bad_servers)
        self.slurm.setServiceParent(self)

    def _watch_slurm(self) -> None:
        """Once listening (the runners need the port): watch the runners, submit more."""
        assert self.slurm is not None
        settings = self.slurm.settings
        if not settings.manager_url:
            # Nodes reach a manager on a loopback interface only on this host (a one-node cluster).
            local = self.config.interface in ("127.0.0.1", "::1", "localhost")
            settings.manager_url = self.url if local else f"https://{socket.gethostname()}:{self.port}/"
        self._add_timer(settings.poll_interval, "watch Slurm runners and submit more", self.slurm.poll)
        log.info("[scheduler] backend = slurm: runners ({name}) reach this manager at {url}",
                 name=self.slurm.job_name, url=settings.manager_url)

    async def _become_worker(self) -> None:
        """The worker role: an agent that pulls the manager's jobs and runs them here."""
        from wmgr.client import Client
        from wmgr.workers.agent import WorkerAgent
        from wmgr.workers.outbox import Outbox

        config = self.config
        assert self.store is not None and self.launcher is not None
        ca = Path(config.manager_ca).expanduser().read_bytes() if config.manager_ca else None
        manager_token = Path(config.manager_token_file).expanduser().read_text().strip()
        # The manager closes a kept-alive connection idle for its [http] header_timeout (10 s by
        # default): ours are let go sooner, and a heartbeat every few seconds keeps one open.
        client = Client(self._reactor, config.manager_url, ca, manager_token, idle_timeout=WORKER_IDLE_TIMEOUT)
        self.agent = WorkerAgent(
            self._reactor, client, config.worker_name or host_name(), host_address(),
            Capacity.detect(config.worker_cores, config.worker_memory), Outbox(self.store),
            self.data_dir / "worker-run", self.launcher.spawn, heartbeat=config.worker_heartbeat,
            output_limit=config.output_limit, kill_grace=config.kill_grace)
        self.agent.setServiceParent(self)
        await self.agent.ready
        self._add_timer(config.sample_interval, "sample pulled jobs", self.agent.sample)

    async def _listen(self, endpoint: Any, site: Any) -> int:
        port = await endpoint.listen(site)
        Listener(port).setServiceParent(self)
        return port.getHost().port

    def _add_timer(self, interval: float, name: str, body: Callable[[], Any]) -> None:
        timer = TimerService(interval, guarded(name, body))
        timer.clock = self._reactor
        timer.setServiceParent(self)

    def _announce(self, first_start: bool) -> None:
        ca, token = self.data_dir / "ca.pem", self.data_dir / TOKEN_FILE
        log.info(
            "wmgr {state} on {url} (data in {data_dir}); CA certificate: {ca}; token file: {token}",
            state="started for the first time" if first_start else "started",
            url=self.url, data_dir=str(self.data_dir), ca=str(ca), token=str(token),
        )
        log.info(
            "try it: curl --cacert {ca} -H \"Authorization: Bearer $(cat {token})\" {url}rest/v1/info/",
            ca=str(ca), token=str(token), url=self.url,
        )
        if self.http_port is not None:
            log.info("plain HTTP (token required) on http://{host}:{port}/",
                     host=url_host(self.config.interface), port=self.http_port)

    def shutdown(self, why: str) -> None:
        """Stop the daemon: the reactor stops, and twistd stops this service tree (stopService),
        as it does on SIGTERM."""
        log.info("stopping: {why}", why=why)
        self._reactor.callLater(0, self._reactor.stop)

    def _drained(self) -> None:
        self.shutdown("drained: no job is running any more")

    def info(self) -> dict[str, Any]:
        assert self.queue is not None
        return {
            "Addr": f"{url_host(self.config.interface)}:{self.port}",
            "Host": host_name(),
            "Port": str(self.port),
            "WebPort": str(self.port),
            "PID": os.getpid(),
            "Deployment": self.config.deployment,
            "Scheduler": self.config.scheduler_backend,
            "Mode": self.queue.mode,
        }

    async def _stop(self) -> None:
        Service.stopService(self)
        for service in reversed(list(self)):
            if service.running:
                await maybeDeferred(service.stopService)
        for name in (URL_FILE, HTTP_URL_FILE):
            try:
                (self.data_dir / name).unlink()
            except FileNotFoundError:
                pass
        log.info("wmgr stopped; every write is committed")
        # twistd ends the process by re-raising the signal that stopped the reactor, which makes a
        # SIGTERM exit with status -15. SIGTERM is how wmgr is meant to be stopped, and a clean
        # stop exits 0; other signals keep their meaning.
        if getattr(self._reactor, "_exitSignal", None) == signal.SIGTERM:
            self._reactor._exitSignal = None

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())
