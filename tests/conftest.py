"""Fixtures shared by the suite. The reactor is never imported at module level here: pytest-twisted
installs it in pytest_configure, after conftest is imported."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from tests.harness import Daemon


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor as the_reactor

    return the_reactor


@pytest.fixture
def make_daemon(tmp_path: Any, reactor: Any) -> Any:
    """A factory of started daemons; every daemon made is stopped (SIGTERM, must exit 0) at the end."""
    daemons: list[Daemon] = []

    async def make(*args: str, name: str = "data", config: Any = None, env: Any = None) -> Daemon:
        daemon = Daemon(tmp_path / name, *args, config=config, env=env)
        daemons.append(daemon)
        return await daemon.start(reactor)

    yield make
    for daemon in daemons:
        daemon.kill_quietly()


@pytest_twisted.async_yield_fixture
async def daemon(make_daemon: Any, reactor: Any) -> Any:
    d = await make_daemon()
    yield d
    if d.process is not None and d.process.poll() is None:
        assert await d.stop(reactor) == 0, d.log()


@pytest_twisted.async_yield_fixture
async def client(daemon: Any, reactor: Any) -> Any:
    c = daemon.client(reactor)
    yield c
    await c.close()
