"""The SQLite backend: one file per database, DIRECTORY/<db>.sqlite.

Every method blocks and runs on the databases service's threads, each with its own connection
(opened per call: cheap for SQLite, and no connection is ever shared between threads). Files are
opened with mode=rw, so a database that does not exist is reported, never created by accident;
a new one is created with O_EXCL|O_NOFOLLOW. WAL lets readers go on while a load writes.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Optional
from urllib.parse import quote

from wmgr.dbs.ddl import (AUTOINCREMENT_TYPE, Column, Index, Table, parse_create_table, quote_sqlite,
                          show_columns, show_create_table, sqlite_index_name, sqlite_statements)
from wmgr.dbs.errors import DatabaseExists, DatabaseMissing, InvalidArgument, TableExists, TableMissing
from wmgr.dbs.names import NAME
from wmgr.dbs.rows import LoadOptions, RowReader, decode

BUSY_TIMEOUT = 30.0
SUFFIX = ".sqlite"


class SqliteBackend:
    kind = "sqlite"

    def __init__(self, directory: Path, xrootd_db: str) -> None:
        self.directory = Path(directory)
        self.xrootd_db = xrootd_db
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    # -- connections --------------------------------------------------------------------------

    def _path(self, db: str) -> Path:
        return self.directory / (db + SUFFIX)

    def _connect(self, db: str) -> sqlite3.Connection:
        path = self._path(db)
        if not path.is_file() or path.is_symlink():
            raise DatabaseMissing(f"Database {db} does not exist")
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=BUSY_TIMEOUT,
                               isolation_level=None, check_same_thread=False)
        return conn

    # -- databases ----------------------------------------------------------------------------

    def databases(self) -> list[str]:
        names = (p.name[:-len(SUFFIX)] for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        return sorted(n for n in names if NAME.match(n))

    def database_exists(self, db: str) -> bool:
        return self._path(db).is_file()

    def create_database(self, db: str) -> None:
        try:
            fd = os.open(self._path(db), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise DatabaseExists(f"Database {db} already exists") from None
        os.close(fd)
        conn = self._connect(db)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()

    def drop_database(self, db: str) -> None:
        try:
            self._path(db).unlink()
        except FileNotFoundError:
            raise DatabaseMissing(f"Database {db} does not exist") from None
        for extra in ("-wal", "-shm"):
            try:
                (self.directory / (db + SUFFIX + extra)).unlink()
            except FileNotFoundError:
                pass

    # -- tables -------------------------------------------------------------------------------

    def tables(self, db: str) -> list[str]:
        conn = self._connect(db)
        try:
            return [row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\\_%' "
                "ESCAPE '\\' ORDER BY name")]
        finally:
            conn.close()

    @staticmethod
    def _exists(conn: sqlite3.Connection, table: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ? COLLATE NOCASE",
                            (table,)).fetchone() is not None

    def table_exists(self, db: str, table: str) -> bool:
        conn = self._connect(db)
        try:
            return self._exists(conn, table)
        finally:
            conn.close()

    def _create(self, conn: sqlite3.Connection, table: Table, name: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._exists(conn, name):
                raise TableExists(f"Table {name} already exists")
            for statement in sqlite_statements(table, name):
                conn.execute(statement)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def create_table(self, db: str, table: str, schema: str, chunk_columns: bool) -> None:
        definition = parse_create_table(schema)
        if chunk_columns:
            definition = definition.with_chunk_columns()
        conn = self._connect(db)
        try:
            self._create(conn, definition, table)
        finally:
            conn.close()

    def drop_table(self, db: str, table: str) -> None:
        conn = self._connect(db)
        try:
            if not self._exists(conn, table):
                raise TableMissing(f"Table {table} does not exist")
            conn.execute(f"DROP TABLE {quote_sqlite(table)}")
        finally:
            conn.close()

    def _definition(self, conn: sqlite3.Connection, table: str) -> Table:
        row = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE",
                           (table,)).fetchone()
        if row is None:
            raise TableMissing(f"Table {table} does not exist")
        name = row[0]
        columns, primary = [], []
        for _, col, declared, not_null, default, pk in conn.execute(f"PRAGMA table_info({quote_sqlite(name)})"):
            column = Column(col, declared, bool(not_null) or pk > 0, _default_value(default))
            if default is not None and default.upper() == "CURRENT_TIMESTAMP":
                column.default_is_expression = True
            if declared == AUTOINCREMENT_TYPE and pk:
                column.type, column.auto_increment, column.not_null = "int(11)", True, True
            columns.append(column)
            if pk:
                primary.append((pk, col))
        indexes = [Index("PRIMARY", [c for _, c in sorted(primary)], True)] if primary else []
        unique = {r[1]: bool(r[2]) for r in conn.execute(f"PRAGMA index_list({quote_sqlite(name)})")}
        prefix = sqlite_index_name(name, "")
        for (index,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                                     "AND sql IS NOT NULL ORDER BY rowid", (name,)):
            cols = [r[2] for r in conn.execute(f"PRAGMA index_info({quote_sqlite(index)})")]
            shown = index[len(prefix):] if index.startswith(prefix) else index
            indexes.append(Index(shown, cols, unique.get(index, False)))
        return Table(name, columns, indexes)

    def definition(self, db: str, table: str) -> Table:
        conn = self._connect(db)
        try:
            return self._definition(conn, table)
        finally:
            conn.close()

    def schema(self, db: str, table: str) -> str:
        return show_create_table(self.definition(db, table))

    def columns(self, db: str, table: str) -> list[dict]:
        return show_columns(self.definition(db, table))

    def column_names(self, db: str, table: str) -> list[str]:
        return self.definition(db, table).column_names()

    def create_like(self, db: str, source: str, target: str, non_unique: bool) -> None:
        conn = self._connect(db)
        try:
            definition = self._definition(conn, source)
            self._create(conn, definition.non_unique() if non_unique else definition, target)
        finally:
            conn.close()

    # -- data ---------------------------------------------------------------------------------

    def load(self, db: str, table: str, data: Iterable[bytes], options: LoadOptions) -> int:
        """Insert the rows of `data` in one transaction: all of them, or none on an error.
        As LOAD DATA LOCAL does, a row whose key is already there is skipped, not an error."""
        conn = self._connect(db)
        try:
            definition = self._definition(conn, table)
            width = len(definition.columns)
            insert = (f"INSERT OR IGNORE INTO {quote_sqlite(definition.name)} VALUES "
                      f"({', '.join('?' * width)})")
            reader = RowReader(options)
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                for batch in reader.rows(decode(data)):
                    for i, row in enumerate(batch):
                        if len(row) != width:
                            line = reader.line - len(batch) + i + 1
                            raise InvalidArgument(f"table-data line {line} has {len(row)} fields; "
                                                  f"table {table} has {width} columns")
                    conn.executemany(insert, batch)
                count = conn.total_changes - before
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return count
        finally:
            conn.close()

    def select(self, db: str, tables: list[str], columns: list[str], batch: int = 10000) -> Iterator[list]:
        """The field type names of these columns, then their values in every row of these
        tables, `batch` rows at a time (run it on one thread: the connection lives in it)."""
        conn = self._connect(db)
        try:
            definition = self._definition(conn, tables[0])
            yield [definition.field_type(c) for c in columns]
            selected = ", ".join(quote_sqlite(c) for c in columns)
            for table in tables:
                cursor = conn.execute(f"SELECT {selected} FROM {quote_sqlite(table)}")
                while True:
                    rows = cursor.fetchmany(batch)
                    if not rows:
                        break
                    yield [list(r) for r in rows]
        finally:
            conn.close()

    # -- the xrootd bookkeeping database ------------------------------------------------------

    def _registry(self) -> sqlite3.Connection:
        if not self._path(self.xrootd_db).exists():
            try:
                self.create_database(self.xrootd_db)
            except DatabaseExists:
                pass
        conn = self._connect(self.xrootd_db)
        conn.execute("CREATE TABLE IF NOT EXISTS Dbs (db TEXT NOT NULL PRIMARY KEY)")
        conn.execute("CREATE TABLE IF NOT EXISTS Chunks (db TEXT NOT NULL, chunk INTEGER NOT NULL, "
                     "PRIMARY KEY (db, chunk))")
        return conn

    def xrootd_dbs(self) -> list[str]:
        conn = self._registry()
        try:
            return [r[0] for r in conn.execute("SELECT db FROM Dbs ORDER BY db")]
        finally:
            conn.close()

    def xrootd_register(self, db: str) -> bool:
        conn = self._registry()
        try:
            return conn.execute("INSERT OR IGNORE INTO Dbs (db) VALUES (?)", (db,)).rowcount == 1
        finally:
            conn.close()

    def xrootd_unregister(self, db: str) -> bool:
        conn = self._registry()
        try:
            return conn.execute("DELETE FROM Dbs WHERE db = ?", (db,)).rowcount == 1
        finally:
            conn.close()

    def xrootd_chunks(self, db: str) -> list[int]:
        conn = self._registry()
        try:
            return [r[0] for r in conn.execute("SELECT chunk FROM Chunks WHERE db = ? ORDER BY chunk", (db,))]
        finally:
            conn.close()

    def register_chunk(self, db: str, chunk_id: int) -> None:
        conn = self._registry()
        try:
            conn.execute("INSERT OR REPLACE INTO Chunks (db, chunk) VALUES (?, ?)", (db, chunk_id))
        finally:
            conn.close()

    def close(self) -> None:
        pass


def _default_value(sql: Optional[str]) -> Optional[str]:
    """A column default as SHOW COLUMNS shows it, from the SQL text SQLite keeps."""
    if sql is None or sql.upper() == "NULL":
        return None
    if sql.upper() == "CURRENT_TIMESTAMP":
        return "current_timestamp()"
    if len(sql) >= 2 and sql[0] == sql[-1] == "'":
        return sql[1:-1].replace("''", "'")
    return sql
