"""Connection registry (issue 10): the notes' wrk commands against wmgr and a Flask baseline.

    python bench/connections.py [--smoke] [--duration 10] [--runs 1] [--only publish] [--keep-log]

Starts, in the same run, the baseline (bench/connections_baseline.py: a minimal Flask app of our
own doing the original connectivity server's work its way: one dict, one lock, a regex per entry)
under the original's documented gunicorn command (1 worker, gthread, 2 threads), and the real
wmgr daemon with `[connections] open = true` and a plain-HTTP listener (how DAQ clients reach
it). Both get a TTL long enough that nothing expires during the run. Then, against each in turn,
`wrk -t1 -c4 -d10s --latency --timeout 30s` (the notes' command) for:

  publish            one connection per request, a new uid each time (publish_unique.lua)
  lookup DRO.* 1k    all 1,000 DRO-%06d-tp_to_trigger entries (a 108 KB reply)
  lookup DRO.* 100k  all 100,000 of them (a 10.9 MB reply)
  exact uid 100k     one uid among 100,000 (as the C++ client asks)

and prints each figure as a ratio to the baseline's. Requires `wrk` (Debian: apt-get install -y
wrk) and Flask + gunicorn (pip install -e '.[bench]'); it installs nothing and says what is
missing. `--smoke` runs each for 1 s with 100 and 2,000 entries instead. `--runs N` repeats each
measurement N times (baseline, then wmgr, each time); `--only publish` measures publish alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import daemon, machine, run_main, thread_cpu  # noqa: E402

SCRIPTS = HERE / "connections_wrk"
TARGETS = {"publish": 2.0, "lookup DRO.* 1k": 3.0, "lookup DRO.* 100k": 10.0, "exact uid 100k": 10.0}
BIG_TTL = 36000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list[str]:
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk (Debian: apt-get install -y wrk)")
    for module in ("flask", "gunicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} (pip install -e '.[bench]')")
    return missing


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the baseline did not start (exit {process.poll()})")
            time.sleep(0.05)


def start_baseline(port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "--workers=1",
               "--worker-class=gthread", "--threads=2", "--timeout", "5000000000", "connections_baseline:app"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=str(HERE), stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, ENTRY_TTL=str(BIG_TTL)))
    wait_listening(port, process)
    return process


def gunicorn_worker(master: subprocess.Popen) -> int:
    """The pid of gunicorn's one worker (the process that serves), a child of the master."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("gunicorn started no worker")


def post(port: int, path: str, body: Any) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fill(port: int, start: int, stop: int, chunk: int = 5000) -> None:
    """Publish DRO-%06d-tp_to_trigger for start <= i < stop into partition `bench`."""
    for first in range(start, stop, chunk):
        connections = [{"connection_type": 0, "data_type": "TPSet", "uid": f"DRO-{i:06d}-tp_to_trigger",
                        "uri": f"tcp://192.168.1.100:{1024 + i % 60000}"} for i in range(first, min(stop, first + chunk))]
        status, reply = post(port, "/publish", {"partition": "bench", "connections": connections})
        if status != 200:
            raise RuntimeError(f"filling port {port}: {status} {reply[:200]!r}")


def check_lookup(port: int, regex: str, expected: int) -> int:
    status, reply = post(port, "/getconnection/bench", {"uid_regex": regex, "data_type": "TPSet"})
    found = len(json.loads(reply)) if status == 200 else -1
    if found != expected:
        raise RuntimeError(f"port {port}: {regex} found {found} entries, expected {expected}")
    return len(reply)


def server_cpu(pid: int) -> float:
    times = thread_cpu(pid)
    return times["main"] + times["threads"]


def wrk(port: int, pid: int, script: str, seconds: float) -> dict[str, Any]:
    """One wrk run; also the server's CPU time per request (its main thread and other threads),
    which the other load on a shared machine disturbs much less than requests per second."""
    command = ["wrk", "-t1", "-c4", f"-d{seconds:g}s", "--latency", "--timeout", "30s",
               "-s", str(SCRIPTS / script), f"http://127.0.0.1:{port}"]
    cpu_before = server_cpu(pid)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu = server_cpu(pid) - cpu_before
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk on port {port} ({script}): {errors.group(1)} failed requests")
    return {"rate": rate, "p50": latency.get("50", "?"), "p99": latency.get("99", "?"),
            "cpu_us": cpu / max(requests, 1) * 1e6}


def measure(name: str, script: str, servers: dict[str, tuple[int, int]], seconds: float,
            results: dict[str, Any], runs: int = 1) -> None:
    for _ in range(runs):
        measure_once(name, script, servers, seconds, results)


def measure_once(name: str, script: str, servers: dict[str, tuple[int, int]], seconds: float,
                 results: dict[str, Any]) -> None:
    figures = {server: wrk(port, pid, script, seconds) for server, (port, pid) in servers.items()}
    base, ours = figures["baseline"], figures["wmgr"]
    ratio = ours["rate"] / base["rate"]
    cpu_ratio = base["cpu_us"] / ours["cpu_us"] if ours["cpu_us"] else float("inf")
    results[name] = dict(figures, ratio=ratio, cpu_ratio=cpu_ratio)
    met = "yes" if ratio >= TARGETS[name] else "NO"
    print(f"{name:<18} baseline {base['rate']:9.1f} req/s (p50 {base['p50']}, p99 {base['p99']}, "
          f"{base['cpu_us']:.0f} us CPU/req)  wmgr {ours['rate']:9.1f} req/s (p50 {ours['p50']}, "
          f"p99 {ours['p99']}, {ours['cpu_us']:.0f} us CPU/req)  ratio {ratio:6.2f}x "
          f"(CPU per request {cpu_ratio:.2f}x less)  target >= {TARGETS[name]:g}x: {met}  "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)


async def main(reactor: Any, opts: argparse.Namespace) -> int:
    missing = missing_tools()
    if missing:
        print("bench/connections.py skipped: missing " + "; ".join(missing))
        return 0
    seconds = 1.0 if opts.smoke else opts.duration
    small, large = (100, 2_000) if opts.smoke else (1_000, 100_000)
    print(f"machine: {machine()}; wrk -t1 -c4 -d{seconds:g}s; entries {small:,} / {large:,}")
    scratch = Path(tempfile.mkdtemp(prefix="wmgr-bench-conn-"))
    baseline: Optional[subprocess.Popen] = None
    http_port = free_port()
    config = f"[connections]\nopen = true\nttl = {BIG_TTL}\nmax_body = 67108864\n"
    try:
        baseline_port = free_port()
        baseline = start_baseline(baseline_port, scratch / "baseline.log")
        async with daemon(reactor, config, opts.keep_log, "--http-port", str(http_port)) as wmgr:
            assert wmgr.process is not None
            servers = {"baseline": (baseline_port, gunicorn_worker(baseline)),
                       "wmgr": (http_port, wmgr.process.pid)}
            ports = {name: port for name, (port, _) in servers.items()}
            results: dict[str, Any] = {}
            measure("publish", "publish_unique.lua", servers, seconds, results, opts.runs)
            if opts.only == "publish":
                return 0
            for port in ports.values():
                fill(port, 0, small)
                check_lookup(port, "DRO.*", small)
                check_lookup(port, f"DRO-{small // 2:06d}-tp_to_trigger", 1)
            exact = SCRIPTS / "lookup_exact.lua"
            exact_script = exact.read_text().replace("DRO-000500-tp_to_trigger", f"DRO-{large // 2:06d}-tp_to_trigger")
            (scratch / "lookup_exact.lua").write_text(exact_script)
            measure("lookup DRO.* 1k", "lookup_all.lua", servers, seconds, results, opts.runs)
            for port in ports.values():
                fill(port, small, large)
                size = check_lookup(port, "DRO.*", large)
            measure("lookup DRO.* 100k", "lookup_all.lua", servers, seconds, results, opts.runs)
            measure("exact uid 100k", str(scratch / "lookup_exact.lua"), servers, seconds, results, opts.runs)
            print(f"(a {large:,}-entry reply is {size:,} bytes)")
            failed = [name for name, r in results.items() if r["ratio"] < TARGETS[name]]
            if failed and not opts.smoke:
                print("below target: " + ", ".join(failed))
    finally:
        if baseline is not None:
            baseline.terminate()
            try:
                baseline.wait(timeout=40)
            except subprocess.TimeoutExpired:
                baseline.kill()
                baseline.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick run (CI): not a timed test")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10, as the notes)")
    parser.add_argument("--runs", type=int, default=1, help="measurements of each figure (default 1)")
    parser.add_argument("--only", choices=["publish"], help="measure publish alone")
    parser.add_argument("--keep-log", action="store_true", help="print the daemon's log at the end")
    options = parser.parse_args()
    run_main(lambda reactor: main(reactor, options))
