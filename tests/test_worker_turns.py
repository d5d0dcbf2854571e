"""Bulk requests (pulls, reports, big adds) wait for reactor turns of their own: wmgr.turns, and
the worker routes and the wr add with it (heartbeats answered ahead of bulk work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq

from tests.test_workers import Manager
from wmgr.api.workers import WorkersAPI
from wmgr.jobs import model
from wmgr.turns import Turns


class Turnstile:
    """A reactor whose callLater(0, ...) calls run only when the test turns it: one turn each."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        self.calls.append((f, args))
        return self

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class Work:
    """Time that moves only as released work runs: each piece takes `cost` seconds."""

    def __init__(self, cost: float) -> None:
        self.now, self.cost = 0.0, cost

    def clock(self) -> float:
        return self.now

    def run(self, released: list[int], i: int) -> None:
        released.append(i)
        self.now += self.cost


def test_bulk_work_runs_in_later_turns_each_within_its_budget() -> None:
    reactor = Turnstile()
    work = Work(0.003)
    turns = Turns(reactor, budget=0.005, clock=work.clock)
    released: list[int] = []
    for i in range(5):
        turns.turn().addCallback(lambda _, i=i: work.run(released, i))
    assert released == [] and turns.pending() == 5  # never in the turn that asked
    reactor.turn()
    assert released == [0, 1]  # 3 ms, then 6 ms: over the 5 ms budget, the rest waits a turn
    reactor.turn()
    assert released == [0, 1, 2, 3]
    reactor.turn()
    assert released == [0, 1, 2, 3, 4] and turns.turns == 3 and turns.pending() == 0


def test_a_piece_longer_than_the_budget_still_runs_one_per_turn() -> None:
    reactor = Turnstile()
    work = Work(1.0)
    turns = Turns(reactor, budget=0.005, clock=work.clock)
    released: list[int] = []
    for i in range(2):
        turns.turn().addCallback(lambda _, i=i: work.run(released, i))
    reactor.turn()
    assert released == [0]
    reactor.turn()
    assert released == [0, 1]


def post(stub: StubTreq, route: str, body: dict[str, Any]) -> list[Any]:
    answers: list[Any] = []
    d = stub.post("https://manager.test/worker/v1/" + route, data=json.dumps(body).encode(),
                  headers={b"Content-Type": [b"application/json"]})
    d.addCallback(lambda response: response.json()).addCallback(answers.append)
    return answers


def test_a_heartbeat_is_answered_while_pulls_and_reports_wait_for_their_turns(tmp_path: Path) -> None:
    m = Manager(tmp_path)
    m.start()
    jobs = m.add(*({"cmd": f"job {i}"} for i in range(3)))
    session = m.join("a")
    reactor = Turnstile()
    stub = StubTreq(WorkersAPI(m.workers, Turns(reactor, budget=0.0, slice_size=2)).resource())
    room = {"name": "a", "session": session, "cores": 4, "memory": 8000, "slots": 8}
    pulled = post(stub, "pull", room)
    beat = post(stub, "heartbeat", {"name": "a", "session": session, "running": []})
    stub.flush()
    assert beat and beat[0]["stop"] == [] and pulled == []
    assert all(job.state == model.READY for job in jobs)  # nothing handed out yet
    reactor.turn()
    m.settle()
    stub.flush()
    assert pulled == [] and all(job.state == model.RESERVED for job in jobs)  # stored; the reply waits a turn
    reactor.turn()
    stub.flush()
    assert len(pulled[0]["jobs"]) == 3
    # Six reports: three turns of two.
    reports = [{"key": p["key"], "attempt": 1, "event": event, "exitcode": 0}
               for p in pulled[0]["jobs"] for event in ("start", "end")]
    accepted = post(stub, "reports", {"name": "a", "reports": reports})
    stub.flush()
    assert accepted == [] and all(job.state == model.RESERVED for job in jobs)
    reactor.turn()
    m.settle()
    stub.flush()
    assert jobs[0].state == model.COMPLETE and jobs[1].state == model.RESERVED and accepted == []
    reactor.turn()
    reactor.turn()
    m.settle()
    stub.flush()
    assert accepted == [{"accepted": 6}] and all(job.state == model.COMPLETE for job in jobs)
