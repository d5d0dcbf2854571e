"""Listing: `GET /rest/v1/jobs/?limit=1` with N queued jobs, median latency.

Full size: 100,000 queued jobs, 15 requests of each kind. `--smoke`: 2,000 jobs, 5 requests.

The daemon is the real one (tests/harness.py, under the Twisted reactor), configured never to
start a job (`[jobs] zero_core_slots = 0`, jobs asking for 0 cores), so all N stay `ready`. They
are added in one POST (not timed here; see add_100k.py). Requests go over one plain blocking
keep-alive http.client/ssl connection (bench/common.py: Http), not treq; each is timed from
sending the request to the end of the body. Requests of the different kinds are interleaved so
that noise hits them alike.

Baseline, measured in the same run on the same connection: `GET /rest/version/` (the cheapest
route: TLS, HTTP, routing, JSON; no job work). Also shown, for information: the same limit=1 query
by rep group (`GET /rest/v1/jobs/bench?limit=1`), which reads the group from the store.

Target (issue 3): < 200 ms.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NO_RUN_CONFIG, Http, arguments, daemon, machine, median, run_main  # noqa: E402

TARGET_MS = 200.0


async def main(reactor, opts) -> int:
    n = 2_000 if opts.smoke else 100_000
    repeats = 5 if opts.smoke else 15
    print(f"machine: {machine()}")
    async with daemon(reactor, NO_RUN_CONFIG, opts.keep_log) as d:
        http = Http(d.data_dir, d.url)
        body = json.dumps([{"cmd": f"true #{i}"} for i in range(n)]).encode()
        cwd = str(d.data_dir.parent / "jobs")
        status, data, _, added = http.request("POST", "/rest/v1/jobs/", body=body,
                                              params={"rep_grp": "bench", "cwd": cwd})
        if status != 201:
            print(f"POST failed: {status} {data[:300]!r}")
            return 1
        print(f"added {n:,} jobs in {added:.2f} s")
        times: dict[str, list[float]] = {"version": [], "limit": [], "group": []}
        requests = {
            "version": ("/rest/version/", None),
            "limit": ("/rest/v1/jobs/", {"limit": "1"}),
            "group": ("/rest/v1/jobs/bench", {"limit": "1"}),
        }
        for name, (path, params) in requests.items():  # warm up each route once
            http.request("GET", path, params=params)
        for _ in range(repeats):
            for name, (path, params) in requests.items():
                status, data, _, whole = http.request("GET", path, params=params)
                if status != 200:
                    print(f"GET {path} failed: {status} {data[:300]!r}")
                    return 1
                if name != "version":
                    (only,) = json.loads(data)
                    if only["State"] != "ready" or only["Similar"] != n - 1:
                        print(f"unexpected reply to {path}: {only}")
                        return 1
                times[name].append(whole * 1000)
        http.close()
    version, limit, group = (median(times[k]) for k in ("version", "limit", "group"))
    print(f"GET /rest/version/: median {version:.2f} ms (min {min(times['version']):.2f}, max {max(times['version']):.2f})")
    print(f"GET /rest/v1/jobs/?limit=1 ({n:,} queued): median {limit:.1f} ms "
          f"(min {min(times['limit']):.1f}, max {max(times['limit']):.1f})")
    print(f"GET /rest/v1/jobs/bench?limit=1 (by rep group, from the store): median {group:.1f} ms "
          f"(min {min(times['group']):.1f}, max {max(times['group']):.1f})")
    print(f"RESULT get_limit: {limit:.1f} ms; baseline GET /rest/version/ {version:.2f} ms; "
          f"ratio {limit / version:.0f}x (target < {TARGET_MS:.0f} ms)")
    return 0


if __name__ == "__main__":
    options = arguments(__doc__.splitlines()[0])
    run_main(lambda reactor: main(reactor, options))
