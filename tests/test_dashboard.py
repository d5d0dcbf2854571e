"""The dashboard's sessions and CSRF check through Root (StubTreq, in memory), and its live counts
(CountsFeed under a Clock, read_counts on a real schema)."""

from __future__ import annotations

import json
import re
import sqlite3
from http.cookies import SimpleCookie
from typing import Any, Optional

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from tests.test_api import BASE, TOKEN, Answer, assert_json_error, result_of
from wmgr.api.dashboard import STATIC_DIR, Dashboard
from wmgr.api.root import Root, RootApp, Surface
from wmgr.api.sessions import COOKIE, LIFETIME, Sessions
from wmgr.jobs.groupcounts import CountsFeed, read_counts
from wmgr.store import migrate

ORIGIN = BASE  # StubTreq speaks plain HTTP to Host wmgr.test
EVIL = "https://evil.example"
SNAPSHOT = {"groups": {"g": {"complete": 2, "running": 1}}, "warnings": []}


class FakeFeed:
    async def snapshot(self) -> dict[str, Any]:
        return SNAPSHOT


class Recorder:
    """A stand-in API surface that records what reached it."""

    app = Klein()

    def __init__(self) -> None:
        self.calls: list[str] = []

    @app.route("/rest/<path:rest>", methods=["GET", "POST", "DELETE", "PATCH"])
    def anything(self, request: Any, rest: str) -> bytes:
        self.calls.append(request.method.decode())
        request.setHeader(b"Content-Type", b"application/json")
        return b"[]"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def setup(clock: Clock) -> Any:
    sessions = Sessions(clock)
    recorder = Recorder()
    dashboard = Dashboard(TOKEN, sessions, FakeFeed(), clock)  # type: ignore[arg-type]
    surfaces = [Surface(("rest",), recorder.app.resource()),
                Surface(("ui",), dashboard.resource(), own_auth=True)]
    root = Root(TOKEN, surfaces, RootApp({}).app.resource(), sessions)
    return StubTreq(root), recorder, sessions


def send(stub: StubTreq, method: str, path: str, *, cookie: Optional[str] = None, origin: Optional[str] = None,
         referer: Optional[str] = None, bearer: bool = False, body: Any = None, form: Any = None,
         **kw: Any) -> Answer:
    headers: dict[bytes, list[bytes]] = {}
    if cookie is not None:
        headers[b"Cookie"] = [COOKIE + b"=" + cookie.encode()]
    if origin is not None:
        headers[b"Origin"] = [origin.encode()]
    if referer is not None:
        headers[b"Referer"] = [referer.encode()]
    if bearer:
        headers[b"Authorization"] = [f"Bearer {TOKEN}".encode()]
    data = None
    if form is not None:
        data = "&".join(f"{k}={v}" for k, v in form.items()).encode()
        headers[b"Content-Type"] = [b"application/x-www-form-urlencoded"]
    elif body is not None:
        data = json.dumps(body).encode()
        headers[b"Content-Type"] = [b"application/json"]
    d = stub.request(method, BASE + path, headers=headers, data=data, **kw)
    stub.flush()
    return Answer(result_of(d))


def set_cookie(answer: Answer) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for raw in answer.headers.getRawHeaders(b"set-cookie") or []:
        jar.load(raw.decode())
    return jar


def login(stub: StubTreq) -> str:
    answer = send(stub, "POST", "/ui/login", origin=ORIGIN, form={"token": TOKEN})
    assert answer.code == 200, answer.body
    return set_cookie(answer)[COOKIE.decode()].value


# -- logging in ----------------------------------------------------------------------------------


def test_login_sets_a_strict_httponly_secure_cookie_that_is_not_the_token(setup: Any) -> None:
    stub, _, sessions = setup
    answer = send(stub, "POST", "/ui/login", origin=ORIGIN, form={"token": TOKEN})
    assert answer.code == 200
    raw = answer.headers.getRawHeaders(b"set-cookie")[0].decode()
    morsel = set_cookie(answer)[COOKIE.decode()]
    assert morsel["httponly"] and morsel["secure"]
    assert re.search(r";\s*SameSite=strict", raw, re.I) and morsel["path"] == "/"
    assert int(morsel["max-age"]) == int(LIFETIME)
    assert TOKEN not in raw and TOKEN not in answer.body.decode()
    assert len(morsel.value) >= 40 and len(sessions) == 1


def test_login_with_a_json_body_works_too(setup: Any) -> None:
    stub, _, _ = setup
    answer = send(stub, "POST", "/ui/login", origin=ORIGIN, body={"token": TOKEN})
    assert answer.code == 200 and set_cookie(answer)[COOKIE.decode()].value


def test_wrong_token_gets_no_cookie(setup: Any) -> None:
    stub, _, sessions = setup
    answer = send(stub, "POST", "/ui/login", origin=ORIGIN, form={"token": "wrong"})
    assert_json_error(answer, 401)
    assert not answer.headers.getRawHeaders(b"set-cookie") and len(sessions) == 0


def test_the_token_in_the_url_does_not_log_in(setup: Any) -> None:
    # Only the form body counts: a token in a URL ends up in histories and logs.
    stub, _, sessions = setup
    answer = send(stub, "POST", f"/ui/login?token={TOKEN}", origin=ORIGIN, form={})
    assert_json_error(answer, 401)
    assert len(sessions) == 0


@pytest.mark.parametrize("body", [b"%C3%BF%EC=1&token=x", "tökén=1".encode(), b"token=%ff", b"a=1&" * 20])
def test_a_strange_login_form_is_a_400_not_a_500(setup: Any, body: bytes) -> None:
    stub, _, sessions = setup
    d = stub.request("POST", BASE + "/ui/login", data=body, headers={
        b"Origin": [ORIGIN.encode()], b"Content-Type": [b"application/x-www-form-urlencoded"]})
    stub.flush()
    answer = Answer(result_of(d))
    assert answer.code in (400, 401), answer.body
    assert_json_error(answer, answer.code)
    assert len(sessions) == 0


def test_cross_origin_login_is_refused(setup: Any) -> None:
    stub, _, sessions = setup
    assert_json_error(send(stub, "POST", "/ui/login", origin=EVIL, form={"token": TOKEN}), 403)
    assert len(sessions) == 0


# -- the cookie stands for the token -------------------------------------------------------------


def test_the_cookie_authorises_reads_of_every_api(setup: Any) -> None:
    stub, recorder, _ = setup
    assert_json_error(send(stub, "GET", "/rest/v1/jobs/"), 401)
    sid = login(stub)
    assert send(stub, "GET", "/rest/v1/jobs/", cookie=sid).code == 200
    assert send(stub, "GET", "/ui/counts", cookie=sid).json() == SNAPSHOT
    assert recorder.calls == ["GET"]


def test_a_made_up_cookie_authorises_nothing(setup: Any) -> None:
    stub, recorder, _ = setup
    login(stub)
    assert_json_error(send(stub, "GET", "/rest/v1/jobs/", cookie="forged" * 8), 401)
    assert_json_error(send(stub, "GET", "/ui/counts", cookie="forged" * 8), 401)
    assert recorder.calls == []


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
def test_state_changes_by_cookie_need_the_daemons_own_origin(setup: Any, method: str) -> None:
    stub, recorder, _ = setup
    sid = login(stub)
    assert_json_error(send(stub, method, "/rest/v1/jobs/x", cookie=sid, origin=EVIL), 403)
    assert_json_error(send(stub, method, "/rest/v1/jobs/x", cookie=sid), 403)  # neither Origin nor Referer
    assert_json_error(send(stub, method, "/rest/v1/jobs/x", cookie=sid, referer=EVIL + "/ui/"), 403)
    assert recorder.calls == []
    assert send(stub, method, "/rest/v1/jobs/x", cookie=sid, origin=ORIGIN).code == 200
    assert send(stub, method, "/rest/v1/jobs/x", cookie=sid, referer=ORIGIN + "/ui/").code == 200
    assert recorder.calls == [method, method]


def test_an_origin_on_another_port_or_scheme_is_another_origin(setup: Any) -> None:
    stub, recorder, _ = setup
    sid = login(stub)
    for other in ("http://wmgr.test:8080", "https://wmgr.test", "http://wmgr.test.evil.example"):
        assert_json_error(send(stub, "POST", "/rest/v1/jobs/x", cookie=sid, origin=other), 403)
    assert recorder.calls == []


def test_the_bearer_token_is_not_subject_to_the_origin_check(setup: Any) -> None:
    stub, recorder, _ = setup
    assert send(stub, "POST", "/rest/v1/jobs/x", bearer=True, origin=EVIL).code == 200
    assert send(stub, "DELETE", "/rest/v1/jobs/x", bearer=True).code == 200
    assert recorder.calls == ["POST", "DELETE"]


# -- ending a session ----------------------------------------------------------------------------


def test_logout_ends_the_session_and_clears_the_cookie(setup: Any) -> None:
    stub, _, sessions = setup
    sid = login(stub)
    answer = send(stub, "POST", "/ui/logout", cookie=sid, origin=ORIGIN)
    assert answer.code == 200
    morsel = set_cookie(answer)[COOKIE.decode()]
    assert morsel.value == "" and morsel["max-age"] == "0"
    assert len(sessions) == 0
    assert_json_error(send(stub, "GET", "/rest/v1/jobs/", cookie=sid), 401)


def test_a_cross_origin_logout_is_refused_and_the_session_stays(setup: Any) -> None:
    stub, _, sessions = setup
    sid = login(stub)
    assert_json_error(send(stub, "POST", "/ui/logout", cookie=sid, origin=EVIL), 403)
    assert send(stub, "GET", "/rest/v1/jobs/", cookie=sid).code == 200


def test_sessions_expire(setup: Any, clock: Clock) -> None:
    stub, _, sessions = setup
    sid = login(stub)
    clock.advance(LIFETIME - 1)
    assert send(stub, "GET", "/rest/v1/jobs/", cookie=sid).code == 200
    clock.advance(2)
    assert_json_error(send(stub, "GET", "/rest/v1/jobs/", cookie=sid), 401)
    assert len(sessions) == 0


def test_sessions_are_bounded_oldest_first(clock: Clock) -> None:
    sessions = Sessions(clock, max_sessions=3)
    ids = [sessions.create() for _ in range(4)]
    assert not sessions.valid(ids[0]) and all(sessions.valid(sid) for sid in ids[1:])
    assert len(set(ids)) == 4


# -- the page itself -----------------------------------------------------------------------------


def test_the_page_is_public_and_locked_down(setup: Any) -> None:
    stub, _, _ = setup
    for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
        answer = send(stub, "GET", path)
        assert answer.code == 200 and answer.content_type.startswith(kind)
        csp = answer.headers.getRawHeaders(b"content-security-policy")[0].decode()
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert_json_error(send(stub, "GET", "/ui/../../setup.py"), 404)
    assert_json_error(send(stub, "GET", "/ui/secret.txt"), 404)


def test_the_page_never_writes_data_as_html() -> None:
    script = (STATIC_DIR / "app.js").read_text()
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)
    assert "<script>" not in html and "style=" not in html  # no inline script or style (the CSP)
    assert "token=" not in script.replace("{ token:", "")  # never in a URL


# -- live counts ---------------------------------------------------------------------------------


def test_read_counts_sums_the_counters_by_group_and_state() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    conn.executemany("INSERT INTO rep_grp_states VALUES (?, ?, ?, ?, ?)", [
        ("a", "complete", 0, "", 5), ("a", "buried", 1, "command exited non-zero", 2),
        ("a", "buried", 127, "command not found", 1), ("a", "reserved", 0, "", 1), ("a", "running", 0, "", 2),
        ("b", "ready", 0, "", 100000), ("c", "delayed", 0, "", 0)])
    counts = read_counts(conn)
    assert set(counts) == {"a", "b"}
    assert counts["a"]["complete"] == 5 and counts["a"]["buried"] == 3 and counts["a"]["running"] == 3
    assert counts["b"]["ready"] == 100000 and counts["b"]["complete"] == 0


class FakeStore:
    def __init__(self) -> None:
        self.commits = 0
        self.counts: dict[str, dict[str, int]] = {}
        self.reads = 0

    def read(self, operation: Any) -> Any:
        self.reads += 1
        return succeed({name: dict(states) for name, states in self.counts.items()})


def test_the_feed_pushes_changes_coalesced_and_only_after_commits(clock: Clock) -> None:
    store = FakeStore()
    warnings: list[dict[str, Any]] = []
    feed = CountsFeed(store, clock, lambda: list(warnings), interval=0.25)
    seen: list[dict[str, Any]] = []
    unsubscribe = feed.subscribe(seen.append)
    assert seen == [{"groups": {}, "warnings": []}]

    clock.advance(1)  # no commit: the counters are not read again
    assert store.reads == 1 and len(seen) == 1

    store.counts = {"g": {"ready": 1}}
    store.commits += 1
    store.counts = {"g": {"ready": 2}}
    store.commits += 1  # two commits in one interval: one push
    clock.advance(0.25)
    assert seen[-1]["groups"] == {"g": {"ready": 2}} and len(seen) == 2

    store.commits += 1  # a commit that changed no count: no push
    clock.advance(0.25)
    assert len(seen) == 2 and store.reads == 3

    warnings.append({"Msg": "m", "FirstDate": 1, "LastDate": 1, "Count": 1})
    clock.advance(0.25)  # warnings change without a commit
    assert seen[-1]["warnings"] == warnings and len(seen) == 3

    late: list[dict[str, Any]] = []
    feed.subscribe(late.append)  # a new subscriber gets the current snapshot at once
    assert late == [seen[-1]]

    unsubscribe()
    store.counts = {"g": {"ready": 3}}
    store.commits += 1
    clock.advance(0.25)
    assert len(seen) == 3 and late[-1]["groups"] == {"g": {"ready": 3}}


def test_the_feed_stops_reading_when_nobody_listens(clock: Clock) -> None:
    store = FakeStore()
    feed = CountsFeed(store, clock, interval=0.25)
    unsubscribe = feed.subscribe(lambda snapshot: None)
    unsubscribe()
    reads = store.reads
    store.commits += 5
    clock.advance(10)
    assert store.reads == reads and not clock.getDelayedCalls()
