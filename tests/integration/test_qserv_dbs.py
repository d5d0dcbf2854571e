"""The Qserv databases API (/dbs, /xrootd) through the real daemon, on SQLite and on MariaDB:
every endpoint, the original's shapes and error names, the seed's curl examples, and a large
upload that streams (the daemon's memory stays flat)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.dbs_support import BACKENDS, MYSQL_URL, RUN_PREFIX, drop_run_databases, multipart, skip_without_mysql

DB = RUN_PREFIX + "it"
SECRET = ("qservUser", "pass:with:colons")
OBJECT = ("CREATE TABLE Object (objectId BIGINT NOT NULL, ra DOUBLE, decl DOUBLE, PRIMARY KEY (objectId), "
          "KEY IDX_ra (ra)) ENGINE=MyISAM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(kind: str, tmp_path: Path) -> str:
    secret = tmp_path / "wmgr.secret"
    secret.write_text(":".join(SECRET) + "\n")
    script = tmp_path / "xrootd.sh"
    script.write_text(f"#!/bin/sh\necho \"$1\" >> {tmp_path / 'xrootd.calls'}\nexit 0\n")
    script.chmod(0o755)
    backend = f"backend = mysql\nurl = {MYSQL_URL}\n" if kind == "mysql" else "backend = sqlite\n"
    return (f"[dbs]\n{backend}xrootd_db = {RUN_PREFIX}qservw\n"
            f"[qserv]\nauth = basic\nsecret_file = {secret}\n"
            f"[service:xrootd]\nscript = {script}\n")


@pytest_twisted.async_yield_fixture(params=BACKENDS)
async def qserv(request: Any, make_daemon: Any, tmp_path: Path, reactor: Any) -> Any:
    skip_without_mysql(request.param)
    http_port = free_port()
    daemon = await make_daemon("--http-port", str(http_port), config=config_text(request.param, tmp_path))
    daemon.http_port = http_port
    daemon.kind = request.param
    client = daemon.client(reactor)
    yield daemon, client
    await client.close()
    assert await daemon.stop(reactor) == 0, daemon.log()
    drop_run_databases()


async def call(client: Any, method: str, path: str, form: Any = None, **kw: Any) -> tuple[int, Any]:
    if form is not None:
        kw["data"] = urlencode(form).encode()
        kw["headers"] = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = await client.request(method, path, **kw)
    assert reply.headers.getRawHeaders("content-type")[0].startswith("application/json"), reply
    return reply.code, reply.json()


async def upload(client: Any, path: str, data: bytes, **kw: Any) -> tuple[int, Any]:
    body, content_type = multipart(data, **kw)
    return await call(client, "POST", path, data=body, headers={"Content-Type": content_type}, timeout=300)


def error(code: int, body: Any) -> tuple[int, str]:
    assert set(body) <= {"exception", "message", "cause"} and body["message"], body
    return code, body["exception"]


@pytest_twisted.ensureDeferred
async def test_databases_tables_and_chunks(qserv: Any) -> None:
    daemon, client = qserv
    assert await call(client, "POST", "dbs", {"db": DB}) == (201, {"result": {"name": DB, "uri": f"/dbs/{DB}"}})
    assert error(*await call(client, "POST", "dbs", {"db": DB})) == (409, "DatabaseExists")
    assert error(*await call(client, "POST", "dbs", {})) == (400, "MissingArgument")
    assert error(*await call(client, "POST", "dbs", {"db": "bad-name"})) == (400, "InvalidArgument")
    assert error(*await call(client, "DELETE", "dbs/mysql")) == (400, "InvalidArgument")
    code, body = await call(client, "GET", "dbs")
    assert code == 200 and {"name": DB, "uri": f"/dbs/{DB}"} in body["results"]
    assert not {"mysql", "information_schema", RUN_PREFIX + "qservw"} & {d["name"] for d in body["results"]}

    tables = f"dbs/{DB}/tables"
    assert await call(client, "POST", tables, {"table": "Object", "schema": OBJECT, "chunkColumns": "1"}) == (
        201, {"result": {"name": "Object", "uri": f"/dbs/{DB}/tables/Object"}})
    assert error(*await call(client, "POST", tables, {"table": "Object", "schema": OBJECT})) == (409, "TableExists")
    assert error(*await call(client, "POST", tables, {"table": "T"})) == (400, "MissingArgument")
    assert error(*await call(client, "POST", tables, {"table": "T", "schemaSource": "css"})) == (409, "CSSDisabled")
    assert error(*await call(client, "POST", tables, {"table": "T", "schemaSource": "css", "schema": "x"})) == (
        400, "ConflictingArgument")
    assert error(*await call(client, "POST", tables, {"table": "T", "schema": "CREATE TABLE T (g POINT)",
                                                      "chunkColumns": "maybe"})) == (400, "InvalidArgument")
    assert error(*await call(client, "GET", f"dbs/{RUN_PREFIX}none/tables")) == (404, "DatabaseMissing")
    assert await call(client, "GET", tables) == (200, {"results": [{"name": "Object", "uri": f"/dbs/{DB}/tables/Object"}]})

    table = f"{tables}/Object"
    code, schema = await call(client, "GET", f"{table}/schema")
    assert code == 200 and schema["result"].startswith("CREATE TABLE `Object` (")
    code, columns = await call(client, "GET", f"{table}/columns")
    assert code == 200 and columns["results"][0] == {"name": "objectId", "type": "bigint(20)", "null": "NO",
                                                     "key": "PRI", "default": None}
    assert [c["name"] for c in columns["results"]] == ["objectId", "ra", "decl", "chunkId", "subChunkId"]
    assert error(*await call(client, "GET", f"{tables}/Nope/columns")) == (404, "TableMissing")

    chunk = {"chunkId": 42, "chunkTable": True, "overlapTable": True, "uri": f"/dbs/{DB}/tables/Object/chunks/42"}
    assert await call(client, "POST", f"{table}/chunks", {"chunkId": "42"}) == (201, {"result": chunk})
    assert (await call(client, "POST", f"{table}/chunks", {"chunkId": "7", "overlapFlag": "no"}))[0] == 201
    assert error(*await call(client, "POST", f"{table}/chunks", {"chunkId": "42"})) == (409, "TableExists")
    assert error(*await call(client, "POST", f"{table}/chunks", {"chunkId": "-1"})) == (400, "InvalidArgument")
    assert error(*await call(client, "POST", f"{table}/chunks", {})) == (400, "MissingArgument")
    code, listed = await call(client, "GET", f"{table}/chunks")
    assert code == 200 and listed["results"] == [dict(chunk, chunkId=7, overlapTable=False,
                                                      uri=f"/dbs/{DB}/tables/Object/chunks/7"), chunk]
    assert (await call(client, "GET", f"{tables}/ObjectFullOverlap_42/columns"))[1]["results"][0]["key"] == "MUL"
    assert await call(client, "DELETE", f"{table}/chunks/7") == (200, {"result": dict(
        chunk, chunkId=7, overlapTable=False, uri=f"/dbs/{DB}/tables/Object/chunks/7")})
    assert error(*await call(client, "DELETE", f"{table}/chunks/7")) == (404, "ChunkDeleteFailed")
    assert error(*await call(client, "DELETE", f"{table}/chunks/x")) == (404, "NotFound")  # not a route

    assert await call(client, "DELETE", table, params={"dropChunks": "1"}) == (
        200, {"result": {"name": "Object", "uri": f"/dbs/{DB}/tables/Object"}})
    assert await call(client, "GET", tables) == (200, {"results": []})
    assert error(*await call(client, "DELETE", table)) == (404, "TableMissing")
    assert await call(client, "DELETE", f"dbs/{DB}") == (200, {"result": {"name": DB, "uri": f"/dbs/{DB}"}})
    assert error(*await call(client, "DELETE", f"dbs/{DB}")) == (404, "DatabaseMissing")
    assert error(*await call(client, "GET", f"dbs/{DB}")) == (405, "MethodNotAllowed")


@pytest_twisted.ensureDeferred
async def test_loads_and_the_index(qserv: Any) -> None:
    daemon, client = qserv
    await call(client, "POST", "dbs", {"db": DB})
    table = f"dbs/{DB}/tables/Object"
    await call(client, "POST", f"dbs/{DB}/tables", {"table": "Object", "schema": OBJECT, "chunkColumns": "1"})
    await call(client, "POST", f"{table}/chunks", {"chunkId": "3"})
    rows = b"".join(b"%d\t%d.5\t\\N\t3\t%d\n" % (i, i, i % 10) for i in range(20000))  # > 100 kB: a spool file
    assert await upload(client, f"{table}/chunks/3/data", gzip.compress(rows), filename="Object_3.txt.gz") == (
        200, {"result": {"status": "OK", "count": 20000}})
    csv = b'1,"1.5",2,3,0\n1,"1.5",2,3,0\n'
    assert await upload(client, f"{table}/chunks/3/overlap", csv, options="delimiter=%2C&enclose=%22") == (
        200, {"result": {"status": "OK", "count": 2}})
    assert await upload(client, f"{table}/data", b"9\t9\t9\t9\t9\n") == (200, {"result": {"status": "OK", "count": 1}})
    assert error(*await upload(client, f"{table}/chunks/4/data", rows[:100])) == (404, "ChunkTableMissing")
    assert error(*await upload(client, f"{table}/data", rows[:100], filename=None)) == (400, "MissingFileData")
    assert error(*await upload(client, f"{table}/data", rows[:100], options="sep=%2C")) == (400, "IllegalOption")
    assert error(*await upload(client, f"dbs/{DB}/tables/Nope/data", rows[:100])) == (404, "TableMissing")

    code, index = await call(client, "GET", f"{table}/index")
    assert code == 200 and len(index["result"]["rows"]) == 20000 and index["result"]["rows"][11] == [11, 3, 1]
    assert index["result"]["description"] == [{"name": "objectId", "type": "LONGLONG"},
                                              {"name": "chunkId", "type": "LONG"}, {"name": "subChunkId", "type": "LONG"}]
    code, one = await call(client, "GET", f"{table}/chunks/3/index", params={"columns": "objectId,ra,decl"})
    assert code == 200 and one["result"]["rows"][2] == [2, 2.5, None]
    assert error(*await call(client, "GET", f"{table}/index", params={"columns": "objectId,ra"})) == (
        400, "InvalidArgument")
    assert error(*await call(client, "GET", f"{table}/index",
                             params={"columns": "objectId,ra,(SELECT 1)"})) == (400, "InvalidArgument")
    assert error(*await call(client, "GET", f"{table}/chunks/9/index")) == (404, "NoMatchingChunks")
    assert error(*await call(client, "PUT", f"dbs/{DB}/chunks/cache")) == (409, "CommandFailure")


@pytest_twisted.ensureDeferred
async def test_xrootd_inventory_restarts_a_running_xrootd(qserv: Any, tmp_path: Path) -> None:
    daemon, client = qserv
    calls = tmp_path / "xrootd.calls"
    assert await call(client, "POST", "xrootd/dbs", {"db": DB, "xrootdRestart": "0"}) == (
        201, {"result": {"name": DB, "uri": f"/xrootd/dbs/{DB}"}})
    assert not calls.exists()
    assert error(*await call(client, "POST", "xrootd/dbs", {"db": DB})) == (409, "DatabaseExists")
    assert await call(client, "GET", "xrootd/dbs") == (200, {"results": [{"name": DB, "uri": f"/xrootd/dbs/{DB}"}]})
    await call(client, "POST", "dbs", {"db": DB})
    await call(client, "POST", f"dbs/{DB}/tables", {"table": "Object", "schema": OBJECT})
    await call(client, "POST", f"dbs/{DB}/tables/Object/chunks", {"chunkId": "12"})
    assert await call(client, "GET", f"xrootd/dbs/{DB}") == (200, {"results": [{"chunkId": 12}]})
    assert await call(client, "DELETE", f"xrootd/dbs/{DB}") == (200, {"result": {"name": DB, "uri": f"/xrootd/dbs/{DB}"}})
    assert calls.read_text().split() == ["status", "restart", "status"]  # xrootd ran, so it was restarted
    assert error(*await call(client, "DELETE", f"xrootd/dbs/{DB}", params={"xrootdRestart": "no"})) == (
        409, "DatabaseMissing")
    assert error(*await call(client, "GET", f"xrootd/dbs/{DB}")) == (404, "DatabaseMissing")
    assert error(*await call(client, "POST", "xrootd/dbs", {"db": DB, "xrootdRestart": "2"})) == (400, "InvalidArgument")


async def curl(reactor: Any, *args: str) -> tuple[int, str, Any]:
    out, err, code = await getProcessOutputAndValue("curl", ["-s", "-i", *args], env=os.environ, reactor=reactor)
    assert code == 0, err
    head, _, body = out.decode().replace("\r\n", "\n").partition("\n\n")
    return int(head.split()[1]), head, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_the_seeds_curl_examples(qserv: Any, reactor: Any) -> None:
    """`curl -i http://127.0.0.1:5012/dbs` and `.../dbs/<db>/tables`, over plain HTTP with the
    secret file's user (Basic), give the seed's shapes."""
    daemon, client = qserv
    await call(client, "POST", "dbs", {"db": DB})
    await call(client, "POST", f"dbs/{DB}/tables", {"table": "Filter", "schema": "CREATE TABLE Filter (filterId TINYINT)"})
    base, user = f"http://127.0.0.1:{daemon.http_port}", ":".join(SECRET)
    code, head, body = await curl(reactor, "-u", user, f"{base}/dbs")
    assert code == 200 and "Content-Type: application/json" in head
    assert {"name": DB, "uri": f"/dbs/{DB}"} in body["results"]
    code, head, body = await curl(reactor, "-u", user, f"{base}/dbs/{DB}/tables")
    assert (code, body) == (200, {"results": [{"name": "Filter", "uri": f"/dbs/{DB}/tables/Filter"}]})
    code, head, body = await curl(reactor, f"{base}/dbs")
    assert code == 401 and body["exception"] == "Unauthorized"


async def while_sampling(reactor: Any, client: Any, daemon: Any, work: Any) -> tuple[Any, float, int]:
    """Run `work` while sampling the daemon's RSS and asking it for something else every 50 ms:
    (work's result, RSS growth in MB, other requests answered)."""
    process = psutil.Process(daemon.process.pid)
    before = process.memory_info().rss
    peak, answered = before, 0
    running = ensureDeferred(work)
    while not running.called:
        peak = max(peak, process.memory_info().rss)
        code, _ = await call(client, "GET", f"dbs/{DB}/tables")
        answered += code == 200
        await deferLater(reactor, 0.05, lambda: None)
    return await running, (peak - before) / 2 ** 20, answered


@pytest_twisted.ensureDeferred
async def test_a_large_upload_and_its_index_stream_in_flat_memory(qserv: Any, reactor: Any) -> None:
    """A 40 MB upload, then the index of its 400,000 rows: the daemon's RSS, sampled all along,
    grows by a few MB at most, and other requests are answered meanwhile."""
    daemon, client = qserv
    await call(client, "POST", "dbs", {"db": DB})
    await call(client, "POST", f"dbs/{DB}/tables", {"table": "Big", "chunkColumns": "1", "schema":
                                                     "CREATE TABLE Big (id BIGINT, a DOUBLE, b VARCHAR(64))"})
    await call(client, "POST", f"dbs/{DB}/tables/Big/chunks", {"chunkId": "1", "overlapFlag": "0"})
    line = b"%d\t12345.678\tsome text that pads the row out to about a hundred bytes.............\t1\t%d\n"
    data = b"".join(line % (i, i % 7) for i in range(400000))
    loaded, growth, answered = await while_sampling(reactor, client, daemon, upload(
        client, f"dbs/{DB}/tables/Big/chunks/1/data", data, filename="big.tsv"))
    assert loaded == (200, {"result": {"status": "OK", "count": 400000}})
    print(f"daemon RSS growth during a {len(data) / 2 ** 20:.0f} MB upload ({daemon.kind}): {growth:.1f} MB",
          file=sys.stderr)
    assert growth < 12 and answered >= 1, (growth, answered)

    (code, index), growth, answered = await while_sampling(reactor, client, daemon, call(
        client, "GET", f"dbs/{DB}/tables/Big/index", params={"columns": "id,chunkId,subChunkId"}, timeout=300))
    assert code == 200 and len(index["result"]["rows"]) == 400000 and index["result"]["rows"][-1] == [399999, 1, 399999 % 7]
    print(f"daemon RSS growth during a 400,000-row index ({daemon.kind}): {growth:.1f} MB", file=sys.stderr)
    assert growth < 12, growth
