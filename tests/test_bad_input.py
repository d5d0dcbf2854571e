"""Bad input at the edge (issue 9, items 1, 2, 5, 6, 7): every value is checked before anything is
queued, and every refusal is a 400 with a JSON reason, never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests import test_api as wr
from tests import test_pman as pm
from wmgr.errors import InvalidRequest
from wmgr.jobs import model


class SearchingQueue(wr.FakeQueue):
    async def status_of(self, ids: list, state: Any, search: bool, limit: int) -> list:
        self.calls.append(("status_of", (ids, state, search, limit)))
        return []


# -- item 1: non-ASCII bytes in the query string ----------------------------------------------------


@pytest.mark.parametrize("query", ["x=%C3%A9", "x=%E9", "%E9=1", "x=\u00e9".encode().decode("latin-1"),
                                   "x=%ED%A0%80", "search=%FF%FE"])
@pytest.mark.parametrize("auth", [f"Bearer {wr.TOKEN}", None])
def test_any_bytes_in_a_query_string_are_never_a_500(query: str, auth: Any) -> None:
    answer = wr.call(wr.make_stub(), "GET", f"/rest/v1/info/?{query}", auth=auth)
    if auth is None:
        wr.assert_json_error(answer, 401)
    else:
        assert answer.code == 200 and answer.json()["Scheduler"] == "local"


def test_a_search_for_a_rep_group_with_accents_reaches_the_queue_as_text() -> None:
    queue = SearchingQueue()
    answer = wr.call(wr.make_stub(queue), "GET", "/rest/v1/jobs/%C3%A9t%C3%A9?search=%C3%A9")
    assert answer.code == 200 and answer.json() == []
    assert queue.calls == [("status_of", (["été"], None, False, 0))]


def test_a_rep_group_default_with_accents_is_text() -> None:
    queue = wr.FakeQueue(allow_add=True)
    answer = wr.call(wr.make_stub(queue), "POST", "/rest/v1/jobs/?rep_grp=%C3%A9t%C3%A9", body=[{"cmd": "true"}])
    assert answer.code == 201 and answer.json()[0]["RepGroup"] == "été"


# -- item 7: the token as a query parameter, however it is spelt --------------------------------------


@pytest.mark.parametrize("name", ["token", "%74oken", "t%6Fken", "%74%6F%6B%65%6E"])
def test_the_token_parameter_authenticates_under_any_percent_spelling(name: str) -> None:
    answer = wr.call(wr.make_stub(), "GET", f"/rest/v1/info/?{name}={wr.TOKEN}", auth=None)
    assert answer.code == 200


@pytest.mark.parametrize("name", ["token", "%74oken", "t%6Fken", "to+ken"])
@pytest.mark.parametrize("separator", ["&", ";"])
def test_pman_never_echoes_the_token_however_it_is_spelt(name: str, separator: str) -> None:
    stub = pm.make_stub(pm.make_pman())
    answer = pm.call(stub, "GET", f"/api/v1/?a=1{separator}{name}={pm.TOKEN}", auth="")
    if name == "to+ken":  # "to ken" is not the token's name: the request is refused
        assert answer.code == 401 and pm.TOKEN not in answer.body.decode()
        return
    assert answer.code == 200
    assert pm.TOKEN not in answer.body.decode()
    assert "token=<not echoed>" in answer.json()["RESTheader"]


# -- items 2, 5, 6: job values --------------------------------------------------------------------


BAD_JOBS = [
    ({"cmd": "true", "env": ["A=b\u0000c"]}, "NUL"),
    ({"cmd": "true", "env": ["A=\ud800"]}, "surrogate"),
    ({"cmd": "true\u0000x"}, "NUL"),
    ({"cmd": "true", "cwd": "/tmp/\ud800"}, "surrogate"),
    ({"cmd": "true", "deps": ["\ud800"]}, "surrogate"),
    ({"cmd": "true", "dep_grps": ["\udfff"]}, "surrogate"),
    ({"cmd": "true", "limit_grps": ["\ud800"]}, "surrogate"),
    ({"cmd": "true", "limit_grps": ["x:99999999999999999999999"]}, "limit group"),
    ({"cmd": "true", "limit_grps": ["x:1000001"]}, "limit group"),
    ({"cmd": "true", "on_exit": [{"run": "rm \u0000"}]}, "NUL"),
    ({"cmd": "true", "rep_grp": "a\u0000"}, "NUL"),
    ({"cmd": "true", "memory": "1" + "0" * 400 + "M"}, "memory"),
    ({"cmd": "true", "memory": "99999999999999999999P"}, "memory"),
    ({"cmd": "true", "memory": "65T"}, "memory"),
    ({"cmd": "true", "time": "9" * 400 + "h"}, "time"),
    ({"cmd": "true", "time": "8785h"}, "time"),
    ({"cmd": "true", "cpus": 4097}, "cpus"),
    ({"cmd": "true", "cpus": "nan"}, "cpus"),
    ({"cmd": "true", "cpus": "inf"}, "cpus"),
    ({"cmd": "true", "disk": 1 << 40}, "disk"),
    ({"cmd": "true", "priority": 256}, "priority"),
    ({"cmd": "true", "retries": 10**30}, "retries"),
]


@pytest.mark.parametrize("job,words", BAD_JOBS)
def test_a_bad_value_is_refused_by_the_parser(job: dict, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        model.normalise(model.parse_spec(job, {}))
    assert words in caught.value.reason
    json.dumps(caught.value.reason).encode("utf-8")  # the reason itself is valid text


@pytest.mark.parametrize("job,words", BAD_JOBS)
def test_a_bad_job_is_a_400_and_nothing_is_queued(job: dict, words: str) -> None:
    queue = wr.FakeQueue()  # fails the test if add is called
    answer = wr.call(wr.make_stub(queue), "POST", "/rest/v1/jobs/", body=[{"cmd": "echo ok"}, job])
    assert words in wr.assert_json_error(answer, 400)
    assert queue.calls == []


def test_the_bounds_themselves_are_accepted() -> None:
    spec = model.normalise(model.parse_spec({
        "cmd": "true", "memory": "64T", "time": "8784h", "cpus": 4096, "disk": model.MAX_DISK_GB,
        "limit_grps": ["a:1000000"], "env": ["A=é"], "deps": ["été"]}, {}))
    assert spec["memory"] == model.MAX_MEMORY_MB and spec["time"] == model.MAX_TIME_S
    listing = model.statuses_json([(model.Job("k" * 32, spec, model.READY, 1), 0)], 0.0)
    assert b"Infinity" not in listing and b"NaN" not in listing
    json.loads(listing)


@pytest.mark.parametrize("depth", [100_000])
def test_json_nested_deep_is_a_400_on_jobs(depth: int) -> None:
    answer = wr.call(wr.make_stub(), "POST", "/rest/v1/jobs/", body="[" * depth + "]" * depth)
    assert "nested too deeply" in wr.assert_json_error(answer, 400)


def test_json_nested_deep_in_a_patch_is_a_400() -> None:
    answer = wr.call(wr.make_stub(), "PATCH", "/rest/v1/jobs/abc", body='{"a":' * 100_000 + "1" + "}" * 100_000)
    assert "nested too deeply" in wr.assert_json_error(answer, 400)


def test_json_nested_deep_is_a_400_on_the_pman_command() -> None:
    stub = pm.make_stub(pm.make_pman())
    answer = pm.call(stub, "POST", "/api/v1/cmd/", body="[" * 100_000 + "]" * 100_000)
    assert answer.code == 400 and "nested too deeply" in json.dumps(answer.json())


def test_values_stored_before_the_bounds_never_make_a_listing_invalid() -> None:
    spec = model.normalise(model.parse_spec({"cmd": "true"}, {}))
    spec.update(time=float("inf"), memory=10**29)
    job = model.Job("k" * 32, spec, model.READY, 1)
    nan_spec = dict(spec, time=float("nan"))
    listing = model.statuses_json([(job, 0), (model.Job("j" * 32, nan_spec, model.READY, 2), 0)], 0.0)
    assert b"Infinity" not in listing and b"NaN" not in listing
    shown = json.loads(listing)
    assert shown[0]["ExpectedTime"] == model.MAX_TIME_S and shown[0]["ExpectedRAM"] == model.MAX_MEMORY_MB


@pytest.mark.parametrize("path", ["/rest/v1/jobs/%FF", "/%FF%FE", "/rest/v1/jobs/%C3%A9%C3"])
def test_a_path_that_is_not_utf8_is_a_json_400(path: str) -> None:
    assert "UTF-8" in wr.assert_json_error(wr.call(wr.make_stub(SearchingQueue()), "GET", path), 400)


def test_a_host_that_is_not_utf8_is_a_json_400() -> None:
    stub = wr.make_stub()
    d = stub.request("GET", wr.BASE + "/rest/v1/info/",
                     headers={b"Authorization": [f"Bearer {wr.TOKEN}".encode()], b"Host": [b"\xff\xfe"]})
    stub.flush()
    assert "UTF-8" in wr.assert_json_error(wr.Answer(wr.result_of(d)), 400)
