"""wmgr.store: the writer thread, batched commits, savepoints, draining on close, migrations.

The store really uses threads and reactor.callFromThread, so these tests run on the real reactor
(pytest-twisted). To make batching deterministic, a "gate" operation holds the writer thread while
the test queues more writes behind it.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from wmgr import store as store_module
from wmgr.store import MIGRATIONS, Store, migrate

WAIT = 10  # seconds; a bound on thread hand-offs, never a sleep


def insert(key: str, fail: bool = False) -> Any:
    def operation(conn: sqlite3.Connection) -> str:
        conn.execute(
            "INSERT INTO jobs (key, rep_grp, state, seq, spec, updated) VALUES (?, 'g', 'ready', 1, '{}', 0)", (key,)
        )
        if fail:
            raise ValueError(f"refusing {key}")
        return key

    return operation


def keys_on_disk(path: Any) -> set[str]:
    """What a brand-new connection sees: only committed data."""
    conn = sqlite3.connect(str(path))
    try:
        return {row[0] for row in conn.execute("SELECT key FROM jobs")}
    finally:
        conn.close()


class Gate:
    """An operation that blocks the writer thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: sqlite3.Connection) -> str:
        self.entered.set()
        assert self.release.wait(WAIT), "the test never opened the gate"
        return "gate"


def bounded(d: Deferred) -> Deferred:
    """A Deferred that fails with TimeoutError instead of hanging the suite if the store is broken."""
    from twisted.internet import reactor

    return d.addTimeout(WAIT, reactor)


@pytest.fixture
def store(tmp_path: Any, reactor: Any) -> Any:
    s = Store(tmp_path / "wmgr.db", reactor)
    s.open()
    yield s
    if s._stopped is None:
        s.close()
        s._writer.join(WAIT)


def hold_writer(s: Store) -> tuple[Gate, Any]:
    gate = Gate()
    d = s.write(gate)
    assert gate.entered.wait(WAIT), "the writer thread did not start the gate"
    return gate, d


@pytest_twisted.ensureDeferred
async def test_write_fires_only_after_commit(store: Store, tmp_path: Any) -> None:
    seen_when_fired: list[set[str]] = []
    d = store.write(insert("a"))
    d.addCallback(lambda result: seen_when_fired.append(keys_on_disk(tmp_path / "wmgr.db")) or result)
    assert await bounded(d) == "a"
    assert seen_when_fired == [{"a"}]


@pytest_twisted.ensureDeferred
async def test_write_has_not_fired_while_its_batch_is_uncommitted(store: Store, tmp_path: Any) -> None:
    gate, gate_d = hold_writer(store)
    d = store.write(insert("b"))
    fired: list[Any] = []
    d.addBoth(fired.append)
    assert fired == []
    assert keys_on_disk(tmp_path / "wmgr.db") == set()
    gate.release.set()
    await bounded(gate_d)
    await bounded(d)
    assert fired == ["b"]
    assert keys_on_disk(tmp_path / "wmgr.db") == {"b"}


@pytest_twisted.ensureDeferred
async def test_many_writes_share_one_commit(store: Store) -> None:
    before = store.commits
    gate, gate_d = hold_writer(store)
    ds = [store.write(insert(f"k{i}")) for i in range(50)]
    gate.release.set()
    assert await bounded(gatherResults([gate_d] + ds)) == ["gate"] + [f"k{i}" for i in range(50)]
    # one transaction for the gate alone, one for the fifty writes queued behind it
    assert store.commits - before == 2


@pytest_twisted.ensureDeferred
async def test_a_batch_is_bounded(store: Store, monkeypatch: Any) -> None:
    monkeypatch.setattr(store_module, "MAX_BATCH", 10)
    before = store.commits
    gate, gate_d = hold_writer(store)
    ds = [store.write(insert(f"k{i}")) for i in range(25)]
    gate.release.set()
    await bounded(gatherResults([gate_d] + ds))
    assert store.commits - before == 1 + 3


@pytest_twisted.ensureDeferred
async def test_a_failing_operation_rolls_back_only_itself(store: Store, tmp_path: Any) -> None:
    before = store.commits
    gate, gate_d = hold_writer(store)
    good1 = store.write(insert("good1"))
    bad = store.write(insert("bad", fail=True))
    good2 = store.write(insert("good2"))
    outcomes: list[Any] = []
    bad.addErrback(lambda f: outcomes.append(f.trap(ValueError)) or f.getErrorMessage())
    gate.release.set()
    await bounded(gate_d)
    assert await bounded(good1) == "good1"
    assert await bounded(bad) == "refusing bad"
    assert await bounded(good2) == "good2"
    assert outcomes == [ValueError]
    assert store.commits - before == 2
    assert keys_on_disk(tmp_path / "wmgr.db") == {"good1", "good2"}


@pytest_twisted.ensureDeferred
async def test_a_failed_commit_fails_the_whole_batch(store: Store, tmp_path: Any) -> None:
    """An operation that ends the transaction itself makes RELEASE fail: nothing in the batch may
    then report success."""
    gate, gate_d = hold_writer(store)
    first = store.write(insert("first"))
    breaker = store.write(lambda conn: conn.execute("COMMIT"))
    first_result: list[Any] = []
    first.addBoth(first_result.append)
    breaker.addErrback(lambda f: None)
    gate.release.set()
    await bounded(gate_d.addErrback(lambda f: None))
    await bounded(breaker)
    assert len(first_result) == 1
    # Either "first" was committed and reported, or it failed and is not on disk: never a success
    # reported for data that is not there.
    if isinstance(first_result[0], str):
        assert "first" in keys_on_disk(tmp_path / "wmgr.db")
    else:
        first_result[0].trap(sqlite3.Error)
    # the writer survives and goes on committing
    assert await bounded(store.write(insert("after"))) == "after"


@pytest_twisted.ensureDeferred
async def test_close_drains_queued_writes(store: Store, tmp_path: Any) -> None:
    gate, gate_d = hold_writer(store)
    ds = [store.write(insert(f"q{i}")) for i in range(20)]
    closed = store.close()
    assert store.close() is closed
    with pytest.raises(RuntimeError, match="closed"):
        store.write(insert("late"))
    gate.release.set()
    await bounded(closed)
    results = await bounded(gatherResults([gate_d] + ds))
    assert results[1:] == [f"q{i}" for i in range(20)]
    assert keys_on_disk(tmp_path / "wmgr.db") == {f"q{i}" for i in range(20)}
    store._writer.join(WAIT)
    assert not store._writer.is_alive()


@pytest_twisted.ensureDeferred
async def test_reads_see_committed_writes(store: Store) -> None:
    await bounded(store.write(insert("r1")))
    rows = await bounded(store.read(lambda conn: [r[0] for r in conn.execute("SELECT key FROM jobs")]))
    assert rows == ["r1"]


@pytest_twisted.ensureDeferred
async def test_wal_and_synchronous_full(store: Store, tmp_path: Any) -> None:
    writer = await bounded(store.write(lambda conn: (conn.execute("PRAGMA journal_mode").fetchone()[0],
                                                     conn.execute("PRAGMA synchronous").fetchone()[0])))
    reader = await bounded(store.read(lambda conn: (conn.execute("PRAGMA journal_mode").fetchone()[0],
                                                    conn.execute("PRAGMA synchronous").fetchone()[0])))
    assert writer == ("wal", 2) and reader == ("wal", 2)  # 2 is FULL
    conn = sqlite3.connect(str(tmp_path / "wmgr.db"))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    finally:
        conn.close()


def test_migrate_sets_user_version_and_is_idempotent(tmp_path: Any) -> None:
    conn = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)
    try:
        assert migrate(conn) == len(MIGRATIONS)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "meta"} <= tables
        assert migrate(conn) == len(MIGRATIONS)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        conn.close()


def test_migrate_refuses_a_newer_database(tmp_path: Any) -> None:
    conn = sqlite3.connect(str(tmp_path / "m.db"), isolation_level=None)
    try:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        with pytest.raises(RuntimeError, match="newer"):
            migrate(conn)
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        conn.close()


def test_open_refuses_a_newer_database(tmp_path: Any, reactor: Any) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(str(path))
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path, reactor).open()


@pytest_twisted.ensureDeferred
async def test_a_batch_is_fsynced_when_any_write_in_it_must_be_durable(store: Store) -> None:
    def synchronous(conn: Any) -> int:
        return conn.execute("PRAGMA synchronous").fetchone()[0]

    FULL, NORMAL = 2, 1
    assert await bounded(store.write(synchronous, durable=False)) == NORMAL
    assert await bounded(store.write(synchronous)) == FULL
    gate, held = hold_writer(store)
    mixed = [store.write(synchronous, durable=False), store.write(synchronous, durable=True)]
    gate.release.set()
    await bounded(held)
    assert [await bounded(d) for d in mixed] == [FULL, FULL]


@pytest_twisted.ensureDeferred
async def test_commit_observers_hear_each_batch_on_the_reactor_thread(store: Store) -> None:
    import threading

    heard: list[tuple[float, bool]] = []
    store.commit_observers.append(lambda seconds: heard.append((seconds, threading.current_thread() is threading.main_thread())))
    await bounded(store.write(lambda conn: conn.execute("INSERT INTO meta VALUES ('a', '1')")))
    assert len(heard) == store.commits == 1
    seconds, on_reactor_thread = heard[0]
    assert 0 <= seconds < WAIT and on_reactor_thread


@pytest_twisted.ensureDeferred
async def test_the_store_is_a_service(tmp_path: Any, reactor: Any) -> None:
    s = Store(tmp_path / "svc.db", reactor)
    s.startService()
    assert s.running
    await bounded(s.write(lambda conn: conn.execute("INSERT INTO meta VALUES ('b', '2')")))
    await bounded(s.stopService())
    s._writer.join(WAIT)  # it fired the Deferred just before it returned
    assert not s.running and not s._writer.is_alive()


@pytest_twisted.ensureDeferred
async def test_an_operation_alone_in_its_batch_commits_or_leaves_nothing(store: Store, tmp_path: Any) -> None:
    before = store.commits
    assert await bounded(store.write(insert("alone"))) == "alone"
    assert store.commits - before == 1
    failed = store.write(insert("refused", fail=True))
    assert await bounded(failed.addErrback(lambda f: f.trap(ValueError) and f.getErrorMessage())) == "refusing refused"
    assert store.commits - before == 1
    assert keys_on_disk(tmp_path / "wmgr.db") == {"alone"}  # its insert, before it raised, rolled back
    assert await bounded(store.write(insert("after"))) == "after"


async def until_true(condition: Any) -> None:
    """Wait (on the reactor, in small steps, at most WAIT seconds) for another thread's work."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(WAIT * 100):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the condition never held")


def wal_frames(path: Any) -> int:
    conn = sqlite3.connect(str(path))
    try:
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_checkpoints_run_in_their_own_thread_not_in_commits(tmp_path: Any, reactor: Any, monkeypatch: Any) -> None:
    # The checkpointer checkpoints once after the first commit, then (here) not again for an
    # hour: the writer's commits, which used to checkpoint the WAL past 1,000 pages themselves,
    # must leave it growing, and still commit.
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 3600)
    s = Store(tmp_path / "wmgr.db", reactor)
    s.open()
    try:
        assert await bounded(s.write(lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])) == 0
        await until_true(lambda: s.checkpoints == 1)
        blob = "x" * 3000  # about one page per row
        for batch in range(12):
            await bounded(s.write(lambda conn, b=batch: conn.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?)", [(f"{b}-{i}", blob) for i in range(100)])))
        assert s.checkpoints == 1
        assert wal_frames(tmp_path / "wmgr.db") > 1000
    finally:
        s.close()
        s._writer.join(WAIT)
    assert not s._checkpointer.is_alive()


@pytest_twisted.ensureDeferred
async def test_writes_are_checkpointed_while_they_go_on(store: Store, tmp_path: Any) -> None:
    await bounded(store.write(insert("a")))
    await until_true(lambda: store.checkpoints >= 1)
    first = store.checkpoints
    await bounded(store.write(insert("b")))
    await until_true(lambda: store.checkpoints > first)  # after CHECKPOINT_INTERVAL
    assert keys_on_disk(tmp_path / "wmgr.db") == {"a", "b"}


class Turnstile:
    """A reactor whose callLater(0, ...) calls run only when the test turns it (a Clock runs the
    calls they schedule in the same advance)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        call = [f, args]
        self.calls.append(call)

        class Handle:
            def cancel(handle) -> None:
                self.calls.remove(call)
        return Handle()

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def test_a_commit_of_many_operations_is_told_a_few_per_reactor_turn_in_order(tmp_path: Any, monkeypatch: Any) -> None:
    # No budget: one operation told per turn (the daemon's budget is a few milliseconds).
    monkeypatch.setattr(store_module, "TELL_BUDGET", 0.0)
    reactor = Turnstile()
    store = Store(tmp_path / "told.db", reactor)  # not opened: the commits are handed over as the writer would
    told: list[tuple[int, str]] = []
    first, second = [Deferred() for _ in range(3)], [Deferred() for _ in range(2)]
    for i, d in enumerate(first + second):
        d.addCallback(lambda result, i=i: told.append((i, result)))
    store._committed([(d, "first") for d in first], 0.0)
    store._committed([(d, "second") for d in second], 0.0)
    assert told == [(0, "first")]
    reactor.turn()
    assert told == [(0, "first"), (1, "first")]
    for _ in range(3):
        reactor.turn()
    assert told == [(0, "first"), (1, "first"), (2, "first"), (3, "second"), (4, "second")]
    assert not reactor.calls


def test_closing_tells_every_committed_operation_before_it_says_stopped(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(store_module, "TELL_BUDGET", 0.0)
    reactor = Turnstile()
    store = Store(tmp_path / "told.db", reactor)
    events: list[str] = []
    operations = [Deferred() for _ in range(4)]
    for i, d in enumerate(operations):
        d.addCallback(lambda _, i=i: events.append(f"op {i}"))
    store._stopped = Deferred()
    store._stopped.addCallback(lambda _: events.append("stopped"))
    store._committed([(d, None) for d in operations], 0.0)
    store._closed()  # what the writer thread hands over once it has exited
    assert events == ["op 0", "op 1", "op 2", "op 3", "stopped"]
    assert not reactor.calls
