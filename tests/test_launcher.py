"""wmgr.jobs.launcher with a real launcher process: whatever one spawn request makes posix_spawn
raise fails that job alone, with its reason, and the launcher goes on starting the next ones."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.harness import until
from wmgr.jobs.launcher import Launcher, LauncherPool
from wmgr.jobs.runner import WRAPPER
from wmgr.jobs.spares import STATUS_BLANK, STATUS_WIDTH

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """A process protocol that tells how its process went: ("started", pid), ("failed", why),
    ("ended", reason)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.finished: Deferred[list[tuple[str, Any]]] = Deferred()

    def makeConnection(self, transport: Any) -> None:
        self.events.append(("started", transport.pid))

    def processEnded(self, reason: Any) -> None:
        self.events.append(("ended", getattr(reason.value, "exitCode", None)))
        self.finished.callback(self.events)

    def startFailed(self, why: str) -> None:
        self.events.append(("failed", why))
        self.finished.callback(self.events)


@pytest.fixture
def launcher(reactor: Any) -> Any:
    launcher = Launcher(reactor)
    launcher.start()
    yield launcher
    launcher.stop()


def spawn(launcher: Launcher, reactor: Any, tmp_path: Path, cmd: str, env: Any = None, name: str = "j") -> Recorder:
    recorder = Recorder()
    stdio = ("/dev/null", str(tmp_path / f"{name}.out"), str(tmp_path / f"{name}.err"))
    launcher.spawn(reactor, recorder, "/bin/sh", ["/bin/sh", "-c", cmd], env, {}, stdio)
    return recorder


@pytest.mark.parametrize("bad_env, bad_cmd, reason", [
    ({"A": "b\x00c"}, "true", "invalid value"),
    ({"A": "lone \ud800"}, "true", "invalid value"),
    (None, "true \x00 nul", "invalid value"),
    (None, "echo " + "x" * 200_000, "Argument list too long (E2BIG)"),
])
@pytest_twisted.ensureDeferred
async def test_one_bad_spawn_fails_alone(launcher: Launcher, reactor: Any, tmp_path: Path, bad_env: Any,
                                         bad_cmd: str, reason: str) -> None:
    bad = spawn(launcher, reactor, tmp_path, bad_cmd, bad_env, "bad")
    good = [spawn(launcher, reactor, tmp_path, f"exit {i}", None, f"good{i}") for i in range(5)]
    events = await bad.finished.addTimeout(10, reactor)
    assert len(events) == 1 and events[0][0] == "failed" and reason in events[0][1], events
    for i, recorder in enumerate(good):
        events = await recorder.finished.addTimeout(10, reactor)
        assert events[0][0] == "started" and events[-1] == ("ended", i)
    assert launcher.restarts == 0


@pytest_twisted.ensureDeferred
async def test_the_launcher_removes_a_jobs_directory_once_it_has_ended(
        launcher: Launcher, reactor: Any, tmp_path: Path) -> None:
    workdir = tmp_path / "wr_cwd" / "job"
    (workdir / "cwd").mkdir(parents=True)
    recorder = Recorder()
    stdio = ("/dev/null", str(tmp_path / "out"), str(tmp_path / "err"))
    process = launcher.spawn(reactor, recorder, "/bin/sh", ["/bin/sh", "-c", f"echo x > {workdir}/cwd/file"], None,
                             {}, stdio, remove=str(workdir))
    assert process.removes_workdir
    events = await recorder.finished.addTimeout(10, reactor)
    assert events[-1] == ("ended", 0)

    async def removed() -> bool:
        return not workdir.exists()

    await until(reactor, removed, timeout=10)


def test_pool_restarts_count_its_launchers() -> None:
    pool = LauncherPool(reactor=None, size=3)
    pool.launchers[0].restarts, pool.launchers[2].restarts = 2, 1
    assert pool.restarts == 3


@pytest_twisted.ensureDeferred
async def test_tied_jobs_die_with_the_daemon_and_the_others_carry_on(reactor: Any, tmp_path: Path) -> None:
    """A worker's pulled jobs are tied: once the launcher's daemon is gone (its stdin ends, as
    when the daemon is killed), the launcher kills their process groups; local jobs carry on."""
    import os
    import signal

    launcher = Launcher(reactor)
    launcher.start()
    tied, free = Recorder(), Recorder()
    stdio = ("/dev/null", str(tmp_path / "out"), str(tmp_path / "err"))
    launcher.spawn(reactor, tied, "/bin/sh", ["/bin/sh", "-c", "sleep 60"], None, {}, stdio, tied=True)
    launcher.spawn(reactor, free, "/bin/sh", ["/bin/sh", "-c", "sleep 60"], None, {}, stdio)

    async def both_started() -> bool:
        return bool(tied.events) and bool(free.events)

    await until(reactor, both_started, timeout=10)
    tied_pid, free_pid = tied.events[0][1], free.events[0][1]
    launcher.stop()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    async def tied_gone() -> bool:
        return not alive(tied_pid)

    try:
        await until(reactor, tied_gone, timeout=10)
        assert alive(free_pid)
    finally:
        for pid in (tied_pid, free_pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def job_request(tmp_path: Path, name: str) -> dict[str, Any]:
    """A job's directories and run files, as JobRun asks the launcher for them."""
    base = tmp_path / "wr_cwd"
    base.mkdir(mode=0o700, exist_ok=True)
    (tmp_path / "run").mkdir(exist_ok=True)
    root = base / "a" / "b" / "c" / name
    run = tmp_path / "run" / name
    return {"make": (str(base), str(root.parent), str(root), str(root / "cwd"), str(root / "tmp")),
            "remove": str(root), "fresh": f"{run}.rc", "read": 4096,
            "stdio": ("/dev/null", f"{run}.out", f"{run}.err")}


async def run_job(launcher: Launcher, reactor: Any, tmp_path: Path, name: str, cmd: str) -> tuple[str, Any]:
    """Run `cmd` in its own job directory; its stdout once it has ended, and its request."""
    request = job_request(tmp_path, name)
    recorder = Recorder()
    process = launcher.spawn(reactor, recorder, "/bin/sh", ["/bin/sh", "-c", f"cd {request['make'][3]} && {cmd}"],
                             None, {}, request["stdio"], remove=request["remove"], make=request["make"],
                             fresh=request["fresh"], read=request["read"])
    events = await recorder.finished.addTimeout(10, reactor)
    assert events[-1] == ("ended", 0), events
    root = Path(request["remove"])

    async def removed() -> bool:
        return not root.exists()

    await until(reactor, removed, timeout=10)
    launcher.remove_later(request["stdio"][1:] + (request["fresh"],))
    return process.outputs[0], request


@pytest_twisted.ensureDeferred
async def test_a_finished_jobs_directory_and_files_serve_the_next_job(
        launcher: Launcher, reactor: Any, tmp_path: Path) -> None:
    """Reused, not made again (wmgr.jobs.spares): the next job finds an empty cwd and tmp and
    empty run files, with the inodes of the last job's; a moment after the last job they go."""
    show = "stat -c %i . ../tmp; echo from $0 >&2"
    first, _ = await run_job(launcher, reactor, tmp_path, "one", show)
    second, request = await run_job(launcher, reactor, tmp_path, "two", show + "; find . ../tmp -mindepth 1 | wc -l")
    assert second.split() == first.split() + ["0"]  # the same directories, empty
    assert Path(request["stdio"][2]).read_text() == "from /bin/sh\n"  # its own stderr, nothing of the last

    async def spares_gone() -> Any:
        left = [p.name for p in tmp_path.rglob(".wmgr-spare*")]
        return not left

    await until(reactor, spares_gone, timeout=10)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    assert list((tmp_path / "wr_cwd" / "a" / "b" / "c").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_directory_something_still_runs_in_is_removed_not_reused(
        launcher: Launcher, reactor: Any, tmp_path: Path) -> None:
    """A job that leaves a process behind (in its process group) may still write into its
    directory: the next job gets a new one."""
    pidfile = tmp_path / "left.pid"
    first, _ = await run_job(launcher, reactor, tmp_path, "one",
                             f"stat -c %i .; sleep 30 > /dev/null 2>&1 & echo $! > {pidfile}")
    try:
        second, _ = await run_job(launcher, reactor, tmp_path, "two", "stat -c %i .")
        assert second != first
    finally:
        import os
        import signal
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, FileNotFoundError):
            pass


@pytest_twisted.ensureDeferred
async def test_what_an_earlier_run_left_in_the_run_files_is_not_this_ones(
        launcher: Launcher, reactor: Any, tmp_path: Path) -> None:
    """The launcher's children open their stdout and stderr without truncating them: what an
    earlier run (of a daemon since killed) left there must go first, spare or no spare."""
    request = job_request(tmp_path, "one")
    for path in request["stdio"][1:]:
        Path(path).write_text("old output of an earlier run\n")
    out, _ = await run_job(launcher, reactor, tmp_path, "one", "echo new")
    assert out == "new\n" and Path(request["stdio"][2]).read_text() == ""
    # And once a spare is there (the files just removed), with longer old output again.
    request = job_request(tmp_path, "two")
    for path in request["stdio"][1:]:
        Path(path).write_text("old output of an earlier run, longer than the new\n")
    out, _ = await run_job(launcher, reactor, tmp_path, "two", "echo new")
    assert out == "new\n" and Path(request["stdio"][2]).read_text() == ""


@pytest_twisted.ensureDeferred
async def test_a_status_file_is_a_blank_spare_until_the_job_writes_it(
        launcher: Launcher, reactor: Any, tmp_path: Path) -> None:
    """The shell writes the status at the job's end into a file that is already there: the last
    run's, blanked (its block kept), put in place of what an earlier run left, with a fresh
    modification time (it stands for the run's start when recovery finds no stored one)."""
    first_rc = job_request(tmp_path, "one")["fresh"]
    write_status = WRAPPER.split("trap '", 1)[1].split("' EXIT", 1)[0].replace("$_wmgr_rc", first_rc)
    first, _ = await run_job(launcher, reactor, tmp_path, "one", f"{write_status}; stat -c %i {first_rc}")


    async def kept() -> bool:  # taken as a spare (the removal goes a reactor turn later)
        return not Path(first_rc).exists()

    await until(reactor, kept, timeout=10)
    second_rc = job_request(tmp_path, "two")["fresh"]
    Path(second_rc).write_text("0 999\n")  # an earlier run's status, not this one's
    before = time.time()
    second, _ = await run_job(launcher, reactor, tmp_path, "two", f"stat -c '%i %s %Y' {second_rc}; cat {second_rc}")
    facts, blank = second.split("\n", 1)
    inode, size, mtime = facts.split()
    assert inode == first.strip() and size == str(STATUS_WIDTH) and int(mtime) >= int(before)
    assert blank == STATUS_BLANK.decode()


@pytest_twisted.ensureDeferred
async def test_a_launcher_going_idle_between_starts_never_stalls(
        reactor: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A launcher clears its spares each time nothing has run for a moment; made idle after every
    job here (a moment of 1 ms), it must still start and report every job (the clearing once
    took its two locks in the order opposite to a start's, and the launcher stood still)."""
    monkeypatch.setenv("WMGR_LAUNCHER_IDLE_SECONDS", "0.001")
    launcher = Launcher(reactor)
    launcher.start()
    try:
        for round_ in range(40):
            batch = [spawn(launcher, reactor, tmp_path, "true", None, f"r{round_}j{i}") for i in range(4)]
            for recorder in batch:
                events = await recorder.finished.addTimeout(10, reactor)
                assert events[-1] == ("ended", 0), events
    finally:
        launcher.stop()
