"""Adding a job and asking for a rep group's status must not depend on the size of the history.

Measured against the real daemon over HTTPS with the wmgr client, in one run:
  1. on an empty store: the median time of POST /rest/v1/jobs/ with one new job, and of
     GET /rest/v1/jobs/<rep group>?limit=1 for a small rep group and for the big one;
  2. the daemon is stopped, 1,000,000 completed jobs (one rep group "history") are written straight
     into its SQLite store, with the per-rep-group counters the daemon keeps, and it is restarted;
  3. the same requests again. The figure is the ratio (with history / empty); the target is ≤ 2.
wr took 190 s to add one job at this scale (its PR #549).

    python bench/history_scale.py            # 1,000,000 completed jobs
    python bench/history_scale.py --smoke    # 10,000, quick
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import react  # noqa: E402

from tests.harness import Daemon  # noqa: E402
from wmgr.jobs import model  # noqa: E402

# The daemon runs nothing during the measurement: no job fits.
CONFIG = "[jobs]\nmax_cores = 1\nzero_core_slots = 0\n"
REPEAT = 30


def fill_history(db: Path, count: int) -> None:
    """Write `count` completed jobs as the daemon would have left them."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN")
    (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
    now = time.time()
    run = json.dumps({"attempts": 1, "pid": 1, "host": "bench", "started": now - 2, "ended": now - 1,
                      "exited": True, "exitcode": 0, "fail_reason": "", "peak_ram": 1, "cpu_time": 0.001})
    batch = []
    for n in range(count):
        spec = {"cmd": f"true history {n}", "cwd": "/tmp", "rep_grp": "history", "req_grp": "true",
                "memory": 1000, "time": 3600.0, "cpus": 0, "priority": 0, "retries": 0}
        batch.append((model.job_key(spec), "history", model.COMPLETE, seq + n + 1, json.dumps(spec), run, now - 1))
        if len(batch) == 50000:
            conn.executemany("INSERT INTO jobs (key, rep_grp, state, seq, spec, run, updated) VALUES (?,?,?,?,?,?,?)", batch)
            batch = []
    conn.executemany("INSERT INTO jobs (key, rep_grp, state, seq, spec, run, updated) VALUES (?,?,?,?,?,?,?)", batch)
    conn.execute("INSERT INTO rep_grp_states (rep_grp, state, exitcode, fail_reason, n) VALUES (?, ?, 0, '', ?) "
                 "ON CONFLICT (rep_grp, state, exitcode, fail_reason) DO UPDATE SET n = n + ?",
                 ("history", model.COMPLETE, count, count))
    conn.execute("COMMIT")
    conn.close()


async def timed(call, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def measure(client, label: str, repeat: int) -> dict[str, float]:
    counter = iter(range(10**9))

    async def add_one():
        reply = await client.post("rest/v1/jobs/", [{"cmd": f"true {label} {next(counter)}"}], params={"rep_grp": "small"})
        assert reply.code == 201, reply

    async def small_status():
        reply = await client.get("rest/v1/jobs/small", params={"limit": "1"})
        assert reply.code == 200, reply

    async def big_status():
        reply = await client.get("rest/v1/jobs/history", params={"limit": "1"})
        assert reply.code == 200, reply

    return {"add one job": await timed(add_one, repeat),
            "status of a small rep group": await timed(small_status, repeat),
            "status of the big rep group (limit=1)": await timed(big_status, repeat)}


async def main(reactor, count: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="wmgr-bench-") as tmp:
        daemon = Daemon(Path(tmp) / "data", config=CONFIG)
        await daemon.start(reactor)
        try:
            async with daemon.client(reactor) as client:
                empty = await measure(client, "empty", repeat)
            await daemon.stop(reactor)
            started = time.perf_counter()
            fill_history(daemon.data_dir / "wmgr.db", count)
            filled_in = time.perf_counter() - started
            await daemon.start(reactor)
            async with daemon.client(reactor) as client:
                [big] = (await client.get("rest/v1/jobs/history", params={"limit": "1"})).json()
                assert big["Similar"] == count - 1, big["Similar"]
                full = await measure(client, "full", repeat)
        finally:
            await daemon.stop(reactor)
    print(f"history: {count:,} completed jobs written in {filled_in:.1f} s; median of {repeat} requests each")
    print(f"{'operation':40} {'empty store':>12} {'with history':>13} {'ratio':>6}  (target <= 2)")
    worst = 0.0
    for name in empty:
        ratio = full[name] / empty[name]
        worst = max(worst, ratio)
        print(f"{name:40} {empty[name] * 1000:10.2f}ms {full[name] * 1000:11.2f}ms {ratio:6.2f}")
    print(f"worst ratio: {worst:.2f} ({'meets' if worst <= 2 else 'MISSES'} the target of 2)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a quick run with 10,000 completed jobs")
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args()
    count = args.count or (10_000 if args.smoke else 1_000_000)
    react(lambda reactor: main(reactor, count, 10 if args.smoke else REPEAT))
