"""A big add (POST /rest/v1/jobs/ of more than ADD_SLICE jobs) in reactor turns of its own: parsed,
made and answered a slice per turn (wmgr.turns), while other requests are answered and an add of
the same keys waits for it; the reply is the same bytes as in one piece.

The real WrAPI and JobQueue (test_queue's Harness: a Clock, a fake spawner, a synchronous store),
with a Turnstile for the turns, so each test says exactly when a turn happens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, ensureDeferred

from tests.test_api import info, result_of
from tests.test_queue import Harness
from tests.test_worker_turns import Turnstile
from wmgr.api import wr as wr_module
from wmgr.api.wr import WrAPI
from wmgr.errors import InvalidRequest
from wmgr.jobs import model
from wmgr.jobs.queue import ADD_SLICE
from wmgr.turns import Turns

N = 2 * ADD_SLICE + 10  # three slices


class Site:
    def __init__(self, tmp_path: Path) -> None:
        self.h = Harness(tmp_path)
        self.h.start()
        self.h.queue.paused = True  # nothing starts: the jobs stay as added
        self.reactor = Turnstile()
        self.turns = Turns(self.reactor, budget=0.0)
        wr = WrAPI(self.h.queue, info, uploads=None, bad_servers=None, turns=self.turns)  # type: ignore[arg-type]
        self.stub = StubTreq(wr.resource())

    def post(self, jobs: list[dict[str, Any]], **params: str) -> Any:
        return self.stub.post("http://wmgr/rest/v1/jobs/", data=json.dumps(jobs).encode(),
                              params=dict({"rep_grp": "big", "cwd": str(self.h.tmp_path)}, **params))

    def flush(self) -> None:
        self.h.settle()
        self.stub.flush()

    def turn_until(self, d: Any, most: int = 100) -> int:
        """Turn the reactor until `d` has fired; how many turns that took."""
        done: list[Any] = []
        d.addBoth(lambda result: (done.append(True), result)[1])
        turns = 0
        self.flush()
        while not done:
            assert turns < most, "the add never finished"
            self.reactor.turn()
            turns += 1
            self.flush()
        return turns


def body_of(site: Site, d: Any) -> tuple[int, bytes]:
    response = result_of(d)
    content = site.stub.content(response)
    site.flush()
    return response.code, result_of(content)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_a_big_add_takes_turns_and_answers_as_one_piece_would(site: Site) -> None:
    d = site.post([{"cmd": f"true {i}"} for i in range(N)])
    site.flush()
    assert not site.h.queue.live  # nothing done in the turn that read it
    turns = site.turn_until(d)
    # Parsing (3 slices), the keys (3), making the jobs (3), their rows (3), the reply (3).
    assert turns >= 12
    code, body = body_of(site, d)
    assert code == 201
    jobs = sorted(site.h.queue.live.values(), key=lambda job: job.seq)
    assert [job.spec["cmd"] for job in jobs] == [f"true {i}" for i in range(N)]
    assert body == model.statuses_json([(job, 0) for job in jobs], 0.0)  # no time shows in a ready job's


def test_other_requests_are_answered_while_a_big_add_waits_for_its_turns(site: Site) -> None:
    big = site.post([{"cmd": f"true {i}"} for i in range(N)])
    site.flush()
    small = site.post([{"cmd": "echo small"}])  # a small add needs no turn
    site.flush()
    code, body = body_of(site, small)
    assert code == 201 and [status["Cmd"] for status in json.loads(body)] == ["echo small"]
    listed = site.stub.get("http://wmgr/rest/v1/jobs/")
    site.flush()
    assert [status["Cmd"] for status in json.loads(body_of(site, listed)[1])] == ["echo small"]
    site.turn_until(big)
    assert len(site.h.queue.live) == N + 1


def test_an_add_of_the_same_key_waits_for_the_big_add_and_finds_its_job(site: Site) -> None:
    queue = site.h.queue
    specs, _ = model.parse_specs([{"cmd": f"true {i}"} for i in range(N)],
                                 model.parse_defaults({"rep_grp": "big", "cwd": str(site.h.tmp_path)}))
    big = ensureDeferred(queue.add(specs, turn=site.turns.turn))
    site.reactor.turn()  # the keys are made; the claim is in the turn that finishes them
    site.reactor.turn()
    site.reactor.turn()
    site.flush()
    assert queue._adding, "the big add has claimed its keys"
    again = ensureDeferred(queue.add([dict(specs[N - 1])]))
    site.flush()
    assert not again.called  # waits for the big add to land
    site.turn_until(big)
    [job] = result_of(again)
    assert job is queue.live[job.key] and job.spec["cmd"] == f"true {N - 1}"
    assert site.h.store.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == N
    assert not queue._adding


def test_a_bad_job_in_a_later_slice_is_named_by_its_index_and_nothing_is_added(site: Site) -> None:
    jobs: list[Any] = [{"cmd": f"true {i}"} for i in range(N)]
    jobs[ADD_SLICE + 3] = {"cmd": " "}
    d = site.post(jobs)
    site.turn_until(d)
    code, body = body_of(site, d)
    assert code == 400 and f"job {ADD_SLICE + 3}:" in json.loads(body)["error"]
    assert not site.h.queue.live


def test_the_spec_parser_in_slices_makes_what_it_makes_in_one() -> None:
    defaults = model.parse_defaults({"rep_grp": "g", "cwd": "/tmp"})
    raws: list[Any] = [{"cmd": f"bin/run {i}"} for i in range(7)] + [{"cmd": "x", "priority": 3}]
    whole, _ = model.parse_specs(raws, defaults)
    parser = model.SpecParser(defaults)
    sliced = parser.parse(raws[:3], 0) + parser.parse(raws[3:], 3)
    assert sliced == whole and [model.stored_json(s) for s in sliced] == [model.stored_json(s) for s in whole]
    # One template for every slice: the jobs of a POST share their values' objects.
    assert sliced[0]["rep_grp"] is sliced[5]["rep_grp"]
    with pytest.raises(InvalidRequest, match="job 11:"):
        parser.parse([{"cmd": "ok"}, {"cmd": None}], 10)


def test_a_big_reply_is_written_a_slice_per_turn(site: Site, monkeypatch: Any) -> None:
    monkeypatch.setattr(wr_module, "REPLY_SLICE", 50_000)
    d = site.post([{"cmd": f"true {i}"} for i in range(N)])
    site.turn_until(d)  # the status line and headers, then the first slice
    response = result_of(d)
    assert response.code == 201
    length = response.length  # from its Content-Length
    content = site.stub.content(response)
    turns = site.turn_until(content)
    body = result_of(content)
    assert len(body) == length and turns >= length // 50_000 - 1
    jobs = sorted(site.h.queue.live.values(), key=lambda job: job.seq)
    assert body == model.statuses_json([(job, 0) for job in jobs], 0.0)


def test_an_add_whose_caller_goes_away_still_lands(site: Site) -> None:
    # Klein cancels a request's handler when its client disconnects: the add runs to its end.
    queue = site.h.queue
    specs, _ = model.parse_specs([{"cmd": f"true {i}"} for i in range(N)],
                                 model.parse_defaults({"rep_grp": "big", "cwd": str(site.h.tmp_path)}))
    d = ensureDeferred(queue.add(specs, turn=site.turns.turn))
    for _ in range(4):
        site.reactor.turn()
    assert queue._adding and not queue.live
    d.cancel()
    failures: list[Any] = []
    d.addErrback(failures.append)
    for _ in range(20):
        site.reactor.turn()
        site.flush()
    assert failures and failures[0].check(CancelledError)
    assert len(queue.live) == N and not queue._adding
    assert site.h.store.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == N
