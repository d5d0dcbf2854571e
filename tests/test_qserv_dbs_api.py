"""The /dbs and /xrootd routes in memory (StubTreq, a fake domain): the error names and codes
that only the route layer decides."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq

from wmgr.api.qserv_dbs import QservDbsAPI
from wmgr.dbs.errors import ChunkDeleteFailed, DatabaseFailure, NotRegistered, TableMissing

BASE = "http://wmgr.test"


class FakeDatabases:
    """Raises what it is told to; records the calls."""

    def __init__(self) -> None:
        self.error: Any = None
        self.calls: list[tuple] = []

    def __getattr__(self, name: str) -> Any:
        async def method(*args: Any, **kw: Any) -> Any:
            self.calls.append((name, *args))
            if self.error is not None:
                raise self.error
            return []
        return method


@pytest.fixture
def api() -> Any:
    fake = FakeDatabases()
    return fake, StubTreq(QservDbsAPI(fake).resource())


async def answer(client: StubTreq, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    response = await client.request(method, BASE + path, **kw)
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("error, code, body", [
    (DatabaseFailure("(1045, 'Access denied')", "OperationalError"), 500,
     {"exception": "OperationalError", "message": "(1045, 'Access denied')"}),
    (DatabaseFailure("no proxy", "FLushFailed"), 500, {"exception": "FLushFailed", "message": "no proxy"}),
    (TableMissing("Table d.t does not exist"), 404, {"exception": "TableMissing", "message": "Table d.t does not exist"}),
])
async def test_domain_errors_keep_the_originals_names_and_codes(api: Any, error: Exception, code: int,
                                                                 body: dict) -> None:
    fake, client = api
    fake.error = error
    assert await answer(client, "DELETE", "/dbs/x/tables/t/chunks/1") == (code, body)


@pytest_twisted.ensureDeferred
async def test_xrootd_names_every_database_error_dbexception(api: Any) -> None:
    fake, client = api
    fake.error = DatabaseFailure("(2003, \"Can't connect\")", "OperationalError")
    assert await answer(client, "GET", "/xrootd/dbs") == (500, {"exception": "DbException",
                                                                 "message": "(2003, \"Can't connect\")"})
    fake.error = NotRegistered("Database x is not registered")
    assert await answer(client, "DELETE", "/xrootd/dbs/x") == (409, {"exception": "DatabaseMissing",
                                                                      "message": "Database x is not registered"})


@pytest_twisted.ensureDeferred
async def test_a_failed_chunk_delete_has_a_cause(api: Any) -> None:
    fake, client = api
    fake.error = ChunkDeleteFailed("Failed to delete chunk 1 of d.t")
    fake.error.cause = "chunk table t_1 does not exist"
    assert await answer(client, "DELETE", "/dbs/d/tables/t/chunks/1") == (404, {
        "exception": "ChunkDeleteFailed", "message": "Failed to delete chunk 1 of d.t",
        "cause": "chunk table t_1 does not exist"})


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method, path, data, exception", [
    ("POST", "/dbs", {"db": "a;b"}, "InvalidArgument"),
    ("GET", "/dbs/a-b/tables", None, "InvalidArgument"),
    ("POST", "/dbs/d/tables", {"table": "t", "schemaSource": "nosql"}, "InvalidArgument"),
    ("POST", "/dbs/d/tables/t/chunks", {"chunkId": "x"}, "InvalidArgument"),
    ("POST", "/dbs/d/tables/t/chunks", {"chunkId": "1", "overlapFlag": "perhaps"}, "InvalidArgument"),
    ("DELETE", "/dbs/d/tables/t?dropChunks=2", None, "InvalidArgument"),
    ("POST", "/xrootd/dbs", {}, "MissingArgument"),
])
async def test_bad_input_is_refused_before_the_domain(api: Any, method: str, path: str, data: Any,
                                                      exception: str) -> None:
    fake, client = api
    code, body = await answer(client, method, path, data=data)
    assert (code, body["exception"]) == (400, exception)
    assert fake.calls == []


@pytest_twisted.ensureDeferred
async def test_flags_and_defaults_reach_the_domain(api: Any) -> None:
    fake, client = api
    await answer(client, "DELETE", "/dbs/d/tables/t?dropChunks=YES")
    await answer(client, "POST", "/dbs/d/tables/t/chunks", data={"chunkId": "12"})
    await answer(client, "POST", "/xrootd/dbs", data={"db": "d"})
    await answer(client, "DELETE", "/xrootd/dbs/d?xrootdRestart=false")
    await answer(client, "GET", "/dbs/d/tables/t/chunks/3/index?columns=a,%20b,c")
    assert fake.calls == [("drop_table", "d", "t", True), ("create_chunk", "d", "t", 12, True),
                          ("xrootd_register", "d", True), ("xrootd_unregister", "d", False),
                          ("index", "d", "t", ["a", "b", "c"], 3)]


def test_a_streamed_index_follows_its_reader() -> None:
    """Paused by the transport, the pool thread would wait before the next batch; stopped (the
    client went away), it ends the select instead of reading rows nobody will get."""
    from twisted.internet.error import ConnectionDone
    from twisted.web.test.requesthelper import DummyRequest

    from wmgr.api.qserv_dbs import StreamedIndex

    stream = StreamedIndex(DummyRequest([b""]), reactor=None)
    stream.pauseProducing()
    assert not stream._go.is_set()
    stream.resumeProducing()
    assert stream._go.is_set()
    stream.stopProducing()
    with pytest.raises(ConnectionDone):
        stream.rows([[1, 2, 3]])
