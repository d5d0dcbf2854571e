"""Metrics for operators, in Prometheus' text format, through prometheus_client.

Each daemon has its own registry (never the process-global one: two daemons in one process, or a
test after another, must not share or collide). What the domain already counts is read at scrape
time by custom collectors from the domain's plain hooks, so nothing on the hot paths calls into
prometheus_client:

- JobQueue.state_counts() -> {state: jobs}, kept by the queue as jobs move (not a scan);
- JobQueue.counters.started / .completed / .failed, runs since the daemon started;
- JobQueue.usage() -> running, cores_used, cores_total, memory_used_mb, memory_total_mb;
- LauncherPool.restarts, launcher processes started again after one ended;
- Store.commit_observers, called on the reactor thread with each batch commit's seconds;
- Workers.counts() -> online, offline, leases (the manager's side of the worker protocol);
- SlurmRunners.counts() -> {Slurm state: runners}, .submitted, .submit_failures, .runner_failures;
- gc.callbacks: each garbage collection's pause (GcPauses, a service of the daemon's);
- a timer of its own, due ten times a second: how late the reactor runs it (ReactorLag, a service).

HTTP requests are counted by route TEMPLATE (the OpenAPI path, such as /rest/v1/jobs/{ids}), never
by raw path, so the number of series stays bounded whatever clients ask for.
"""

from __future__ import annotations

import gc
import re
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
MB = 1024 * 1024

# Seconds: from a cached GET (sub-millisecond) to a 100,000-job add (seconds).
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PATH_CACHE_SIZE = 4096  # request paths whose route template is remembered

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ReactorLag(Service):
    """How late the reactor runs a timer due every `interval` seconds: the time any event (a
    request's bytes, a process's exit) may wait before the reactor gets to it, whatever the
    cause (a long callback, a garbage collection, a blocking call, no CPU to run on)."""

    def __init__(self, registry: CollectorRegistry, reactor: Any, interval: float = 0.1) -> None:
        self.histogram = Histogram("wmgr_reactor_lag_seconds",
                                   f"Seconds the reactor ran a timer late (one due every {interval:g} s)",
                                   buckets=LAG_BUCKETS, registry=registry)
        self._reactor = reactor
        self.interval = interval
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> Any:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return super().stopService()

    def _schedule(self) -> None:
        due = self._reactor.seconds() + self.interval
        self._call = self._reactor.callLater(self.interval, self._tick, due)

    def _tick(self, due: float) -> None:
        self.histogram.observe(max(0.0, self._reactor.seconds() - due))
        self._schedule()


class GcPauses(Service):
    """The garbage collector's pauses, by generation, from gc.callbacks.

    Every thread waits while a collection runs, and a request that arrives meanwhile waits in its
    socket: a tail of latency that the request timings (headers to answer) never show. A service
    so that the callback goes when the daemon stops (gc.callbacks is the process's)."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.perf_counter) -> None:
        self.histogram = Histogram("wmgr_gc_pause_seconds", "Seconds each garbage collection took, by generation",
                                   ["generation"], buckets=GC_BUCKETS, registry=registry)
        self._by_generation = [self.histogram.labels(str(generation)) for generation in range(3)]
        self._clock = clock
        self._began: Optional[float] = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = self._clock()
        elif self._began is not None:
            self._by_generation[info["generation"]].observe(self._clock() - self._began)
            self._began = None

    def startService(self) -> None:
        super().startService()
        gc.callbacks.append(self)

    def stopService(self) -> Any:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        return super().stopService()


class RouteTemplates:
    """Matches a request path to the OpenAPI path template that serves it."""

    def __init__(self, templates: Iterable[str]) -> None:
        patterns = []
        for template in templates:
            parts = [part for part in template.strip("/").split("/") if part]
            regex = []
            for index, part in enumerate(parts):
                if re.fullmatch(r"\{[^}]+\}", part):
                    # The last parameter of a template may span segments (Klein's <path:...>).
                    regex.append(".+" if index == len(parts) - 1 else "[^/]+")
                else:
                    regex.append(re.escape(part))
            literals = sum(1 for part in parts if not part.startswith("{"))
            patterns.append((literals, len(parts), re.compile("^/" + "/".join(regex) + "/?$"), template))
        # Most literal segments first: /rest/v1/jobs/{ids}/retry before /rest/v1/jobs/{ids}.
        patterns.sort(key=lambda item: (-item[0], -item[1]))
        self._patterns = [(regex, template) for _, _, regex, template in patterns]
        # path -> template: most requests repeat a few paths (a DAQ application publishes every
        # 2 s), and a match walks up to every template's regex. Bounded, as clients pick paths.
        self._known: dict[str, str] = {}

    def match(self, path: str) -> str:
        template = self._known.get(path)
        if template is None:
            template = self._match(path)
            if len(self._known) >= PATH_CACHE_SIZE:
                self._known.clear()
            self._known[path] = template
        return template

    def _match(self, path: str) -> str:
        for regex, template in self._patterns:
            if regex.match(path):
                return template
        return UNMATCHED


class JobCollector:
    """Jobs by state, runs started/completed/failed, runner slots and launcher restarts, read from
    the domain's hooks when scraped."""

    def __init__(self, queue: Any, launcher: Any) -> None:
        self.queue = queue
        self.launcher = launcher

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("wmgr_jobs", "Jobs in the queue by state", labels=["state"])
        for state, count in sorted(self.queue.state_counts().items()):
            states.add_metric([state], count)
        yield states
        counters = self.queue.counters
        for name, what in (("started", "Job runs started"), ("completed", "Job runs that completed"),
                           ("failed", "Job runs that failed (retried or buried)")):
            yield CounterMetricFamily(f"wmgr_jobs_{name}", f"{what} since the daemon started",
                                      value=getattr(counters, name))
        usage = self.queue.usage()
        yield GaugeMetricFamily("wmgr_runner_slots_used", "Jobs running now", value=usage["running"])
        yield GaugeMetricFamily("wmgr_runner_cores_used", "Cores reserved by running jobs", value=usage["cores_used"])
        yield GaugeMetricFamily("wmgr_runner_cores", "Cores offered to jobs", value=usage["cores_total"])
        yield GaugeMetricFamily("wmgr_runner_memory_used_bytes", "Memory reserved by running jobs",
                                value=usage["memory_used_mb"] * MB)
        yield GaugeMetricFamily("wmgr_runner_memory_bytes", "Memory offered to jobs", value=usage["memory_total_mb"] * MB)
        yield CounterMetricFamily("wmgr_launcher_restarts", "Launcher processes started again after one ended",
                                  value=self.launcher.restarts)


class ConnectionCollector:
    """The connection registry: live entries per partition, publications and lookups."""

    def __init__(self, connections: Any) -> None:
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily("wmgr_connections", "Live entries of the connection registry, by partition",
                                    labels=["partition"])
        for partition in self.connections.partitions():
            entries.add_metric([partition["partition"]], partition["entries"])
        yield entries
        stats = self.connections.stats
        yield CounterMetricFamily("wmgr_connections_publishes", "Connections published since the statistics were reset",
                                  value=stats.publishes)
        yield CounterMetricFamily("wmgr_connections_lookups", "Connection lookups since the statistics were reset",
                                  value=stats.lookups)


class ServiceCollector:
    """The services wmgr supervises itself ([service:NAME] with a command): up or not, restarts."""

    def __init__(self, services: Any) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("wmgr_service_up", "1 if a supervised service's process runs, else 0", labels=["name"])
        restarts = CounterMetricFamily("wmgr_service_restarts", "Times a supervised service was started again",
                                       labels=["name"])
        for state in self.services.supervised_states():
            up.add_metric([state.name], 1 if state.state == "active" else 0)
            restarts.add_metric([state.name], state.restarts or 0)
        yield up
        yield restarts


class WorkerCollector:
    """The manager's workers: online and offline, and the jobs they hold under a lease."""

    def __init__(self, workers: Any) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        counts = self.workers.counts()
        workers = GaugeMetricFamily("wmgr_workers", "Workers known to this manager, by connection",
                                    labels=["connection"])
        for connection in ("online", "offline"):
            workers.add_metric([connection], counts[connection])
        yield workers
        yield GaugeMetricFamily("wmgr_worker_leases", "Jobs handed to workers and not yet ended", value=counts["leases"])


class SlurmCollector:
    """The Slurm runners (wmgr.slurm): by state, and submissions and failures since the start."""

    def __init__(self, runners: Any) -> None:
        self.runners = runners

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("wmgr_slurm_runners", "This manager's Slurm runners, by Slurm job state",
                                     labels=["state"])
        for state, count in sorted(self.runners.counts().items()):
            by_state.add_metric([state], count)
        yield by_state
        yield CounterMetricFamily("wmgr_slurm_runners_submitted", "Runners submitted with sbatch",
                                  value=self.runners.submitted)
        yield CounterMetricFamily("wmgr_slurm_submit_failures", "sbatch calls that failed",
                                  value=self.runners.submit_failures)
        yield CounterMetricFamily("wmgr_slurm_runner_failures",
                                  "Runners whose Slurm job ended in failure (cancelled, timed out, out of memory...)",
                                  value=self.runners.runner_failures)
        yield GaugeMetricFamily("wmgr_slurm_held_seconds", "Seconds before the back-off lets a runner be submitted",
                                value=self.runners.held_for())


class Metrics:
    """One daemon's registry, its HTTP and store metrics, and the job collector."""

    def __init__(self, route_templates: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self.routes = RouteTemplates(route_templates)
        self.requests = Counter("wmgr_http_requests", "HTTP requests answered, by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("wmgr_http_request_duration_seconds",
                                 "Seconds from a request's headers to its answer, by route template",
                                 ["method", "route"], buckets=HTTP_BUCKETS, registry=self.registry)
        self.store_commits = Histogram("wmgr_store_commit_duration_seconds", "Seconds each batch commit of the store took",
                                       buckets=COMMIT_BUCKETS, registry=self.registry)
        self._children: dict[tuple[str, str, Optional[int]], tuple[Any, Any]] = {}

    def watch(self, queue: Any, launcher: Any, store: Any) -> None:
        self.registry.register(JobCollector(queue, launcher))
        store.commit_observers.append(self.store_commits.observe)

    def watch_workers(self, workers: Any) -> None:
        self.registry.register(WorkerCollector(workers))

    def watch_slurm(self, runners: Any) -> None:
        self.registry.register(SlurmCollector(runners))

    def watch_connections(self, connections: Any) -> None:
        self.registry.register(ConnectionCollector(connections))

    def watch_services(self, services: Any) -> None:
        self.registry.register(ServiceCollector(services))

    def observe_request(self, method: bytes, path: bytes, status: Optional[int], seconds: float) -> None:
        name = method.decode("ascii", "replace")
        name = name if name in METHODS else "other"
        route = self.routes.match(path.decode("utf-8", "replace"))
        key = (name, route, status)
        children = self._children.get(key)
        if children is None:
            # labels() takes a lock and builds its key each time: the children are kept instead
            # (as many as the series: methods outside METHODS are "other", routes are templates).
            children = self._children[key] = (self.requests.labels(name, route, str(status or 0)),
                                              self.latency.labels(name, route))
        children[0].inc()
        children[1].observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
