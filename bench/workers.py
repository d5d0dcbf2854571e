"""Workers: many simulated workers heartbeating and pulling batches from one manager.

Full size: 1,000 simulated workers in this one process (treq, one persistent HTTPS connection
each, no real jobs), each registering, then heartbeating every 5 s (staggered) and pulling when it
has room, as the agent does; 10,000 trivial jobs are handed out and taken back (each batch is
"run" at once: start and end reported in one request). `--smoke`: 50 workers, 500 jobs.

Measured:
1. heartbeat latency (send to end of reply), p50/p99 while idle and during each jobs phase
   (target p99 < 50 ms), and as the manager's request log times them,
   against the latency of the cheapest route (GET /rest/version/) sent by the same process at
   the same time (baseline: what any request costs under this load);
2. jobs handed out and taken back per second, at the agents' cadence (idle workers pull once per
   heartbeat; workers that got jobs pull again as soon as they have reported them), target
   >= 1,000 jobs/s;
3. where it tops out: the same with every worker pulling at once when the jobs are added (then
   again as soon as it has reported), with the manager's reactor CPU and this process's CPU over
   that phase and this process's reactor lag (whichever is saturated is the limit);
4. baseline for the rate: the same number of trivial jobs (`true`) through a manager's own local
   launchers, measured in the same run.

The machine may be shared with other work: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import re  # noqa: E402

from common import daemon, machine, run_main, thread_cpu  # noqa: E402
from twisted.internet.defer import DeferredList, ensureDeferred  # noqa: E402
from twisted.internet.ssl import Certificate, trustRootFromCertificates  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool  # noqa: E402
from treq.client import HTTPClient  # noqa: E402

from wmgr.client import Client  # noqa: E402

MANAGER_CONFIG = "[workers]\nrun_local = false\ntimeout = 60\n"
HEARTBEAT = 5.0
SLOTS = 16  # zero-core slots each simulated worker offers


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


class Farm:
    """The simulated workers and what they measured."""

    def __init__(self, reactor: Any, client: Client, n: int) -> None:
        self.reactor = reactor
        self.client = client
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

    async def post(self, route: str, body: dict[str, Any]) -> Any:
        reply = await self.client.post("worker/v1/" + route, body, timeout=120)
        if reply.code != 200:
            self.errors += 1
            raise RuntimeError(f"{route}: {reply}")
        return reply.json()

    async def register(self, name: str) -> None:
        answer = await self.post("register", {"name": name, "ip": "127.0.0.1", "cores": 0, "memory": 100000})
        self.sessions[name] = answer["session"]

    async def pull_and_run(self, name: str) -> None:
        """Pull a batch; "run" it at once (start and end in one report); again while it gets
        work. One loop per worker at a time."""
        if self.pulling.get(name):
            return
        self.pulling[name] = True
        try:
            while not self.stopping:
                body = {"name": name, "session": self.sessions[name], "cores": 0, "memory": 100000, "slots": SLOTS}
                jobs = (await self.post("pull", body))["jobs"]
                if jobs:
                    now = time.time()
                    reports = []
                    for job in jobs:
                        reports.append({"key": job["key"], "attempt": job["attempt"], "event": "start", "pid": 1,
                                        "started": now})
                        reports.append({"key": job["key"], "attempt": job["attempt"], "event": "end", "exitcode": 0,
                                        "started": now, "ended": now})
                    await self.post("reports", {"name": name, "reports": reports})
                    self.done_jobs += len(jobs)
                    continue
                return
        finally:
            self.pulling[name] = False

    async def live(self, name: str) -> None:
        """Heartbeat every HEARTBEAT seconds (first one at a random offset), pulling after each
        until a pull comes back empty."""
        await deferLater(self.reactor, random.uniform(0, HEARTBEAT), lambda: None)
        while not self.stopping:
            started = time.perf_counter()
            ready = 1
            try:
                answer = await self.post("heartbeat", {"name": name, "session": self.sessions[name], "running": [],
                                                       "figures": {"load_average": {"1min": 0.1}}})
                ready = answer.get("ready", 1)
            except Exception:
                pass
            self.beats.setdefault(self.phase, []).append(time.perf_counter() - started)
            # As the agent's cycle: heartbeat, then pull when the manager has work; one request at
            # a time per worker.
            try:
                if ready:
                    await self.pull_and_run(name)
            except Exception:
                pass
            await deferLater(self.reactor, max(0.0, HEARTBEAT - (time.perf_counter() - started)), lambda: None)

    async def lag(self) -> None:
        """How late this process's own reactor runs a 50 ms timer: when it is seconds late, the
        latencies measured here are this process's, not the manager's."""
        while not self.stopping:
            planned = time.perf_counter() + 0.05
            await deferLater(self.reactor, 0.05, lambda: None)
            self.lags.append(time.perf_counter() - planned)

    async def probe(self) -> None:
        """The baseline request, a few times a second, alongside the workers."""
        while not self.stopping:
            started = time.perf_counter()
            await self.client.get("rest/version/")
            self.baseline.setdefault(self.phase, []).append(time.perf_counter() - started)
            await deferLater(self.reactor, 0.2, lambda: None)


def served_times(log_path: Path, what: str) -> list[float]:
    pattern = re.compile(re.escape(what) + r" \d+ ([\d.]+)ms")
    with open(log_path, errors="replace") as f:
        return [float(m.group(1)) for m in map(pattern.search, f) if m]


async def wait_until(reactor: Any, check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.05, lambda: None)
    return True


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def jobs_phase(reactor: Any, farm: Farm, admin: Client, n_jobs: int, tag: str) -> tuple[float, dict[str, float], float]:
    pid_cpu_before = thread_cpu(farm.manager_pid)  # type: ignore[attr-defined]
    own_before = own_cpu()
    target = farm.done_jobs + n_jobs
    started = time.perf_counter()
    await admin.add_jobs([{"cmd": f"true {tag} {i}"} for i in range(n_jobs)], rep_grp=tag)
    farm.phase = tag
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


async def main(reactor: Any, opts: Any) -> int:
    n_workers = opts.workers or (50 if opts.smoke else 1000)
    n_jobs = opts.jobs or (500 if opts.smoke else 10_000)
    print(f"machine: {machine()} (shared with other work: compare ratios)")
    async with daemon(reactor, MANAGER_CONFIG, opts.keep_log) as d:
        ca = (d.data_dir / "ca.pem").read_bytes()
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = n_workers + 16
        pool.cachedConnectionTimeout = 8.0  # under the manager's [http] header_timeout (10 s)
        policy = BrowserLikePolicyForHTTPS(trustRootFromCertificates([Certificate.loadPEM(ca)]))
        http = HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        token = (d.data_dir / "worker.token").read_text().strip()
        client = Client(reactor, d.url, ca, token, http=http)
        admin = d.client(reactor, idle_timeout=5.0)
        farm = Farm(reactor, client, n_workers)
        farm.manager_pid = d.process.pid  # type: ignore[attr-defined, union-attr]
        probe_client = d.client(reactor, idle_timeout=5.0)
        try:
            started = time.perf_counter()
            names = [f"sim{i:04d}" for i in range(n_workers)]
            for i in range(0, n_workers, 50):
                await DeferredList([ensureDeferred(farm.register(name)) for name in names[i:i + 50]],
                                   fireOnOneErrback=True, consumeErrors=True)
            print(f"{n_workers} workers registered in {time.perf_counter() - started:.1f} s")
            lives = [ensureDeferred(farm.live(name)) for name in names]
            probe_client._http = http
            probe = ensureDeferred(farm.probe())
            lag = ensureDeferred(farm.lag())
            await deferLater(reactor, HEARTBEAT + 1, lambda: None)
            farm.phase = "idle"
            await deferLater(reactor, HEARTBEAT * (1 if opts.smoke else 3), lambda: None)  # steady state, idle

            rate, cpu, own = await jobs_phase(reactor, farm, admin, n_jobs, "cadence")
            print(f"at the agents' cadence: {n_jobs:,} jobs handed out and taken back at {rate:,.0f} jobs/s "
                  f"(manager reactor {cpu['main']:.0%} CPU, its threads {cpu['threads']:.0%}; this process {own:.0%})")
            farm.kick = True
            top, cpu, own = await jobs_phase(reactor, farm, admin, n_jobs, "all at once")
            farm.kick = False
            print(f"every worker pulling at once (top): {top:,.0f} jobs/s (manager reactor {cpu['main']:.0%} CPU, its "
                  f"threads {cpu['threads']:.0%}; this process {own:.0%})")
            await deferLater(reactor, HEARTBEAT, lambda: None)
            farm.stopping = True
            await DeferredList(lives + [probe, lag], consumeErrors=True)
            served = served_times(d.log_path, "POST /worker/v1/heartbeat")
        finally:
            farm.stopping = True
            await admin.close()
            await probe_client.close()
            await pool.closeCachedConnections()
    base = [t for phase, times in farm.baseline.items() if phase != "warm-up" for t in times]
    beats = [t for phase, times in farm.beats.items() if phase != "warm-up" for t in times]
    for phase, times in farm.beats.items():
        print(f"heartbeats while {phase}: {len(times):,}, p50 {percentile(times, 0.5) * 1000:.1f} ms, "
              f"p99 {percentile(times, 0.99) * 1000:.1f} ms (target < 50 ms)")
    print(f"heartbeats after the warm-up: {len(beats):,}, p99 {percentile(beats, 0.99) * 1000:.1f} ms; errors {farm.errors}")
    print(f"heartbeats as the manager timed them (its request log, from the request line to the reply): "
          f"p50 {percentile(served, 0.5):.1f} ms, p99 {percentile(served, 0.99):.1f} ms")
    print(f"this process's reactor lag (a 50 ms timer): p50 {percentile(farm.lags, 0.5) * 1000:.1f} ms, "
          f"p99 {percentile(farm.lags, 0.99) * 1000:.1f} ms")
    print(f"baseline GET /rest/version/ alongside (after the warm-up): {len(base)}, p50 {percentile(base, 0.5) * 1000:.1f} ms, "
          f"p99 {percentile(base, 0.99) * 1000:.1f} ms; heartbeat p99 / baseline p99 = "
          f"{percentile(beats, 0.99) / max(percentile(base, 0.99), 1e-9):.2f}")
    local = await local_baseline(reactor, n_jobs)
    print(f"baseline: the same {n_jobs:,} trivial jobs through the local launchers: {local:,.0f} jobs/s")
    print(f"ratio: workers at cadence / local = {rate / local:.2f}; all at once / local = {top / local:.2f}")
    if farm.errors:
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick run (CI): not a timed test")
    parser.add_argument("--workers", type=int, default=0, help="simulated workers (default 1,000; smoke 50)")
    parser.add_argument("--jobs", type=int, default=0, help="jobs per phase (default 10,000; smoke 500)")
    parser.add_argument("--keep-log", action="store_true", help="print the manager's log at the end")
    options = parser.parse_args()
    run_main(lambda reactor: main(reactor, options))
