"""Bulk work in reactor turns of its own, so that heartbeats and small requests are answered ahead of it.

With many workers, one reactor turn can read dozens of requests: heartbeats (each well under a
millisecond of work) and pulls and reports (a millisecond or more each, for a batch of jobs). A
heartbeat read in that turn would otherwise wait for all of them, and a worker whose heartbeats
wait misses its lease. So pulls and reports wait for a turn: `await turns.turn()` returns in a
later reactor turn, in arrival order, each turn releasing bulk work only until `budget` seconds
have gone (at least one piece, so bulk work always progresses). Heartbeats are handled where they
are read; their replies are written in the next turn's I/O, before the rest of the bulk work. A
big report batch takes a turn per slice of `slice_size` reports, and a pull takes a second turn
once its hand-out is committed (one commit can store many pulls) to make its reply.

A big add (`POST /rest/v1/jobs/`, 10,000 jobs: a quarter of a second of work in one piece) takes
a turn per slice of its parsing, its jobs' making and its reply (see WrAPI.add_jobs and
JobQueue.add), so no request waits for all of it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Optional, Sequence, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


class Turns:
    def __init__(self, reactor: Any, budget: float = 0.003, slice_size: int = 64,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._reactor = reactor
        self.budget = budget
        self.slice_size = slice_size
        # CPU-bound slices are measured in real time, never the reactor's (a test Clock stands still).
        self._clock = clock
        self._waiting: deque[Deferred[None]] = deque()
        self._call: Any = None
        self.turns = 0  # reactor turns that released bulk work (for tests and curiosity)

    def turn(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        if self._call is None:
            self._call = self._reactor.callLater(0, self._release)
        return d

    def pending(self) -> int:
        return len(self._waiting)

    def _release(self) -> None:
        # self._call stays set meanwhile: work released here that asks for another turn (the
        # next slice of a report batch) is queued, not scheduled a second time.
        self.turns += 1
        deadline = self._clock() + self.budget
        try:
            # The work each waiter does runs inside callback(), up to its next await.
            self._waiting.popleft().callback(None)
            while self._waiting and self._clock() < deadline:
                self._waiting.popleft().callback(None)
        finally:
            self._call = self._reactor.callLater(0, self._release) if self._waiting else None


async def in_slices(items: Sequence[T], size: int,
                    turn: Optional[Callable[[], Deferred[None]]]) -> AsyncIterator[tuple[int, Sequence[T]]]:
    """`items` a slice of `size` at a time, with the index of the slice's first item, waiting for
    `turn()` between slices; without a turn, all slices at once."""
    for start in range(0, len(items), size):
        if start and turn is not None:
            await turn()
        yield start, items[start:start + size]
