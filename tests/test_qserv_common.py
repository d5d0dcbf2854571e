"""What every Qserv route shares (wmgr.api.qserv): the error envelope, answers, form fields and
query parameters, flags and names, through a small Klein app under StubTreq."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from treq.testing import StubTreq

from wmgr.api import qserv
from wmgr.errors import Conflict, InvalidRequest, NotFound

BASE = "http://wmgr.test"


class TableMissing(NotFound):
    """A domain error with a specific name, as wmgr.dbs may define."""


class Probe:
    app = Klein()
    qserv.install_qserv_error_handlers(app)

    @app.route("/probe/form", methods=["POST", "PUT"])
    def form(self, request: Any) -> bytes:
        return qserv.result(request, qserv.form_fields(request))

    @app.route("/probe/query", methods=["GET", "DELETE"])
    def query(self, request: Any) -> bytes:
        return qserv.result(request, qserv.query_params(request))

    @app.route("/probe/flag", methods=["GET"])
    def flag(self, request: Any) -> bytes:
        return qserv.result(request, qserv.flag(qserv.query_params(request), "dropChunks", False))

    @app.route("/probe/db/<name>", methods=["GET"])
    def db(self, request: Any, name: str) -> bytes:
        return qserv.result(request, {"name": qserv.database_name(name), "uri": f"/dbs/{name}"})

    @app.route("/probe/list", methods=["GET"])
    def listing(self, request: Any) -> bytes:
        return qserv.results(request, ({"uri": f"/x/{n}", "name": n} for n in ("b", "a")))

    @app.route("/probe/raise/<kind>", methods=["GET"])
    def fail(self, request: Any, kind: str) -> bytes:
        raise {
            "missing": qserv.MissingArgument("db parameter is not specified"),
            "command": qserv.CommandFailure("start failed", cause="exit status 3"),
            "xrootd": qserv.DatabaseMissing("not registered", code=409),
            "notimpl": qserv.NotImplemented_("no chunk listing"),
            "domain-named": TableMissing("Table t is missing"),
            "domain-invalid": InvalidRequest("bad"),
            "domain-conflict": Conflict("busy"),
            "bug": RuntimeError("oops"),
        }[kind]


def stub() -> StubTreq:
    return StubTreq(Probe().app.resource())


async def call(method: str, path: str, **kw: Any) -> tuple[int, bytes, Any]:
    client = stub()
    response = await client.request(method, BASE + path, **kw)
    body = await response.content()
    return response.code, body, response.headers


async def json_call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
    code, body, headers = await call(method, path, **kw)
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"application/json"), body
    return code, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_results_are_compact_with_sorted_keys():
    code, body, _ = await call("GET", "/probe/list")
    assert code == 200
    assert body == b'{"results":[{"name":"b","uri":"/x/b"},{"name":"a","uri":"/x/a"}]}'


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind, code, expected", [
    ("missing", 400, {"exception": "MissingArgument", "message": "db parameter is not specified"}),
    ("command", 409, {"exception": "CommandFailure", "message": "start failed", "cause": "exit status 3"}),
    ("xrootd", 409, {"exception": "DatabaseMissing", "message": "not registered"}),
    ("notimpl", 501, {"exception": "NotImplemented", "message": "no chunk listing"}),
    ("domain-named", 404, {"exception": "TableMissing", "message": "Table t is missing"}),
    ("domain-invalid", 400, {"exception": "InvalidArgument", "message": "bad"}),
    ("domain-conflict", 409, {"exception": "Conflict", "message": "busy"}),
    ("bug", 500, {"exception": "InternalError", "message": "internal error: see the daemon's log"}),
])
async def test_errors_are_the_qserv_envelope(kind, code, expected):
    assert await json_call("GET", f"/probe/raise/{kind}") == (code, expected)


@pytest_twisted.ensureDeferred
async def test_unknown_route_and_wrong_method_are_json_not_html():
    code, body = await json_call("GET", "/nowhere")
    assert code == 404 and body["exception"] == "NotFound"
    code, body = await json_call("GET", "/probe/form")
    assert code == 405 and body["exception"] == "MethodNotAllowed"
    assert set(body) == {"exception", "message"}


@pytest_twisted.ensureDeferred
async def test_urlencoded_form_on_post_and_put():
    for method in ("POST", "PUT"):
        code, body = await json_call(method, "/probe/form", data={"action": "start", "db": "a b"})
        assert (code, body) == (200, {"result": {"action": "start", "db": "a b"}})


@pytest_twisted.ensureDeferred
async def test_first_value_wins_and_blank_values_are_kept():
    code, body = await json_call("PUT", "/probe/form", data=b"a=1&a=2&b=",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert body == {"result": {"a": "1", "b": ""}}


@pytest_twisted.ensureDeferred
async def test_multipart_form_fields_without_the_file_parts():
    boundary = "part-X-of-the-multipart-request"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"action\"\r\n\r\nstop\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"table-data\"; filename=\"t.data\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n1\t2\n\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n\u00e9t\u00e9\r\n"
            f"--{boundary}--\r\n").encode("utf-8")
    for method in ("POST", "PUT"):
        code, answer = await json_call(method, "/probe/form", data=body,
                                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert (code, answer) == (200, {"result": {"action": "stop", "note": "\u00e9t\u00e9"}})


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("data, content_type", [
    (b"db=%ff", "application/x-www-form-urlencoded"),
    (b"db=\xe9", "application/x-www-form-urlencoded"),
    (b'{"db": "x"}', "application/json"),
    (b"--b\r\nContent-Disposition: form-data; name=\"db\"\r\n\r\n\xff\r\n--b--\r\n", "multipart/form-data; boundary=b"),
])
async def test_bad_form_encoding_is_400(data, content_type):
    code, body = await json_call("PUT", "/probe/form", data=data, headers={"Content-Type": content_type})
    assert code == 400 and body["exception"] == "InvalidArgument", body


@pytest_twisted.ensureDeferred
async def test_oversized_form_is_400():
    code, body = await json_call("PUT", "/probe/form", data=b"a=" + b"x" * (qserv.FORM_LIMIT + 1),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 400 and "larger than" in body["message"]


@pytest_twisted.ensureDeferred
async def test_query_params_only_from_the_url():
    code, body = await json_call("DELETE", "/probe/query?dropChunks=1&x=%C3%A9")
    assert body == {"result": {"dropChunks": "1", "x": "\u00e9"}}
    code, body = await json_call("GET", "/probe/query?x=%ff")
    assert code == 400 and body["exception"] == "InvalidArgument"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("value, expected", [
    ("1", True), ("yes", True), ("TRUE", True), (" true ", True), ("0", False), ("No", False), ("false", False),
])
async def test_flags_accept_the_originals_values(value, expected):
    assert await json_call("GET", f"/probe/flag?dropChunks={value}") == (200, {"result": expected})


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("value", ["2", "on", "", "None", "y"])
async def test_other_flag_values_are_400_with_the_originals_message(value):
    code, body = await json_call("GET", f"/probe/flag?dropChunks={value}")
    assert (code, body) == (400, {"exception": "InvalidArgument",
                                  "message": f"Unexpected value of 'dropChunks' option: {value}"})


def test_flag_default_when_absent():
    assert qserv.flag({}, "overlapFlag", True) is True
    assert qserv.flag({}, "overlapFlag", False) is False


@pytest.mark.parametrize("name", ["a", "_", "A_1", "qservTest_case01_qserv", "_9"])
def test_valid_names(name):
    assert qserv.valid_name(name)
    assert qserv.database_name(name) == name


@pytest.mark.parametrize("name", ["", "1a", "a-b", "a b", "a\n", "\u00e9", "a;drop", "`a`", "a.b"])
def test_invalid_names(name):
    assert not qserv.valid_name(name)
    with pytest.raises(qserv.InvalidArgument, match="Database name is invalid"):
        qserv.database_name(name)
    with pytest.raises(qserv.InvalidArgument, match="Table name is invalid"):
        qserv.table_name(name)


@pytest_twisted.ensureDeferred
async def test_invalid_name_in_a_path_is_400():
    code, body = await json_call("GET", "/probe/db/a-b")
    assert (code, body) == (400, {"exception": "InvalidArgument", "message": "Database name is invalid: 'a-b'"})


def test_required():
    assert qserv.required({"db": "x"}, "db") == "x"
    for fields in ({}, {"db": ""}):
        with pytest.raises(qserv.MissingArgument):
            qserv.required(fields, "db")


def test_error_codes_follow_the_original():
    assert qserv.InvalidService("x").code == 404
    assert qserv.DatabaseExists("x").code == 409
    assert qserv.GrantFailed("x").code == 500
    assert qserv.DatabaseMissing("x").code == 404
    assert qserv.DatabaseMissing("x", code=409).code == 409
