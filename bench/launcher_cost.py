"""CPU per job of the launchers and the hand-off to them, without the daemon (diagnosis, not a target).

    python bench/launcher_cost.py [--jobs 5000] [--slots 16] [--launchers 2] [--warm] [--smoke]

Runs jobs `true #<i>` the way the daemon's queue does -- a LauncherPool, one JobRun per job with
its unique workspace (made and removed by the launchers), its run files read and removed by them
once the end is known -- keeping `--slots` jobs running until `--jobs` have ended, with no store,
no HTTP and no scheduler. Prints, per job, the CPU of this process's reactor thread (the daemon's
side of the hand-off: framing, events, the runs' bookkeeping), of the launcher processes
themselves, and of the jobs' `sh` (the launchers' reaped children), from /proc. CPU time per job,
not the rate, is the figure to compare between two versions of the launcher on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from wmgr.jobs.launcher import LauncherPool  # noqa: E402
from wmgr.jobs.runner import JobRun, RunFiles, prepare_workspace  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def launchers_cpu(pool: LauncherPool) -> tuple[float, float, float]:
    """(the launchers' own CPU, of which in the kernel, their reaped children's: the jobs') in seconds."""
    own = system = jobs = 0.0
    for launcher in pool.launchers:
        pid = launcher._protocol.transport.pid
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own += (int(fields[11]) + int(fields[12])) / TICK
        system += int(fields[12]) / TICK
        jobs += (int(fields[13]) + int(fields[14])) / TICK
    return own, system, jobs


async def main(reactor, opts) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="wmgr-launcher-cost-", dir=opts.dir))
    run_dir = Path(tempfile.mkdtemp(prefix="wmgr-launcher-cost-runs-", dir=opts.run_dir)) if opts.run_dir else tmp / "runs"
    run_dir.mkdir(exist_ok=True)
    if opts.warm:
        # Every job directory's parents made first (wr_cwd/<k0>/<k1>/<k2>, 4,096): the figure is
        # then a long-running daemon's, without the one-off cost of a new cwd (on ext4, a new
        # directory can cost more than a job).
        for name in (f"{n:03x}" for n in range(4096)):
            os.makedirs(tmp / "wr_cwd" / name[0] / name[1] / name[2])
    pool = LauncherPool(reactor, opts.launchers)
    pool.start()
    await deferLater(reactor, 0.5)  # the launchers' interpreters start
    spec = {"cwd": str(tmp), "env": None}
    finished = Deferred()
    counts = {"started": 0, "ended": 0, "failed": 0}

    def start_one() -> None:
        i = counts["started"]
        counts["started"] += 1
        key = f"{i:032x}"[::-1]
        workspace = prepare_workspace(key, spec, make=False)
        run = JobRun(reactor, RunFiles(run_dir, key, 1), workspace, f"true #{i}", spawn=pool.spawn,
                     remove_workdir=True)
        run.start()
        run.done.addCallback(ended, run)

    def ended(result, run) -> None:
        counts["ended"] += 1
        if result.exitcode != 0:
            counts["failed"] += 1
        run.remove_files()
        if counts["started"] < opts.jobs:
            start_one()
        elif counts["ended"] == opts.jobs:
            finished.callback(None)

    main_before = time.thread_time()
    own_before, system_before, jobs_before = launchers_cpu(pool)
    started = time.perf_counter()
    for _ in range(min(opts.slots, opts.jobs)):
        start_one()
    await finished
    elapsed = time.perf_counter() - started
    await deferLater(reactor, 1.0)  # the last removals, and the spares of idle launchers
    main_cpu = time.thread_time() - main_before
    own, system, jobs = launchers_cpu(pool)
    own, system, jobs = own - own_before, system - system_before, jobs - jobs_before
    pool.stop()
    n = opts.jobs
    print(f"{n:,} jobs in {elapsed:.2f} s ({n / elapsed:,.0f} jobs/s; {counts['failed']} failed), "
          f"{opts.slots} slots, {opts.launchers} launchers; load average {os.getloadavg()[0]:.1f}")
    print(f"CPU per job (ms): reactor side {main_cpu / n * 1000:.3f}, launchers {own / n * 1000:.3f} "
          f"(of which in the kernel {system / n * 1000:.3f}), "
          f"jobs' sh {jobs / n * 1000:.3f}; together {(main_cpu + own + jobs) / n * 1000:.3f}")
    leftovers = [p for p in tmp.rglob("*") if p.is_file()]
    print(f"files left: {len(leftovers)}; run dir entries: {len(os.listdir(run_dir))}")
    await deferLater(reactor, 0.2)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if counts["failed"] or leftovers else 0


def deferLater(reactor, seconds: float) -> Deferred:
    from twisted.internet.task import deferLater as later
    return later(reactor, seconds, lambda: None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--launchers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", default=None, help="where the jobs' directories and run files go (default: $TMPDIR)")
    parser.add_argument("--run-dir", default=None, help="where the run files go (default: in --dir)")
    parser.add_argument("--warm", action="store_true",
                        help="make the job directories' parent directories before the timing starts")
    parser.add_argument("--smoke", action="store_true")
    options = parser.parse_args()
    if options.smoke:
        options.jobs = 200

    async def body(reactor):
        code = await main(reactor, options)
        if code:
            raise SystemExit(code)

    react(lambda reactor: ensureDeferred(body(reactor)))
