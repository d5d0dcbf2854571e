"""The Qserv worker manager's databases (/dbs) and xrootd inventory (/xrootd), in the original's
shapes (wmgr.api.qserv) over the databases domain (wmgr.dbs.Databases).

Table uploads are multipart bodies of any size. twisted.web spools a large body to a temporary
file, and the daemon's site parses no form bodies (wmgr.api.channel), so the upload's handler
hands the spooled file to the domain, which reads it part by part on a thread.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Optional

from klein import Klein
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from zope.interface import implementer

from wmgr.api.openapi import path_param, query_param, reply
from wmgr.api.qserv import (QSERV_ERROR_REPLY, QSERV_SECURITY, ConflictingArgument, CSSDisabled, InvalidArgument,
                             answer, database_name, error_body, flag, form_fields,
                             install_qserv_error_handlers, query_params, required, result, results, table_name)
from wmgr.dbs import Databases
from wmgr.dbs.errors import DatabaseFailure, NotRegistered
from wmgr.dbs.names import parse_chunk_id
from wmgr.dbs.service import IndexSink

log = Logger()

DEFAULT_INDEX_COLUMNS = "objectId,chunkId,subChunkId"


@implementer(IPushProducer)
class StreamedIndex(IndexSink):
    """The index answer, `{"result":{"description":[...],"rows":[...]}}` as answer() would encode
    it, written batch by batch as the databases pool reads the rows. It is the response's
    producer: while the client is slow to read, the pool thread waits instead of the rows piling
    up in the daemon."""

    def __init__(self, request: Any, reactor: Any) -> None:
        super().__init__()
        self.request, self.reactor = request, reactor
        self.started = False
        self._written_rows = False
        self._go, self._stopped = threading.Event(), False
        self._go.set()
        request.notifyFinish().addErrback(lambda _: self.stopProducing())

    # IPushProducer, called on the reactor thread by the transport.
    def pauseProducing(self) -> None:
        self._go.clear()

    def resumeProducing(self) -> None:
        self._go.set()

    def stopProducing(self) -> None:
        self._stopped = True
        self._go.set()

    # IndexSink, called on a pool thread.
    def start(self, description: list[dict]) -> None:
        head = b'{"result":{"description":' + _json(description) + b',"rows":['
        blockingCallFromThread(self.reactor, self._begin, head)

    def rows(self, rows: list[list]) -> None:
        self._go.wait()
        if self._stopped:
            raise ConnectionDone("the client went away: the index is not read any further")
        data = (b"," if self._written_rows else b"") + _json(rows)[1:-1]
        self._written_rows = True
        blockingCallFromThread(self.reactor, self.request.write, data)

    # The reactor thread again.
    def _begin(self, head: bytes) -> None:
        self.request.setResponseCode(200)
        self.request.setHeader(b"Content-Type", b"application/json")
        self.request.registerProducer(self, True)
        self.started = True
        self.request.write(head)

    def end(self) -> bytes:
        if not self.started:  # the domain answered without selecting anything
            return answer(self.request, {"result": {"description": self.description, "rows": []}})
        self.request.unregisterProducer()
        return b"]}}"

    def abort(self) -> None:
        self.request.unregisterProducer()
        if self.request.transport is not None:
            self.request.transport.abortConnection()  # a cut answer, never a wrong one


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def db_uri(db: str) -> str:
    return f"/dbs/{db}"


def table_uri(db: str, table: str) -> str:
    return f"/dbs/{db}/tables/{table}"


def chunk_answer(db: str, table: str, chunk: dict) -> dict:
    return dict(chunk, uri=f"{table_uri(db, table)}/chunks/{chunk['chunkId']}")


def xrootd_uri(db: str) -> str:
    return f"/xrootd/dbs/{db}"


class QservDbsAPI:
    app = Klein()

    # Before the shared handlers (Klein tries them in order): the two domain errors whose Qserv
    # answer is not "class name, status of its kind".
    @app.handle_errors(DatabaseFailure)
    def database_failure(self, request: Any, failure: Any) -> bytes:
        # Under /dbs the original named a database error after its class; under /xrootd it said
        # DbException whatever the class.
        name = "DbException" if request.path.startswith(b"/xrootd/") else failure.value.exception
        return answer(request, error_body(name, failure.value.reason), 500)

    @app.handle_errors(NotRegistered)
    def not_registered(self, request: Any, failure: Any) -> bytes:
        return answer(request, error_body("DatabaseMissing", failure.value.reason), 409)

    install_qserv_error_handlers(app)

    def __init__(self, databases: Databases) -> None:
        self.dbs = databases

    def resource(self) -> Any:
        return self.app.resource()

    # -- databases ----------------------------------------------------------------------------

    @app.route("/dbs", methods=["GET"], strict_slashes=False)
    async def list_databases(self, request: Any) -> bytes:
        return results(request, ({"name": db, "uri": db_uri(db)} for db in await self.dbs.databases()))

    @app.route("/dbs", methods=["POST"], strict_slashes=False)
    async def create_database(self, request: Any) -> bytes:
        db = database_name(required(form_fields(request), "db"))
        await self.dbs.create_database(db)
        return result(request, {"name": db, "uri": db_uri(db)}, 201)

    @app.route("/dbs/<db>", methods=["DELETE"], strict_slashes=False)
    async def drop_database(self, request: Any, db: str) -> bytes:
        await self.dbs.drop_database(database_name(db))
        return result(request, {"name": db, "uri": db_uri(db)})

    # -- tables -------------------------------------------------------------------------------

    @app.route("/dbs/<db>/tables", methods=["GET"], strict_slashes=False)
    async def list_tables(self, request: Any, db: str) -> bytes:
        tables = await self.dbs.tables(database_name(db))
        return results(request, ({"name": t, "uri": table_uri(db, t)} for t in tables))

    @app.route("/dbs/<db>/tables", methods=["POST"], strict_slashes=False)
    async def create_table(self, request: Any, db: str) -> bytes:
        database_name(db)
        fields = form_fields(request)
        source = fields.get("schemaSource", "request").lower()
        if source not in ("request", "css"):
            raise InvalidArgument(f"Unexpected value of 'schemaSource' option: {fields['schemaSource']}")
        table = table_name(required(fields, "table"))
        chunk_columns = flag(fields, "chunkColumns", False)
        if source == "css":
            if fields.get("schema"):
                raise ConflictingArgument("schema cannot be given with schemaSource=css")
            raise CSSDisabled("schemaSource=css: this worker manager has no CSS; send the schema")
        schema = required(fields, "schema")
        await self.dbs.create_table(db, table, schema, chunk_columns)
        return result(request, {"name": table, "uri": table_uri(db, table)}, 201)

    @app.route("/dbs/<db>/tables/<table>", methods=["DELETE"], strict_slashes=False)
    async def drop_table(self, request: Any, db: str, table: str) -> bytes:
        drop_chunks = flag(query_params(request), "dropChunks", False)
        await self.dbs.drop_table(database_name(db), table_name(table), drop_chunks)
        return result(request, {"name": table, "uri": table_uri(db, table)})

    @app.route("/dbs/<db>/tables/<table>/schema", methods=["GET"], strict_slashes=False)
    async def table_schema(self, request: Any, db: str, table: str) -> bytes:
        return result(request, await self.dbs.schema(database_name(db), table_name(table)))

    @app.route("/dbs/<db>/tables/<table>/columns", methods=["GET"], strict_slashes=False)
    async def table_columns(self, request: Any, db: str, table: str) -> bytes:
        return results(request, await self.dbs.columns(database_name(db), table_name(table)))

    # -- chunks -------------------------------------------------------------------------------

    @app.route("/dbs/<db>/tables/<table>/chunks", methods=["GET"], strict_slashes=False)
    async def list_chunks(self, request: Any, db: str, table: str) -> bytes:
        chunks = await self.dbs.chunks(database_name(db), table_name(table))
        return results(request, (chunk_answer(db, table, c) for c in chunks))

    @app.route("/dbs/<db>/tables/<table>/chunks", methods=["POST"], strict_slashes=False)
    async def create_chunk(self, request: Any, db: str, table: str) -> bytes:
        database_name(db), table_name(table)
        fields = form_fields(request)
        chunk_id = parse_chunk_id(required(fields, "chunkId"))
        overlap = flag(fields, "overlapFlag", True)
        chunk = await self.dbs.create_chunk(db, table, chunk_id, overlap)
        return result(request, chunk_answer(db, table, chunk), 201)

    @app.route("/dbs/<db>/tables/<table>/chunks/<int:chunk_id>", methods=["DELETE"], strict_slashes=False)
    async def delete_chunk(self, request: Any, db: str, table: str, chunk_id: int) -> bytes:
        chunk = await self.dbs.delete_chunk(database_name(db), table_name(table), chunk_id)
        return result(request, chunk_answer(db, table, chunk))

    # -- data ---------------------------------------------------------------------------------

    @app.route("/dbs/<db>/tables/<table>/data", methods=["POST"], strict_slashes=False)
    async def load_table(self, request: Any, db: str, table: str) -> bytes:
        return await self._load(request, db, table)

    @app.route("/dbs/<db>/tables/<table>/chunks/<int:chunk_id>/data", methods=["POST"], strict_slashes=False)
    async def load_chunk(self, request: Any, db: str, table: str, chunk_id: int) -> bytes:
        return await self._load(request, db, table, chunk_id)

    @app.route("/dbs/<db>/tables/<table>/chunks/<int:chunk_id>/overlap", methods=["POST"], strict_slashes=False)
    async def load_overlap(self, request: Any, db: str, table: str, chunk_id: int) -> bytes:
        return await self._load(request, db, table, chunk_id, overlap=True)

    async def _load(self, request: Any, db: str, table: str, chunk_id: Optional[int] = None,
                    overlap: bool = False) -> bytes:
        database_name(db), table_name(table)
        count = await self.dbs.load(db, table, request.content, request.getHeader(b"content-type"),
                                    chunk_id, overlap)
        return result(request, {"status": "OK", "count": count})

    @app.route("/dbs/<db>/tables/<table>/index", methods=["GET"], strict_slashes=False)
    async def table_index(self, request: Any, db: str, table: str) -> bytes:
        return await self._index(request, db, table)

    @app.route("/dbs/<db>/tables/<table>/chunks/<int:chunk_id>/index", methods=["GET"], strict_slashes=False)
    async def chunk_index(self, request: Any, db: str, table: str, chunk_id: int) -> bytes:
        return await self._index(request, db, table, chunk_id)

    async def _index(self, request: Any, db: str, table: str, chunk_id: Optional[int] = None) -> bytes:
        """The index is streamed: an index of every row of every chunk table can be larger than
        the daemon should hold (the original built it whole in memory)."""
        text = query_params(request).get("columns") or DEFAULT_INDEX_COLUMNS
        columns = [c.strip() for c in text.split(",")]
        stream = StreamedIndex(request, self.dbs.reactor)
        try:
            await self.dbs.index(database_name(db), table_name(table), columns, chunk_id, sink=stream)
        except Exception:
            if not stream.started:
                raise  # nothing sent yet: answered as any error is
            stream.abort()
            log.failure("the index of {db}.{table} failed after its answer began", db=db, table=table)
            return b""
        return stream.end()

    @app.route("/dbs/<db>/chunks/cache", methods=["PUT"], strict_slashes=False)
    async def reset_chunks_cache(self, request: Any, db: str) -> bytes:
        await self.dbs.flush_chunks_cache(database_name(db))
        return result(request, {"status": "OK"})

    # -- xrootd -------------------------------------------------------------------------------

    @app.route("/xrootd/dbs", methods=["GET"], strict_slashes=False)
    async def xrootd_dbs(self, request: Any) -> bytes:
        return results(request, ({"name": db, "uri": xrootd_uri(db)} for db in await self.dbs.xrootd_dbs()))

    @app.route("/xrootd/dbs", methods=["POST"], strict_slashes=False)
    async def xrootd_register(self, request: Any) -> bytes:
        fields = form_fields(request)
        db = database_name(required(fields, "db"))
        await self.dbs.xrootd_register(db, flag(fields, "xrootdRestart", True))
        return result(request, {"name": db, "uri": xrootd_uri(db)}, 201)

    @app.route("/xrootd/dbs/<db>", methods=["DELETE"], strict_slashes=False)
    async def xrootd_unregister(self, request: Any, db: str) -> bytes:
        restart = flag(query_params(request), "xrootdRestart", True)
        await self.dbs.xrootd_unregister(database_name(db), restart)
        return result(request, {"name": db, "uri": xrootd_uri(db)})

    @app.route("/xrootd/dbs/<db>", methods=["GET"], strict_slashes=False)
    async def xrootd_chunks(self, request: Any, db: str) -> bytes:
        chunks = await self.dbs.xrootd_chunks(database_name(db))
        return results(request, ({"chunkId": c} for c in chunks))



# -- OpenAPI ------------------------------------------------------------------------------------

_DB, _TABLE = path_param("db", "a database name"), path_param("table", "a table name")
_CHUNK = {"name": "chunk_id", "in": "path", "required": True, "description": "a chunk id (>= 0)",
          "schema": {"type": "integer", "minimum": 0}}
_NAMED = {"type": "object", "properties": {"name": {"type": "string"}, "uri": {"type": "string"}}}
_CHUNK_ITEM = {"type": "object", "properties": {
    "chunkId": {"type": "integer"}, "chunkTable": {"type": "boolean"}, "overlapTable": {"type": "boolean"},
    "uri": {"type": "string"}}}
_LOADED = {"type": "object", "properties": {"status": {"type": "string"}, "count": {"type": "integer"}}}
_INDEX = {"type": "object", "properties": {
    "rows": {"type": "array", "items": {"type": "array", "items": {}}},
    "description": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "type": {"type": "string"}}}}}}
_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["table-data"], "properties": {
        "table-data": {"type": "string", "format": "binary",
                       "description": "the rows, as LOAD DATA reads them; gzip if the file name ends .gz"},
        "load-options": {"type": "string", "description": "urlencoded delimiter, enclose, escape, terminate, "
                                                          "compressed"}}}}}}


def _form(required_fields: list[str], **properties: Any) -> dict:
    schema = {"type": "object", "required": required_fields,
              "properties": {k: {"type": "string", "description": v} for k, v in properties.items()}}
    return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema},
                                          "multipart/form-data": {"schema": schema}}}


def _op(summary: str, ok: str, body: Any, codes: tuple, parameters: tuple = (), request: Any = None,
        status: str = "200") -> dict:
    operation: dict = {"summary": summary, "security": QSERV_SECURITY, "parameters": list(parameters),
                       "responses": {status: reply(ok, {"type": "object", "properties": body}),
                                     **{str(c): QSERV_ERROR_REPLY for c in (401,) + codes}}}
    if request is not None:
        operation["requestBody"] = request
    return operation


def _many(item: Any) -> dict:
    return {"results": {"type": "array", "items": item}}


def _one(item: Any) -> dict:
    return {"result": item}


_INDEX_QUERY = query_param("columns", f"exactly three columns of the table (default {DEFAULT_INDEX_COLUMNS})")
_RESTART = query_param("xrootdRestart", "restart xrootd if it runs (0/1/yes/no/true/false; default true)")

QSERV_DBS_PATHS: dict[str, Any] = {
    "/dbs": {
        "get": _op("the databases (system ones left out)", "databases", _many(_NAMED), (500,)),
        "post": _op("create a database", "the database", _one(_NAMED), (400, 409, 500),
                    request=_form(["db"], db="the database name"), status="201"),
    },
    "/dbs/{db}": {"delete": _op("drop a database", "the database", _one(_NAMED), (400, 404, 500), (_DB,))},
    "/dbs/{db}/tables": {
        "get": _op("the tables and views of a database, chunk tables too", "tables", _many(_NAMED),
                   (400, 404, 500), (_DB,)),
        "post": _op("create a table from a MySQL CREATE TABLE statement (mapped onto SQLite there)", "the table",
                    _one(_NAMED), (400, 404, 409, 500), (_DB,), status="201", request=_form(
                        ["table", "schema"], table="the table name (the statement must create it)",
                        schema="CREATE TABLE ...", schemaSource="request (css: 409 CSSDisabled)",
                        chunkColumns="add chunkId and subChunkId INT NOT NULL (drop _chunkId, _subChunkId)")),
    },
    "/dbs/{db}/tables/{table}": {"delete": _op(
        "drop a table (with dropChunks, its chunk and overlap tables first)", "the table", _one(_NAMED),
        (400, 404, 500), (_DB, _TABLE, query_param("dropChunks", "also drop <table>_N and <table>FullOverlap_N "
                                                                 "(default false)")))},
    "/dbs/{db}/tables/{table}/schema": {"get": _op("the table's CREATE TABLE statement", "the statement",
                                                   _one({"type": "string"}), (400, 404, 500), (_DB, _TABLE))},
    "/dbs/{db}/tables/{table}/columns": {"get": _op(
        "the table's columns as SHOW COLUMNS gives them", "columns", _many({"type": "object", "properties": {
            k: {"type": "string", "nullable": k == "default"} for k in ("name", "type", "null", "key", "default")}}),
        (400, 404, 500), (_DB, _TABLE))},
    "/dbs/{db}/tables/{table}/chunks": {
        "get": _op("the table's chunks", "chunks", _many(_CHUNK_ITEM), (400, 404, 500), (_DB, _TABLE)),
        "post": _op("create chunk table <table>_N (and overlap table <table>FullOverlap_N, unique keys made "
                    "non-unique) and register the chunk", "the chunk", _one(_CHUNK_ITEM), (400, 404, 409, 500),
                    (_DB, _TABLE), status="201", request=_form(["chunkId"], chunkId="the chunk id (>= 0)",
                                                               overlapFlag="also the overlap table (default true)")),
    },
    "/dbs/{db}/tables/{table}/chunks/{chunk_id}": {"delete": _op(
        "drop a chunk's chunk and overlap tables", "the chunk", _one(_CHUNK_ITEM), (400, 404, 500),
        (_DB, _TABLE, _CHUNK))},
    "/dbs/{db}/tables/{table}/data": {"post": _op(
        "load rows into the table (streamed)", "rows loaded", _one(_LOADED), (400, 404, 500), (_DB, _TABLE),
        request=_UPLOAD_BODY)},
    "/dbs/{db}/tables/{table}/chunks/{chunk_id}/data": {"post": _op(
        "load rows into a chunk table (streamed)", "rows loaded", _one(_LOADED), (400, 404, 500),
        (_DB, _TABLE, _CHUNK), request=_UPLOAD_BODY)},
    "/dbs/{db}/tables/{table}/chunks/{chunk_id}/overlap": {"post": _op(
        "load rows into a chunk's overlap table (streamed)", "rows loaded", _one(_LOADED), (400, 404, 500),
        (_DB, _TABLE, _CHUNK), request=_UPLOAD_BODY)},
    "/dbs/{db}/tables/{table}/index": {"get": _op(
        "three columns of every row of every chunk table", "the index", _one(_INDEX), (400, 404, 500),
        (_DB, _TABLE, _INDEX_QUERY))},
    "/dbs/{db}/tables/{table}/chunks/{chunk_id}/index": {"get": _op(
        "three columns of every row of one chunk table", "the index", _one(_INDEX), (400, 404, 500),
        (_DB, _TABLE, _CHUNK, _INDEX_QUERY))},
    "/dbs/{db}/chunks/cache": {"put": _op(
        "reset the czar's chunk cache of a database (through [dbs] proxy_url)", "done",
        _one({"type": "object", "properties": {"status": {"type": "string"}}}), (400, 500), (_DB,))},
    "/xrootd/dbs": {
        "get": _op("databases registered with xrootd", "databases", _many(_NAMED), (500,)),
        "post": _op("register a database with xrootd", "the database", _one(_NAMED), (400, 409, 500),
                    status="201", request=_form(["db"], db="the database name",
                                                xrootdRestart="restart xrootd if it runs (default true)")),
    },
    "/xrootd/dbs/{db}": {
        "get": _op("the chunks registered for a database", "chunks", _many(
            {"type": "object", "properties": {"chunkId": {"type": "integer"}}}), (400, 404, 500), (_DB,)),
        "delete": _op("unregister a database from xrootd (409 DatabaseMissing if it is not registered)",
                      "the database", _one(_NAMED), (400, 409, 500), (_DB, _RESTART)),
    },
}
