"""Every SQL statement of the connection registry (tables made by migration 4 in wmgr.store).

Each function takes a sqlite3 connection and runs on the store's writer or reader thread, never on
the reactor. connection_type is kept as its JSON text, so an int comes back an int and a string a
string.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Callable, Iterable

from wmgr.connections.registry import Connection, Entry, json_text

PartitionEntries = list[tuple[str, list[Entry]]]
Operation = Callable[[sqlite3.Connection], Any]


UPSERT = ("INSERT INTO conn_entries (partition, uid, uri, data_type, connection_type, published, seq) "
          "VALUES (?, ?, ?, ?, ?, ?, ?) "
          "ON CONFLICT (partition, uid) DO UPDATE SET uri = excluded.uri, data_type = excluded.data_type, "
          "connection_type = excluded.connection_type, published = excluded.published")


def save(partition: str, entries: Iterable[Entry], new_partition: bool) -> Operation:
    rows = [(partition, e.connection.uid, e.connection.uri, e.connection.data_type,
             json_text(e.connection.connection_type), e.published, e.seq) for e in entries]

    def run(conn: sqlite3.Connection) -> None:
        # As few statements as possible: each is a GIL hand-off between this thread and the
        # reactor's, a large part of what a small publish costs.
        if new_partition:
            conn.execute("INSERT OR IGNORE INTO conn_partitions (name) VALUES (?)", (partition,))
        if len(rows) == 1:
            conn.execute(UPSERT, rows[0])
        elif rows:
            conn.executemany(UPSERT, rows)

    return run


def delete_entries(partition: str, uids: Iterable[str], partition_gone: bool) -> Operation:
    rows = [(partition, uid) for uid in uids]

    def run(conn: sqlite3.Connection) -> None:
        conn.executemany("DELETE FROM conn_entries WHERE partition = ? AND uid = ?", rows)
        if partition_gone:
            conn.execute("DELETE FROM conn_partitions WHERE name = ?", (partition,))

    return run


def delete_partition(partition: str) -> Operation:
    def run(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM conn_entries WHERE partition = ?", (partition,))
        conn.execute("DELETE FROM conn_partitions WHERE name = ?", (partition,))

    return run


def delete_all(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM conn_entries")
    conn.execute("DELETE FROM conn_partitions")


def delete_expired(cutoff: float) -> Operation:
    """Entries published at or before `cutoff` (now - ttl) are expired."""

    def run(conn: sqlite3.Connection) -> int:
        return conn.execute("DELETE FROM conn_entries WHERE published <= ?", (cutoff,)).rowcount

    return run


def load(cutoff: float) -> Operation:
    """Every partition (in creation order) with its entries still live after `cutoff`, in reply order."""

    def run(conn: sqlite3.Connection) -> PartitionEntries:
        partitions: dict[str, list[Entry]] = {
            name: [] for (name,) in conn.execute("SELECT name FROM conn_partitions ORDER BY rowid")}
        for partition, uid, uri, data_type, connection_type, published, seq in conn.execute(
                "SELECT partition, uid, uri, data_type, connection_type, published, seq FROM conn_entries "
                "WHERE published > ? ORDER BY seq", (cutoff,)):
            entry = Entry(Connection(uid, uri, data_type, json.loads(connection_type)), published, seq)
            partitions.setdefault(partition, []).append(entry)
        return list(partitions.items())

    return run

