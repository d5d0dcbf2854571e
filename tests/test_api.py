"""The HTTP layer in memory: wmgr.api.root.Root over the wr surface, with treq.testing.StubTreq.

The job queue is a fake: StubTreq drives a real Site over in-memory transports, and a handler that
awaited the real queue (store threads) would never finish without the real reactor. Everything
here completes synchronously.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Optional

import pytest
from treq.testing import StubTreq
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from wmgr import __version__
from wmgr.api.openapi import ROOT_PATHS, WR_PATHS, document
from wmgr.api.root import Root, RootApp, Surface
from wmgr.api.wr import WrAPI
from wmgr.jobs import model

TOKEN = "s3cret-Token_value"
BASE = "http://wmgr.test"


# -- fakes and helpers ---------------------------------------------------------------------------------


class FakeQueue:
    """Records calls. `add` fails the test unless the test allowed it."""

    mode = "started"

    def __init__(self, jobs: Optional[list] = None, allow_add: bool = False) -> None:
        self.jobs = jobs or []
        self.allow_add = allow_add
        self.calls: list[tuple[str, Any]] = []

    async def add(self, specs: list, rerun: bool = False, while_committing: Any = None, turn: Any = None) -> list:
        self.calls.append(("add", (specs, rerun)))
        if not self.allow_add:
            pytest.fail(f"queue.add was called with {specs!r}: the request should have been refused first")
        jobs = []
        for i, spec in enumerate(specs, start=1):
            spec = model.normalise(dict(spec))
            jobs.append(model.Job(model.job_key(spec), spec, model.READY, i))
        return jobs

    def incomplete(self, state: Optional[str] = None) -> list:
        self.calls.append(("incomplete", state))
        return list(self.jobs)

    def __getattr__(self, name: str) -> Any:
        def unexpected(*args: Any, **kw: Any) -> Any:
            self.calls.append((name, args))
            pytest.fail(f"queue.{name} was not expected here")

        return unexpected


class Untouchable:
    """Stands in for collaborators these tests never reach (uploads, bad servers...)."""

    def __getattr__(self, name: str) -> Any:
        pytest.fail(f"unexpected use of .{name}")


def info() -> dict[str, Any]:
    return {"Addr": "localhost:1", "Host": "h", "Port": "1", "WebPort": "1", "PID": 1,
            "Deployment": "production", "Scheduler": "local", "Mode": "started"}


def make_wr(queue: Any) -> WrAPI:
    """WrAPI with the fake queue and whatever else its constructor asks for."""
    params = list(inspect.signature(WrAPI).parameters)
    kwargs: dict[str, Any] = {"queue": queue, "info": info}
    for name in params:
        kwargs.setdefault(name, Untouchable())
    return WrAPI(**kwargs)


def make_stub(queue: Any = None) -> StubTreq:
    queue = queue if queue is not None else FakeQueue()
    surfaces = [(("rest",), make_wr(queue).resource())]
    fallback = RootApp(document([WR_PATHS, ROOT_PATHS])).app.resource()
    return StubTreq(Root(TOKEN, surfaces, fallback))


def result_of(d: Any) -> Any:
    """The result of a Deferred that has already fired (StubTreq with synchronous handlers)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the request did not complete"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class Answer:
    def __init__(self, response: Any) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = result_of(response.content())

    @property
    def content_type(self) -> str:
        values = self.headers.getRawHeaders(b"content-type") or [b""]
        return values[0].decode()

    def json(self) -> Any:
        assert self.content_type.startswith("application/json"), (self.content_type, self.body[:200])
        return json.loads(self.body)


def call(stub: StubTreq, method: str, path: str, auth: Optional[str] = f"Bearer {TOKEN}", body: Any = None,
         **kw: Any) -> Answer:
    headers = {}
    if auth is not None:
        headers[b"Authorization"] = [auth.encode()]
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    d = stub.request(method, BASE + path, headers=headers, data=body, **kw)
    stub.flush()
    return Answer(result_of(d))


def assert_json_error(answer: Answer, code: int) -> str:
    assert answer.code == code, answer.body
    body = answer.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert b"<html" not in answer.body.lower() and b"traceback" not in answer.body.lower()
    return body["error"]


# -- authentication -------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", "Bearer ", TOKEN,
                                  f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"])
def test_401_without_a_valid_token(auth: Optional[str]) -> None:
    queue = FakeQueue()
    stub = make_stub(queue)
    for method, path in [("GET", "/rest/v1/info/"), ("GET", "/rest/v1/jobs/"), ("POST", "/rest/v1/jobs/"),
                         ("DELETE", "/rest/v1/jobs/?state=deletable"), ("GET", "/openapi.json"),
                         ("GET", "/no/such/path")]:
        answer = call(stub, method, path, auth=auth, body=[{"cmd": "true"}] if method == "POST" else None)
        assert "token" in assert_json_error(answer, 401)
    assert queue.calls == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_in_any_case(scheme: str) -> None:
    answer = call(make_stub(), "GET", "/rest/v1/info/", auth=f"{scheme} {TOKEN}")
    assert answer.code == 200
    assert answer.json() == info()


def test_token_as_query_parameter() -> None:
    stub = make_stub()
    assert call(stub, "GET", f"/rest/v1/info/?token={TOKEN}", auth=None).code == 200
    assert_json_error(call(stub, "GET", "/rest/v1/info/?token=wrong", auth=None), 401)


def test_the_token_parameter_is_not_a_job_default() -> None:
    queue = FakeQueue(allow_add=True)
    answer = call(make_stub(queue), "POST", f"/rest/v1/jobs/?token={TOKEN}", auth=None, body=[{"cmd": "true"}])
    assert answer.code == 201, answer.body


@pytest.mark.parametrize("path", ["/rest/version/", "/rest/version"])
def test_version_is_public(path: str) -> None:
    stub = make_stub()
    for auth in (None, "Bearer wrong"):
        answer = call(stub, "GET", path, auth=auth)
        assert answer.code == 200
        assert answer.json() == {"Version": __version__, "API": "1"}


def test_only_the_version_is_public() -> None:
    for path in ("/rest/version/x", "/rest/versions/", "/rest/v1/version/", "/rest/version/../v1/info/"):
        assert_json_error(call(make_stub(), "GET", path, auth=None), 401)


# -- JSON errors, never HTML -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/rest/nope", "/rest/v1/nope/", "/rest/v2/jobs/", "/", "/openapi.yaml"])
def test_404_is_json(path: str) -> None:
    assert_json_error(call(make_stub(), "GET", path), 404)


@pytest.mark.parametrize("method, path", [
    ("PUT", "/rest/v1/info/"), ("POST", "/rest/version/"), ("DELETE", "/openapi.json"), ("PATCH", "/rest/v1/jobs/"),
])
def test_405_is_json(method: str, path: str) -> None:
    assert_json_error(call(make_stub(), method, path), 405)


def test_an_unexpected_error_is_a_json_500() -> None:
    class Broken(FakeQueue):
        def incomplete(self, state: Optional[str] = None) -> list:
            raise RuntimeError("secret internals")

    answer = call(make_stub(Broken()), "GET", "/rest/v1/jobs/")
    error = assert_json_error(answer, 500)
    assert "secret internals" not in error


# -- /openapi.json ---------------------------------------------------------------------------------------


def test_openapi_is_served_and_valid() -> None:
    from openapi_spec_validator import validate

    answer = call(make_stub(), "GET", "/openapi.json")
    assert answer.code == 200
    doc = answer.json()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    for path in ("/rest/version/", "/rest/v1/info/", "/rest/v1/jobs/", "/rest/v1/jobs/{ids}", "/openapi.json"):
        assert path in doc["paths"], path
    assert doc["paths"]["/rest/version/"]["get"]["security"] == []


# -- POST /rest/v1/jobs/: refused before the queue is touched ----------------------------------------------


@pytest.mark.parametrize("query, body, words", [
    ("", b"{not json", "JSON"),
    ("", b"", "JSON"),
    ("", {"cmd": "true"}, "array"),
    ("", "true", "array"),
    ("", [{"cmd": "true", "memory": "5"}], "memory"),
    ("", [{"cmd": "true", "memory": 5}], "memory"),
    ("", [{"cmd": "true", "time": "5"}], "time"),
    ("", [{"cmd": "true", "colour": "red"}], "colour"),
    ("", [{"cmd": "true", "priority": 256}], "priority"),
    ("", [{"cmd": "true", "retries": -1}], "retries"),
    ("", [{"cmd": "true", "override": 3}], "override"),
    ("", [{"cmd": "true", "on_failure": [{"explode": True}]}], "on_failure"),
    ("", [{"cmd": "true", "mounts": [{"Mount": "/m"}]}], "mounts"),
    ("", [{"cmd": "true", "with_docker": "ubuntu"}], "with_docker"),
    ("", [{"rep_grp": "x"}], "cmd was not specified"),
    ("", [{"cmd": "true"}, {"cmd": "true", "memory": "lots"}], "job 1"),
    ("", [{"cmd": "true"}, "not an object"], "job 1"),
    ("?memory=5", [{"cmd": "true"}], "memory"),
    ("?colour=red", [{"cmd": "true"}], "colour"),
    ("?cmd=true", [{"rep_grp": "x"}], "cmd"),
    ("?priority=999", [{"cmd": "true"}], "priority"),
])
def test_bad_adds_are_400_and_never_reach_the_queue(query: str, body: Any, words: str) -> None:
    queue = FakeQueue()
    answer = call(make_stub(queue), "POST", "/rest/v1/jobs/" + query, body=body)
    error = assert_json_error(answer, 400)
    assert words in error
    assert [c for c in queue.calls if c[0] == "add"] == []


def test_a_good_add_reaches_the_queue_translated() -> None:
    """The seed's Quick Start: query parameters are defaults, each job's own values win."""
    queue = FakeQueue(allow_add=True)
    body = [{"cmd": "sleep 5 && echo mymsg && false", "memory": "5M", "cpus": 1}, {"cmd": "sleep 5", "cpus": 1}]
    answer = call(make_stub(queue), "POST", "/rest/v1/jobs/?rep_grp=myid&cpus=2&memory=3G&time=5s", body=body)
    assert answer.code == 201, answer.body
    ((name, (specs, rerun)),) = queue.calls
    assert name == "add" and rerun is False
    # The API hands the queue normalised specs: defaults filled in (cwd, req_grp, ...).
    assert specs[0].items() >= {"cmd": "sleep 5 && echo mymsg && false", "rep_grp": "myid", "cpus": 1,
                                "memory": 5, "time": 5.0, "cwd": "/tmp", "req_grp": "sleep"}.items()
    assert specs[1].items() >= {"cmd": "sleep 5", "rep_grp": "myid", "cpus": 1, "memory": 3072, "time": 5.0}.items()
    reply = answer.json()
    assert [s["Key"] for s in reply] == ["58cef10e7a340c3b7fa09ea304a3cb98", "ea4266bc0fc7dd493caeb2fff1963e4a"]
    assert [s["ExpectedRAM"] for s in reply] == [5, 3072]
    assert all(s["State"] == "ready" and s["RepGroup"] == "myid" for s in reply)


@pytest.mark.parametrize("query, body", [("?rerun=true", [{"cmd": "true"}]), ("", [{"cmd": "true", "rerun": True}])])
def test_rerun_is_passed_on(query: str, body: Any) -> None:
    queue = FakeQueue(allow_add=True)
    assert call(make_stub(queue), "POST", "/rest/v1/jobs/" + query, body=body).code == 201
    ((_, (specs, rerun)),) = queue.calls
    assert rerun is True


def test_an_empty_array_adds_nothing() -> None:
    queue = FakeQueue(allow_add=True)
    answer = call(make_stub(queue), "POST", "/rest/v1/jobs/", body=[])
    assert answer.code == 201 and answer.json() == []


# -- GET and DELETE parameters that are refused before the queue is asked ------------------------------------


@pytest.mark.parametrize("path", ["/rest/v1/jobs/?state=sleeping", "/rest/v1/jobs/?limit=many",
                                  "/rest/v1/jobs/?limit=-1"])
def test_bad_get_parameters_are_400(path: str) -> None:
    queue = FakeQueue()
    assert_json_error(call(make_stub(queue), "GET", path), 400)


@pytest.mark.parametrize("path", ["/rest/v1/jobs/", "/rest/v1/jobs/?state=complete", "/rest/v1/jobs/?state=",
                                  "/rest/v1/jobs/myid", "/rest/v1/jobs/myid?state=ready"])
def test_delete_needs_a_state(path: str) -> None:
    queue = FakeQueue()
    error = assert_json_error(call(make_stub(queue), "DELETE", path), 400)
    assert "state" in error
    assert queue.calls == []


def test_get_incomplete_jobs_shows_statuses() -> None:
    spec = model.normalise(model.parse_spec({"cmd": "echo hi", "env": ["A=1"]}, {}))
    job = model.Job(model.job_key(spec), spec, model.BURIED, 1)
    job.stdout = "hi\n"
    stub = make_stub(FakeQueue([job]))
    plain = call(stub, "GET", "/rest/v1/jobs/").json()
    assert [s["Key"] for s in plain] == [job.key]
    assert plain[0]["StdOut"] == "" and plain[0]["Env"] is None
    full = call(stub, "GET", "/rest/v1/jobs/?std=true&env=true").json()
    assert full[0]["StdOut"] == "hi" and full[0]["Env"] == ["A=1"]


class SaysWhoAsked(Resource):
    """A surface that does its own access check: it answers with what Root told it."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"token_ok": request.wmgr_token_ok}).encode()


def test_a_surface_with_its_own_auth_is_reached_without_the_token_and_told_whether_it_came() -> None:
    fallback = RootApp(document([WR_PATHS, ROOT_PATHS])).app.resource()
    stub = StubTreq(Root(TOKEN, [Surface(("open",), SaysWhoAsked(), own_auth=True),
                                 (("rest",), make_wr(FakeQueue()).resource())], fallback))
    assert call(stub, "GET", "/open/x", auth=None).json() == {"token_ok": False}
    assert call(stub, "GET", "/open/x").json() == {"token_ok": True}
    assert call(stub, "GET", "/open/x", auth="Bearer wrong").json() == {"token_ok": False}
    # Every other surface still refuses a request without it.
    assert call(stub, "GET", "/rest/v1/jobs/", auth=None).code == 401


class SaysHello(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        assert not hasattr(request, "wmgr_token_ok")  # Root did not look for a token
        return b"hello"


def test_an_open_surface_is_served_whatever_the_token_and_others_still_want_it() -> None:
    fallback = RootApp(document([WR_PATHS, ROOT_PATHS])).app.resource()
    stub = StubTreq(Root(TOKEN, [Surface(("open",), SaysHello(), own_auth=True, open=True),
                                 (("rest",), make_wr(FakeQueue()).resource())], fallback))
    for auth in (None, "Bearer wrong", f"Bearer {TOKEN}"):
        response = call(stub, "GET", "/open/x", auth=auth)
        assert (response.code, response.body) == (200, b"hello")
    assert call(stub, "GET", "/rest/v1/jobs/", auth=None).code == 401
    assert call(stub, "GET", "/open/%FF", auth=None).code == 400  # the path check still comes first
