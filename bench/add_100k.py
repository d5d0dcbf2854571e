"""Adding: N distinct jobs accepted in one POST, in jobs/s durably stored.

Full size: 100,000 jobs. `--smoke`: 2,000.

The daemon is the real one (tests/harness.py, under the Twisted reactor), configured so that it
never starts a job (`[jobs] zero_core_slots = 0`; the jobs ask for 0 cores, so none ever fits and
a scheduling pass stops at the first job): only adding is measured. Commands are `true #<i>`, all
distinct, so every job has its own key. The body is encoded before the clock starts, and the
request is sent with a plain blocking http.client/ssl connection (bench/common.py: Http), not treq.
The figure is N / (time from sending the POST to receiving the 201 status line); the daemon
commits the add (SQLite, WAL, synchronous=FULL) before it answers, and builds the whole reply
(one status object per job) before the status line goes out. The time to the end of the reply
body is printed too.

Baseline, measured in the same run: inserting the same N rows (key, rep group, state, seq, spec
JSON, time: what the daemon stores) with sqlite3 `executemany` in one transaction into the same
schema (wmgr.store.MIGRATIONS) with WAL and synchronous=FULL, in a file on the same disk as the
daemon's store, timed from BEGIN to the end of COMMIT. Best of 3.

It also prints the daemon's CPU time for the POST (its reactor thread, and its other threads: the
store's writer) per job, which the other load on a shared machine disturbs less than the rate.

Target (issue 3): >= 50,000 jobs/s.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NO_RUN_CONFIG, Http, arguments, daemon, machine, run_main, thread_cpu  # noqa: E402

from wmgr.jobs import model  # noqa: E402
from wmgr.store import migrate  # noqa: E402

TARGET_RATE = 50_000.0


def job_bodies(n: int) -> list[dict]:
    return [{"cmd": f"true #{i}"} for i in range(n)]


def sqlite_rate(n: int, directory: Path, cwd: str) -> float:
    """Rows/s of a bare executemany of the rows the daemon would store, one transaction."""
    rows = []
    now = time.time()
    for seq, raw in enumerate(job_bodies(n), 1):
        spec = model.normalise(model.parse_spec(raw, {"rep_grp": "bench", "cwd": cwd}))
        rows.append((model.job_key(spec), "bench", model.READY, seq, json.dumps(spec, separators=(",", ":")), now))
    best = float("inf")
    for attempt in range(3):
        path = directory / f"baseline-{attempt}.db"
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        migrate(conn)
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO jobs (key, rep_grp, state, seq, spec, updated) VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        best = min(best, time.perf_counter() - started)
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return n / best


async def main(reactor, opts) -> int:
    n = 2_000 if opts.smoke else 100_000
    print(f"machine: {machine()}")
    async with daemon(reactor, NO_RUN_CONFIG, opts.keep_log) as d:
        scratch = d.data_dir.parent / "baseline"
        scratch.mkdir()
        cwd = str(d.data_dir.parent / "jobs")
        baseline = sqlite_rate(n, scratch, cwd)
        print(f"baseline: sqlite3 executemany of {n:,} rows, one transaction, WAL+FULL: {baseline:,.0f} rows/s")
        http = Http(d.data_dir, d.url)
        body = json.dumps(job_bodies(n)).encode()
        cpu_before = thread_cpu(d.process.pid)
        status, data, first, whole = http.request(
            "POST", "/rest/v1/jobs/", body=body, params={"rep_grp": "bench", "cwd": cwd})
        cpu = {k: v - cpu_before[k] for k, v in thread_cpu(d.process.pid).items()}
        if status != 201:
            print(f"POST failed: {status} {data[:300]!r}")
            return 1
        reply = json.loads(data)
        # Stored, not just answered: the rep group as the store has it.
        groups = http.json("GET", "/rest/v1/jobs/bench", params={"limit": "1"})
        stored = sum(1 + g["Similar"] for g in groups)
        http.close()
    rate = n / first
    print(f"POST of {n:,} jobs ({len(body) / 1e6:.1f} MB): 201 after {first:.2f} s, "
          f"reply ({len(data) / 1e6:.1f} MB) read after {whole:.2f} s; {len(reply):,} statuses; {stored:,} stored")
    print(f"daemon CPU for the POST (to the end of the reply): reactor thread {cpu['main']:.2f} s "
          f"({cpu['main'] / n * 1e6:.1f} us per job), other threads {cpu['threads']:.2f} s "
          f"({cpu['threads'] / n * 1e6:.1f} us per job)")
    print(f"RESULT add_100k: {rate:,.0f} jobs/s ({n / whole:,.0f}/s to the end of the reply); "
          f"sqlite baseline {baseline:,.0f} rows/s; ratio {rate / baseline:.1%} "
          f"(target >= {TARGET_RATE:,.0f} jobs/s)")
    if len(reply) != n or stored != n:
        print("not every job was added")
        return 1
    return 0


if __name__ == "__main__":
    options = arguments(__doc__.splitlines()[0])
    run_main(lambda reactor: main(reactor, options))
