"""The databases domain: Qserv's databases, tables, chunk tables, table loads, the index and the
xrootd chunk inventory, over one backend (SQLite or MySQL/MariaDB).

The rules live here, once for both backends: which databases are the system's (hidden and
protected), how chunk and overlap tables are named and found, what a drop with dropChunks drops,
that index columns are real columns of the table. The backend does the primitive work. All of
it runs on this service's own thread pool, never on the reactor: a slow load or a locked
database keeps a pool thread, not the daemon, waiting.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Awaitable, BinaryIO, Callable, Optional

from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from wmgr.dbs import multipart
from wmgr.dbs.ddl import read_header
from wmgr.dbs.errors import (ChunkDeleteFailed, ChunkRegisterFailed, ChunkTableMissing, CommandFailure,
                             DatabaseExists, DatabaseFailure, DatabaseMissing, InvalidArgument, MissingFileData,
                             NoMatchingChunks, NotRegistered, TableMissing)
from wmgr.dbs.names import (SYSTEM_DATABASES, check_column, check_database, check_table, chunk_of, chunk_table,
                            overlap_table)
from wmgr.dbs.rows import LoadOptions, gunzip
from wmgr.errors import WmgrError

log = Logger()

# The load-options field is a short urlencoded string; anything larger is not one.
MAX_LOAD_OPTIONS = 64 * 1024
INDEX_COLUMNS = 3
# Upload bytes handed to the backend at a time: a block's rows exist as Python objects at once
# (about five times its size), so this bounds a load's memory.
LOAD_BLOCK = 256 * 1024


class Databases(Service):
    def __init__(self, backend: Any, reactor: Any, threads: int = 4,
                 restart_if_running: Optional[Callable[[str], Awaitable[bool]]] = None,
                 proxy_url: Optional[str] = None) -> None:
        self.backend = backend
        self._reactor = self.reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="wmgr-dbs")
        self._restart_if_running = restart_if_running
        self.proxy_url = proxy_url
        self.hidden = SYSTEM_DATABASES | {backend.xrootd_db}

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Any:
        super().stopService()
        # Joining the pool's threads blocks until running work ends: not on the reactor.
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._pool.stop)

    async def _run(self, work: Callable[..., Any], *args: Any) -> Any:
        return await deferToThreadPool(self._reactor, self._pool, _translated, work, *args)

    # -- names --------------------------------------------------------------------------------

    def _user_database(self, db: str) -> str:
        check_database(db)
        if db.lower() in self.hidden:
            raise InvalidArgument(f"Database {db} is a system database: not available through this API")
        return db

    async def _existing_table(self, db: str, table: str) -> None:
        self._user_database(db)
        check_table(table)
        if not await self._run(self.backend.database_exists, db):
            raise DatabaseMissing(f"Database {db} does not exist")
        if not await self._run(self.backend.table_exists, db, table):
            raise TableMissing(f"Table {db}.{table} does not exist")

    # -- databases ----------------------------------------------------------------------------

    async def databases(self) -> list[str]:
        return [db for db in await self._run(self.backend.databases) if db.lower() not in self.hidden]

    async def create_database(self, db: str) -> None:
        self._user_database(db)
        await self._run(self.backend.create_database, db)

    async def drop_database(self, db: str) -> None:
        self._user_database(db)
        await self._run(self.backend.drop_database, db)

    # -- tables -------------------------------------------------------------------------------

    async def tables(self, db: str) -> list[str]:
        self._user_database(db)
        return await self._run(self.backend.tables, db)

    async def create_table(self, db: str, table: str, schema: str, chunk_columns: bool) -> None:
        self._user_database(db)
        check_table(table)
        qualifier, name, _ = read_header(schema)
        if name != table or (qualifier is not None and qualifier != db):
            raise InvalidArgument(f"the schema creates table {(qualifier + '.') if qualifier else ''}{name}, "
                                  f"not {db}.{table}")
        if not await self._run(self.backend.database_exists, db):
            raise DatabaseMissing(f"Database {db} does not exist")
        await self._run(self.backend.create_table, db, table, schema, chunk_columns)

    async def drop_table(self, db: str, table: str, drop_chunks: bool) -> None:
        """With drop_chunks, the chunk and overlap tables go first, even if the table itself
        then turns out to be missing (as the original did, saying how many went)."""
        self._user_database(db)
        check_table(table)
        if not await self._run(self.backend.database_exists, db):
            raise DatabaseMissing(f"Database {db} does not exist")
        dropped = 0
        if drop_chunks:
            for name in await self._run(self.backend.tables, db):
                if chunk_of(table, name) is not None:
                    await self._run(self.backend.drop_table, db, name)
                    dropped += 1
        try:
            await self._run(self.backend.drop_table, db, table)
        except TableMissing:
            suffix = f", but {dropped} chunk tables have been dropped" if dropped else ""
            raise TableMissing(f"Table {db}.{table} does not exist{suffix}") from None

    async def schema(self, db: str, table: str) -> str:
        await self._existing_table(db, table)
        return await self._run(self.backend.schema, db, table)

    async def columns(self, db: str, table: str) -> list[dict]:
        await self._existing_table(db, table)
        return await self._run(self.backend.columns, db, table)

    # -- chunks -------------------------------------------------------------------------------

    async def chunks(self, db: str, table: str) -> list[dict]:
        """{chunkId, chunkTable, overlapTable} of every chunk of the table, by chunk id."""
        await self._existing_table(db, table)
        found: dict[int, dict] = {}
        for name in await self._run(self.backend.tables, db):
            chunk = chunk_of(table, name)
            if chunk is not None:
                entry = found.setdefault(chunk[0], {"chunkId": chunk[0], "chunkTable": False, "overlapTable": False})
                entry["overlapTable" if chunk[1] else "chunkTable"] = True
        return [found[k] for k in sorted(found)]

    async def create_chunk(self, db: str, table: str, chunk_id: int, overlap: bool) -> dict:
        await self._existing_table(db, table)
        await self._run(self.backend.create_like, db, table, chunk_table(table, chunk_id), False)
        if overlap:
            await self._run(self.backend.create_like, db, table, overlap_table(table, chunk_id), True)
        try:
            await self._run(self.backend.register_chunk, db, chunk_id)
        except WmgrError as e:
            raise ChunkRegisterFailed(f"Failed to register chunk {chunk_id} of {db}: {e.reason}") from None
        return {"chunkId": chunk_id, "chunkTable": True, "overlapTable": overlap}

    async def delete_chunk(self, db: str, table: str, chunk_id: int) -> dict:
        """Drops both tables that exist; without the chunk table itself it is a ChunkDeleteFailed
        (after dropping a lone overlap table all the same, as the original did)."""
        await self._existing_table(db, table)
        dropped = {}
        for key, name in (("chunkTable", chunk_table(table, chunk_id)), ("overlapTable", overlap_table(table, chunk_id))):
            try:
                await self._run(self.backend.drop_table, db, name)
                dropped[key] = True
            except TableMissing:
                dropped[key] = False
        if not dropped["chunkTable"]:
            failure = ChunkDeleteFailed(f"Failed to delete chunk {chunk_id} of {db}.{table}")
            failure.cause = (f"chunk table {chunk_table(table, chunk_id)} does not exist"
                             + (" (its overlap table was dropped)" if dropped["overlapTable"] else ""))
            raise failure
        return {"chunkId": chunk_id, **dropped}

    # -- data ---------------------------------------------------------------------------------

    async def load(self, db: str, table: str, body: BinaryIO, content_type: Optional[bytes],
                   chunk_id: Optional[int] = None, overlap: bool = False) -> int:
        """Load a multipart upload (a `table-data` file part, an optional `load-options` field)
        into the table, its chunk table or its overlap table; the number of rows loaded."""
        await self._existing_table(db, table)
        target = table
        if chunk_id is not None:
            target = overlap_table(table, chunk_id) if overlap else chunk_table(table, chunk_id)
            if not await self._run(self.backend.table_exists, db, target):
                raise ChunkTableMissing(f"Chunk table {db}.{target} does not exist")
        return await self._run(self._load, db, target, body, content_type)

    def _load(self, db: str, table: str, body: BinaryIO, content_type: Optional[bytes]) -> int:
        parts = multipart.scan(body, content_type)
        data = parts.get("table-data")
        if data is None or data.filename is None:
            raise MissingFileData("table-data file part is missing (a file part, with a file name, is required)")
        options = LoadOptions()
        if "load-options" in parts:
            text = multipart.read_small(body, parts["load-options"], MAX_LOAD_OPTIONS)
            try:
                options = LoadOptions.parse(text.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidArgument("load-options is not UTF-8 text") from None
        blocks = multipart.read_blocks(body, data, LOAD_BLOCK)
        if options.gzipped(data.filename):
            blocks = gunzip(blocks)
        return self.backend.load(db, table, blocks, options)

    async def index(self, db: str, table: str, columns: list[str], chunk_id: Optional[int] = None,
                    sink: Optional["IndexSink"] = None) -> dict:
        """The three columns of every row of every chunk table (or of one), with their types;
        each column must be a real column of the table (the original pasted them into SQL).

        With a `sink`, the rows are not gathered: the sink gets the description, then batch after
        batch of rows, on a pool thread (it may block there: that holds the database back), and
        the answer is empty."""
        if len(columns) != INDEX_COLUMNS:
            raise InvalidArgument(f"columns must name exactly {INDEX_COLUMNS} columns, not {len(columns)}")
        for column in columns:
            check_column(column)
        await self._existing_table(db, table)
        names = await self._run(self.backend.tables, db)
        if chunk_id is None:
            tables = sorted((c[0], n) for n in names if (c := chunk_of(table, n)) is not None and not c[1])
            chunk_tables = [n for _, n in tables]
        else:
            chunk_tables = [chunk_table(table, chunk_id)] if chunk_table(table, chunk_id) in names else []
        if not chunk_tables:
            raise NoMatchingChunks(f"No chunk tables of {db}.{table}" +
                                   (f" for chunk {chunk_id}" if chunk_id is not None else ""))
        real = {c.lower(): c for c in await self._run(self.backend.column_names, db, chunk_tables[0])}
        unknown = [c for c in columns if c.lower() not in real]
        if unknown:
            raise InvalidArgument(f"{db}.{table} has no column {', '.join(unknown)}")
        gathered = IndexSink()
        await self._run(_feed, self.backend.select(db, chunk_tables, [real[c.lower()] for c in columns]), columns,
                        sink or gathered)
        return {} if sink else {"rows": gathered.gathered, "description": gathered.description}

    async def flush_chunks_cache(self, db: str) -> None:
        """The czar's chunk cache reset, through its mysql-proxy ([dbs] proxy_url)."""
        self._user_database(db)
        if not self.proxy_url:
            # Not a database failure (the original's 500 FLushFailed): this daemon is not set up to
            # reach a czar, which is the request's conflict with its configuration.
            raise CommandFailure("no czar proxy is configured ([dbs] proxy_url): the chunk cache lives in the czar")
        from wmgr.dbs.mysql import flush_chunks_cache

        try:
            await self._run(flush_chunks_cache, self.proxy_url, db)
        except DatabaseFailure as e:
            raise DatabaseFailure(f"Failed to flush the chunk cache of {db}: {e.reason}", "FLushFailed") from None

    # -- xrootd -------------------------------------------------------------------------------

    async def xrootd_dbs(self) -> list[str]:
        return await self._run(self.backend.xrootd_dbs)

    async def xrootd_register(self, db: str, restart: bool) -> None:
        self._user_database(db)
        if not await self._run(self.backend.xrootd_register, db):
            raise DatabaseExists(f"Database {db} is already registered with xrootd")
        await self._restart_xrootd(restart)

    async def xrootd_unregister(self, db: str, restart: bool) -> None:
        self._user_database(db)
        if not await self._run(self.backend.xrootd_unregister, db):
            raise NotRegistered(f"Database {db} is not registered with xrootd")
        await self._restart_xrootd(restart)

    async def xrootd_chunks(self, db: str) -> list[int]:
        self._user_database(db)
        if db not in await self._run(self.backend.xrootd_dbs):
            raise DatabaseMissing(f"Database {db} is not registered with xrootd")
        return await self._run(self.backend.xrootd_chunks, db)

    async def _restart_xrootd(self, restart: bool) -> None:
        """xrootd reads its chunk list when it starts: restart it if it runs (and is configured)."""
        if restart and self._restart_if_running is not None:
            await self._restart_if_running("xrootd")


class IndexSink:
    """Where index rows go; this one gathers them (subclasses send them on as they come)."""

    def __init__(self) -> None:
        self.description: list[dict] = []
        self.gathered: list[list] = []

    def start(self, description: list[dict]) -> None:
        self.description = description

    def rows(self, rows: list[list]) -> None:
        self.gathered.extend(rows)


def _feed(batches: Any, columns: list[str], sink: IndexSink) -> None:
    """Hand a backend's select (types first, then row batches) to the sink, on a pool thread."""
    try:
        types = next(batches)
        sink.start([{"name": c, "type": t} for c, t in zip(columns, types)])
        for rows in batches:
            sink.rows(rows)
    finally:
        batches.close()


def _translated(work: Callable[..., Any], *args: Any) -> Any:
    """Run `work` (on a pool thread); a driver's error becomes a DatabaseFailure named after its
    class, as the original reported database errors."""
    try:
        return work(*args)
    except WmgrError:
        raise
    except sqlite3.Error as e:
        raise DatabaseFailure(str(e), type(e).__name__) from None
    except Exception as e:
        if type(e).__module__.startswith("pymysql"):
            raise DatabaseFailure(str(e), type(e).__name__) from None
        raise
