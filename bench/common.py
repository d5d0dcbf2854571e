"""Shared helpers for the wmgr benchmarks (run as `python bench/<name>.py` from the repo root).

- `run_main(main)`: run `async def main(reactor)` under the Twisted reactor (task.react).
- `daemon(reactor, config=...)`: an async context manager that starts the real daemon the way the
  integration tests do (tests/harness.py: `twistd -n wmgr` in a subprocess, a temporary data
  directory, `--port 0`) and always stops it with SIGTERM (then kill if it will not stop), and
  removes its temporary directory, even when the benchmark fails.
- `Http`: a plain, blocking, keep-alive HTTPS client (http.client + ssl, verifying the daemon's own
  CA) used for every *timed* request, so that figures measure the daemon and not treq/Twisted in the
  benchmark process. Blocking the benchmark's reactor is harmless: the daemon is another process.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from tests.harness import Daemon  # noqa: E402

# A daemon that accepts jobs but never starts one: jobs asking for 0 cores only run in zero-core
# slots, and there are none (the scheduler's `fits` is then always false, so a pass costs O(1)).
NO_RUN_CONFIG = "[jobs]\nzero_core_slots = 0\nsample_interval = 1\n"


def arguments(description: str, slots: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if slots:
        parser.add_argument("--slots", type=int, default=0, help="[jobs] zero_core_slots (experiments only)")
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick run (CI): not a timed test")
    parser.add_argument("--keep-log", action="store_true", help="print the daemon's log at the end")
    return parser.parse_args()


def machine() -> str:
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")


def run_main(main: Callable[[Any], Awaitable[int]]) -> None:
    async def body(reactor: Any) -> None:
        code = await main(reactor)
        if code:
            raise SystemExit(code)

    react(lambda reactor: ensureDeferred(body(reactor)))


class Http:
    """A blocking keep-alive HTTPS connection to the daemon, trusting its CA, sending its token."""

    def __init__(self, data_dir: Path, url: str, timeout: float = 600.0) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "localhost", parts.port or 443
        context = ssl.create_default_context(cafile=str(data_dir / "ca.pem"))
        self.token = (data_dir / "client.token").read_text().strip()
        self.conn = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=timeout)

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                params: Optional[dict[str, Any]] = None) -> tuple[int, bytes, float, float]:
        """Send a request; return (status, body, seconds to the status line, seconds to the end
        of the body), both timed from just before the request is sent."""
        if params:
            path = path + "?" + urlencode(params)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        first = time.perf_counter() - started
        data = response.read()
        return response.status, data, first, time.perf_counter() - started

    def json(self, method: str, path: str, **kw: Any) -> Any:
        status, data, _, _ = self.request(method, path, **kw)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


@asynccontextmanager
async def daemon(reactor: Any, config: Optional[str] = None, keep_log: bool = False,
                 *args: str) -> AsyncIterator[Daemon]:
    """The real daemon in a fresh temporary directory; always stopped and cleaned up."""
    tmp = Path(tempfile.mkdtemp(prefix="wmgr-bench-"))
    d = Daemon(tmp / "data", *args, config=config)
    try:
        await d.start(reactor, timeout=60)
        yield d
    finally:
        try:
            if d.process is not None and d.process.poll() is None:
                try:
                    await d.stop(reactor, timeout=60)
                except AssertionError as e:
                    print(f"warning: {str(e).splitlines()[0]}", file=sys.stderr)
        finally:
            d.kill_quietly()
            if keep_log:
                print(d.log())
            shutil.rmtree(tmp, ignore_errors=True)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by a process: its main thread (the reactor),
    its other threads together (the store's writer and readers, thread pools), and its reaped
    children (the jobs, counted once their parent has waited for them)."""
    tick = os.sysconf("SC_CLK_TCK")
    result = {"main": 0.0, "threads": 0.0, "children": 0.0}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            result["main" if int(tid) == pid else "threads"] += (int(fields[11]) + int(fields[12])) / tick
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        result["children"] = (int(fields[13]) + int(fields[14])) / tick
    except (OSError, IndexError, ValueError):
        pass
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- the spawn baseline ------------------------------------------------------------------------------

SPAWNER = r"""
import os, sys, time
duration = float(sys.argv[1])
argv = ["/bin/sh", "-c", "true"]
env = dict(os.environ)
n = 0
deadline = time.perf_counter() + duration
started = time.perf_counter()
while time.perf_counter() < deadline:
    pid = os.posix_spawn("/bin/sh", argv, env)
    os.waitpid(pid, 0)
    n += 1
print(n, time.perf_counter() - started)
"""


def spawn_rate(spawners: int = 2, duration: float = 5.0) -> float:
    """Processes per second that `spawners` parallel processes start and reap, each running
    `sh -c true` with os.posix_spawn + waitpid in a loop for `duration` seconds."""
    procs = [subprocess.Popen([sys.executable, "-c", SPAWNER, str(duration)], stdout=subprocess.PIPE, text=True)
             for _ in range(spawners)]
    total = 0.0
    for p in procs:
        out, _ = p.communicate(timeout=duration + 60)
        n, elapsed = out.split()
        total += int(n) / float(elapsed)
    return total
