"""Per-rep-group job counts by state, read from the store's counters and pushed when they change.

The store keeps a count of jobs per (rep group, state, exit code, fail reason) in the same
transaction as every change, so a snapshot of every group costs one small aggregate over those
counters, however many jobs there are: it never scans jobs. The feed watches the store's commit
count (a number in memory) a few times a second while anyone is subscribed, reads the counters
only after a commit, and calls its subscribers only when the snapshot differs from the last one:
changes are coalesced to at most one push per interval.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Optional

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from wmgr.jobs import model
from wmgr.jobs.journal import group_state_counts

log = Logger()

# The states a person sees, in the order of a progress bar; reserved (taken, not yet started)
# is shown as running, as wr's `running` filter does.
SHOWN_STATES = (model.COMPLETE, model.BURIED, model.LOST, model.RUNNING, model.READY, model.DEPENDENT,
                model.DELAYED)
_SHOWN_AS = {model.RESERVED: model.RUNNING}

Snapshot = dict[str, Any]
Subscriber = Callable[[Snapshot], None]


def read_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """{rep group: {state: count}} for every rep group with a job, from the counters."""
    counts: dict[str, dict[str, int]] = {}
    for rep_grp, state, n in group_state_counts(conn):
        if n <= 0:
            continue
        group = counts.get(rep_grp)
        if group is None:
            group = counts[rep_grp] = dict.fromkeys(SHOWN_STATES, 0)
        shown = _SHOWN_AS.get(state, state)
        group[shown] = group.get(shown, 0) + n
    return counts


class CountsFeed:
    """Snapshots {"groups": {rep group: {state: n}}, "warnings": [...]} for live views."""

    def __init__(self, store: Any, clock: Any, warnings: Callable[[], list[dict[str, Any]]] = list,
                 interval: float = 0.25) -> None:
        self._store = store
        self._clock = clock
        self._warnings = warnings
        self.interval = interval
        self._subscribers: list[Subscriber] = []
        self._loop: Optional[LoopingCall] = None
        self._seen_commits: Optional[int] = None
        self._reading = False
        self.last: Optional[Snapshot] = None

    async def snapshot(self) -> Snapshot:
        """The current snapshot, read now."""
        groups = await self._store.read(read_counts)
        return {"groups": groups, "warnings": self._warnings()}

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber` with the current snapshot soon, then with each changed one. Returns
        the function that ends the subscription."""
        self._subscribers.append(subscriber)
        if self.last is not None and self._loop is not None:
            subscriber(self.last)
        if self._loop is None:
            self._seen_commits = None
            self.last = None
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=True)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)
            if not self._subscribers and self._loop is not None:
                if self._loop.running:
                    self._loop.stop()
                self._loop = None

        return unsubscribe

    def _tick(self) -> None:
        if self._reading:
            return
        commits = self._store.commits
        if commits == self._seen_commits and self.last is not None:
            warnings = self._warnings()
            if warnings != self.last["warnings"]:
                self._publish({"groups": self.last["groups"], "warnings": warnings})
            return
        self._reading = True
        ensureDeferred(self._refresh(commits))

    async def _refresh(self, commits: int) -> None:
        try:
            snapshot = await self.snapshot()
        except Exception:
            log.failure("could not read the job counters")
            return
        finally:
            self._reading = False
        self._seen_commits = commits
        if snapshot != self.last:
            self._publish(snapshot)

    def _publish(self, snapshot: Snapshot) -> None:
        self.last = snapshot
        for subscriber in list(self._subscribers):
            try:
                subscriber(snapshot)
            except Exception:
                log.failure("a counts subscriber failed")
