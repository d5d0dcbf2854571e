"""The MySQL/MariaDB backend, through pymysql (pure Python: no client library to build).

Every method blocks and runs on the databases service's threads with a connection of its own
(the original used a fresh connection per request too). Identifiers are validated before they
get here and back-quoted; every value is a bound parameter. A table upload streams into
LOAD DATA LOCAL INFILE through a pipe: a writer thread feeds the (gunzipped) upload into it while
the server reads /dev/fd/<read end>, so the file never exists on disk twice nor in memory.
"""

from __future__ import annotations

import datetime
import decimal
import os
import threading
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import unquote, urlsplit

import pymysql
from pymysql.constants import ER, FIELD_TYPE

from wmgr.dbs.ddl import read_header
from wmgr.dbs.errors import DatabaseExists, DatabaseMissing, TableExists, TableMissing
from wmgr.dbs.rows import LoadOptions

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_FIELD_TYPE_NAMES = {value: name for name, value in vars(FIELD_TYPE).items() if name.isupper()}


def q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def connection_settings(url: str) -> dict[str, Any]:
    """mysql://user:password@host:port (user, password and port optional) as pymysql arguments."""
    parts = urlsplit(url)
    if parts.scheme != "mysql" or not parts.hostname:
        raise ValueError(f"not a mysql://user:password@host:port URL: {url!r}")
    return {"host": parts.hostname, "port": parts.port or 3306, "user": unquote(parts.username or "root"),
            "password": unquote(parts.password or "")}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta)):
        return str(value)
    return str(value)


class MysqlBackend:
    kind = "mysql"

    def __init__(self, url: str, xrootd_db: str) -> None:
        self.settings = connection_settings(url)
        if self.settings["host"] in LOOPBACK:
            # pymysql tries TLS by default, and building its context costs ~30 ms a connection;
            # to a server on this machine TLS protects nothing.
            self.settings["ssl_disabled"] = True
        self.xrootd_db = xrootd_db
        self._registry_ready = False
        # One connection per pool thread for everything but loads: a new one costs a handshake.
        self._local = threading.local()

    def _connect(self, db: Optional[str] = None, **extra: Any) -> pymysql.connections.Connection:
        settings = {**self.settings, "charset": "utf8mb4", "autocommit": True, "connect_timeout": 10, **extra}
        try:
            return pymysql.connect(database=db, **settings)
        except pymysql.err.OperationalError as e:
            if e.args and e.args[0] == ER.BAD_DB_ERROR:
                raise DatabaseMissing(f"Database {db} does not exist") from None
            raise

    def _thread_connection(self, db: Optional[str]) -> pymysql.connections.Connection:
        """This thread's connection (made again if the server dropped it), using database `db`."""
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                raise pymysql.err.InterfaceError("no connection yet")
            conn.ping(reconnect=False)
        except pymysql.err.MySQLError:
            conn = self._local.conn = self._connect()
        if db is not None:
            try:
                conn.select_db(db)
            except pymysql.err.OperationalError as e:
                if e.args and e.args[0] == ER.BAD_DB_ERROR:
                    raise DatabaseMissing(f"Database {db} does not exist") from None
                raise
        return conn

    def _query(self, sql: str, args: Any = None, db: Optional[str] = None) -> list[tuple]:
        """Run one statement on this thread's connection (statements name their database
        unless `db` is given, so the connection's current database does not matter)."""
        with self._thread_connection(db).cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())

    # -- databases ----------------------------------------------------------------------------

    def databases(self) -> list[str]:
        return sorted(r[0] for r in self._query("SHOW DATABASES"))

    def database_exists(self, db: str) -> bool:
        return bool(self._query("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (db,)))

    def create_database(self, db: str) -> None:
        try:
            self._query(f"CREATE DATABASE {q(db)}")
        except pymysql.err.ProgrammingError as e:
            if e.args and e.args[0] == ER.DB_CREATE_EXISTS:
                raise DatabaseExists(f"Database {db} already exists") from None
            raise

    def drop_database(self, db: str) -> None:
        if not self.database_exists(db):
            raise DatabaseMissing(f"Database {db} does not exist")
        try:
            self._query(f"DROP DATABASE {q(db)}")
        except pymysql.err.OperationalError as e:
            if e.args and e.args[0] == ER.DB_DROP_EXISTS:
                raise DatabaseMissing(f"Database {db} does not exist") from None
            raise

    # -- tables -------------------------------------------------------------------------------

    def tables(self, db: str) -> list[str]:
        if not self.database_exists(db):
            raise DatabaseMissing(f"Database {db} does not exist")
        return [r[0] for r in self._query(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME", (db,))]

    def table_exists(self, db: str, table: str) -> bool:
        return bool(self._query("SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
                                (db, table)))

    def create_table(self, db: str, table: str, schema: str, chunk_columns: bool) -> None:
        """The statement runs as sent (the original's behaviour), once it is known to be one
        CREATE TABLE of this table in this database."""
        read_header(schema)
        try:
            self._query(schema, db=db)
        except (pymysql.err.OperationalError, pymysql.err.InternalError) as e:
            if e.args and e.args[0] == ER.TABLE_EXISTS_ERROR:
                raise TableExists(f"Table {table} already exists") from None
            raise
        if chunk_columns:
            have = {c.lower() for c in self.column_names(db, table)}
            changes = [f"DROP COLUMN {q(c)}" for c in ("_chunkId", "_subChunkId") if c.lower() in have]
            changes += [f"ADD COLUMN {q(c)} INT(11) NOT NULL" for c in ("chunkId", "subChunkId") if c.lower() not in have]
            if changes:
                self._query(f"ALTER TABLE {q(db)}.{q(table)} " + ", ".join(changes))

    def drop_table(self, db: str, table: str) -> None:
        try:
            self._query(f"DROP TABLE {q(db)}.{q(table)}")
        except (pymysql.err.OperationalError, pymysql.err.InternalError) as e:
            if e.args and e.args[0] == ER.BAD_TABLE_ERROR:
                raise TableMissing(f"Table {table} does not exist") from None
            raise

    def _show(self, sql: str, db: str, table: str) -> list[tuple]:
        try:
            return self._query(sql.format(table=f"{q(db)}.{q(table)}"))
        except pymysql.err.ProgrammingError as e:
            if e.args and e.args[0] == ER.NO_SUCH_TABLE:
                raise TableMissing(f"Table {table} does not exist") from None
            raise

    def schema(self, db: str, table: str) -> str:
        text = self._show("SHOW CREATE TABLE {table}", db, table)[0][1]
        return text.decode("utf-8") if isinstance(text, bytes) else text  # MariaDB may give bytes

    def columns(self, db: str, table: str) -> list[dict]:
        return [{"name": r[0], "type": r[1].decode() if isinstance(r[1], bytes) else r[1], "null": r[2], "key": r[3],
                 "default": r[4]} for r in self._show("SHOW COLUMNS FROM {table}", db, table)]

    def column_names(self, db: str, table: str) -> list[str]:
        return [c["name"] for c in self.columns(db, table)]

    def create_like(self, db: str, source: str, target: str, non_unique: bool) -> None:
        if not self.table_exists(db, source):
            raise TableMissing(f"Table {source} does not exist")
        try:
            self._query(f"CREATE TABLE {q(db)}.{q(target)} LIKE {q(db)}.{q(source)}")
        except (pymysql.err.OperationalError, pymysql.err.InternalError) as e:
            if e.args and e.args[0] == ER.TABLE_EXISTS_ERROR:
                raise TableExists(f"Table {target} already exists") from None
            raise
        if non_unique:
            self._drop_uniqueness(db, target)

    def _drop_uniqueness(self, db: str, table: str) -> None:
        """Every unique index (PRIMARY too) replaced by a non-unique one on the same columns."""
        unique: dict[str, list[tuple[int, str, Optional[int]]]] = {}
        for r in self._query(f"SHOW INDEX FROM {q(db)}.{q(table)}"):
            _, non_unique, key, seq, column, _, _, sub_part = r[:8]
            if not non_unique:
                unique.setdefault(key, []).append((seq, column, sub_part))
        changes = []
        for key, parts in unique.items():
            columns = ", ".join(q(c) + (f"({int(s)})" if s else "") for _, c, s in sorted(parts))
            name = "PRIMARY_NON_UNIQUE" if key == "PRIMARY" else key
            changes.append("DROP PRIMARY KEY" if key == "PRIMARY" else f"DROP INDEX {q(key)}")
            changes.append(f"ADD INDEX {q(name)} ({columns})")
        if changes:
            self._query(f"ALTER TABLE {q(db)}.{q(table)} " + ", ".join(changes))

    # -- data ---------------------------------------------------------------------------------

    def load(self, db: str, table: str, data: Iterable[bytes], options: LoadOptions) -> int:
        if not self.table_exists(db, table):
            raise TableMissing(f"Table {table} does not exist")
        read_end, write_end = os.pipe()
        failure: list[BaseException] = []

        def feed() -> None:
            try:
                with os.fdopen(write_end, "wb") as pipe:
                    for block in data:
                        pipe.write(block)
            except BrokenPipeError:
                pass  # the server stopped reading: the statement's own error says why
            except BaseException as e:  # bad gzip, a bad multipart body...
                failure.append(e)

        writer = threading.Thread(target=feed, name="wmgr-dbs-load-feed", daemon=True)
        conn = self._connect(db, autocommit=False, local_infile=True)
        try:
            writer.start()
            with conn.cursor() as cursor:
                cursor.execute(
                    f"LOAD DATA LOCAL INFILE %s INTO TABLE {q(table)} CHARACTER SET utf8mb4 "
                    "FIELDS TERMINATED BY %s ENCLOSED BY %s ESCAPED BY %s LINES TERMINATED BY %s",
                    (f"/dev/fd/{read_end}", options.delimiter, options.enclose, options.escape, options.terminate))
                count = cursor.rowcount
            os.close(read_end)
            read_end = -1
            writer.join()
            if failure:
                conn.rollback()
                raise failure[0]
            conn.commit()
            return count
        finally:
            if read_end != -1:
                os.close(read_end)  # the writer, if still blocked, gets EPIPE and ends
            writer.join(timeout=30)
            conn.close()

    def select(self, db: str, tables: list[str], columns: list[str], batch: int = 10000) -> Iterator[list]:
        """The field type names of these columns, then their values in every row of these
        tables, `batch` rows at a time, read unbuffered (run it on one thread)."""
        conn = self._connect(db)  # its own: an unbuffered cursor ties up its connection
        try:
            selected = ", ".join(q(c) for c in columns)
            with conn.cursor(pymysql.cursors.SSCursor) as cursor:
                for i, table in enumerate(tables):
                    cursor.execute(f"SELECT {selected} FROM {q(table)}")
                    if i == 0:
                        yield [_FIELD_TYPE_NAMES.get(d[1], str(d[1])) for d in cursor.description]
                    while True:
                        rows = cursor.fetchmany(batch)
                        if not rows:
                            break
                        yield [[_json_value(v) for v in row] for row in rows]
        finally:
            conn.close()

    # -- the xrootd bookkeeping database ------------------------------------------------------

    def _registry(self, sql: str, args: Any = None) -> tuple[list[tuple], int]:
        if not self._registry_ready:
            db = q(self.xrootd_db)
            self._query(f"CREATE DATABASE IF NOT EXISTS {db}")
            self._query(f"CREATE TABLE IF NOT EXISTS {db}.Dbs (db CHAR(200) NOT NULL PRIMARY KEY)")
            self._query(f"CREATE TABLE IF NOT EXISTS {db}.Chunks (db CHAR(200) NOT NULL, "
                        "chunk INT UNSIGNED NOT NULL, UNIQUE KEY (db, chunk))")
            self._registry_ready = True
        with self._thread_connection(self.xrootd_db).cursor() as cursor:
            affected = cursor.execute(sql, args)
            return list(cursor.fetchall()), affected

    def xrootd_dbs(self) -> list[str]:
        return [r[0] for r in self._registry("SELECT db FROM Dbs ORDER BY db")[0]]

    def xrootd_register(self, db: str) -> bool:
        return self._registry("INSERT IGNORE INTO Dbs (db) VALUES (%s)", (db,))[1] == 1

    def xrootd_unregister(self, db: str) -> bool:
        return self._registry("DELETE FROM Dbs WHERE db = %s", (db,))[1] == 1

    def xrootd_chunks(self, db: str) -> list[int]:
        return [int(r[0]) for r in self._registry("SELECT chunk FROM Chunks WHERE db = %s ORDER BY chunk", (db,))[0]]

    def register_chunk(self, db: str, chunk_id: int) -> None:
        self._registry("REPLACE INTO Chunks (db, chunk) VALUES (%s, %s)", (db, chunk_id))

    def close(self) -> None:
        pass


def flush_chunks_cache(proxy_url: str, db: str) -> None:
    """The czar's FLUSH QSERV_CHUNKS_CACHE FOR <db>, sent through its mysql-proxy (what the
    original's PUT /dbs/<db>/chunks/cache did)."""
    conn = pymysql.connect(**connection_settings(proxy_url), autocommit=True, connect_timeout=10)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"FLUSH QSERV_CHUNKS_CACHE FOR {q(db)}")
    finally:
        conn.close()
