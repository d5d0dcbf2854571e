"""Workers: many simulated workers heartbeating and pulling batches from one manager.

Full size: 1,000 simulated workers in this one process (one kept-alive HTTPS connection each,
HTTP/1.1 written and parsed by hand: treq's Agent cost several times as much per request and
made the simulator, not the manager, the bottleneck; no real jobs), each registering, then
heartbeating every 5 s (staggered) and pulling when it has room, as the agent does; 10,000
trivial jobs are handed out and taken back (each batch is "run" at once: start and end reported
in one request). `--smoke`: 50 workers, 500 jobs.

Measured:
1. heartbeat latency, p50/p99 while idle and during each jobs phase (target p99 < 50 ms): as the
   worker saw it (from the moment its request was handed to the TLS transport to the last byte
   of the reply parsed), and as the manager timed it (request headers to reply: the
   wmgr_http_request_duration_seconds histogram of its /metrics, read between phases), against
   the latency of the cheapest route (GET /rest/version/) sent by the same process at the same
   time (baseline: what any request costs under this load), with this process's reactor lag
   (a reply that arrives while it is busy waits to be read), and for each phase the manager's
   garbage collections and how late its reactor ran a timer (its /metrics:
   wmgr_gc_pause_seconds, wmgr_reactor_lag_seconds). The simulator is the instrument: each
   heartbeat on its own schedule (as workers on hosts of their own), its collector off once the
   workers have registered, each phase's jobs added by another process;
2. jobs handed out and taken back per second, at the agents' cadence (idle workers pull once per
   heartbeat; workers that got jobs pull again as soon as they have reported them), target
   >= 1,000 jobs/s;
3. where it tops out: the same with every worker pulling at once when the jobs are added (then
   again as soon as it has reported), with the manager's reactor CPU and this process's CPU over
   that phase (whichever is saturated is the limit), and how long the manager's reactor was
   runnable but waiting for a CPU (schedstat: other work on a shared machine);
4. paced (`--paced`, default 1,200 jobs/s): the farm's pulls spaced so that it takes jobs at
   that rate, as a farm of jobs that take time does; the heartbeat p99 while jobs flow at
   >= 1,000 jobs/s without the manager being driven to its limit;
5. baseline for the rate: the same number of trivial jobs (`true`) through a manager's own local
   launchers, measured in the same run.

The machine may be shared with other work (the load average is printed): compare the ratios,
not the absolute figures.
"""

from __future__ import annotations

import gc
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from typing import Optional  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from common import daemon, machine, run_main, thread_cpu  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.internet.ssl import Certificate, optionsForClientTLS  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402

from wmgr.client import Client  # noqa: E402

MANAGER_CONFIG = "[workers]\nrun_local = false\ntimeout = 60\n"
HEARTBEAT = 5.0
SLOTS = 16  # zero-core slots each simulated worker offers


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


class Wire(Protocol):
    """One simulated worker's kept-alive HTTPS connection, its HTTP/1.1 written and parsed by
    hand: one request at a time, replies with a Content-Length or chunked. treq's Agent costs
    several times as much per request, and a simulator out of CPU measures its own backlog.

    A request's time is taken when its bytes are handed to the TLS transport and when the last
    byte of its reply has been parsed: what the worker waited for, its own queueing before it
    sent excluded."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: Optional[Deferred[tuple[int, bytes, float]]] = None
        self.sent = 0.0
        self.open = False

    def connectionMade(self) -> None:
        self.open = True

    def connectionLost(self, reason: Any = None) -> None:
        self.open = False
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.errback(reason)

    def request(self, data: bytes) -> Deferred[tuple[int, bytes, float]]:
        assert self.waiting is None, "one request at a time"
        self.waiting = Deferred()
        self.sent = time.perf_counter()
        self.transport.write(data)
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting is None:
            return
        parsed = parse_reply(self.buffer)
        if parsed is None:
            return
        code, body, self.buffer = parsed
        waiting, self.waiting = self.waiting, None
        waiting.callback((code, body, time.perf_counter() - self.sent))


def parse_reply(buffer: bytes) -> Optional[tuple[int, bytes, bytes]]:
    """(status, body, what follows) of one complete HTTP/1.1 reply at the start of buffer, or
    None while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].lower()
    code = int(head[9:12])
    rest = end + 4
    length = re.search(rb"\r\ncontent-length: *(\d+)", head)
    if length is not None:
        size = int(length.group(1))
        if len(buffer) < rest + size:
            return None
        return code, buffer[rest:rest + size], buffer[rest + size:]
    if b"transfer-encoding: chunked" not in head:
        raise ValueError(f"a reply with neither a length nor chunks: {head!r}")
    body = []
    while True:
        line_end = buffer.find(b"\r\n", rest)
        if line_end < 0:
            return None
        size = int(buffer[rest:line_end].split(b";")[0], 16)
        if len(buffer) < line_end + 2 + size + 2:
            return None
        body.append(buffer[line_end + 2:line_end + 2 + size])
        rest = line_end + 2 + size + 2
        if size == 0:
            return code, b"".join(body), buffer[rest:]


class Farm:
    """The simulated workers and what they measured."""

    def __init__(self, reactor: Any, url: str, ca: bytes, token: str, n: int) -> None:
        self.reactor = reactor
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 443
        tls = optionsForClientTLS(host, trustRoot=Certificate.loadPEM(ca))
        self.endpoint = wrapClientTLS(tls, TCP4ClientEndpoint(reactor, host, port))
        self.host_header = f"Host: {host}:{port}\r\n".encode()
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.wires: dict[str, Wire] = {}
        self.n = n
        self.sessions: dict[str, str] = {}
        self.phase = "warm-up"  # the first heartbeats open each worker's connection (TLS handshakes)
        self.beats: dict[str, list[float]] = {}
        self.baseline: dict[str, list[float]] = {}
        self.lags: list[float] = []
        self.done_jobs = 0
        self.kick = False
        self.stopping = False
        self.pulling: dict[str, bool] = {}
        self.errors = 0
        self.rate = 0.0  # jobs/s the farm as a whole takes, when paced (0: as fast as it can)
        self.next_pull = 0.0
        self.gc_pauses: dict[str, list[float]] = {}  # this process's collections, by phase
        self.manager_peak_rss = 0  # kB, read at the end
        self._gc_began = 0.0

    def gc_probe(self, phase: str, info: dict[str, int]) -> None:
        """gc.callbacks: a collection here stops every simulated worker (its replies wait)."""
        if phase == "start":
            self._gc_began = time.perf_counter()
        else:
            self.gc_pauses.setdefault(self.phase, []).append(time.perf_counter() - self._gc_began)

    async def wire(self, name: str) -> Wire:
        wire = self.wires.get(name)
        if wire is None or not wire.open:
            wire = self.wires[name] = await connectProtocol(self.endpoint, Wire())
        return wire

    async def send(self, name: str, method: str, path: str, body: Optional[bytes] = None,
                   token: bytes = b"") -> tuple[int, bytes, float]:
        head = (f"{method} /{path} HTTP/1.1\r\n".encode() + self.host_header + (token or self.auth)
                + (b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) if body is not None
                   else b"") + b"\r\n")
        wire = await self.wire(name)
        return await wire.request(head + (body or b""))

    async def post(self, wire: str, route: str, body: dict[str, Any]) -> tuple[Any, float]:
        code, reply, seconds = await self.send(wire, "POST", "worker/v1/" + route, json.dumps(body).encode())
        if code != 200:
            self.errors += 1
            raise RuntimeError(f"{route}: {code} {reply[:200]!r}")
        return json.loads(reply), seconds

    async def register(self, name: str) -> None:
        answer, _ = await self.post(name, "register", {"name": name, "ip": "127.0.0.1", "cores": 0,
                                                       "memory": 100000})
        self.sessions[name] = answer["session"]

    async def pull_and_run(self, name: str) -> None:
        """Pull a batch; "run" it at once (start and end in one report); again while it gets
        work. One loop per worker at a time."""
        if self.pulling.get(name):
            return
        self.pulling[name] = True
        try:
            while not self.stopping:
                await self.paced()
                body = {"name": name, "session": self.sessions[name], "cores": 0, "memory": 100000, "slots": SLOTS}
                jobs = (await self.post(name, "pull", body))[0]["jobs"]
                if jobs:
                    now = time.time()
                    reports = []
                    for job in jobs:
                        reports.append({"key": job["key"], "attempt": job["attempt"], "event": "start", "pid": 1,
                                        "started": now})
                        reports.append({"key": job["key"], "attempt": job["attempt"], "event": "end", "exitcode": 0,
                                        "started": now, "ended": now})
                    await self.post(name, "reports", {"name": name, "reports": reports})
                    self.done_jobs += len(jobs)
                    continue
                return
        finally:
            self.pulling[name] = False

    async def paced(self) -> None:
        """When paced, the farm's pulls start one every SLOTS / rate seconds (as jobs that take
        time would free slots at that rate): the flow is what a farm of real jobs asks for, not
        the most the manager can give."""
        if not self.rate:
            return
        now = time.perf_counter()
        self.next_pull = max(now, self.next_pull + SLOTS / self.rate)
        if self.next_pull > now:
            await deferLater(self.reactor, self.next_pull - now, lambda: None)

    async def live(self, name: str) -> None:
        """Heartbeat every HEARTBEAT seconds (first one at a random offset), on a connection of
        its own, whatever the worker's pulls and reports are doing (as the agent's heartbeat is
        due every HEARTBEAT seconds); after a heartbeat that says work is ready, start pulling
        if it is not already."""
        # On a schedule of its own (an offset, then every HEARTBEAT), as an agent's LoopingCall
        # keeps it: timed from the last send instead, every heartbeat that a stall of this one
        # process held up would be sent together from then on, a burst that real workers, each on
        # a host of its own, never make.
        due = time.perf_counter() + random.uniform(0, HEARTBEAT)
        while not self.stopping:
            await deferLater(self.reactor, max(0.0, due - time.perf_counter()), lambda: None)
            now = time.perf_counter()
            due += HEARTBEAT * max(1, int((now - due) // HEARTBEAT) + 1)  # a missed beat is skipped
            try:
                answer, seconds = await self.post(name + "/beat", "heartbeat", {
                    "name": name, "session": self.sessions[name], "running": [],
                    "figures": {"load_average": {"1min": 0.1}}})
                self.beats.setdefault(self.phase, []).append(seconds)
                if answer.get("ready", 1) and not self.pulling.get(name):
                    ensureDeferred(self.pull_and_run(name)).addErrback(lambda f: None)
            except Exception:
                pass

    async def lag(self) -> None:
        """How late this process's own reactor runs a 50 ms timer: a reply that arrives while it
        is busy waits that long to be read, and counts in the latencies measured here."""
        while not self.stopping:
            planned = time.perf_counter() + 0.05
            await deferLater(self.reactor, 0.05, lambda: None)
            self.lags.append(time.perf_counter() - planned)

    async def probe(self, token: bytes) -> None:
        """The baseline request, a few times a second, alongside the workers, on its own
        connection."""
        while not self.stopping:
            try:
                _, _, seconds = await self.send("probe", "GET", "rest/version/", token=token)
                self.baseline.setdefault(self.phase, []).append(seconds)
            except Exception:
                self.errors += 1
            await deferLater(self.reactor, 0.2, lambda: None)


def bucket_percentile(total: int, buckets: dict[float, int], p: float) -> float:
    """The smallest bucket bound within which a fraction p of the requests were answered."""
    for bound in sorted(buckets):
        if buckets[bound] >= p * total:
            return bound
    return float("inf")


async def wait_until(reactor: Any, check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.05, lambda: None)
    return True


def peak_rss(pid: int) -> int:
    """A process's peak resident set (VmHWM), in kB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_queue_wait(pid: int) -> tuple[float, float]:
    """Seconds a process's main thread has run on a CPU, and waited runnable for one (taken by
    other processes), from /proc/PID/task/PID/schedstat."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            ran, waited, _ = f.read().split()
        return int(ran) / 1e9, int(waited) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


# Another client adds each phase's jobs, from a process of its own: encoding 10,000 jobs and
# parsing the 201 (a status per job, megabytes of JSON) stopped this process's reactor for
# 100-200 ms, and the heartbeat replies that arrived meanwhile counted it as latency.
ADDER = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common import Http
http = Http(Path(sys.argv[2]), sys.argv[3])
tag, n = sys.argv[4], int(sys.argv[5])
body = json.dumps([{"cmd": f"true {tag} {i}"} for i in range(n)]).encode()
status, data, _, _ = http.request("POST", "/rest/v1/jobs/", body, params={"rep_grp": tag})
sys.exit(0 if status == 201 else f"adding jobs: {status} {data[:300]!r}")
"""


async def add_jobs_elsewhere(reactor: Any, d: Any, n_jobs: int, tag: str) -> None:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-c", ADDER, str(Path(__file__).resolve().parent), str(d.data_dir), d.url, tag, str(n_jobs)],
        env=dict(os.environ), reactor=reactor)
    if code != 0:
        raise RuntimeError(f"adding {n_jobs} jobs failed: {err.decode(errors='replace')[-500:]}")


async def jobs_phase(reactor: Any, farm: Farm, admin: Client, n_jobs: int, tag: str) -> tuple[float, dict[str, float], float]:
    pid_cpu_before = thread_cpu(farm.manager_pid)  # type: ignore[attr-defined]
    own_before = own_cpu()
    waits_before = run_queue_wait(farm.manager_pid), run_queue_wait(os.getpid())  # type: ignore[attr-defined]
    target = farm.done_jobs + n_jobs
    started = time.perf_counter()
    # The phase begins with the add: the manager takes the jobs (0.2-0.3 s of its reactor for
    # 10,000) while the workers heartbeat; labelled "idle", that time had been the idle tail.
    farm.phase = tag
    await add_jobs_elsewhere(reactor, farm.daemon, n_jobs, tag)
    if farm.kick:
        for name in farm.sessions:
            d = ensureDeferred(farm.pull_and_run(name))
            d.addErrback(lambda f: None)
    ok = await wait_until(reactor, lambda: farm.done_jobs >= target, timeout=600)
    elapsed = time.perf_counter() - started
    farm.phase = "idle"
    if not ok:
        raise RuntimeError(f"only {farm.done_jobs - (target - n_jobs)} of {n_jobs} jobs came back")
    after = thread_cpu(farm.manager_pid)  # type: ignore[attr-defined]
    cpu = {k: (after[k] - pid_cpu_before[k]) / elapsed for k in after}
    waits_after = run_queue_wait(farm.manager_pid), run_queue_wait(os.getpid())  # type: ignore[attr-defined]
    cpu["main waited"] = (waits_after[0][1] - waits_before[0][1]) / elapsed
    cpu["own waited"] = (waits_after[1][1] - waits_before[1][1]) / elapsed
    return n_jobs / elapsed, cpu, (own_cpu() - own_before) / elapsed


async def local_baseline(reactor: Any, n_jobs: int) -> float:
    """The same number of trivial jobs run by a manager's own launchers."""
    async with daemon(reactor, None) as d:
        async with d.client(reactor, idle_timeout=5.0) as client:
            started = time.perf_counter()
            await client.add_jobs([{"cmd": f"true local {i}"} for i in range(n_jobs)], rep_grp="local")

            async def left() -> int:
                return len(await client.jobs())

            while await left():
                await deferLater(reactor, 0.1, lambda: None)
            return n_jobs / (time.perf_counter() - started)


def manager_histogram(families: list[Any], name: str, **labels: str) -> dict[float, int]:
    """One histogram of the manager's /metrics (parsed), its series with these labels added
    together: the count within each bucket bound (seconds), cumulative, and under -1 the seconds
    in all (as microseconds, an int like the counts)."""
    buckets: dict[float, int] = {}
    total = 0.0
    for family in families:
        if family.name != name:
            continue
        for sample in family.samples:
            if any(sample.labels.get(key) != value for key, value in labels.items()):
                continue
            if sample.name == name + "_bucket":
                bound = float(sample.labels["le"])  # "+Inf" too
                buckets[bound] = buckets.get(bound, 0) + int(sample.value)
            elif sample.name == name + "_sum":
                total += sample.value
    buckets[-1.0] = int(total * 1e6)
    return buckets


# (heartbeats answered, their buckets), then the collections', the reactor lag's and the full
# collections' histograms, as manager_histogram gives them.
Timing = tuple[int, dict[float, int], dict[float, int], dict[float, int], dict[float, int]]


async def heartbeat_timing(admin: Client) -> Timing:
    """The manager's timings so far, from its /metrics: heartbeats from request headers to the
    reply, its garbage collections and its reactor's lag."""
    families = list(text_string_to_metric_families((await admin.get("metrics")).text))
    beats = manager_histogram(families, "wmgr_http_request_duration_seconds", method="POST",
                              route="/worker/v1/heartbeat")
    del beats[-1.0]
    return (beats.get(float("inf"), 0), beats, manager_histogram(families, "wmgr_gc_pause_seconds"),
            manager_histogram(families, "wmgr_reactor_lag_seconds"),
            manager_histogram(families, "wmgr_gc_pause_seconds", generation="2"))


def _over(before: dict[float, int], after: dict[float, int]) -> tuple[int, float, dict[float, int]]:
    delta = {bound: count - before.get(bound, 0) for bound, count in after.items()}
    return delta.get(float("inf"), 0), delta.get(-1.0, 0) / 1000, delta


def timing_between(before: Timing, after: Timing) -> str:
    total = after[0] - before[0]
    buckets = {bound: count - before[1].get(bound, 0) for bound, count in after[1].items()}
    collections, gc_ms, gc = _over(before[2], after[2])
    ticks, _, lag = _over(before[3], after[3])
    full, full_ms, _ = _over(before[4], after[4])
    extra = (f"; its garbage collections {collections:,} ({gc_ms:.0f} ms in all), "
             f"{collections - gc.get(0.01, 0)} over 10 ms, {collections - gc.get(0.05, 0)} over 50 ms, "
             f"{full} full ({full_ms:.0f} ms); "
             f"its reactor late (a 0.1 s timer) over 10 ms {ticks - lag.get(0.01, 0)} times, over 50 ms "
             f"{ticks - lag.get(0.05, 0)}, over 250 ms {ticks - lag.get(0.25, 0)} (of {ticks:,})")
    if not total:
        return "none" + extra
    within = buckets.get(0.05, 0) / total
    return (f"{total:,}, p50 <= {bucket_percentile(total, buckets, 0.5) * 1000:g} ms, "
            f"p99 <= {bucket_percentile(total, buckets, 0.99) * 1000:g} ms, {within:.1%} within 50 ms" + extra)


def raise_priority(pid: int, nice: int) -> None:
    """Every thread of process `pid` at this nice value, and its scheduling autogroup (root only):
    with autogroups (Linux's default for sessions) a nice value counts only within its group, and
    every session competes as one."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass


async def main(reactor: Any, opts: Any) -> int:
    n_workers = opts.workers or (50 if opts.smoke else 1000)
    n_jobs = opts.jobs or (500 if opts.smoke else 10_000)
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} (shared with other work: compare ratios)")
    loads = [os.getloadavg()[0]]
    async with daemon(reactor, MANAGER_CONFIG, opts.keep_log) as d:
        ca = (d.data_dir / "ca.pem").read_bytes()
        token = (d.data_dir / "worker.token").read_text().strip()
        admin = d.client(reactor, idle_timeout=5.0)
        farm = Farm(reactor, d.url, ca, token, n_workers)
        farm.manager_pid = d.process.pid  # type: ignore[attr-defined, union-attr]
        farm.daemon = d  # type: ignore[attr-defined]
        if opts.priority:
            # The manager and this simulator ahead of the machine's other work, as on a manager host
            # of its own: without it, on a shared machine, both wait for a CPU most of the time.
            raise_priority(d.process.pid, -opts.priority)  # type: ignore[union-attr]
            raise_priority(os.getpid(), -opts.priority)
            print(f"the manager and this process run at nice -{opts.priority} (threads and autogroup)")
        client_token = f"Authorization: Bearer {(d.data_dir / 'client.token').read_text().strip()}\r\n".encode()
        try:
            started = time.perf_counter()
            names = [f"sim{i:04d}" for i in range(n_workers)]
            for i in range(0, n_workers, 50):
                await DeferredList([ensureDeferred(farm.register(name)) for name in names[i:i + 50]],
                                   fireOnOneErrback=True, consumeErrors=True)
            print(f"{n_workers} workers registered in {time.perf_counter() - started:.1f} s (manager pid "
                  f"{d.process.pid}, for py-spy)", flush=True)  # type: ignore[union-attr]
            # The simulator is the instrument, not what is measured: a thousand workers, each on
            # a host of its own, never wait for one collector. From here on its collector is off
            # (what it makes meanwhile is printed at the end), so that its pauses do not count
            # as heartbeat latency; any collection that still runs is printed.
            gc.collect()
            gc.freeze()
            gc.disable()
            gc.callbacks.append(farm.gc_probe)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            served = {"registered": await heartbeat_timing(admin)}
            lives = [ensureDeferred(farm.live(name)) for name in names]
            probe = ensureDeferred(farm.probe(client_token))
            lag = ensureDeferred(farm.lag())
            await deferLater(reactor, HEARTBEAT + 1, lambda: None)
            farm.phase = "idle"
            await deferLater(reactor, HEARTBEAT * (1 if opts.smoke else 3), lambda: None)  # steady state, idle

            served["warm-up and idle"] = await heartbeat_timing(admin)
            loads.append(os.getloadavg()[0])
            rate, cpu, own = await jobs_phase(reactor, farm, admin, n_jobs, "cadence")
            served["cadence"] = await heartbeat_timing(admin)
            print(f"at the agents' cadence: {n_jobs:,} jobs handed out and taken back at {rate:,.0f} jobs/s "
                  f"(manager reactor {cpu['main']:.0%} CPU and {cpu['main waited']:.0%} runnable waiting for one, "
                  f"its threads {cpu['threads']:.0%}; this process {own:.0%}, {cpu['own waited']:.0%} waiting)")
            farm.kick = True
            top, cpu, own = await jobs_phase(reactor, farm, admin, n_jobs, "all at once")
            served["all at once"] = await heartbeat_timing(admin)
            loads.append(os.getloadavg()[0])
            farm.kick = False
            print(f"every worker pulling at once (top): {top:,.0f} jobs/s (manager reactor {cpu['main']:.0%} CPU and "
                  f"{cpu['main waited']:.0%} runnable waiting for one, its threads {cpu['threads']:.0%}; "
                  f"this process {own:.0%}, {cpu['own waited']:.0%} waiting)", flush=True)
            if opts.paced:
                farm.rate = opts.paced
                paced, cpu, own = await jobs_phase(reactor, farm, admin, n_jobs, "paced")
                served["paced"] = await heartbeat_timing(admin)
                farm.rate = 0.0
                print(f"paced at {opts.paced:,} jobs/s: {paced:,.0f} jobs/s (manager reactor {cpu['main']:.0%} CPU and "
                      f"{cpu['main waited']:.0%} runnable waiting for one; this process {own:.0%})")
            await deferLater(reactor, HEARTBEAT, lambda: None)
            farm.stopping = True
            await DeferredList(lives + [probe, lag], consumeErrors=True)
            farm.manager_peak_rss = peak_rss(d.process.pid)  # type: ignore[attr-defined, union-attr]
        finally:
            farm.stopping = True
            await admin.close()
            for wire in farm.wires.values():
                if wire.open:
                    wire.transport.loseConnection()
    base = [t for phase, times in farm.baseline.items() if phase != "warm-up" for t in times]
    beats = [t for phase, times in farm.beats.items() if phase != "warm-up" for t in times]
    flowing = [t for phase, times in farm.beats.items() if phase in ("cadence", "all at once", "paced") for t in times]
    for phase, times in farm.beats.items():
        print(f"heartbeats while {phase}: {len(times):,}, p50 {percentile(times, 0.5) * 1000:.1f} ms, "
              f"p99 {percentile(times, 0.99) * 1000:.1f} ms (target < 50 ms)")
    print(f"heartbeats after the warm-up: {len(beats):,}, p99 {percentile(beats, 0.99) * 1000:.1f} ms; "
          f"while jobs flow: p99 {percentile(flowing, 0.99) * 1000:.1f} ms; errors {farm.errors}")
    previous = None
    for phase, timing in served.items():
        if previous is not None:
            print(f"heartbeats while {phase} as the manager timed them (headers to reply, its /metrics): "
                  f"{timing_between(previous, timing)}")
        previous = timing
    print(f"this process's reactor lag (a 50 ms timer): p50 {percentile(farm.lags, 0.5) * 1000:.1f} ms, "
          f"p99 {percentile(farm.lags, 0.99) * 1000:.1f} ms")
    gc.callbacks.remove(farm.gc_probe)
    gc.enable()
    print(f"this process's collector was off once the workers had registered: its peak RSS grew by "
          f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024:.0f} MB from then")
    for phase, pauses in farm.gc_pauses.items():
        print(f"this process's garbage collections while {phase}: {len(pauses):,} "
              f"({sum(pauses) * 1000:.0f} ms in all), longest {max(pauses) * 1000:.1f} ms, "
              f"{sum(1 for p in pauses if p > 0.01)} over 10 ms")
    print(f"baseline GET /rest/version/ alongside (after the warm-up): {len(base)}, p50 {percentile(base, 0.5) * 1000:.1f} ms, "
          f"p99 {percentile(base, 0.99) * 1000:.1f} ms; heartbeat p99 / baseline p99 = "
          f"{percentile(beats, 0.99) / max(percentile(base, 0.99), 1e-9):.2f}")
    local = await local_baseline(reactor, n_jobs)
    loads.append(os.getloadavg()[0])
    print(f"baseline: the same {n_jobs:,} trivial jobs through the local launchers: {local:,.0f} jobs/s")
    print(f"ratio: workers at cadence / local = {rate / local:.2f}; all at once / local = {top / local:.2f}")
    print(f"load average (1 min) over the run: {', '.join(f'{x:.1f}' for x in loads)}; the manager's peak RSS "
          f"{farm.manager_peak_rss / 1024:.0f} MB")
    if farm.errors:
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick run (CI): not a timed test")
    parser.add_argument("--workers", type=int, default=0, help="simulated workers (default 1,000; smoke 50)")
    parser.add_argument("--jobs", type=int, default=0, help="jobs per phase (default 10,000; smoke 500)")
    parser.add_argument("--paced", type=float, default=1200.0, metavar="JOBS_PER_S",
                        help="a last phase with the farm taking jobs at this rate (0: none; default 1,200)")
    parser.add_argument("--priority", type=int, default=0, metavar="N",
                        help="run the manager and the simulator at nice -N (root), ahead of other work on a "
                             "shared machine")
    parser.add_argument("--keep-log", action="store_true", help="print the manager's log at the end")
    options = parser.parse_args()
    run_main(lambda reactor: main(reactor, options))
