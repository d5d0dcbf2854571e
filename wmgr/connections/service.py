"""The connection registry as a service: the registry's rules (wmgr.connections.registry), made
durable through the store (wmgr.connections.journal), with expiry by a timer and the original's
statistics.

Changes are applied in memory first (so they are seen at once) and answered only after the store
has committed them. Those commits skip the fsync (durable=False): an entry lives ttl seconds
(10 by default) unless republished, so surviving a power cut would only bring back entries
that are already dead, while surviving a kill -9 or a restart, which WAL gives without it, is
what matters; and an fsync per publish would cap publishing at the disk's flush rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from wmgr.connections import journal
from wmgr.connections.registry import FULLMATCH, BadPattern, Connection, Registry
from wmgr.errors import InvalidRequest, NotFound

log = Logger()


def purge_interval(ttl: float) -> float:
    """Expired entries are never returned; purging them is only about memory, so it runs twice
    per TTL, at most every minute and at least every half second."""
    return min(60.0, max(0.5, ttl / 2))


class IterationBatch:
    """Store writes made in one reactor iteration, handed to the store as one operation at its end.

    Clients wait for their commit, so their next requests tend to arrive together, in one
    iteration; one operation for all of them is one hand-off to the store's writer thread and one
    wake-up back instead of one each, which is most of what a small publish costs. Nothing waits
    longer than before: the batch leaves as soon as the iteration's events are handled. The batch
    commits or fails as a whole; its operations are plain statements of validated values, so only
    the disk can fail them."""

    def __init__(self, store: Any, reactor: Any) -> None:
        self._store = store
        self._reactor = reactor
        self._pending: list[tuple[journal.Operation, Deferred[None]]] = []
        self._scheduled = False

    def write(self, operation: journal.Operation) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self._pending.append((operation, done))
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._flush)
        return done

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, [], False

        def run_all(conn: Any) -> None:
            for operation, _ in batch:
                operation(conn)

        def committed(result: Any) -> None:
            for _, done in batch:
                if isinstance(result, Failure):
                    done.errback(result)
                else:
                    done.callback(None)

        try:
            d = self._store.write(run_all, durable=False)
        except Exception:  # the store is closed: these writes fail rather than hang
            committed(Failure())
        else:
            d.addBoth(committed)


@dataclass
class Stats:
    """What the original's /stats page reports."""

    since: float
    publishes: int = 0
    publish_seconds: float = 0.0
    lookups: int = 0
    lookup_seconds: float = 0.0
    max_partitions: int = 0
    max_entries: dict[str, int] = field(default_factory=dict)


class ConnectionService(MultiService):
    """Owns the registry; every read and change goes through here."""

    def __init__(self, store: Any, reactor: Any, ttl: float = 10.0, match: str = FULLMATCH,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.registry = Registry(ttl, match)
        self._store = store
        self._batch = IterationBatch(store, reactor)
        self._reactor = reactor
        self._timer = timer  # measures handler time for /stats only; the rules use reactor time
        self.stats = Stats(since=reactor.seconds())
        self._store_may_hold_expired = True
        purger = TimerService(purge_interval(ttl), lambda: ensureDeferred(self.purge()))
        purger.clock = reactor
        purger.setServiceParent(self)

    def _write(self, operation: journal.Operation) -> "Deferred[Any]":
        return self._batch.write(operation)

    @property
    def ttl(self) -> float:
        return self.registry.ttl

    async def load(self) -> int:
        """Bring back what was published before a restart and has not expired; returns the number
        of entries."""
        cutoff = self._reactor.seconds() - self.ttl
        loaded = await self._store.read(journal.load(cutoff))
        count = 0
        for name, entries in loaded:
            self.registry.ensure(name)
            for entry in entries:
                self.registry.restore(name, entry)
                count += 1
        self._note_sizes()
        return count

    # -- changes (each committed before it returns) -------------------------------------------------

    def publish(self, partition: str, connections: Iterable[Connection]) -> "Deferred[None]":
        """Fires once the publication is committed. A plain Deferred, not a coroutine: this is
        the registry's hot path, and the coroutine's wrapping cost more than the rest of it."""
        started = self._timer()
        new_partition = partition not in self.registry.partitions
        stored = self.registry.publish(partition, connections, self._reactor.seconds())
        self._note_sizes(partition)
        self.stats.publishes += 1
        self.stats.publish_seconds += self._timer() - started
        return self._write(journal.save(partition, stored, new_partition))

    async def retract(self, partition: str, uids: list[str]) -> None:
        """Remove the entries named; NotFound if the partition is unknown or (after removing the
        others, as the original does) if some uid was not there."""
        try:
            removed, missing, gone = self.registry.retract(partition, uids)
        except KeyError:
            raise NotFound(f"partition {partition} not found") from None
        if removed or gone:
            await self._write(journal.delete_entries(partition, removed, gone))
        if missing:
            raise NotFound(f"not in partition {partition}: {', '.join(missing)}")

    async def retract_partition(self, partition: str) -> None:
        if not self.registry.retract_partition(partition):
            raise NotFound(f"partition {partition} not found")
        await self._write(journal.delete_partition(partition))

    async def reset(self) -> None:
        """/resetService: forget every partition and zero the statistics."""
        self.registry.clear()
        self.reset_stats()
        await self._write(journal.delete_all)

    async def purge(self) -> None:
        """Forget expired entries, in memory and in the store. The purge timer's body: it never
        raises, so the timer never stops."""
        try:
            now = self._reactor.seconds()
            purged = self.registry.purge(now)
            if purged:
                log.debug("purged {n} expired connections", n=len(purged))
                self._store_may_hold_expired = True
            if self._store_may_hold_expired:
                # The store holds what memory holds, plus (until the first purge) the rows that
                # had expired before a restart and were not loaded; the delete scans the table.
                await self._write(journal.delete_expired(now - self.ttl))
                self._store_may_hold_expired = False
        except Exception:
            log.failure("purging expired connections failed; it will run again")

    # -- queries ---------------------------------------------------------------------------------------

    def lookup(self, partition: str, uid_regex: str, data_type: str) -> bytes:
        started = self._timer()
        try:
            reply = self.registry.lookup(partition, uid_regex, data_type, self._reactor.seconds())
        except KeyError:
            raise NotFound(f"partition {partition} not found") from None
        except BadPattern as e:
            raise InvalidRequest(str(e)) from None
        self.stats.lookups += 1
        self.stats.lookup_seconds += self._timer() - started
        return reply

    def partitions(self) -> list[dict[str, Any]]:
        """Each partition with its number of live entries, in the order they were created."""
        now = self._reactor.seconds()
        return [{"partition": part.name, "entries": self.registry.live_count(part, now)}
                for part in self.registry]

    def entries(self, partition: str) -> list[tuple[Connection, float, bool]]:
        """(connection, published, live) of every entry held, in reply order (the dump page)."""
        now = self._reactor.seconds()
        part = self.registry.partitions[partition]
        return [(e.connection, e.published, now - e.published < self.ttl) for e in part.entries.values()]

    def reset_stats(self) -> None:
        self.stats = Stats(since=self._reactor.seconds())

    def _note_sizes(self, partition: Optional[str] = None) -> None:
        stats, partitions = self.stats, self.registry.partitions
        stats.max_partitions = max(stats.max_partitions, len(partitions))
        for name in (partition,) if partition is not None else partitions:
            size = len(partitions[name].entries)
            if size > stats.max_entries.get(name, 0):
                stats.max_entries[name] = size
