"""Slurm: trivial jobs through Slurm runners, against one sbatch per job, in the same run.

Needs a running Slurm (scripts/slurm-one-node.sh start); without one it says so and exits 0.

Measured:
1. baseline: 100 trivial jobs (`true`), one `sbatch` each, submitted one after the other as fast
   as sbatch returns; from the first submission until squeue shows none of them: jobs/s;
2. submission latency: an idle manager with `[scheduler] backend = slurm` and no runner is given
   one job; how long until it starts (the job's Started time less the time it was added) and
   until the client sees it complete;
3. 10,000 trivial jobs through runners (max_runners runners, default 4, `pack` zero-core jobs at
   once each, default 64: a runner's rate is its slots per round trip to the manager):
   from the add until every job is complete: jobs/s, the ratio against the baseline (target
   >= 20x), and where it tops out: the manager's reactor CPU over that phase (near 100 %: the
   manager is the limit; well under: the runners, i.e. the node's cores, are).
`--smoke`: 10 baseline jobs, 300 jobs through runners (CI: not a timed test).

The machine may be shared with other work: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, machine, run_main, thread_cpu  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402

from wmgr.client import Client  # noqa: E402


def manager_config(max_runners: int, pack: int) -> str:
    return ("[scheduler]\nbackend = slurm\n[slurm]\n"
            f"max_runners = {max_runners}\npack = {pack}\nmax_cpus = 1\nidle_exit = 10\npoll_interval = 0.5\n"
            "heartbeat = 1\nrunner_memory = 150\n[workers]\ntimeout = 30\ncheck_interval = 1\n")


def slurm_problem() -> str:
    if not shutil.which("sbatch"):
        return "sbatch is not on PATH"
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if done.returncode != 0 or not any(state.startswith(("idle", "mixed", "alloc")) for state in done.stdout.split()):
        return f"no Slurm node is up (sinfo: {(done.stdout + done.stderr).strip()[:200]!r})"
    return ""


def squeue_count(name: str) -> int:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return len(out.split())


async def one_sbatch_per_job(reactor: Any, n: int) -> float:
    """n jobs, one sbatch each; until squeue shows none of them."""
    name = f"wmgr-bench-base-{int(time.time())}"
    started = time.perf_counter()
    for _ in range(n):
        subprocess.run(["sbatch", "-Q", f"--job-name={name}", "--mem=16M", "--time=1", "--output=/dev/null",
                        "--wrap=true"], check=True)
    while squeue_count(name) > 0:
        await deferLater(reactor, 0.1, lambda: None)
    return n / (time.perf_counter() - started)


async def until_done(reactor: Any, client: Client, every: float = 0.2) -> None:
    while True:
        reply = await client.get("rest/v1/jobs/")
        if reply.code == 200 and reply.json() == []:
            return
        await deferLater(reactor, every, lambda: None)


async def main(reactor: Any, opts: argparse.Namespace) -> int:
    problem = slurm_problem()
    if problem:
        print(f"no Slurm here ({problem}): nothing measured; start one with scripts/slurm-one-node.sh start")
        return 0
    n_base = 10 if opts.smoke else 100
    n_jobs = opts.jobs or (300 if opts.smoke else 10_000)
    print(machine())
    base = await one_sbatch_per_job(reactor, n_base)
    print(f"baseline: {n_base} trivial jobs, one sbatch each: {base:.1f} jobs/s")

    async with daemon(reactor, manager_config(opts.runners, opts.pack), opts.keep_log) as d:
        client = d.client(reactor)
        try:
            added = time.time()
            [job] = await client.add_jobs([{"cmd": "true", "cpus": 0, "memory": "10M", "rep_grp": "first"}])
            await until_done(reactor, client, every=0.05)
            seen = time.time() - added
            status = (await client.get("rest/v1/jobs/" + job["Key"])).json()[0]
            waited = status["Started"] - added
            print(f"first job on an idle manager with no runner: started after {waited:.2f} s "
                  f"(sbatch, Slurm's scheduling tick, the runner's start and first pull), complete for the client "
                  f"after {seen:.2f} s")

            jobs = [{"cmd": f"true {i}", "cpus": 0, "memory": "10M", "rep_grp": "many"} for i in range(n_jobs)]
            cpu_before, started = thread_cpu(d.process.pid), time.perf_counter()  # type: ignore[union-attr]
            for i in range(0, n_jobs, 5000):
                await client.add_jobs(jobs[i:i + 5000])
            await until_done(reactor, client, every=0.5)
            elapsed = time.perf_counter() - started
            cpu_after = thread_cpu(d.process.pid)  # type: ignore[union-attr]
            rate = n_jobs / elapsed
            runners = (await client.get("slurm/v1/runners")).json()
            reactor_cpu = (cpu_after["main"] - cpu_before["main"]) / elapsed
            threads_cpu = (cpu_after["threads"] - cpu_before["threads"]) / elapsed
            print(f"{n_jobs:,} trivial jobs through up to {opts.runners} runners ({opts.pack} at once each, "
                  f"{runners['submitted']} runners submitted in all): {rate:,.0f} jobs/s in {elapsed:.1f} s; "
                  f"manager reactor {reactor_cpu:.0%} CPU, its threads {threads_cpu:.0%}")
            print(f"ratio: runners / one sbatch per job = {rate / base:.1f}x (target >= 20x)")
        finally:
            await client.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick run (CI): not a timed test")
    parser.add_argument("--jobs", type=int, default=0, help="jobs through runners (default 10,000; smoke 300)")
    parser.add_argument("--runners", type=int, default=4, help="[slurm] max_runners (default 4)")
    parser.add_argument("--pack", type=int, default=64,
                        help="[slurm] pack: zero-core jobs at once per runner (default 64)")
    parser.add_argument("--keep-log", action="store_true", help="print the manager's log at the end")
    options = parser.parse_args()
    run_main(lambda reactor: main(reactor, options))
