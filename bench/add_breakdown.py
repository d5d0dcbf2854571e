"""Where the time of a big add goes: the daemon's add path, stage by stage, in one process.

    python bench/add_breakdown.py [--smoke]

Not a benchmark of the daemon (no HTTP, TLS or reactor): it calls the same functions the daemon
calls for `POST /rest/v1/jobs/` (wmgr.api.wr.WrAPI.add_jobs -> wmgr.jobs.queue.JobQueue.add ->
_insert_jobs in the store's writer -> Job.status -> json_response), one stage at a time, on N
distinct jobs (`true #<i>`, no deps or limit groups), and prints each stage's time and share. The SQLite stage runs against
a fresh database with the store's own connection settings (WAL, synchronous=FULL) in a temporary
directory. Full size: 100,000 jobs; `--smoke`: 2,000.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wmgr.jobs import model  # noqa: E402
from wmgr.jobs.model import Job  # noqa: E402
from wmgr.jobs.journal import insert_jobs as _insert_jobs  # noqa: E402
from wmgr.jobs.scheduler import Capacity, Scheduler  # noqa: E402
from wmgr.store import _connect, migrate  # noqa: E402


def main() -> int:
    n = 2_000 if "--smoke" in sys.argv else 100_000
    tmp = Path(tempfile.mkdtemp(prefix="wmgr-bench-"))
    try:
        stages: list[tuple[str, float]] = []

        def stage(name: str, started: float) -> float:
            now = time.perf_counter()
            stages.append((name, now - started))
            return now

        body = json.dumps([{"cmd": f"true #{i}"} for i in range(n)]).encode()
        params = {"rep_grp": "bench", "cwd": str(tmp)}
        conn = _connect(str(tmp / "wmgr.db"))
        migrate(conn)

        t = time.perf_counter()
        raw = json.loads(body)
        t = stage("json.loads(body)", t)
        defaults = model.parse_defaults(params)
        specs = [model.parse_spec(item, defaults) for item in raw]
        t = stage("parse_spec (validation)", t)
        normalised = [model.normalise(spec) for spec in specs]
        t = stage("normalise", t)
        candidates = {}
        for spec in normalised:
            candidates.setdefault(model.job_key(spec), spec)
        t = stage("job_key (farmhash) + dedup dict", t)
        now = time.time()
        rows = [(key, spec["rep_grp"], model.READY, seq, json.dumps(spec, separators=(",", ":")), now,
                 spec.get("deps") or ())
                for seq, (key, spec) in enumerate(candidates.items(), 1)]
        t = stage("rows: json.dumps(spec) per job", t)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SAVEPOINT op")
        select_started = time.perf_counter()
        keys = [row[0] for row in rows]
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            conn.execute(f"SELECT key FROM jobs WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        select_time = time.perf_counter() - select_started
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        conn.execute("COMMIT")
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SAVEPOINT op")
        # The signature has grown over time (limit groups): pass what this tree's version takes.
        extra = [{}] * (len(inspect.signature(_insert_jobs).parameters) - 3)
        added = _insert_jobs(conn, rows, False, *extra)
        conn.execute("RELEASE op")
        conn.execute("COMMIT")
        t = stage(f"store: _insert_jobs + COMMIT (of which the SELECT ... IN: {select_time:.2f} s)", t)
        scheduler = Scheduler(Capacity(2, 1 << 20, 0))
        live, by_rep_grp = {}, {}
        seqs = {row[0]: row[3] for row in rows}
        for key in added:
            job = Job(key, candidates[key], model.READY, seqs[key])
            if hasattr(job, "group_key") and hasattr(job, "stored"):
                job.stored = job.group_key
            live[key] = job
            by_rep_grp.setdefault(job.rep_grp, {})[key] = None
            scheduler.push(job)
        t = stage("Job() + index + scheduler.push", t)
        jobs = [live[key] for key in candidates if key in live]
        now = time.time()
        statuses = [job.status(now) for job in jobs]
        t = stage("Job.status per job", t)
        reply = json.dumps(statuses, separators=(",", ":")).encode("utf-8")
        t = stage(f"json.dumps(reply) ({len(reply) / 1e6:.1f} MB)", t)
        conn.close()

        total = sum(seconds for _, seconds in stages)
        print(f"{n:,} jobs: {total:.2f} s in these stages ({n / total:,.0f} jobs/s without HTTP/TLS/reactor)")
        for name, seconds in stages:
            print(f"  {seconds:6.3f} s  {100 * seconds / total:5.1f}%  {name}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
