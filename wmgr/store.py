"""The one SQLite store.

Every write goes through one writer thread, which takes whatever operations are waiting, runs each
inside its own savepoint (so one failing operation leaves the others intact; an operation alone
in its batch has the transaction for that) and commits them all in one transaction. The Deferred
of each operation fires on the reactor thread only after that commit, so a caller that answers a
client after awaiting it has made the change durable first.
Reads run on a small pool of reader connections; WAL mode lets them proceed while the writer
commits. Checkpoints (copying the WAL back into the database file, two fsyncs) run in a thread of
their own, never inside a commit. Nothing here ever touches SQLite from the reactor thread.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.internet.threads import deferToThreadPool

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]

log = Logger()

# Schema versions, applied in order; PRAGMA user_version records how far a database has come.
MIGRATIONS: list[str] = [
    # 1: the job table. Live jobs are also held in memory by the queue; this is their durable copy
    # and the only copy of completed ones. spec and run are JSON: the definition a client gave, and
    # what running it produced.
    """
    CREATE TABLE jobs (
        key      TEXT PRIMARY KEY,
        rep_grp  TEXT NOT NULL,
        state    TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        spec     TEXT NOT NULL,
        run      TEXT NOT NULL DEFAULT '{}',
        stdout   TEXT NOT NULL DEFAULT '',
        stderr   TEXT NOT NULL DEFAULT '',
        updated  REAL NOT NULL
    );
    CREATE INDEX jobs_rep_grp ON jobs (rep_grp, state);
    CREATE INDEX jobs_state ON jobs (state, updated);
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: what keeps status and adds independent of the size of the history. exitcode and
    # fail_reason become columns so that jobs can be grouped as wr's limit=N groups them;
    # rep_grp_states counts jobs per (rep group, state, exit code, fail reason), kept up to date
    # in the same transaction as every change; job_deps finds completed jobs that wait for a
    # group (live dependencies re-run them); req_samples feeds resource learning; limit_groups
    # keeps the limits set with name:N.
    """
    ALTER TABLE jobs ADD COLUMN exitcode INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN fail_reason TEXT NOT NULL DEFAULT '';
    UPDATE jobs SET exitcode = COALESCE(json_extract(run, '$.exitcode'), 0),
                    fail_reason = COALESCE(json_extract(run, '$.fail_reason'), '');
    DROP INDEX jobs_rep_grp;
    CREATE INDEX jobs_rep_grp ON jobs (rep_grp, state, exitcode, fail_reason, seq);
    CREATE TABLE rep_grp_states (
        rep_grp     TEXT NOT NULL,
        state       TEXT NOT NULL,
        exitcode    INTEGER NOT NULL,
        fail_reason TEXT NOT NULL,
        n           INTEGER NOT NULL,
        PRIMARY KEY (rep_grp, state, exitcode, fail_reason)
    );
    INSERT INTO rep_grp_states
        SELECT rep_grp, state, exitcode, fail_reason, COUNT(*) FROM jobs
        GROUP BY rep_grp, state, exitcode, fail_reason;
    CREATE TABLE job_deps (dep_grp TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (dep_grp, key));
    INSERT OR IGNORE INTO job_deps SELECT each.value, jobs.key FROM jobs, json_each(jobs.spec, '$.deps') AS each;
    CREATE TABLE req_samples (
        id      INTEGER PRIMARY KEY,
        req_grp TEXT NOT NULL,
        ram     INTEGER NOT NULL,
        secs    REAL NOT NULL
    );
    CREATE INDEX req_samples_grp ON req_samples (req_grp, id);
    CREATE TABLE limit_groups (name TEXT PRIMARY KEY, lim INTEGER NOT NULL);
    """,
    # 3: only pruning looks jobs up by the time they changed, and only completed ones: a partial
    # index, which adding and running jobs never have to update.
    """
    DROP INDEX jobs_state;
    CREATE INDEX jobs_completed ON jobs (updated, seq) WHERE state = 'complete';
    """,
    # 4: the connection registry (wmgr/connections/journal.py). Entries expire ttl seconds after
    # `published`; partitions are listed apart so that an empty one survives a restart too.
    # One B-tree per entry and no index on `published`: a publish then changes one page, and only
    # the purge, in the writer thread every few seconds, scans.
    """
    CREATE TABLE conn_partitions (name TEXT PRIMARY KEY);
    CREATE TABLE conn_entries (
        partition       TEXT NOT NULL,
        uid             TEXT NOT NULL,
        uri             TEXT NOT NULL,
        data_type       TEXT NOT NULL,
        connection_type TEXT NOT NULL,
        published       REAL NOT NULL,
        seq             INTEGER NOT NULL,
        PRIMARY KEY (partition, uid)
    ) WITHOUT ROWID;
    """,
    # 5: a worker's reports to its manager (starts, ends) kept until the manager acknowledges them,
    # so that none is lost while the manager is unreachable (wmgr/workers/outbox.py).
    """
    CREATE TABLE worker_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
    """,
    # 6: Flamenco's tasks (wmgr/flamenco.py): what the server sent and workers reported, as JSON;
    # their jobs are ordinary jobs.
    """
    CREATE TABLE flamenco_tasks (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
    """,
    # 7: the workers a manager knows (wmgr/workers/registry.py), so that a worker keeps its small
    # Flamenco id (GET /workers/<id>) and an operator's disable across restarts.
    """
    CREATE TABLE workers (name TEXT PRIMARY KEY, id INTEGER NOT NULL UNIQUE, ip TEXT NOT NULL,
                          system TEXT NOT NULL, enabled INTEGER NOT NULL);
    """,
]

_STOP = object()
# An upper bound on operations per transaction, so that one commit never holds up replies for long.
MAX_BATCH = 2000
# Seconds of a reactor turn spent telling callers their operations committed (see Store._tell).
TELL_BUDGET = 0.003
# Seconds between checkpoints while writes go on. SQLite's own (automatic) checkpoint runs inside
# whichever commit takes the WAL past 1,000 pages, and its fsyncs (tens of milliseconds on a busy
# disk) then held up every reply waiting for that commit: the writer's connection has it off,
# and the checkpointer thread runs a PASSIVE one (it never blocks the writer) this often instead.
CHECKPOINT_INTERVAL = 0.5


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit is fsynced, so "acknowledged" survives a power cut as well as a kill -9.
    # Batching many operations per commit is what keeps this affordable.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class Store(Service):
    """The daemon's SQLite database: a writer thread with batched commits and reader threads.
    A Service: started, it opens (and migrates); stopped, it commits what is queued and closes."""

    name = "store"

    def __init__(self, path: Path, reactor: Any, readers: int = 2) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._writer: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._readers = ThreadPool(minthreads=1, maxthreads=readers, name="wmgr-store-read")
        self._local = threading.local()
        self.commits = 0  # transactions committed; the tests and benchmarks read it
        self.checkpoints = 0  # checkpoints run by the checkpointer thread (the tests read it)
        self._checkpointer: threading.Thread | None = None
        self._wrote = threading.Event()  # set by the writer after a commit, or to stop the checkpointer
        self._closing = threading.Event()
        self._durable = True  # what the writer connection's synchronous setting is now
        # Called on the reactor thread with the seconds each batch's transaction took (metrics).
        self.commit_observers: list[Callable[[float], None]] = []
        # Committed operations whose callers are still to be told (see _tell), in commit order.
        self._to_tell: deque[tuple[Deferred[Any], Any]] = deque()
        self._telling: Any = None

    def startService(self) -> None:
        self.open()
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Create or migrate the database and start the threads. Runs before the reactor does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(str(self.path))
        migrate(conn)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, args=(_connect(str(self.path)),), name="wmgr-store-checkpoint", daemon=True
        )
        self._checkpointer.start()
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="wmgr-store-write", daemon=True
        )
        self._writer.start()
        self._readers.start()

    def close(self) -> Deferred[None]:
        """Finish every queued write, then stop the threads; fires when the writer has exited."""
        if self._stopped is None:
            self._stopped = Deferred()
            self._queue.put(_STOP)
            self._readers.stop()
        return self._stopped

    # -- the checkpointer thread ---------------------------------------------------------------

    def _checkpoint_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                self._wrote.wait()
                if self._closing.is_set():
                    return
                self._wrote.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error:
                    log.failure("a checkpoint of the store failed; the next commit brings another")
                if self._closing.wait(CHECKPOINT_INTERVAL):
                    return
        finally:
            conn.close()

    def _stop_checkpointer(self) -> None:
        """Called by the writer before it closes its connection, which is then the last one
        open on the file and so checkpoints what remains as SQLite closes it."""
        self._closing.set()
        self._wrote.set()
        if self._checkpointer is not None:
            self._checkpointer.join()

    # -- operations ----------------------------------------------------------------------------

    def write(self, operation: Operation[T], durable: bool = True) -> Deferred[T]:
        """Run operation(conn) in the writer thread; fire with its result once committed.

        durable: committed with an fsync (synchronous=FULL), so that it survives a power cut;
        what a client is told is done must be. Otherwise the commit (synchronous=NORMAL, in WAL
        mode) survives any crash of the daemon itself, kill -9 included, but may be lost with
        the machine's power: right for the stream of job state changes, whose fsyncs otherwise
        kept the disk of a busy machine saturated."""
        if self._stopped is not None:
            raise RuntimeError("the store is closed")
        d: Deferred[T] = Deferred()
        self._queue.put((operation, d, durable))
        return d

    def read(self, operation: Operation[T]) -> Deferred[T]:
        """Run operation(conn) on a reader connection in a reader thread."""
        return deferToThreadPool(self._reactor, self._readers, self._read, operation)

    def _read(self, operation: Operation[T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(str(self.path))
        conn.execute("BEGIN")
        try:
            return operation(conn)
        finally:
            conn.execute("COMMIT")

    # -- the writer thread ---------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            work = [item for item in batch if item is not _STOP]
            stopping = len(work) != len(batch)
            if work:
                self._run_batch(conn, work)
        self._stop_checkpointer()
        conn.close()
        self._reactor.callFromThread(self._closed)

    def _closed(self) -> None:
        # Everything committed is told before the store says it has stopped.
        if self._telling is not None:
            self._telling.cancel()
        self._telling = None
        while self._to_tell:
            _fire(*self._to_tell.popleft())
        assert self._stopped is not None
        self._stopped.callback(None)

    def _run_batch(self, conn: sqlite3.Connection, work: list[tuple[Operation[Any], Deferred[Any], bool]]) -> None:
        outcomes: list[tuple[Deferred[Any], Any]] = []
        durable = any(item[2] for item in work)
        if durable != self._durable:
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        began = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            if len(work) == 1:
                # One operation (the usual batch when requests come one at a time): the
                # transaction is its savepoint. Two statements fewer, each a GIL hand-off.
                operation, d, _ = work[0]
                try:
                    result = operation(conn)
                except BaseException:
                    result = Failure()
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                else:
                    conn.execute("COMMIT")
                    self.commits += 1
                    self._wrote.set()
                outcomes.append((d, result))
            else:
                for operation, d, _ in work:
                    conn.execute("SAVEPOINT op")
                    try:
                        result = operation(conn)
                    except BaseException:
                        conn.execute("ROLLBACK TO op")
                        result = Failure()
                    conn.execute("RELEASE op")
                    outcomes.append((d, result))
                conn.execute("COMMIT")
                self.commits += 1
                self._wrote.set()
        except BaseException:
            # The commit itself failed (disk full, I/O error): nothing in this batch is durable.
            failure = Failure()
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            outcomes = [(d, failure) for _, d, _ in work]
        self._reactor.callFromThread(self._committed, outcomes, time.perf_counter() - began)

    def _committed(self, outcomes: list[tuple[Deferred[Any], Any]], seconds: float) -> None:
        for observer in self.commit_observers:
            try:
                observer(seconds)
            except Exception:
                log.failure("a commit observer failed")
        self._to_tell.extend(outcomes)
        if self._telling is None:
            self._tell()

    def _tell(self) -> None:
        """Fire the committed operations' Deferreds, in commit order, for at most TELL_BUDGET
        seconds per reactor turn. One commit can hold hundreds of operations (the ends of jobs
        that workers reported, the hand-outs of many pulls), and what each caller does next
        (its reply, the job's next state) had, all in one turn, held every other request for
        a tenth of a second."""
        self._telling = None
        to_tell = self._to_tell
        deadline = time.perf_counter() + TELL_BUDGET
        while to_tell:
            _fire(*to_tell.popleft())
            if to_tell and time.perf_counter() >= deadline:
                self._telling = self._reactor.callLater(0, self._tell)
                return


def _fire(d: Deferred[Any], result: Any) -> None:
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; return the version it is at."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"the store at schema version {version} is newer than this wmgr ({len(MIGRATIONS)})"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
        log.info("store schema migrated to version {version}", version=number)
    return len(MIGRATIONS)
