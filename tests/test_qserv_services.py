"""Services (wmgr.services) on a fake process reactor driven by a Clock, and their routes
(wmgr.api.qserv_services) under StubTreq."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from wmgr.api.qserv_services import QservServicesAPI
from wmgr.config import Config
from wmgr.errors import InvalidRequest
from wmgr.services import CommandFailure, InvalidService, ServiceManager, service_spec

BASE = "http://wmgr.test"


class FakeProcess:
    def __init__(self, protocol: Any, args: list[str], pid: int, child_fds: Any) -> None:
        self.protocol, self.args, self.pid, self.child_fds = protocol, args, pid, child_fds
        self.signals: list[str] = []
        self.ended = False
        protocol.makeConnection(self)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self, code: int = 0, sig: Optional[int] = None) -> None:
        assert not self.ended
        self.ended = True
        reason = ProcessDone(0) if code == 0 and sig is None else ProcessTerminated(None if sig else code, sig)
        self.protocol.processEnded(Failure(reason))

    # What a ProcessProtocol may call on its transport.
    def loseConnection(self) -> None:
        pass

    def closeStdin(self) -> None:
        pass


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: Any = 0, childFDs: Any = None) -> FakeProcess:
        process = FakeProcess(protocol, list(args), 1000 + len(self.spawned), childFDs)
        self.spawned.append(process)
        return process

    def running(self) -> list[FakeProcess]:
        return [p for p in self.spawned if not p.ended]


def manager(tmp_path: Path, reactor: FakeReactor, **specs: dict[str, str]) -> tuple[ServiceManager, list]:
    signalled: list[tuple[int, int]] = []
    services = ServiceManager([service_spec(name, options) for name, options in specs.items()], reactor,
                              tmp_path / "services", script_timeout=30, kill_grace=5, restart_min_delay=1,
                              restart_max_delay=8, killpg=lambda pgid, sig: signalled.append((pgid, sig)))
    services.startService()
    return services, signalled


def run(coroutine: Any) -> Deferred:
    return Deferred.fromCoroutine(coroutine)


def value(d: Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not finished"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


# -- specs and configuration ----------------------------------------------------------------------------


def test_a_spec_has_a_command_or_a_script():
    assert service_spec("xrootd", {"command": "xrootd -c 'a b.cf'"}).command == ("xrootd", "-c", "a b.cf")
    assert service_spec("mysqld", {"script": "/etc/init.d/mysqld"}).script == "/etc/init.d/mysqld"
    for options in ({}, {"command": "x", "script": "/y"}, {"script": "relative/path"}, {"command": "x", "env": "A=1"},
                    {"command": "'unclosed"}):
        with pytest.raises(ValueError):
            service_spec("ok", options)
    for name in ("a/b", "", ".x", "a b"):
        with pytest.raises(ValueError):
            service_spec(name, {"command": "x"})


def test_the_config_reads_service_sections(tmp_path: Path):
    path = tmp_path / "wmgr.cnf"
    path.write_text("[services]\nscript_timeout = 7\n[service:mysqld]\nscript = /etc/init.d/mysqld\n"
                    "[service:xrootd]\ncommand = /usr/bin/xrootd -c x.cf\n")
    config = Config.load(str(path))
    assert config.services_script_timeout == 7
    assert sorted(config.services) == ["mysqld", "xrootd"]
    assert config.services["xrootd"].command == ("/usr/bin/xrootd", "-c", "x.cf")


@pytest.mark.parametrize("text, reason", [
    ("[service:x]\n", "exactly one of command"),
    ("[service:x]\ncommand = a\nbogus = 1\n", "unknown option"),
    ("[servicex:y]\ncommand = a\n", "not a wmgr option"),
    ("[service:x]\ncommand = a\n[service:x]\ncommand = b\n", "already exists"),
    ("[services]\nscript_timeout = 0\n", "script_timeout must be > 0"),
    ("[qserv]\nauth = ntlm\n", "auth is none"),
])
def test_bad_service_config_is_refused(tmp_path: Path, text: str, reason: str):
    path = tmp_path / "wmgr.cnf"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=reason):
        Config.load(str(path))


# -- supervised commands --------------------------------------------------------------------------------


def test_a_command_is_started_and_restarted_with_back_off(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, xrootd={"command": "/bin/xrootd -c x"})
    [first] = reactor.spawned
    assert first.args == ["/bin/xrootd", "-c", "x"]
    reactor.advance(10)
    state = value(run(services.state("xrootd")))
    assert (state.state, state.pid, state.uptime, state.restarts) == ("active", first.pid, 10, 0)

    first.end(sig=9)  # it ran long enough: restarted at once
    reactor.advance(0)
    assert len(reactor.running()) == 1
    second = reactor.running()[0]
    assert value(run(services.state("xrootd"))).restarts == 1

    second.end(1)  # died at once: restarted after 1 s, then 2 s...
    assert value(run(services.state("xrootd"))).state == "stopped"
    reactor.advance(0.9)
    assert reactor.running() == []
    reactor.advance(0.1)
    third = reactor.running()[0]
    third.end(1)
    reactor.advance(1.9)
    assert reactor.running() == []
    reactor.advance(0.1)
    assert len(reactor.running()) == 1
    assert value(run(services.state("xrootd"))).restarts == 3


def test_stop_takes_a_command_out_of_supervision_and_start_puts_it_back(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, xrootd={"command": "xrootd"})
    [process] = reactor.spawned
    stopping = run(services.act("xrootd", "stop"))
    assert process.signals == ["TERM"]
    reactor.advance(0.1)
    process.end(sig=15)
    reactor.advance(0.1)
    assert value(stopping).state == "stopped"
    reactor.advance(100)
    assert reactor.running() == []  # not restarted
    assert value(run(services.act("xrootd", "stop"))).state == "stopped"  # stopping twice is fine

    started = value(run(services.act("xrootd", "start")))
    assert (started.state, started.pid, started.restarts) == ("active", reactor.spawned[-1].pid, 0)
    assert value(run(services.act("xrootd", "start"))).pid == started.pid  # already running: no second one


def test_a_command_that_ignores_term_is_killed_after_the_grace(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, xrootd={"command": "xrootd"})
    [process] = reactor.spawned
    restarting = run(services.act("xrootd", "restart"))
    reactor.advance(5)
    assert process.signals == ["TERM", "KILL"]
    process.end(sig=9)
    reactor.advance(0.1)
    state = value(restarting)
    assert state.state == "active" and state.pid == reactor.spawned[-1].pid != process.pid


def test_command_output_goes_to_the_service_log(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, xrootd={"command": "xrootd"})
    [process] = reactor.spawned
    process.protocol.outReceived(b"hello\nwor")
    process.protocol.errReceived(b"oops\n")
    process.protocol.outReceived(b"ld\n")
    log = (tmp_path / "services" / "xrootd.log").read_text()
    assert log == "stdout: hello\nstderr: oops\nstdout: world\n"


def test_stopping_the_manager_stops_the_commands(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, a={"command": "a"}, b={"command": "b"})
    stopped = services.stopService()
    assert [p.signals for p in reactor.spawned] == [["TERM"], ["TERM"]]
    reactor.spawned[0].end(sig=15)
    reactor.advance(5)
    assert reactor.spawned[1].signals == ["TERM", "KILL"]
    reactor.spawned[1].end(sig=9)
    reactor.advance(0.1)
    assert value(stopped) is None


# -- init.d-style scripts -------------------------------------------------------------------------------


def test_script_status_zero_is_active_anything_else_stopped(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, mysqld={"script": "/etc/init.d/mysqld"})
    asking = run(services.state("mysqld"))
    [status] = reactor.spawned
    assert status.args[-2:] == ["/etc/init.d/mysqld", "status"]
    assert "setsid" in status.args[-3]  # its own session, so a hung one is killed with its children
    assert set(status.child_fds) == {0, 1, 2}
    status.end(0)
    state = value(asking)
    assert (state.state, state.pid, state.restarts) == ("active", None, None)
    asking = run(services.state("mysqld"))
    reactor.spawned[-1].end(3)
    assert value(asking).state == "stopped"


def test_script_action_then_status(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, mysqld={"script": "/etc/init.d/mysqld"})
    acting = run(services.act("mysqld", "restart"))
    assert reactor.spawned[-1].args[-1] == "restart"
    reactor.spawned[-1].end(0)
    assert reactor.spawned[-1].args[-1] == "status"
    reactor.spawned[-1].end(0)
    assert value(acting).state == "active"


def test_a_failing_script_action_is_a_command_failure(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, mysqld={"script": "/etc/init.d/mysqld"})
    acting = run(services.act("mysqld", "start"))
    reactor.spawned[-1].end(2)
    assert len(reactor.spawned) == 1  # no status after a failure
    with pytest.raises(CommandFailure) as caught:
        value(acting)
    assert "exited with status 2" in caught.value.cause


def test_a_hung_script_is_killed_with_its_group_and_fails(tmp_path: Path):
    reactor = FakeReactor()
    services, signalled = manager(tmp_path, reactor, mysqld={"script": "/etc/init.d/mysqld"},
                                  xrootd={"command": "xrootd"})
    acting = run(services.act("mysqld", "start"))
    [hung] = [p for p in reactor.spawned if p.args[-1] == "start"]
    reactor.advance(29.9)
    assert signalled == [] and not acting.called
    # others are answered meanwhile
    assert value(run(services.state("xrootd"))).state == "active"
    reactor.advance(0.1)
    assert signalled == [(hung.pid, signal.SIGTERM)]
    reactor.advance(5)
    assert signalled == [(hung.pid, signal.SIGTERM), (hung.pid, signal.SIGKILL)]
    hung.end(sig=9)
    with pytest.raises(CommandFailure) as caught:
        value(acting)
    assert "did not finish within 30s" in caught.value.cause


def test_actions_on_one_service_run_one_at_a_time(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, mysqld={"script": "/etc/init.d/mysqld"})
    first = run(services.act("mysqld", "stop"))
    second = run(services.act("mysqld", "start"))
    assert [p.args[-1] for p in reactor.spawned] == ["stop"]
    reactor.spawned[-1].end(0)
    reactor.spawned[-1].end(3)  # status after stop
    assert value(first).state == "stopped"
    assert [p.args[-1] for p in reactor.spawned] == ["stop", "status", "start"]
    reactor.spawned[-1].end(0)
    reactor.spawned[-1].end(0)
    assert value(second).state == "active"


def test_unknown_service_and_action(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor)
    with pytest.raises(InvalidService):
        value(run(services.state("nope")))
    services, _ = manager(tmp_path, reactor, x={"command": "x"})
    with pytest.raises(ValueError):
        value(run(services.act("x", "reload")))


def test_restart_if_running(tmp_path: Path):
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, xrootd={"script": "/etc/init.d/xrootd"})
    assert value(run(services.restart_if_running("not-configured"))) is False
    asking = run(services.restart_if_running("xrootd"))
    reactor.spawned[-1].end(3)  # status: stopped
    assert value(asking) is False
    asking = run(services.restart_if_running("xrootd"))
    reactor.spawned[-1].end(0)  # status: active
    assert reactor.spawned[-1].args[-1] == "restart"
    reactor.spawned[-1].end(1)
    with pytest.raises(CommandFailure):
        value(asking)


# -- the routes -----------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Any:
    reactor = FakeReactor()
    services, _ = manager(tmp_path, reactor, xrootd={"command": "xrootd"}, mysqld={"script": "/etc/init.d/mysqld"})
    return reactor, StubTreq(QservServicesAPI(services).resource())


async def answer(client: StubTreq, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    response = await client.request(method, BASE + path, **kw)
    return response.code, json.loads(await response.content())


async def settled(response: Any) -> tuple[int, Any]:
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_list_services_in_the_seeds_shape(api):
    _, client = api
    assert await answer(client, "GET", "/services") == (200, {"results": [
        {"name": "xrootd", "uri": "/services/xrootd"}, {"name": "mysqld", "uri": "/services/mysqld"}]})


@pytest_twisted.ensureDeferred
async def test_service_state_route(api):
    reactor, client = api
    reactor.advance(2)
    code, body = await answer(client, "GET", "/services/xrootd")
    assert (code, body) == (200, {"result": {"name": "xrootd", "state": "active", "uri": "/services/xrootd",
                                             "pid": reactor.spawned[0].pid, "uptime": 2, "restarts": 0}})


@pytest_twisted.ensureDeferred
async def test_put_action_answers_the_new_state(api):
    reactor, client = api
    pending = client.request("PUT", BASE + "/services/mysqld", data={"action": "start"})
    reactor.spawned[-1].end(0)
    reactor.spawned[-1].end(0)
    client.flush()
    code, body = await settled(await pending)
    assert (code, body["result"]["state"]) == (200, "active")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path, data, code, exception", [
    ("/services/nope", {"action": "start"}, 404, "InvalidService"),
    ("/services/xrootd", {}, 400, "MissingArgument"),
    ("/services/xrootd", {"action": "reload"}, 400, "InvalidArgument"),
])
async def test_put_refusals(api, path, data, code, exception):
    reactor, client = api
    spawned = len(reactor.spawned)
    got_code, body = await answer(client, "PUT", path, data=data)
    assert (got_code, body["exception"]) == (code, exception)
    assert len(reactor.spawned) == spawned


@pytest_twisted.ensureDeferred
async def test_failed_action_is_409_command_failure_with_cause(api):
    reactor, client = api
    pending = client.request("PUT", BASE + "/services/mysqld", data={"action": "stop"})
    reactor.spawned[-1].end(1)
    client.flush()
    code, body = await settled(await pending)
    assert (code, body["exception"]) == (409, "CommandFailure")
    assert body["message"] == "Failed to stop service mysqld" and "exited with status 1" in body["cause"]


@pytest_twisted.ensureDeferred
async def test_unknown_service_is_404(api):
    _, client = api
    assert await answer(client, "GET", "/services/nope") == (404, {
        "exception": "InvalidService", "message": "Service name not known: nope"})


def test_a_hung_status_is_a_command_failure_too(tmp_path: Path):
    reactor = FakeReactor()
    services, signalled = manager(tmp_path, reactor, mysqld={"script": "/etc/init.d/mysqld"})
    asking = run(services.state("mysqld"))
    reactor.advance(30)
    [status] = reactor.spawned
    assert signalled == [(status.pid, signal.SIGTERM)]
    status.end(sig=15)  # it obeyed TERM: no KILL needed, but the group still gets one after the grace
    with pytest.raises(CommandFailure, match="Failed to get the state of service mysqld"):
        value(asking)
