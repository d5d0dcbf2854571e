"""wmgr.jobs.runner: the process (a session leader, its CPU time), the wrapper's status file,
bounded output, killing a whole process group (TERM, then KILL after the grace period), the
workspace, and JobRun's state machine with a fake spawner (no process at all).

Real processes are used where the process is the point; their timers run on a task.Clock, so the
grace period passes when the test says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import psutil
import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from wmgr.jobs import runner
from wmgr.jobs.runner import (
    ARGV0, SHELL, WRAPPER, JobRun, RunFiles, RunResult, Workspace, prepare_workspace, read_bounded,
    spawn_in_session,
)
from wmgr.jobs.spares import STATUS_BLANK, STATUS_WIDTH

KEY = "ea4266bc0fc7dd493caeb2fff1963e4a"
WAIT = 10.0  # a bound on waiting for a real process, never a fixed sleep


# -- helpers -----------------------------------------------------------------------------------------


def workspace(path: Path, env: Optional[dict] = None) -> Workspace:
    path.mkdir(parents=True, exist_ok=True)
    return Workspace(cwd=str(path), relative_cwd="", tmp=None, exact_env=env, extra_env={}, home_changed=False)


def run_files(tmp_path: Path) -> RunFiles:
    directory = tmp_path / "run"
    directory.mkdir(exist_ok=True)
    return RunFiles(directory, KEY)


def make_run(reactor: Any, files: RunFiles, ws: Workspace, cmd: str, clock: Any, spawn: Any = None,
             **kw: Any) -> JobRun:
    """A JobRun whose timers run on `clock` while processes are spawned with `reactor`."""
    return JobRun(reactor, files, ws, cmd, spawn=spawn or spawn_in_session, clock=clock, **kw)


async def wait_for(reactor: Any, predicate: Any, what: str) -> None:
    """Poll a condition that a real process makes true (bounded)."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


def bounded(d: Deferred) -> Deferred:
    """A Deferred that fails with TimeoutError instead of hanging the suite."""
    from twisted.internet import reactor

    return d.addTimeout(WAIT, reactor)


def read_pid(path: Path) -> Optional[int]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(reactor: Any, pid: int) -> None:
    await wait_for(reactor, lambda: gone(pid), f"process {pid} to die")


@pytest.fixture
def survivors() -> Any:
    """Pids a test started indirectly; any still alive at the end are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def py(code: str) -> str:
    return f"{sys.executable} -c '{code}'"


# -- real processes ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_job_is_a_session_leader(reactor: Any, tmp_path: Path) -> None:
    clock = Clock()
    run = make_run(reactor, run_files(tmp_path), workspace(tmp_path / "cwd"), "sleep 30", clock)
    pid = run.start()
    try:
        assert pid > 0
        assert os.getsid(pid) == pid
        assert os.getpgid(pid) == pid
        assert os.getsid(pid) != os.getsid(0)
    finally:
        run.kill("test over")
    result = await bounded(run.done)
    assert result.signal == signal.SIGTERM


@pytest_twisted.ensureDeferred
async def test_cpu_time_is_reported(reactor: Any, tmp_path: Path) -> None:
    burn = py("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass")
    run = make_run(reactor, run_files(tmp_path), workspace(tmp_path / "cwd"), burn, Clock())
    run.start()
    result = await bounded(run.done)
    assert result.exitcode == 0, result
    assert 0.28 <= result.cpu_time < 5, result.cpu_time
    assert result.ended >= result.started > 0


@pytest_twisted.ensureDeferred
async def test_the_job_runs_in_its_cwd_with_its_env(reactor: Any, tmp_path: Path) -> None:
    env = dict(os.environ, WMGR_TEST_VALUE="a value with spaces")
    ws = workspace(tmp_path / "here", env)
    run = make_run(reactor, run_files(tmp_path), ws, 'pwd; echo "$WMGR_TEST_VALUE"; echo oops >&2', Clock())
    run.start()
    result = await bounded(run.done)
    assert result.stdout == f"{tmp_path / 'here'}\na value with spaces\n"
    assert result.stderr == "oops\n"


@pytest_twisted.ensureDeferred
async def test_output_is_bounded(reactor: Any, tmp_path: Path) -> None:
    write = py("import sys\nfor s in (sys.stdout, sys.stderr): s.write(\"A\" * 100 + \"B\" * 9800 + \"C\" * 100)")
    run = make_run(reactor, run_files(tmp_path), workspace(tmp_path / "cwd"), write, Clock(), output_limit=100)
    run.start()
    result = await bounded(run.done)
    expected = "A" * 100 + "\n... [9800 bytes omitted] ...\n" + "C" * 100
    assert result.stdout == expected
    assert result.stderr == expected


@pytest.mark.parametrize("cmd, code", [
    ("true", 0),
    ("echo fine", 0),
    ("false", 1),
    ("exit 3", 3),
    ("echo partial; exit 7", 7),
    ("(exit 5)", 5),
    ("wmgr_no_such_command_xyz", 127),
])
@pytest_twisted.ensureDeferred
async def test_exit_status_file(reactor: Any, tmp_path: Path, cmd: str, code: int) -> None:
    files = run_files(tmp_path)
    run = make_run(reactor, files, workspace(tmp_path / "cwd"), cmd, Clock())
    run.start()
    result = await bounded(run.done)
    assert result.exitcode == code
    assert result.signal is None
    assert Path(files.rc).read_text() == f"{code} {run.pid}".ljust(STATUS_WIDTH - 1) + "\n"  # the status, and who ran
    assert files.exit_status() == code


@pytest_twisted.ensureDeferred
async def test_no_status_file_when_killed_by_a_signal(reactor: Any, tmp_path: Path) -> None:
    files = run_files(tmp_path)
    run = make_run(reactor, files, workspace(tmp_path / "cwd"), "echo before; kill -KILL $$; echo after", Clock())
    run.start()
    result = await bounded(run.done)
    assert result.exitcode is None
    assert result.signal == signal.SIGKILL
    assert result.stdout == "before\n"
    assert not Path(files.rc).exists()
    assert files.exit_status() is None
    for blank in ("", STATUS_BLANK.decode()):  # as the launcher leaves it (a spare in its place)
        Path(files.rc).write_text(blank)
        assert files.exit_record() == (None, 0)


@pytest_twisted.ensureDeferred
async def test_start_removes_the_files_of_an_earlier_run(reactor: Any, tmp_path: Path) -> None:
    files = run_files(tmp_path)
    Path(files.rc).write_text("0\n")
    Path(files.out).write_text("old output")
    run = make_run(reactor, files, workspace(tmp_path / "cwd"), "kill -KILL $$", Clock())
    run.start()
    result = await bounded(run.done)
    assert result.stdout == ""
    assert not Path(files.rc).exists()


@pytest_twisted.ensureDeferred
async def test_kill_terms_the_whole_group(reactor: Any, tmp_path: Path, survivors: list) -> None:
    pidfile = tmp_path / "grandchild.pid"
    clock = Clock()
    files = run_files(tmp_path)
    run = make_run(reactor, files, workspace(tmp_path / "cwd"), f"sleep 60 & echo $! > {pidfile}; wait", clock,
                   kill_grace=5.0)
    run.start()
    await wait_for(reactor, lambda: read_pid(pidfile), "the grandchild's pid")
    grandchild = read_pid(pidfile)
    survivors.append(grandchild)
    assert os.getpgid(grandchild) == run.pid
    runner_reason = "killed by user request"
    run.kill(runner_reason)
    assert [c.getTime() for c in clock.getDelayedCalls()] == [5.0]
    result = await bounded(run.done)
    assert result.signal == signal.SIGTERM
    assert result.exitcode is None
    assert result.kill_reason == runner_reason
    assert not Path(files.rc).exists()
    await wait_gone(reactor, grandchild)
    # The KILL stays due: it is harmless once the group is gone, and needed when it is not.
    assert [c.getTime() for c in clock.getDelayedCalls()] == [5.0]
    clock.advance(5)


@pytest_twisted.ensureDeferred
async def test_kill_escalates_to_kill_after_the_grace_period(reactor: Any, tmp_path: Path, survivors: list) -> None:
    pidfile = tmp_path / "grandchild.pid"
    clock = Clock()
    # The job ignores TERM (and so do the children it starts after that).
    cmd = f"trap '' TERM; sleep 60 & echo $! > {pidfile}; wait"
    run = make_run(reactor, run_files(tmp_path), workspace(tmp_path / "cwd"), cmd, clock, kill_grace=3.0)
    run.start()
    await wait_for(reactor, lambda: read_pid(pidfile), "the grandchild's pid")
    grandchild = read_pid(pidfile)
    survivors.append(grandchild)
    run.kill("killed by user request")
    assert [c.getTime() for c in clock.getDelayedCalls()] == [3.0]
    clock.advance(3.0)  # the grace period is over: KILL
    result = await bounded(run.done)
    assert result.signal == signal.SIGKILL
    assert result.kill_reason == "killed by user request"
    await wait_gone(reactor, grandchild)


# -- JobRun's state machine with a fake spawner ------------------------------------------------------


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rusage: Any = None


class FakeSpawner:
    """Records what JobRun asks to spawn and hands back a transport; the test ends the 'process'
    by calling `end` (as DummyProcessReactor does in twisted/runner/test/test_procmon.py)."""

    def __init__(self, pid: int = 1 << 30) -> None:
        self.pid = pid
        self.calls: list[dict[str, Any]] = []
        self.protocol: Any = None
        self.transport: Optional[FakeTransport] = None

    def __call__(self, reactor: Any, protocol: Any, executable: str, argv: list, env: Any, extra: dict,
                 stdio: tuple) -> Any:
        self.calls.append(dict(reactor=reactor, executable=executable, argv=argv, env=env, extra=dict(extra),
                               stdio=tuple(stdio)))
        self.protocol = protocol
        self.transport = FakeTransport(self.pid)
        protocol.makeConnection(self.transport)
        return self.transport

    def end(self, reason: BaseException, rusage: Any = None) -> None:
        assert self.transport is not None
        self.transport.rusage = rusage
        self.protocol.processEnded(Failure(reason))


@pytest.fixture
def signals(monkeypatch: Any) -> list[tuple[int, int]]:
    """Every signal JobRun sends to a process group, instead of sending it."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(runner, "signal_group", lambda pgid, sig: sent.append((pgid, sig)))
    return sent


@pytest.fixture
def fake(tmp_path: Path) -> Any:
    spawner = FakeSpawner()
    clock = Clock()
    files = run_files(tmp_path)
    ws = workspace(tmp_path / "cwd", {"ONLY": "this"})
    run = make_run(Clock(), files, ws, "echo hi", clock, spawn=spawner, kill_grace=5.0)
    return SimpleNamespace(spawner=spawner, clock=clock, files=files, ws=ws, run=run)


def outcome(run: JobRun) -> list[Any]:
    seen: list[Any] = []
    run.done.addBoth(seen.append)
    return seen


def test_fake_start_spawns_the_wrapper(fake: Any, signals: list) -> None:
    assert fake.run.start() == fake.spawner.pid
    (call,) = fake.spawner.calls
    assert call["executable"] == SHELL
    assert call["argv"] == [SHELL, "-c", WRAPPER, ARGV0, fake.ws.cwd, str(fake.files.rc), "echo hi"]
    assert call["env"] == {"ONLY": "this"} and call["extra"] == {}
    # stdin, stdout and stderr go as paths: the child opens them, so they exist only if it ran.
    assert call["stdio"] == (os.devnull, fake.files.out, fake.files.err)
    assert not Path(fake.files.out).exists()
    assert signals == []


@pytest.mark.parametrize("reason, exitcode, sig", [
    (error.ProcessDone(0), 0, None),
    (error.ProcessTerminated(exitCode=3), 3, None),
    (error.ProcessTerminated(exitCode=127), 127, None),
    (error.ProcessTerminated(signal=signal.SIGKILL), None, signal.SIGKILL),
])
def test_fake_outcomes(fake: Any, signals: list, reason: Any, exitcode: Any, sig: Any) -> None:
    seen = outcome(fake.run)
    fake.run.start()
    Path(fake.files.out).write_text("out\n")
    Path(fake.files.err).write_text("err\n")
    fake.spawner.end(reason, SimpleNamespace(ru_utime=1.25, ru_stime=0.5))
    (result,) = seen
    assert isinstance(result, RunResult)
    assert (result.exitcode, result.signal) == (exitcode, sig)
    assert result.cpu_time == pytest.approx(1.75)
    assert result.stdout == "out\n" and result.stderr == "err\n"
    assert result.kill_reason == ""


def test_fake_done_fires_exactly_once(fake: Any, signals: list) -> None:
    seen = outcome(fake.run)
    fake.run.start()
    fake.spawner.end(error.ProcessTerminated(exitCode=2))
    fake.spawner.end(error.ProcessDone(0))  # a second end is ignored, not an AlreadyCalledError
    assert len(seen) == 1
    assert seen[0].exitcode == 2


def test_fake_kill_terms_now_and_kills_after_the_grace(fake: Any, signals: list) -> None:
    seen = outcome(fake.run)
    pid = fake.run.start()
    fake.run.kill("first reason")
    assert signals == [(pid, signal.SIGTERM)]
    fake.run.kill("second reason")  # TERM again, but still one KILL timer
    assert signals == [(pid, signal.SIGTERM)] * 2
    assert len(fake.clock.getDelayedCalls()) == 1
    fake.clock.advance(4.99)
    assert signals == [(pid, signal.SIGTERM)] * 2
    fake.clock.advance(0.01)
    assert signals == [(pid, signal.SIGTERM)] * 2 + [(pid, signal.SIGKILL)]
    assert seen == []
    fake.spawner.end(error.ProcessTerminated(signal=signal.SIGKILL))
    (result,) = seen
    assert result.signal == signal.SIGKILL
    assert result.kill_reason == "first reason"
    fake.run.kill("after the end")  # nothing left to signal
    assert len(signals) == 3


def test_fake_end_before_the_grace_still_kills_the_group_after_it(fake: Any, signals: list) -> None:
    """The shell may end on TERM while what it started ignores it: the group is KILLed when the
    grace period ends all the same (the result is delivered at once)."""
    seen = outcome(fake.run)
    pid = fake.run.start()
    fake.run.kill("stop")
    fake.spawner.end(error.ProcessTerminated(signal=signal.SIGTERM))
    assert seen[0].signal == signal.SIGTERM and seen[0].kill_reason == "stop"
    assert signals == [(pid, signal.SIGTERM)]
    fake.clock.advance(10)
    assert signals == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]


def test_fake_kill_before_start_does_nothing(fake: Any, signals: list) -> None:
    fake.run.kill("too early")
    assert signals == []
    assert fake.clock.getDelayedCalls() == []


def test_fake_spawn_failure_propagates(fake: Any, tmp_path: Path) -> None:
    def broken(*args: Any) -> Any:
        raise OSError(2, "no such file")

    run = make_run(Clock(), fake.files, fake.ws, "true", Clock(), spawn=broken)
    with pytest.raises(OSError):
        run.start()
    assert run.pid == 0


# -- the workspace -------------------------------------------------------------------------------------


def test_prepare_workspace_makes_a_unique_dir(tmp_path: Path) -> None:
    spec = {"cwd": str(tmp_path), "env": ["A=1", "B=x=y"]}
    first = prepare_workspace(KEY, spec)
    second = prepare_workspace(KEY, spec)
    assert first.cwd != second.cwd
    for ws in (first, second):
        root = Path(ws.cwd).parent
        assert Path(ws.cwd).name == "cwd" and Path(ws.cwd).is_dir()
        assert ws.tmp == str(root / "tmp") and Path(ws.tmp).is_dir()
        assert root.parent == tmp_path / "wr_cwd" / "e" / "a" / "4"
        assert root.name.startswith(KEY[3:]) and len(root.name) > len(KEY[3:])
        assert ws.relative_cwd == "/" + str(Path(ws.cwd).relative_to(tmp_path))
        assert ws.relative_cwd.startswith("/wr_cwd/e/a/4/266bc0fc7dd493caeb2fff1963e4a")
        assert ws.env["TMPDIR"] == ws.tmp
        assert ws.env["A"] == "1" and ws.env["B"] == "x=y"
        assert ws.home_changed is False
        assert "HOME" not in ws.env or ws.env["HOME"] != ws.cwd


def test_prepare_workspace_without_env_inherits_the_daemons(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("WMGR_INHERITED", "yes")
    ws = prepare_workspace(KEY, {"cwd": str(tmp_path)})
    assert ws.env["WMGR_INHERITED"] == "yes"
    assert ws.env["TMPDIR"] == ws.tmp
    assert os.environ.get("TMPDIR") != ws.tmp, "the daemon's own environment must not change"


def test_prepare_workspace_change_home(tmp_path: Path) -> None:
    ws = prepare_workspace(KEY, {"cwd": str(tmp_path), "change_home": True})
    assert ws.home_changed is True
    assert ws.env["HOME"] == ws.cwd


def test_prepare_workspace_cwd_matters(tmp_path: Path) -> None:
    ws = prepare_workspace(KEY, {"cwd": str(tmp_path), "cwd_matters": True, "change_home": True})
    assert ws.cwd == str(tmp_path)
    assert ws.relative_cwd == ""
    assert ws.tmp is None
    assert list(tmp_path.iterdir()) == []  # nothing made
    with pytest.raises(FileNotFoundError):
        prepare_workspace(KEY, {"cwd": str(tmp_path / "missing"), "cwd_matters": True})


# -- read_bounded --------------------------------------------------------------------------------------


def test_read_bounded(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert read_bounded(tmp_path / "missing", 4) == ""
    path.write_bytes(b"")
    assert read_bounded(path, 4) == ""
    path.write_bytes(b"12345678")  # exactly twice the limit: kept whole
    assert read_bounded(path, 4) == "12345678"
    path.write_bytes(b"123456789")
    assert read_bounded(path, 4) == "1234\n... [1 bytes omitted] ...\n6789"
    path.write_bytes(b"a" * 10 + b"b" * 1000 + b"c" * 10)
    assert read_bounded(path, 10) == "a" * 10 + "\n... [1000 bytes omitted] ...\n" + "c" * 10


def test_read_bounded_replaces_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"ok \xff\xfe done")
    assert read_bounded(path, 100) == "ok \ufffd\ufffd done"


def test_fake_time_limit_kills_with_its_reason(tmp_path: Path, signals: list) -> None:
    spawner, clock = FakeSpawner(), Clock()
    run = make_run(Clock(), run_files(tmp_path), workspace(tmp_path / "cwd"), "sleep 100", clock, spawn=spawner,
                   kill_grace=2.0, max_time=10.0)
    seen = outcome(run)
    pid = run.start()
    clock.advance(9.99)
    assert signals == []
    clock.advance(0.01)
    assert signals == [(pid, signal.SIGTERM)]
    clock.advance(2.0)
    assert signals == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    spawner.end(error.ProcessTerminated(signal=signal.SIGKILL))
    assert seen[0].kill_reason == runner.FAIL_TIME


def test_fake_ending_in_time_cancels_the_time_limit(tmp_path: Path, signals: list) -> None:
    spawner, clock = FakeSpawner(), Clock()
    run = make_run(Clock(), run_files(tmp_path), workspace(tmp_path / "cwd"), "true", clock, spawn=spawner,
                   max_time=10.0)
    run.start()
    spawner.end(error.ProcessDone(0))
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert signals == []


# -- the daemon user's own base for job directories (issue 9, item 10) ----------------------------


def test_job_directories_are_made_in_a_private_base(tmp_path: Path) -> None:
    ws = prepare_workspace(KEY, {"cwd": str(tmp_path), "env": None})
    base = tmp_path / "wr_cwd"
    assert ws.base == str(base) and ws.cwd.startswith(str(base) + "/") and ws.relative_cwd.startswith("/wr_cwd/")
    info = base.lstat()
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700


@pytest.mark.parametrize("planted", ["symlink", "other_owner"])
def test_a_base_planted_by_someone_else_is_never_used(tmp_path: Path, planted: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    cwd = tmp_path / "shared"
    cwd.mkdir()
    if planted == "symlink":
        (cwd / "wr_cwd").symlink_to(elsewhere)
    else:
        if os.getuid() != 0:
            pytest.skip("making a directory owned by another user needs root")
        (cwd / "wr_cwd").mkdir(mode=0o777)
        os.chown(cwd / "wr_cwd", 65534, 65534)
    ws = prepare_workspace(KEY, {"cwd": str(cwd), "env": None})
    own = cwd / f"wr_cwd.{os.getuid()}"
    assert ws.base == str(own) and ws.cwd.startswith(str(own) + "/")
    assert ws.relative_cwd.startswith(f"/wr_cwd.{os.getuid()}/")
    assert list(elsewhere.iterdir()) == [] and own.lstat().st_mode & 0o777 == 0o700


def test_a_base_removed_and_made_again_by_someone_else_is_not_written_into(tmp_path: Path) -> None:
    from wmgr.jobs.launcher import make_job_dirs

    ws = prepare_workspace(KEY, {"cwd": str(tmp_path / "c1"), "env": None}, make=False)
    base = Path(ws.base)
    base.rmdir()
    make_job_dirs(*ws.pending)  # removed (a /tmp cleaner): made again, ours
    assert os.path.isdir(ws.cwd) and base.lstat().st_mode & 0o777 == 0o700
    ws = prepare_workspace(KEY, {"cwd": str(tmp_path / "c1"), "env": None}, make=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shutil
    shutil.rmtree(base)
    base.symlink_to(elsewhere)  # made again by someone else
    with pytest.raises(PermissionError):
        make_job_dirs(*ws.pending)
    assert list(elsewhere.iterdir()) == []


def test_recovery_finds_the_jobs_of_this_and_earlier_versions_by_their_command_line(tmp_path: Path) -> None:
    """A restarted daemon (perhaps upgraded) knows its running jobs by the wrapper's arguments."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started = {}
    try:
        for name, wrapper in (("k.1", WRAPPER), ("j.2", runner.EARLIER_WRAPPERS[0])):
            argv = [SHELL, "-c", wrapper, ARGV0, str(tmp_path), str(run_dir / f"{name}.rc"), "sleep 30"]
            started[name] = subprocess.Popen(argv)
        other = subprocess.Popen([SHELL, "-c", WRAPPER, ARGV0, str(tmp_path), str(tmp_path / "x.1.rc"), "sleep 30"])
        started["elsewhere"] = other
        found = runner.find_job_processes(run_dir)
        assert found == {"k.1": started["k.1"].pid, "j.2": started["j.2"].pid}
    finally:
        for process in started.values():
            process.kill()
            process.wait()
