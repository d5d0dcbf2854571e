"""The databases domain (wmgr.dbs.Databases) on both backends: the same tests on SQLite and on
MariaDB, through its thread pool on the real reactor."""

from __future__ import annotations

import gzip
import io
from typing import Any

import pytest
import pytest_twisted

from tests.dbs_support import BACKENDS, MYSQL_URL, RUN_PREFIX, drop_run_databases, multipart, skip_without_mysql
from wmgr.dbs import Databases, make_backend
from wmgr.dbs import errors

OBJECT = """CREATE TABLE `Object` (
  `objectId` BIGINT NOT NULL,
  `ra` DOUBLE NOT NULL DEFAULT 0,
  `name` VARCHAR(16) CHARACTER SET latin1 DEFAULT NULL,
  PRIMARY KEY (`objectId`),
  KEY `IDX_ra` (`ra`),
  UNIQUE KEY `UQ_name` (`name`)
) ENGINE=MyISAM DEFAULT CHARSET=latin1"""


@pytest_twisted.async_yield_fixture(params=BACKENDS)
async def dbs(request: Any, tmp_path: Any, reactor: Any) -> Any:
    skip_without_mysql(request.param)
    backend = make_backend(request.param, tmp_path, MYSQL_URL, RUN_PREFIX + "qservw")
    restarts: list[str] = []

    async def restart_if_running(name: str) -> bool:
        restarts.append(name)
        return True

    service = Databases(backend, reactor, restart_if_running=restart_if_running)
    service.restarts = restarts
    service.startService()
    yield service
    await service.stopService()
    drop_run_databases()


DB = RUN_PREFIX + "db"


async def make_object(dbs: Databases, chunk_columns: bool = True) -> None:
    await dbs.create_database(DB)
    await dbs.create_table(DB, "Object", OBJECT, chunk_columns)


async def load(dbs: Databases, data: bytes, table: str = "Object", chunk: Any = None, overlap: bool = False,
               **kw: Any) -> int:
    body, content_type = multipart(data, **kw)
    return await dbs.load(DB, table, io.BytesIO(body), content_type.encode(), chunk, overlap)


def table_rows(dbs: Databases, table: str) -> list:
    """Every row of a table, straight from the backend (a select yields the types first)."""
    batches = dbs.backend.select(DB, [table], ["objectId", "ra", "name"])
    next(batches)
    return [row for batch in batches for row in batch]


async def raises(kind: type, coroutine: Any) -> Exception:
    with pytest.raises(kind) as caught:
        await coroutine
    return caught.value


@pytest_twisted.ensureDeferred
async def test_databases_are_created_listed_and_dropped(dbs: Databases) -> None:
    await dbs.create_database(DB)
    assert DB in await dbs.databases()
    await raises(errors.DatabaseExists, dbs.create_database(DB))
    await dbs.drop_database(DB)
    assert DB not in await dbs.databases()
    await raises(errors.DatabaseMissing, dbs.drop_database(DB))
    await raises(errors.DatabaseMissing, dbs.tables(DB))
    await raises(errors.DatabaseMissing, dbs.drop_table(DB, "Object", True))
    await raises(errors.DatabaseMissing, dbs.drop_table(DB, "Object", False))


@pytest_twisted.ensureDeferred
async def test_system_databases_are_hidden_and_protected(dbs: Databases) -> None:
    await dbs.xrootd_dbs()  # makes the bookkeeping database
    listed = await dbs.databases()
    for name in ("mysql", "information_schema", "performance_schema", "sys", RUN_PREFIX + "qservw"):
        assert name not in listed
        await raises(errors.InvalidArgument, dbs.drop_database(name))
        await raises(errors.InvalidArgument, dbs.tables(name))
    await raises(errors.InvalidArgument, dbs.create_database("MySQL"))
    await raises(errors.InvalidArgument, dbs.create_database("bad-name"))


@pytest_twisted.ensureDeferred
async def test_table_shapes_match_on_both_backends(dbs: Databases) -> None:
    await make_object(dbs)
    assert await dbs.tables(DB) == ["Object"]
    assert await dbs.columns(DB, "Object") == [
        {"name": "objectId", "type": "bigint(20)", "null": "NO", "key": "PRI", "default": None},
        {"name": "ra", "type": "double", "null": "NO", "key": "MUL", "default": "0"},
        {"name": "name", "type": "varchar(16)", "null": "YES", "key": "UNI", "default": None},
        {"name": "chunkId", "type": "int(11)", "null": "NO", "key": "", "default": None},
        {"name": "subChunkId", "type": "int(11)", "null": "NO", "key": "", "default": None},
    ]
    schema = await dbs.schema(DB, "Object")
    assert schema.startswith("CREATE TABLE `Object` (\n  `objectId` bigint(20) NOT NULL,")
    assert "PRIMARY KEY (`objectId`)" in schema and "UNIQUE KEY `UQ_name` (`name`)" in schema
    await raises(errors.TableExists, dbs.create_table(DB, "Object", OBJECT, False))
    await raises(errors.TableMissing, dbs.columns(DB, "Nope"))
    await raises(errors.TableMissing, dbs.schema(DB, "Nope"))


@pytest_twisted.ensureDeferred
async def test_create_table_checks_the_statement(dbs: Databases) -> None:
    await dbs.create_database(DB)
    await raises(errors.InvalidArgument, dbs.create_table(DB, "Other", OBJECT, False))  # names Object
    await raises(errors.InvalidArgument, dbs.create_table(DB, "T", "DROP TABLE T", False))
    await raises(errors.InvalidArgument, dbs.create_table(DB, "T", "CREATE TABLE T (a INT); DROP TABLE x", False))
    await raises(errors.InvalidArgument, dbs.create_table(DB, "T", "CREATE TABLE other_db.T (a INT)", False))
    await raises(errors.DatabaseMissing, dbs.create_table(RUN_PREFIX + "none", "T", "CREATE TABLE T (a INT)", False))
    assert await dbs.tables(DB) == []


@pytest_twisted.ensureDeferred
async def test_chunks_are_made_listed_and_deleted(dbs: Databases) -> None:
    await make_object(dbs)
    assert await dbs.create_chunk(DB, "Object", 7, True) == {"chunkId": 7, "chunkTable": True, "overlapTable": True}
    assert await dbs.create_chunk(DB, "Object", 3, False) == {"chunkId": 3, "chunkTable": True, "overlapTable": False}
    await raises(errors.TableExists, dbs.create_chunk(DB, "Object", 7, False))
    await raises(errors.TableMissing, dbs.create_chunk(DB, "Nope", 1, False))
    assert await dbs.chunks(DB, "Object") == [{"chunkId": 3, "chunkTable": True, "overlapTable": False},
                                              {"chunkId": 7, "chunkTable": True, "overlapTable": True}]
    overlap = await dbs.columns(DB, "ObjectFullOverlap_7")
    assert [c["key"] for c in overlap][:3] == ["MUL", "MUL", "MUL"]  # no PRI, no UNI: rows may repeat
    assert "PRIMARY_NON_UNIQUE" in await dbs.schema(DB, "ObjectFullOverlap_7")
    await dbs.xrootd_register(DB, restart=False)
    assert await dbs.xrootd_chunks(DB) == [3, 7]
    assert await dbs.delete_chunk(DB, "Object", 7) == {"chunkId": 7, "chunkTable": True, "overlapTable": True}
    error = await raises(errors.ChunkDeleteFailed, dbs.delete_chunk(DB, "Object", 7))
    assert error.cause == "chunk table Object_7 does not exist"
    assert await dbs.chunks(DB, "Object") == [{"chunkId": 3, "chunkTable": True, "overlapTable": False}]


@pytest_twisted.ensureDeferred
async def test_drop_table_with_and_without_chunks(dbs: Databases) -> None:
    await make_object(dbs)
    await dbs.create_chunk(DB, "Object", 1, True)
    await dbs.drop_table(DB, "Object", False)
    assert await dbs.tables(DB) == ["ObjectFullOverlap_1", "Object_1"]
    error = await raises(errors.TableMissing, dbs.drop_table(DB, "Object", True))
    assert "but 2 chunk tables have been dropped" in error.reason
    assert await dbs.tables(DB) == []


@pytest_twisted.ensureDeferred
async def test_load_plain_gzip_options_and_chunks(dbs: Databases) -> None:
    await make_object(dbs)
    await dbs.create_chunk(DB, "Object", 5, True)
    assert await load(dbs, b"1\t1.5\ta\t5\t0\n2\t2.5\t\\N\t5\t1\n") == 2
    assert await load(dbs, gzip.compress(b"3\t3.5\tc\t5\t2\n"), filename="rows.tsv.gz", chunk=5) == 1
    csv = b'4,4.5,"x,y",5,3\n4,4.5,"x,y",5,3\n'
    assert await load(dbs, csv, chunk=5, overlap=True, options="delimiter=%2C&enclose=%22",
                      options_first=False) == 2
    assert await load(dbs, gzip.compress(b"5|5|e|5|4\n"), filename="no-suffix",
                      options="delimiter=%7C&compressed=1") == 1
    index = await dbs.index(DB, "Object", ["objectId", "chunkId", "subChunkId"])
    assert index == {"rows": [[3, 5, 2]], "description": [
        {"name": "objectId", "type": "LONGLONG"}, {"name": "chunkId", "type": "LONG"},
        {"name": "subChunkId", "type": "LONG"}]}
    assert (await dbs.index(DB, "Object", ["objectId", "ra", "name"], 5))["rows"] == [[3, 3.5, "c"]]
    await raises(errors.ChunkTableMissing, load(dbs, b"", chunk=6))
    await raises(errors.NoMatchingChunks, dbs.index(DB, "Object", ["objectId", "chunkId", "subChunkId"], 6))


@pytest_twisted.ensureDeferred
async def test_a_bad_load_loads_nothing(dbs: Databases) -> None:
    # InnoDB: a MyISAM table on MySQL keeps the rows read before a failure (it has no transactions).
    await dbs.create_database(DB)
    await dbs.create_table(DB, "Object", OBJECT.replace("MyISAM", "InnoDB"), True)
    await raises(errors.MissingFileData, load(dbs, b"1\t1\ta\t1\t1\n", filename=None))
    await raises(errors.MissingFileData, load(dbs, b"1\t1\ta\t1\t1\n", field_name="other"))
    await raises(errors.IllegalOption, load(dbs, b"1\t1\ta\t1\t1\n", options="delimeter=%2C"))
    good = b"1\t1\ta\t1\t1\n" * 1000
    await raises(errors.InvalidArgument, load(dbs, gzip.compress(good)[:-30], filename="x.gz"))
    await raises(errors.InvalidArgument, dbs.load(DB, "Object", io.BytesIO(b"x"), b"text/plain"))
    if dbs.backend.kind == "sqlite":  # MySQL's LOAD DATA LOCAL fills a short line's columns, with a warning
        await raises(errors.InvalidArgument, load(dbs, good + b"2\t2\n"))
    assert table_rows(dbs, "Object") == []


@pytest_twisted.ensureDeferred
async def test_index_columns_must_be_real_columns(dbs: Databases) -> None:
    await make_object(dbs)
    await dbs.create_chunk(DB, "Object", 1, False)
    await raises(errors.InvalidArgument, dbs.index(DB, "Object", ["objectId", "chunkId"]))
    await raises(errors.InvalidArgument, dbs.index(DB, "Object", ["objectId", "chunkId", "nope"]))
    await raises(errors.InvalidArgument, dbs.index(DB, "Object", ["objectId", "chunkId", "1 FROM mysql.user --"]))
    await raises(errors.TableMissing, dbs.index(DB, "Nope", ["a", "b", "c"]))


@pytest_twisted.ensureDeferred
async def test_xrootd_registration(dbs: Databases) -> None:
    assert DB not in await dbs.xrootd_dbs()
    await dbs.xrootd_register(DB, restart=True)
    assert dbs.restarts == ["xrootd"]
    await raises(errors.DatabaseExists, dbs.xrootd_register(DB, restart=True))
    assert DB in await dbs.xrootd_dbs()
    assert await dbs.xrootd_chunks(DB) == []
    await dbs.xrootd_unregister(DB, restart=False)
    assert dbs.restarts == ["xrootd"]
    await raises(errors.NotRegistered, dbs.xrootd_unregister(DB, restart=False))
    await raises(errors.DatabaseMissing, dbs.xrootd_chunks(DB))


@pytest_twisted.ensureDeferred
async def test_chunk_cache_reset_needs_a_proxy(dbs: Databases) -> None:
    # Without one it is the request's conflict with this daemon's set-up, not a database failure.
    error = await raises(errors.CommandFailure, dbs.flush_chunks_cache(DB))
    assert "proxy_url" in error.reason
    if dbs.backend.kind == "mysql":  # MariaDB is no mysql-proxy: it refuses the czar's statement
        dbs.proxy_url = MYSQL_URL
        error = await raises(errors.DatabaseFailure, dbs.flush_chunks_cache(DB))
        assert error.exception == "FLushFailed" and "QSERV_CHUNKS_CACHE" in error.reason


@pytest_twisted.ensureDeferred
async def test_a_row_whose_key_is_there_is_skipped_as_load_data_local_does(dbs: Databases) -> None:
    await make_object(dbs)
    assert await load(dbs, b"1\t1\ta\t1\t1\n1\t2\tb\t1\t1\n2\t2\tc\t1\t1\n") == 2
    assert await load(dbs, b"2\t9\tz\t1\t1\n") == 0
    assert table_rows(dbs, "Object") == [[1, 1.0, "a"], [2, 2.0, "c"]]


def test_a_connection_the_server_dropped_is_made_again(tmp_path: Any) -> None:
    skip_without_mysql("mysql")
    import pymysql

    backend = make_backend("mysql", tmp_path, MYSQL_URL, RUN_PREFIX + "qservw")
    backend.databases()
    killer = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        killer.cursor().execute(f"KILL {backend._local.conn.thread_id()}")
    finally:
        killer.close()
    assert "information_schema" in backend.databases()
