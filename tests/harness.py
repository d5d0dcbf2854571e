"""Starting and stopping the real daemon (`twistd -n wmgr`) for integration tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from twisted.internet.task import deferLater

from wmgr.client import Client


def twistd_command() -> list[str]:
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


class Daemon:
    """One wmgr daemon in a subprocess with its own data directory.

    `start()` waits for the URL file it writes once listening; `stop()` sends SIGTERM and expects
    a clean exit within seconds; `crash()` is kill -9.
    """

    def __init__(self, data_dir: Path, *args: str, config: Optional[str] = None, env: Optional[dict] = None) -> None:
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.config_text = config
        self.env = env
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.log_path = self.data_dir.parent / (self.data_dir.name + ".log")
        self.url = ""

    @property
    def url_file(self) -> Path:
        return self.data_dir / "wmgr.url"

    @property
    def http_port(self) -> int:
        """The plain-HTTP listener's port (--http-port), from the file the daemon writes before
        its URL file."""
        url = (self.data_dir / "wmgr.http.url").read_text().strip()
        return int(url.rstrip("/").rsplit(":", 1)[1])

    def command(self) -> list[str]:
        command = twistd_command() + ["-n", "--pidfile=", "wmgr", "--data-dir", str(self.data_dir)]
        if not any(a.startswith("--port") for a in self.args):
            command += ["--port", "0"]
        if self.config_text is not None:
            config_path = self.data_dir.parent / (self.data_dir.name + ".cnf")
            config_path.write_text(self.config_text)
            command += ["--config", str(config_path)]
        return command + self.args

    async def start(self, reactor: Any, timeout: float = 30.0) -> "Daemon":
        for stale in (self.url_file, self.data_dir / "wmgr.http.url"):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
        env = dict(os.environ, **(self.env or {}))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            cwd=str(self.data_dir.parent), env=env)
        deadline = time.monotonic() + timeout
        while not self.url_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the daemon did not start in {timeout}s:\n{self.log()}")
            await deferLater(reactor, 0.05, lambda: None)
        self.url = self.url_file.read_text().strip()
        return self

    def client(self, reactor: Any, **kw: Any) -> Client:
        return Client.from_data_dir(reactor, self.data_dir, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    async def wait(self, reactor: Any, timeout: float) -> Optional[int]:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        return self.process.poll()

    async def stop(self, reactor: Any, timeout: float = 15.0) -> int:
        """SIGTERM, and the daemon must exit by itself within `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        code = await self.wait(reactor, timeout)
        if code is None:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the daemon did not stop within {timeout}s of SIGTERM:\n{self.log()}")
        return code

    def crash(self) -> None:
        """kill -9: no clean-up of any kind."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def kill_quietly(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def until(reactor: Any, check: Any, timeout: float = 20.0, every: float = 0.05) -> Any:
    """Poll `check` (a coroutine function) until it returns something truthy, and return that;
    fail the test with the last result after `timeout` seconds. Never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting; last: {result!r}")
        await deferLater(reactor, every, lambda: None)
