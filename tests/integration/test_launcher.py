"""The job launcher can die without losing anything: runs it started are settled from their files,
and a new launcher starts the next jobs."""

from __future__ import annotations

import psutil
import pytest
import pytest_twisted

from tests.harness import until

pytestmark = pytest.mark.timeout(90)

CONFIG = "[jobs]\nsample_interval = 0.2\nlaunchers = 1\n"


def launchers(daemon):
    found = []
    for child in psutil.Process(daemon.process.pid).children():
        try:
            if "wmgr.jobs.launcher" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


async def the_launcher(reactor, daemon):
    """The daemon's one launcher, once it has exec'ed (a child just forked still shows twistd's
    command line)."""
    async def one():
        found = launchers(daemon)
        return found[0] if len(found) == 1 else None

    return await until(reactor, one)


@pytest_twisted.ensureDeferred
async def test_jobs_survive_the_launcher_dying(make_daemon, reactor, tmp_path):
    daemon = await make_daemon(config=CONFIG)
    gate = tmp_path / "gate"
    async with daemon.client(reactor) as client:
        await client.add_jobs([{"cmd": f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done; exit 3",
                                "rep_grp": "survivor"}])

        async def running():
            [job] = await client.jobs("survivor")
            return job if job["State"] == "running" and job["Pid"] else None

        job = await until(reactor, running)
        launcher = await the_launcher(reactor, daemon)
        launcher.kill()
        launcher.wait(5)
        gate.touch()

        async def ended():
            [job] = await client.jobs("survivor", std="true")
            return job if job["State"] == "buried" else None

        job = await until(reactor, ended)
        assert job["Exitcode"] == 3 and job["StdOut"] == "done"
        assert job["FailReason"] == "command exited non-zero"
        # A new launcher took over: new jobs still run.
        await client.add_jobs([{"cmd": "echo after", "rep_grp": "after"}])

        async def complete():
            [job] = await client.jobs("after")
            return job["State"] == "complete"

        await until(reactor, complete)
        assert (await the_launcher(reactor, daemon)).pid != launcher.pid
    assert "the job launcher died" in daemon.log()


@pytest_twisted.ensureDeferred
async def test_stopping_the_daemon_stops_its_launchers(make_daemon, reactor):
    daemon = await make_daemon(config=CONFIG)
    launcher = await the_launcher(reactor, daemon)
    assert await daemon.stop(reactor) == 0
    assert launcher.wait(5) is not None or not launcher.is_running()
