"""Profile the daemon with py-spy during one of the benchmark workloads (not a benchmark itself).

    python bench/profile_daemon.py throughput|add|group|limit [--out DIR] [--rate 250] [--smoke]

Starts the real daemon (as the benchmarks do), attaches `py-spy record` (from the same venv, or
PATH) to its pid, runs the workload, stops py-spy and writes `DIR/<workload>.collapsed` (stacks
in Brendan Gregg's collapsed format, for flamegraph.pl or speedscope), then prints the top functions by
self time and by inclusive time. The daemon is stopped and its temporary directory removed.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NO_RUN_CONFIG, Http, daemon, run_main  # noqa: E402


def py_spy() -> str:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else (shutil.which("py-spy") or "py-spy")


def summarise(path: Path, top: int = 25) -> None:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{total} samples")
    print("-- self --")
    for frame, n in self_time.most_common(top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    print("-- inclusive --")
    for frame, n in inclusive.most_common(top + 15):
        print(f"{100 * n / total:5.1f}%  {frame}")


async def main(reactor, opts) -> int:
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = None if opts.workload == "throughput" else NO_RUN_CONFIG
    n = 10_000 if opts.workload == "throughput" else 100_000
    if opts.smoke:
        n //= 50
    async with daemon(reactor, config) as d:
        http = Http(d.data_dir, d.url)
        cwd = str(d.data_dir.parent / "jobs")
        Path(cwd).mkdir()
        body = json.dumps([{"cmd": f"true #{i}"} for i in range(n)]).encode()
        params = {"rep_grp": "bench", "cwd": cwd}
        if opts.workload in ("group", "limit"):
            http.request("POST", "/rest/v1/jobs/", body=body, params=params)
        collapsed = out / f"{opts.workload}{'-gil' if opts.gil else ''}.collapsed"
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(d.process.pid), "--rate", str(opts.rate),
                                "--format", "raw", "--function", "--output", str(collapsed)] + (["--gil"] if opts.gil else []),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            started = time.perf_counter()
            if opts.workload == "add":
                status, _, first, _ = http.request("POST", "/rest/v1/jobs/", body=body, params=params)
                print(f"POST: {status} after {first:.2f} s")
            elif opts.workload == "throughput":
                http.request("POST", "/rest/v1/jobs/", body=body, params=params)
                deadline = time.perf_counter() + 600
                while http.json("GET", "/rest/v1/jobs/", params={"limit": "1"}) and time.perf_counter() < deadline:
                    time.sleep(0.1)
                print(f"{n} jobs in {time.perf_counter() - started:.2f} s")
            else:
                path = "/rest/v1/jobs/bench" if opts.workload == "group" else "/rest/v1/jobs/"
                for _ in range(5 if opts.workload == "group" else 50):
                    http.request("GET", path, params={"limit": "1"})
                print(f"GETs in {time.perf_counter() - started:.2f} s")
            time.sleep(0.5)
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            http.close()
    if not collapsed.exists():
        print(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
        return 1
    summarise(collapsed)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["throughput", "add", "group", "limit"])
    parser.add_argument("--out", default="/tmp/wmgr-profiles")
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    options = parser.parse_args()
    run_main(lambda reactor: main(reactor, options))
