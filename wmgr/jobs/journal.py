"""The job queue's journal: every write it makes to the store, batched, and every SQL statement
the queue uses (the functions below run in the store's threads; the Journal runs on the reactor).

Rules kept here:
- State changes saved in one reactor turn share one store operation, in order with every other
  write, and a job saved twice in it is written once, as it is then.
- The per-rep-group counters (rep_grp_states) move in the same transaction as the jobs they count:
  status and limit=N groups are read from them, never from a scan.
- Every value is a parameter; identifiers are fixed text.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from wmgr import compactjson
from wmgr.jobs import model
from wmgr.jobs.learning import WINDOW
from wmgr.jobs.model import Job
from wmgr.store import Store

log = Logger()

# The store's columns for a job row, in the order the queries below use.
COLUMNS = "key, spec, state, seq, run, stdout, stderr"
_CHUNK = 500  # keys per IN (...) query: well under SQLite's parameter limit
_INSERT_ROWS = 5000  # job rows per INSERT statement, at most (see insert_jobs): 30,000 parameters
PRUNE_CHUNK = 5000  # completed jobs removed per transaction when pruning history

dumps = compactjson.dumps

# The per-state deltas the operation running in the writer thread moved the counters by (see
# move_counters and _tracked): the Journal mirrors the counters' sums by state in memory.
_moved = threading.local()


def _tracked(operation: Callable[[sqlite3.Connection], Any]) -> Callable[[sqlite3.Connection], tuple[Any, Counter]]:
    def run(conn: sqlite3.Connection) -> tuple[Any, Counter]:
        _moved.deltas = Counter()
        try:
            return operation(conn), _moved.deltas
        finally:
            _moved.deltas = None

    return run


class Journal:
    """The queue's store access: batched saves of job state, and its other reads and writes.

    `on_failure(message)` is told when a batch of saves could not be written (the queue turns it
    into a scheduler warning)."""

    # How long saves of changes that happen by themselves (a job started, ended...) wait to be
    # written together. Without it, with ends arriving one per reactor turn, nearly every job's
    # end was a transaction of its own: 9,848 commits for 10,000 jobs, and the writer thread used
    # more than twice the CPU of 2,448 larger ones. A save a client waits for (durable) goes at
    # the next turn.
    flush_delay = 0.005

    def __init__(self, store: Store, reactor: Any, on_failure: Callable[[str], None] = lambda message: None) -> None:
        self.store = store
        self._reactor = reactor
        self._on_failure = on_failure
        self._dirty: dict[str, Job] = {}
        self._dirty_samples: list[tuple[str, int, float]] = []
        self._dirty_specs: list[tuple[str, str]] = []
        self._dirty_limits: dict[str, int] = {}
        self._waiters: list[tuple[Deferred[None], bool]] = []
        self._durable = False
        self._call: Any = None
        self._states: Counter = Counter()  # jobs by state, as committed

    def state_counts(self) -> dict[str, int]:
        return {state: self._states.get(state, 0) for state in model.STATES}

    def _committed(self, outcome: tuple[Any, Counter]) -> Any:
        result, deltas = outcome
        self._states.update(deltas)
        return result

    def _store_write(self, operation: Callable[[sqlite3.Connection], Any], durable: bool = True) -> Deferred[Any]:
        return self.store.write(_tracked(operation), durable=durable).addCallback(self._committed)

    # -- reads ---------------------------------------------------------------------------------

    def load(self) -> Deferred[dict[str, Any]]:
        """Live jobs, the last seq, learning samples and limits, as load_state returns them."""
        return self.store.read(load_state).addCallback(self._loaded)

    def _loaded(self, loaded: dict[str, Any]) -> dict[str, Any]:
        self._states = Counter(dict(loaded["states"]))
        return loaded

    def history(self, keys: list[str], groups: list[str], search: bool, limit: int,
                want_groups: bool) -> Deferred[dict[str, Any]]:
        return self.store.read(lambda conn: read_history(conn, keys, groups, search, limit, want_groups))

    # -- batched saves of job state ------------------------------------------------------------

    def save(self, jobs: Iterable[Job], samples: Iterable[tuple[str, int, float]] = (),
             specs: Iterable[tuple[str, str]] = (), limits: Optional[dict[str, int]] = None,
             strict: bool = False, durable: bool = False) -> Deferred[None]:
        """Write the jobs' current state (and counters), in order with every other write.

        The Deferred fires once committed. A failure is logged and reported to on_failure; with
        `strict` it is also passed on, for callers that must not go on as if it were stored.
        `durable` when a client will be told it is done (see Store.write): job state changes
        that happen by themselves are not, the run's status file stands behind them."""
        for job in jobs:
            self._dirty[job.key] = job
        self._dirty_samples.extend(samples)
        self._dirty_specs.extend(specs)
        self._dirty_limits.update(limits or {})
        delay = 0.0 if durable else self.flush_delay
        if self._call is not None and delay == 0 and self._call.getTime() > self._reactor.seconds():
            self._call.cancel()
            self._call = None
        if self._call is None:
            self._call = self._reactor.callLater(delay, self.flush)
        waiter: Deferred[None] = Deferred()
        self._waiters.append((waiter, strict))
        self._durable = self._durable or durable
        return waiter

    def mark(self, jobs: Iterable[Job]) -> None:
        """save() for changes nobody waits for (a job started, running): no Deferred per call.
        A failure to write them is logged and reported to on_failure all the same."""
        for job in jobs:
            self._dirty[job.key] = job
        if self._call is None:
            self._call = self._reactor.callLater(self.flush_delay, self.flush)

    def flush(self) -> None:
        """Send the saves gathered so far to the store as one operation."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self._waiters and not self._dirty:
            return
        changes = []
        for job in self._dirty.values():
            new = job.group_key
            # The run's record is encoded in the store's thread: off the reactor, which only
            # takes the (immutable) values.
            changes.append((new, job.stored, job.run_values(), job.stdout, job.stderr, job.key))
            job.stored = new
        samples, specs, limits = self._dirty_samples, self._dirty_specs, self._dirty_limits
        waiters, durable = self._waiters, self._durable
        self._dirty, self._dirty_samples, self._dirty_specs, self._dirty_limits = {}, [], [], {}
        self._waiters, self._durable = [], False
        now = self._reactor.seconds()
        d = self._store_write(lambda conn: apply_changes(conn, changes, samples, specs, limits, now), durable)
        d.addCallbacks(self._flushed, self._flush_failed, callbackArgs=(waiters,), errbackArgs=(waiters,))

    @staticmethod
    def _flushed(_: Any, waiters: list[tuple[Deferred[None], bool]]) -> None:
        for waiter, _strict in waiters:
            waiter.callback(None)

    def _flush_failed(self, failure: Any, waiters: list[tuple[Deferred[None], bool]]) -> None:
        log.failure("could not write job changes to the store", failure)
        self._on_failure(f"could not write job changes to the store: {failure.getErrorMessage()}")
        for waiter, strict in waiters:
            if strict:
                waiter.errback(failure)
            else:
                waiter.callback(None)

    # -- other writes (saves still gathering go first, so the counters stay in order) ----------

    def write(self, operation: Callable[[sqlite3.Connection], Any]) -> Deferred[Any]:
        self.flush()
        return self._store_write(operation)

    def insert(self, rows: list[tuple[Any, ...]], rerun: bool, limits: dict[str, int]) -> Deferred[list[str]]:
        return self.write(lambda conn: insert_jobs(conn, rows, rerun, limits))

    def delete(self, items: list[tuple[str, Any]]) -> Deferred[None]:
        return self.write(lambda conn: delete_jobs(conn, items))

    def resurrect(self, groups: set[str]) -> Deferred[list[tuple[Any, ...]]]:
        return self.write(lambda conn: resurrect_dependants(conn, groups))

    async def prune(self, cutoff: Optional[float], keep: int) -> int:
        """Remove completed jobs older than cutoff or beyond the newest `keep`, a chunk per
        transaction so that other writes keep flowing; return how many went."""
        total = 0
        while True:
            removed = await self.write(lambda conn: prune_completed(conn, cutoff, keep, PRUNE_CHUNK))
            total += removed
            if removed < PRUNE_CHUNK:
                return total


def row_to_job(row: tuple[Any, ...]) -> Job:
    key, spec, state, seq, run, stdout, stderr = row
    job = Job(key, json.loads(spec), state, seq)
    job.restore_run(json.loads(run))
    job.stdout, job.stderr = stdout, stderr
    job.stored = job.group_key
    return job


def _chunks(items: list[Any], size: int = _CHUNK) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _rows_per_insert(conn: sqlite3.Connection, columns: int) -> int:
    """Rows of `columns` values per multi-row INSERT: at most _INSERT_ROWS, within the
    connection's parameter limit (999 before SQLite 3.32; Python before 3.11 cannot ask)."""
    getlimit = getattr(conn, "getlimit", None)
    limit = getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if getlimit is not None else 999
    return max(1, min(_INSERT_ROWS, limit // columns))


def _marks(items: list[Any]) -> str:
    return ",".join("?" * len(items))


def load_state(conn: sqlite3.Connection) -> dict[str, Any]:
    rows = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE state != ? ORDER BY seq", (model.COMPLETE,)).fetchall()
    (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
    samples = conn.execute(
        "SELECT req_grp, ram, secs FROM (SELECT req_grp, ram, secs, id, ROW_NUMBER() OVER "
        "(PARTITION BY req_grp ORDER BY id DESC) AS n FROM req_samples) WHERE n <= ? ORDER BY id", (WINDOW,)
    ).fetchall()
    limits = conn.execute("SELECT name, lim FROM limit_groups").fetchall()
    states = conn.execute("SELECT state, SUM(n) FROM rep_grp_states GROUP BY state").fetchall()
    return {"rows": rows, "seq": seq, "samples": samples, "limits": limits, "states": states}


def group_state_counts(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(rep group, state, jobs) from the counters, for live views: never a scan of jobs."""
    return conn.execute(
        "SELECT rep_grp, state, SUM(n) FROM rep_grp_states GROUP BY rep_grp, state ORDER BY rep_grp").fetchall()


def move_counters(conn: sqlite3.Connection, deltas: Counter) -> None:
    """Move the per-rep-group counters by the given deltas."""
    rows = [(*group, n, n) for group, n in deltas.items() if n]
    moved = getattr(_moved, "deltas", None)
    if moved is not None:
        for group, n in deltas.items():
            moved[group[1]] += n
    if rows:
        conn.executemany(
            "INSERT INTO rep_grp_states (rep_grp, state, exitcode, fail_reason, n) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (rep_grp, state, exitcode, fail_reason) DO UPDATE SET n = n + ?", rows)
        # Only the counters that went down can have reached zero: remove those, by key.
        conn.executemany(
            "DELETE FROM rep_grp_states WHERE rep_grp = ? AND state = ? AND exitcode = ? AND fail_reason = ? "
            "AND n <= 0", [group for group, n in deltas.items() if n < 0])


def insert_jobs(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], rerun: bool,
                 limits: dict[str, int]) -> list[str]:
    """Insert new jobs; a key already stored is a completed job (live ones were filtered out):
    left alone, or re-queued with rerun. Returns the keys now queued."""
    existing: dict[str, tuple[str, str, int, str]] = {}
    keys = [row[0] for row in rows]
    for chunk in _chunks(keys):
        for key, *group in conn.execute(
                f"SELECT key, rep_grp, state, exitcode, fail_reason FROM jobs WHERE key IN ({_marks(chunk)})", chunk):
            existing[key] = tuple(group)  # type: ignore[assignment]
    deltas: Counter = Counter()
    fresh = [row for row in rows if row[0] not in existing]
    for chunk in _chunks(fresh, _rows_per_insert(conn, 6)):
        # Many rows per statement, not executemany: sqlite3 holds the GIL to bind each row and lets
        # go of it only while a statement runs, so row by row the insert of a big add crawled
        # while the reactor made the jobs and the reply (it took twice as long); bound at once, the
        # statement runs its thousands of rows with the GIL free.
        conn.execute(f"INSERT INTO jobs (key, rep_grp, state, seq, spec, updated) VALUES "
                     f"{','.join(['(?,?,?,?,?,?)'] * len(chunk))}",
                     [value for row in chunk for value in row[:6]])
    for row in fresh:
        deltas[(row[1], row[2], 0, "")] += 1
    queued = [row[0] for row in fresh]
    if rerun and existing:
        again = [row for row in rows if row[0] in existing]
        conn.executemany(
            "UPDATE jobs SET rep_grp = ?, state = ?, seq = ?, spec = ?, run = '{}', stdout = '', stderr = '', "
            "exitcode = 0, fail_reason = '', updated = ? WHERE key = ?",
            [(row[1], row[2], row[3], row[4], row[5], row[0]) for row in again])
        for row in again:
            deltas[existing[row[0]]] -= 1
            deltas[(row[1], row[2], 0, "")] += 1
        conn.executemany("DELETE FROM job_deps WHERE key = ?", [(row[0],) for row in again])
        fresh = fresh + again
        queued += [row[0] for row in again]
    conn.executemany("INSERT OR IGNORE INTO job_deps (dep_grp, key) VALUES (?, ?)",
                     [(group, row[0]) for row in fresh for group in row[6]])
    conn.executemany("INSERT INTO limit_groups (name, lim) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET lim = ?",
                     [(name, limit, limit) for name, limit in limits.items()])
    move_counters(conn, deltas)
    return queued


def apply_changes(conn: sqlite3.Connection, changes: list[tuple[Any, ...]], samples: list[tuple[str, int, float]],
                  specs: list[tuple[str, str]], limits: dict[str, int], now: float) -> None:
    if specs:
        conn.executemany("UPDATE jobs SET spec = ? WHERE key = ?", specs)
    conn.executemany(
        "UPDATE jobs SET rep_grp = ?, state = ?, exitcode = ?, fail_reason = ?, run = ?, stdout = ?, stderr = ?, "
        "updated = ? WHERE key = ?",
        [(*new, dumps(model.run_record_of(run)), stdout, stderr, now, key)
         for new, _, run, stdout, stderr, key in changes])
    deltas: Counter = Counter()
    for new, old, *_ in changes:
        if new != old:
            deltas[new] += 1
            if old is not None:
                deltas[old] -= 1
    move_counters(conn, deltas)
    if samples:
        conn.executemany("INSERT INTO req_samples (req_grp, ram, secs) VALUES (?, ?, ?)", samples)
    if limits:
        conn.executemany("INSERT INTO limit_groups (name, lim) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET lim = ?",
                         [(name, limit, limit) for name, limit in limits.items()])


def delete_jobs(conn: sqlite3.Connection, items: list[tuple[str, Any]]) -> None:
    keys = [key for key, _ in items]
    for chunk in _chunks(keys):
        conn.execute(f"DELETE FROM jobs WHERE key IN ({_marks(chunk)})", chunk)
        conn.execute(f"DELETE FROM job_deps WHERE key IN ({_marks(chunk)})", chunk)
    move_counters(conn, tally_removed(items))


def tally_removed(items: list[tuple[str, Any]]) -> Counter:
    deltas: Counter = Counter()
    for _, group in items:
        if group is not None:
            deltas[group] -= 1
    return deltas


def resurrect_dependants(conn: sqlite3.Connection, groups: set[str]) -> list[tuple[Any, ...]]:
    """Completed jobs waiting for these groups become dependent again, and recursively those
    waiting for the groups they belong to. Returns their rows."""
    revived: list[tuple[Any, ...]] = []
    seen: set[str] = set()
    frontier = set(groups)
    while frontier:
        seen |= frontier
        batch = sorted(frontier)
        frontier = set()
        keys = [key for (key,) in conn.execute(
            f"SELECT DISTINCT key FROM job_deps WHERE dep_grp IN ({_marks(batch)})", batch)]
        for chunk in _chunks(keys):
            rows = conn.execute(
                f"SELECT {COLUMNS}, rep_grp, exitcode, fail_reason FROM jobs WHERE state = ? AND key IN ({_marks(chunk)})",
                [model.COMPLETE, *chunk]).fetchall()
            deltas: Counter = Counter()
            for row in rows:
                conn.execute("UPDATE jobs SET state = ?, exitcode = 0, fail_reason = '' WHERE key = ?",
                             (model.DEPENDENT, row[0]))
                deltas[(row[7], model.COMPLETE, row[8], row[9])] -= 1
                deltas[(row[7], model.DEPENDENT, 0, "")] += 1
                revived.append(row[:7])
                frontier |= set(json.loads(row[1]).get("dep_grps") or ()) - seen
            move_counters(conn, deltas)
    return revived


def read_history(conn: sqlite3.Connection, keys: list[str], groups: list[str], search: bool, limit: int,
             want_groups: bool) -> dict[str, Any]:
    """Stored jobs by key, and completed jobs of rep groups (exact, or containing the text when
    searching): all of them, or with a limit only the counts and a few examples per group."""
    by_key: dict[str, Job] = {}
    for chunk in _chunks(keys):
        for row in conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE key IN ({_marks(chunk)})", chunk):
            by_key[row[0]] = row_to_job(row)
    names: list[str] = []
    if want_groups:
        for group in groups:
            if search:
                pattern = "%" + group.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                names += [n for (n,) in conn.execute(
                    "SELECT DISTINCT rep_grp FROM rep_grp_states WHERE state = ? AND rep_grp LIKE ? ESCAPE '\\'",
                    (model.COMPLETE, pattern))]
            else:
                names.append(group)
    jobs: list[Job] = []
    counted: list[tuple[tuple[str, int, str], int, list[Job]]] = []
    for name in dict.fromkeys(names):
        if not limit:
            jobs += [row_to_job(row) for row in conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE rep_grp = ? AND state = ? ORDER BY seq", (name, model.COMPLETE))]
            continue
        for exitcode, fail_reason, n in conn.execute(
                "SELECT exitcode, fail_reason, n FROM rep_grp_states WHERE rep_grp = ? AND state = ?",
                (name, model.COMPLETE)).fetchall():
            examples = [row_to_job(row) for row in conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE rep_grp = ? AND state = ? AND exitcode = ? AND fail_reason = ? "
                "ORDER BY seq LIMIT ?", (name, model.COMPLETE, exitcode, fail_reason, limit))]
            counted.append(((model.COMPLETE, exitcode, fail_reason), n, examples))
    return {"keys": by_key, "jobs": jobs, "groups": counted}


# Written out, not bound: SQLite uses the partial index jobs_completed only for a query whose
# WHERE names its condition literally.
_COMPLETED = f"state = '{model.COMPLETE}'"


def prune_completed(conn: sqlite3.Connection, cutoff: Optional[float], keep: int, chunk: int) -> int:
    """Remove up to `chunk` completed jobs older than cutoff or beyond the newest `keep`."""
    clauses, params = [], []
    if cutoff is not None:
        clauses.append("updated < ?")
        params.append(cutoff)
    if keep:
        # The newest `keep` by (updated, seq): jobs whose ends were committed together share
        # `updated`, and seq orders them.
        row = conn.execute(f"SELECT updated, seq FROM jobs WHERE {_COMPLETED} ORDER BY updated DESC, seq DESC "
                           "LIMIT 1 OFFSET ?", (keep - 1,)).fetchone()
        if row is not None:
            clauses.append("(updated, seq) < (?, ?)")
            params.extend(row)
    if not clauses:
        return 0
    rows = conn.execute(
        f"SELECT key, rep_grp, exitcode, fail_reason FROM jobs WHERE {_COMPLETED} AND ({' OR '.join(clauses)}) "
        "ORDER BY updated LIMIT ?", [*params, chunk]).fetchall()
    if not rows:
        return 0
    delete_jobs(conn, [(key, (rep_grp, model.COMPLETE, exitcode, fail_reason)) for key, rep_grp, exitcode, fail_reason in rows])
    return len(rows)
