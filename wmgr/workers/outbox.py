"""A worker's reports to its manager, kept durably until the manager acknowledges them.

A report is written to the worker daemon's own store before it is sent, and removed only once the
manager has answered it; a worker that cannot reach its manager keeps them (across its own
restarts too) and sends them, in order, when the manager answers again. The manager ignores a
report for a lease that is no longer current, so a report sent twice changes nothing there.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from wmgr.store import Store


class Outbox:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: dict[int, dict[str, Any]] = {}  # id -> report, in the order they were made

    async def load(self) -> None:
        rows = await self.store.read(_load)
        self.pending = {row_id: json.loads(body) for row_id, body in rows}

    async def put(self, report: dict[str, Any]) -> None:
        row_id = await self.store.write(lambda conn: _insert(conn, json.dumps(report)))
        self.pending[row_id] = report

    async def acknowledged(self, ids: list[int]) -> None:
        await self.store.write(lambda conn: _delete(conn, ids))
        for row_id in ids:
            self.pending.pop(row_id, None)

    def batch(self, most: int = 500) -> list[tuple[int, dict[str, Any]]]:
        return list(self.pending.items())[:most]


def _load(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return conn.execute("SELECT id, body FROM worker_outbox ORDER BY id").fetchall()


def _insert(conn: sqlite3.Connection, body: str) -> int:
    return int(conn.execute("INSERT INTO worker_outbox (body) VALUES (?)", (body,)).lastrowid)


def _delete(conn: sqlite3.Connection, ids: list[int]) -> None:
    conn.executemany("DELETE FROM worker_outbox WHERE id = ?", [(row_id,) for row_id in ids])
