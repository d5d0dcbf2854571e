"""The dashboard surface on the real daemon over HTTPS: login, the cookie on the wr API, the CSRF
check, and the live event stream (pushed on change; ended cleanly when the daemon stops)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.harness import until

pytestmark = pytest.mark.timeout(120)


def origin_of(daemon: Any) -> str:
    return daemon.url.rstrip("/")


async def login(client: Any, daemon: Any) -> str:
    reply = await client.request("POST", "ui/login", data=f"token={client.token}".encode(), token=False,
                                 headers={"Content-Type": "application/x-www-form-urlencoded",
                                          "Origin": origin_of(daemon)})
    assert reply.code == 200, reply
    [cookie] = reply.headers.getRawHeaders(b"set-cookie")
    assert b"HttpOnly" in cookie and b"Secure" in cookie and b"SameSite=strict" in cookie
    return cookie.split(b";")[0].decode()


@pytest_twisted.ensureDeferred
async def test_the_cookie_works_on_the_wr_api_and_cross_origin_changes_are_refused(daemon, client, reactor):
    cookie = await login(client, daemon)
    [job] = await client.add_jobs([{"cmd": "sleep 0.1 && exit 2"}], rep_grp="csrf")
    await until(reactor, lambda: _buried(client, job["Key"]))
    listing = await client.get("rest/v1/jobs/csrf", token=False, headers={"Cookie": cookie})
    assert listing.code == 200 and listing.json()[0]["Key"] == job["Key"]

    evil = await client.delete(f"rest/v1/jobs/{job['Key']}", params={"state": "deletable"}, token=False,
                               headers={"Cookie": cookie, "Origin": "https://evil.example"})
    assert evil.code == 403 and "Origin" in evil.json()["error"]
    assert len(await client.jobs(job["Key"])) == 1

    mine = await client.delete(f"rest/v1/jobs/{job['Key']}", params={"state": "deletable"}, token=False,
                               headers={"Cookie": cookie, "Origin": origin_of(daemon)})
    assert mine.code == 200 and await client.jobs(job["Key"]) == []

    out = await client.post("ui/logout", token=False, headers={"Cookie": cookie, "Origin": origin_of(daemon)})
    assert out.code == 200
    after = await client.get("rest/v1/jobs/csrf", token=False, headers={"Cookie": cookie})
    assert after.code == 401


@pytest_twisted.ensureDeferred
async def test_events_push_counts_when_they_change(daemon, client, reactor):
    seen: list[dict[str, Any]] = []

    def on_snapshot(snapshot: dict[str, Any]) -> bool:
        seen.append(snapshot)
        return snapshot["groups"].get("live", {}).get("complete") == 3

    following = Deferred.fromCoroutine(client.follow_events("ui/events", on_snapshot))
    await until(reactor, lambda: _true(bool(seen)))
    assert seen[0] == {"groups": {}, "warnings": []}
    await client.add_jobs([{"cmd": f"sleep 0.2 && echo {n}"} for n in range(3)], rep_grp="live")
    await following
    assert seen[-1]["groups"]["live"]["complete"] == 3
    assert len(seen) <= 12, "pushes are coalesced, not one per job event"
    counts = (await client.get("ui/counts")).json()
    assert counts["groups"]["live"] == seen[-1]["groups"]["live"]


@pytest_twisted.ensureDeferred
async def test_an_open_event_stream_does_not_hold_up_a_clean_stop(daemon, client, reactor):
    seen: list[Any] = []
    following = Deferred.fromCoroutine(client.follow_events("ui/events", lambda s: seen.append(s) and False))
    await until(reactor, lambda: _true(bool(seen)))
    assert await daemon.stop(reactor, timeout=15) == 0, daemon.log()
    assert "Traceback" not in daemon.log() and "Unhandled" not in daemon.log(), daemon.log()
    with pytest.raises(ConnectionError):
        await following


async def _true(value: bool) -> bool:
    return value


async def _buried(client: Any, key: str) -> bool:
    return (await client.jobs(key))[0]["State"] == "buried"
