"""The pman API in memory: payload parsing, the job tree, pman's actions and reply envelope.

The job queue is a fake and "threads" run inline, so everything completes synchronously under
StubTreq (see tests/test_api.py for why).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from treq.testing import StubTreq
from twisted.python.failure import Failure

from wmgr import pman as domain
from wmgr.api.openapi import ROOT_PATHS, document
from wmgr.api.pman import PMAN_PATHS, PmanAPI, envelope, parse_payload
from wmgr.api.root import Root, RootApp
from wmgr.errors import InvalidRequest
from wmgr.jobs import model
from wmgr.jobs.model import Job
from wmgr.pman import Pman, PmanJob

TOKEN = "pman-Test_token"
BASE = "http://wmgr.test"
SEED_PAYLOAD = {"exec": {"cmd": "cal 7 1970"}, "action": "run",
                "meta": {"jid": "123-456-1", "auid": "rudolphpienaar"}}


# -- fakes and helpers ---------------------------------------------------------------------------------


class FakeQueue:
    """Enough of JobQueue for pman: jobs in a dict, select by rep group, kill marks them."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.seq = 0
        self.killed: list[str] = []

    async def add(self, specs: list, rerun: bool = False) -> list:
        out = []
        for spec in specs:
            spec = model.normalise(dict(spec))
            key = model.job_key(spec)
            if key not in self.jobs:
                self.seq += 1
                self.jobs[key] = Job(key, spec, model.READY, self.seq)
            out.append(self.jobs[key])
        return out

    async def select(self, ids: list, state: Optional[str] = None, search: bool = False) -> list:
        # Newest first, so that the tests see pman order by seq, not by what the queue returns.
        return sorted((job for job in self.jobs.values() if job.rep_grp in ids or job.key in ids),
                      key=lambda job: -job.seq)

    async def forget(self, jobs: list) -> list:
        gone = [job for job in jobs if job.state not in model.ACTIVE_STATES]
        for job in gone:
            del self.jobs[job.key]
        return gone

    async def kill(self, jobs: list) -> list:
        affected = [job for job in jobs if job.state == model.RUNNING]
        for job in affected:
            self.killed.append(job.key)
            finish(job, model.BURIED, None)
            job.fail_reason = model.FAIL_KILLED
        return affected


async def inline(function: Any, *args: Any) -> Any:
    return function(*args)


HOST = {"system": "Linux", "machine": "x86_64", "platform": "p", "uname": ["Linux", "h", "r", "v", "x86_64", ""],
        "version": "v"}


async def fixed_host() -> dict:
    return HOST


def make_pman(queue: Optional[FakeQueue] = None, allow_quit: bool = False) -> Pman:
    pman = Pman(queue or FakeQueue(), allow_quit=allow_quit, run_in_thread=inline)
    pman.host = fixed_host  # type: ignore[method-assign]
    return pman


def start(job: Job, pid: int = 4242) -> None:
    job.state, job.started, job.pid = model.RUNNING, 1_700_000_000.5, pid


def finish(job: Job, state: str, exitcode: Optional[int], stdout: str = "", stderr: str = "") -> None:
    job.state = state
    job.ended = (job.started or 1_700_000_000.0) + 2
    job.exited = exitcode is not None
    job.exitcode = exitcode if exitcode is not None else -1
    job.stdout, job.stderr = stdout, stderr


def result_of(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "did not complete synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def run(coroutine: Any) -> Any:
    from twisted.internet.defer import ensureDeferred

    return result_of(ensureDeferred(coroutine))


def make_stub(pman: Pman) -> StubTreq:
    api = PmanAPI(None, reactor=None, pman=pman)
    fallback = RootApp(document([PMAN_PATHS, ROOT_PATHS])).app.resource()
    return StubTreq(Root(TOKEN, [(("api",), api.resource())], fallback))


class Answer:
    def __init__(self, response: Any) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = result_of(response.content())

    def json(self) -> Any:
        content_type = (self.headers.getRawHeaders(b"content-type") or [b""])[0]
        assert content_type.startswith(b"application/json"), (content_type, self.body[:200])
        return json.loads(self.body)


def call(stub: StubTreq, method: str, path: str, body: Any = None, auth: str = f"bearer {TOKEN}",
         content_type: Optional[str] = None) -> Answer:
    headers = {b"Authorization": [auth.encode()]}
    if content_type:
        headers[b"Content-Type"] = [content_type.encode()]
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    d = stub.request(method, BASE + path, headers=headers, data=body)
    stub.flush()
    return Answer(result_of(d))


# -- payload parsing --------------------------------------------------------------------------------


def test_payload_wrapped_as_pfurl_and_httpie_send_it() -> None:
    payload, problem = parse_payload(json.dumps({"payload": {"action": "hello", "meta": {"askAbout": "timestamp"}}}))
    assert problem == "" and payload == {"action": "hello", "meta": {"askAbout": "timestamp"}}


def test_payload_in_the_seeds_shape_keeps_exec() -> None:
    payload, problem = parse_payload(json.dumps({"payload": SEED_PAYLOAD}))
    assert problem == ""
    assert payload["action"] == "run" and payload["exec"] == {"cmd": "cal 7 1970"}
    assert payload["meta"] == {"jid": "123-456-1", "auid": "rudolphpienaar"}


def test_payload_unwrapped_or_as_a_json_string_is_accepted() -> None:
    assert parse_payload(json.dumps(SEED_PAYLOAD))[0]["action"] == "run"
    assert parse_payload(json.dumps({"payload": json.dumps(SEED_PAYLOAD)}))[0]["action"] == "run"
    payload, problem = parse_payload('{"payload": {"action": "hello"}}')
    assert problem == "" and payload["meta"] == {}


@pytest.mark.parametrize("body", ['[1, 2]', '"text"', '{"nothing": 1}', '{"payload": 3}',
                                  '{"payload": {"meta": {}}}', '{"payload": {"action": ""}}',
                                  '{"payload": {"action": "run", "meta": [1]}}', '{"payload": "not json"}'])
def test_payload_of_the_wrong_shape_is_a_problem_not_an_error(body: str) -> None:
    payload, problem = parse_payload(body)
    assert payload is None and problem


@pytest.mark.parametrize("body", ["", "not json", '{"payload": ', "{'single': 'quotes'}"])
def test_text_that_is_not_json_is_invalid(body: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_payload(body)


# -- jobs and their identity ------------------------------------------------------------------------


def pman_spec(cmd: str, rep_grp: str, identity: Any) -> dict:
    spec = model.normalise(model.parse_spec({"cmd": cmd, "rep_grp": rep_grp}, {}))
    if identity is not None:
        spec["labels"] = {"pman": identity}
        spec["unique"] = identity.get("root", "") if isinstance(identity, dict) else ""
    return spec


@pytest.mark.parametrize("cmd", ["cal 7 1970", "echo 'a\nb'; exit 3", 'printf "%s" "\u00e9\u2028"'])
def test_identity_is_kept_in_labels_and_the_command_is_the_clients(cmd: str) -> None:
    identity = {"root": "20240101000000.000001_u", "meta": {"jid": "j\n1", "auid": "a\u2028"}}
    spec = pman_spec(cmd, "pman", identity)
    pj = PmanJob.from_job(Job(model.job_key(spec), spec, model.READY, 1))
    assert pj is not None and pj.cmd == cmd and pj.root == identity["root"]
    assert pj.jid == "j\n1" and pj.auid == "a\u2028"


def test_the_same_command_run_twice_gets_two_keys() -> None:
    one = pman_spec("true", "pman", {"root": "r1", "meta": {}})
    two = pman_spec("true", "pman", {"root": "r2", "meta": {}})
    assert model.job_key(one) != model.job_key(two)
    # ...while a wr job of that command keeps wr's key.
    assert model.job_key(pman_spec("true", "pman", None)) == model.job_key({"cmd": "true"})


def test_jobs_without_the_identity_or_outside_the_rep_group_are_not_pman_jobs() -> None:
    for spec in (pman_spec("true", "pman", None), pman_spec("true", "pman", {"no": "root"}),
                 pman_spec("true", "other", {"root": "r", "meta": {}})):
        assert PmanJob.from_job(Job(model.job_key(spec), spec, model.READY, 1)) is None


def test_run_adds_a_pman_job_to_the_queue_and_every_run_is_a_new_job() -> None:
    queue = FakeQueue()
    pman = make_pman(queue)
    first = run(pman.run("sleep 1", {"jid": 7, "auid": "me", "threaded": True}))
    second = run(pman.run("sleep 1", {"jid": 7, "auid": "me"}))
    assert first.job.key != second.job.key and len(queue.jobs) == 2
    assert first.jid == "7" and first.auid == "me" and first.cmd == "sleep 1"
    spec = first.job.spec
    assert spec["rep_grp"] == "pman" and spec["cmd"] == "sleep 1"  # the client's command, as it is
    assert spec["labels"]["pman"]["root"] == first.root and spec["unique"] == first.root
    assert spec["time"] == 0 and spec["override"] == 2  # no time limit, as pman had none
    assert spec["req_grp"] == "sleep"
    assert first.meta["threaded"] is True
    assert len(first.root) == len("20240101000000.000001_") + 36


def test_jobs_are_in_seq_order_and_index_from_zero() -> None:
    pman = make_pman()
    roots = [run(pman.run(f"echo {i}", {"jid": f"j{i}"})).root for i in range(3)]
    assert [pj.root for pj in run(pman.jobs())] == roots
    assert run(pman.get([]))[1] == {root: {} for root in roots}
    for alias, index in [("_0", 0), ("_1", 1), ("_01", 1), ("_002", 2), ("_-1", 2)]:
        found, value = run(pman.get([alias, "jid"]))
        assert found and value == {roots[index]: {"jid": f"j{index}"}}, alias
    assert run(pman.get(["_3", "jid"])) == (False, False)
    assert run(pman.get(["_x"])) == (False, False)


@pytest.mark.parametrize("state, word", [(model.READY, "notstarted"), (model.DEPENDENT, "notstarted"),
                                         (model.RUNNING, "started"), (model.RESERVED, "started"),
                                         (model.DELAYED, "started"), (model.COMPLETE, "finishedSuccessfully"),
                                         (model.BURIED, "finishedWithError"), (model.LOST, "undefined")])
def test_status_words(state: str, word: str) -> None:
    job = Job("0" * 32, {"memory": 1, "time": 0, "rep_grp": "pman", "cmd": "x"}, state, 1)
    assert domain.status_word(job) == word


# -- the job tree -----------------------------------------------------------------------------------


def test_tree_before_the_job_starts() -> None:
    pman = make_pman()
    pj = run(pman.run("true", {"jid": "a"}))
    tree = domain.job_tree(pj, HOST)
    assert tree["cmd"] == "true" and tree["jid"] == "a" and "auid" not in tree
    assert json.loads(tree["d_meta"]) == {"jid": "a", "auid": "", "cmd": "true"}
    assert tree["jobCount"] == 0 and tree["start"] == {} and tree["end"] == {}
    assert "startInfo" not in tree and "endInfo" not in tree
    assert tree["status"] == "notstarted" and tree["key"] == pj.job.key


def test_tree_while_running_and_after_the_end() -> None:
    pman = make_pman()
    pj = run(pman.run("echo a; exit 3", {"jid": "b", "auid": "u"}))
    start(pj.job)
    tree = domain.job_tree(pj, HOST)
    record = tree["startInfo"]["0"]
    assert record["pid"] == 4242 and record["started"] is True and record["done"] is False
    assert record["returncode"] is None and record["startstamp"] and record["endstamp"] == ""
    assert record["system"] == "Linux" and record["uname"][0] == "Linux"
    assert "endInfo" not in tree and tree["end"] == {}

    finish(pj.job, model.BURIED, 3, stdout="a\n", stderr="")
    tree = domain.job_tree(pj, HOST)
    end = tree["end"]["0"]["endInfo"]["0"]
    # The whole command's exit status, not only the first `;` part's.
    assert end["returncode"] == 3 and end["done"] is True and end["stdout"] == "a\n" and end["pid"] == 4242
    assert end["endstamp"] > end["startstamp"]
    assert tree["endInfo"]["0"] == end and tree["endInfo"]["allJobsDone"] is True
    assert tree["startInfo"]["allJobsStarted"] is True
    assert tree["start"]["0"]["startInfo"]["0"]["done"] is False  # as seen at the start
    assert tree["start"]["1"]["startInfo"] == {"allJobsStarted": True}
    assert tree["end"]["1"]["endInfo"] == {"allJobsDone": True}
    assert tree["jobCount"] == 1 and tree["status"] == "finishedWithError"


def test_a_job_that_did_not_exit_by_itself_has_returncode_minus_one() -> None:
    pman = make_pman()
    pj = run(pman.run("sleep 9", {}))
    start(pj.job)
    finish(pj.job, model.BURIED, None)
    assert pj.returncode == -1


def test_path_gets_reach_single_leaves_and_echo_unknown_paths_with_false() -> None:
    pman = make_pman()
    pj = run(pman.run("echo hi", {"jid": "c"}))
    start(pj.job)
    finish(pj.job, model.COMPLETE, 0, stdout="hi\n")
    root = pj.root
    assert run(pman.get(["_0", "end", "0", "endInfo", "0", "returncode"])) == (
        True, {root: {"end": {"0": {"endInfo": {"0": {"returncode": 0}}}}}})
    assert run(pman.get([root, "endInfo", "0", "stdout"])) == (True, {root: {"endInfo": {"0": {"stdout": "hi\n"}}}})
    assert run(pman.get(["_0", "startInfo", "0", "pid"])) == (True, {root: {"startInfo": {"0": {"pid": 4242}}}})
    # Past a leaf, the path indexes into its JSON value (a list by position).
    assert run(pman.get(["_0", "endInfo", "0", "uname", "0"]))[1] == {root: {"endInfo": {"0": {"uname": {"0": "Linux"}}}}}
    assert run(pman.get(["_0", "nothing", "here"])) == (False, {root: {"nothing": {"here": False}}})
    assert run(pman.get(["_0", "jid", "deeper"])) == (False, {root: {"jid": {"deeper": False}}})
    assert run(pman.get(["no-such-root", "jid"])) == (False, {"no-such-root": {"jid": False}})


# -- actions ----------------------------------------------------------------------------------------


def test_unknown_action_fails_with_a_message() -> None:
    result = run(make_pman().perform("fly", {}))
    assert result.status is False and "fly" in result.message and "run" in result.message


def test_run_takes_the_command_from_meta_or_from_exec() -> None:
    queue = FakeQueue()
    pman = make_pman(queue)
    result = run(pman.perform("run", SEED_PAYLOAD["meta"], SEED_PAYLOAD))
    assert result.status is True and result.d_ret["jid"] == "123-456-1" and result.d_ret["status"] == "notstarted"
    assert result.extra == {"jobRootDir": result.d_ret["jobRoot"]}
    assert run(pman.perform("run", {"cmd": "true", "jid": "x", "auid": "y"})).status is True
    for meta, payload in [({}, {}), ({"cmd": ""}, {}), ({"cmd": 5}, {}), ({"cmd": "true", "jid": {"a": 1}}, {}),
                          ({}, {"exec": "cal"}), ({"cmd": "a\x00b"}, {})]:
        result = run(pman.perform("run", meta, payload))
        assert result.status is False and result.message, meta
    assert len(queue.jobs) == 2


def test_hello() -> None:
    pman = make_pman()
    stamp = run(pman.perform("hello", {"askAbout": "timestamp"}))
    assert stamp.status and len(stamp.d_ret["timestamp"]["now"]) == len("20240101000000.000000")
    assert stamp.d_ret["name"] == "wmgr"
    echo = run(pman.perform("hello", {"askAbout": "echoBack", "echoBack": "hi there"}))
    assert echo.status and echo.d_ret["echoBack"] == {"msg": "hi there"}
    info = run(pman.perform("hello", {"askAbout": "sysinfo"})).d_ret["sysinfo"]
    for name in ("system", "machine", "platform", "uname", "version", "memory", "cpucount", "loadavg",
                 "cpu_percent", "hostname", "inet"):
        assert name in info, name
    assert len(info["uname"]) == 6 and len(info["loadavg"]) == 3 and info["memory"][0] > 0
    assert run(pman.perform("hello", {})).status is False
    assert run(pman.perform("hello", {"askAbout": "weather"})).status is False


def test_status_done_info_search_and_get() -> None:
    pman = make_pman()
    a = run(pman.run("true", {"jid": "job-1", "auid": "me"}))
    b = run(pman.run("false", {"jid": "job-1", "auid": "me"}))
    c = run(pman.run("sleep 5", {"jid": "job-2", "auid": "me"}))
    start(a.job), finish(a.job, model.COMPLETE, 0)
    start(b.job), finish(b.job, model.BURIED, 1)
    start(c.job)

    status = run(pman.perform("status", {"key": "jid", "value": "job-1"}))
    assert status.status is True
    assert status.d_ret["l_status"] == ["finishedSuccessfully", "finishedWithError"]
    assert status.d_ret["0.start"] == {"jobRoot": a.root, "startTrigger": [True]}
    assert status.d_ret["1.end"] == {"jobRoot": b.root, "returncode": [1]}
    assert status.d_ret["0.container"] == {"jobRoot": a.root, "tree": None}
    running = run(pman.perform("status", {"key": "jid", "value": "job-2"}))
    assert running.d_ret["l_status"] == ["started"] and running.d_ret["0.end"]["returncode"] == []

    done = run(pman.perform("done", {"key": "auid", "value": "me"}))
    assert done.status and "l_status" not in done.d_ret and len(done.d_ret) == 9

    none = run(pman.perform("status", {"key": "jid", "value": "nope"}))
    assert none.status is False and none.d_ret["-1.end"] == {"jobRoot": None, "returncode": None}
    assert run(pman.perform("status", {"key": "jid"})).status is False  # no value

    info = run(pman.perform("info", {"key": "jid", "value": "job-1"}))
    assert info.status and info.d_ret["1.1"][b.root]["endInfo"]["0"]["returncode"] == 1
    assert set(info.d_ret["0.0"][a.root]["startInfo"]) == {"0", "allJobsStarted"}
    missing = run(pman.perform("info", {"key": "jid", "value": "nope"}))
    assert missing.status is False and missing.d_ret == {"-1": {"noJobFound": {"endInfo": {"allJobsDone": None}}}}

    search = run(pman.perform("search", {"key": "jid", "value": "job-2"}))
    assert search.status and search.d_ret == {"0": {c.root: {"jid": "job-2"}}}
    by_path = run(pman.perform("search", {"key": "jid", "value": "job-1", "path": "/endInfo/0/returncode"}))
    assert by_path.d_ret == {"0": {a.root: {"endInfo": {"0": {"returncode": 0}}}},
                             "1": {b.root: {"endInfo": {"0": {"returncode": 1}}}}}
    by_job = run(pman.perform("search", {"key": "jid", "value": "job-1", "job": 0, "field": "returncode"}))
    assert by_job.d_ret["1"] == {b.root: {"end": {"0": {"endInfo": {"0": {"returncode": 1}}}}}}
    by_root = run(pman.perform("search", {"key": "jobRoot", "value": c.root}))
    assert by_root.status and list(by_root.d_ret["0"]) == [c.root]

    got = run(pman.perform("get", {"path": "/_2/jid"}))
    assert got.status and got.d_ret == {c.root: {"jid": "job-2"}}
    assert run(pman.perform("get", {"path": "/_9/jid"})).status is False
    assert run(pman.perform("get", {})).status is False


def test_kill_stops_only_running_jobs() -> None:
    queue = FakeQueue()
    pman = make_pman(queue)
    waiting = run(pman.run("sleep 1", {"jid": "k"}))
    running = run(pman.run("sleep 2", {"jid": "k"}))
    start(running.job)
    result = run(pman.perform("kill", {"key": "jid", "value": "k"}))
    assert result.status is True and queue.killed == [running.job.key]
    assert result.d_ret["0"]["killed"] is False and result.d_ret["1"]["killed"] is True
    assert running.status == "finishedWithError" and waiting.status == "notstarted"
    again = run(pman.perform("kill", {"key": "jid", "value": "k"}))
    assert again.status is False and "running" in again.message
    assert run(pman.perform("kill", {"key": "jid", "value": "none"})).status is False


def test_quit_only_when_allowed() -> None:
    refused = run(make_pman().perform("quit", {"saveDB": True}))
    assert refused.status is False and "allow_quit" in refused.message and not refused.stop
    allowed = run(make_pman(allow_quit=True).perform("quit", {"saveDB": True}))
    assert allowed.status is True and allowed.stop


def test_dbctl() -> None:
    pman = make_pman()
    pj = run(pman.run("true", {}))
    for do in ("save", "load"):
        result = run(pman.perform("DBctl", {"do": do}))
        assert result.status is True and result.d_ret == {pj.root: {}}
    assert run(pman.perform("DBctl", {})).status is False
    running = run(pman.run("sleep 9", {}))
    running.job.state = model.RUNNING
    clear = run(pman.perform("DBctl", {"do": "clear"}))
    # Finished jobs go; a running one is a process still to be accounted for, and stays.
    assert clear.status is True and "1 finished" in clear.message and "1 still running" in clear.message
    assert [j.root for j in run(pman.jobs())] == [running.root]


# -- the HTTP surface ----------------------------------------------------------------------------


ENVELOPE = {"status", "RESTheader", "RESTverb", "action", "path", "receivedByServer", "client_json_payload",
            "client_json_len"}


def test_post_answers_pmans_envelope_whatever_the_content_type() -> None:
    stub = make_stub(make_pman())
    body = json.dumps({"payload": SEED_PAYLOAD})
    for path, content_type in [("/api/v1/cmd/", "application/json"), ("/api/v1/cmd", "application/x-www-form-urlencoded"),
                               ("/api/v1/cmd", None)]:
        answer = call(stub, "POST", path, body, content_type=content_type)
        assert answer.code == 200
        reply = answer.json()
        assert ENVELOPE | {"meta", "payloadsize", "d_ret"} <= set(reply)
        assert reply["status"] is True and reply["action"] == "run" and reply["RESTverb"] == "POST"
        assert reply["RESTheader"] == f"POST {path} HTTP/1.1\r"
        assert reply["path"] == "/api/v1/cmd"
        assert reply["client_json_payload"] == body and reply["client_json_len"] == len(body) == reply["payloadsize"]
        assert reply["meta"] == SEED_PAYLOAD["meta"]
        assert reply["receivedByServer"][0] == reply["RESTheader"] and reply["receivedByServer"][-1] == body
        # The token is not echoed back.
        assert TOKEN not in answer.body.decode()


def test_unknown_action_and_wrong_shapes_answer_200_with_status_false() -> None:
    stub = make_stub(make_pman())
    for body in [{"payload": {"action": "fly", "meta": {}}}, {"payload": {"meta": {}}}, [1], {"x": 1}]:
        answer = call(stub, "POST", "/api/v1/cmd", body)
        assert answer.code == 200
        reply = answer.json()
        assert reply["status"] is False and reply["message"], body


@pytest.mark.parametrize("body", ["", "{not json", "payload=1"])
def test_malformed_json_is_a_400_with_a_json_reason(body: str) -> None:
    answer = call(make_stub(make_pman()), "POST", "/api/v1/cmd", body,
                  content_type="application/x-www-form-urlencoded")
    assert answer.code == 400
    reply = answer.json()
    assert reply["status"] is False and "JSON" in reply["error"]


def test_path_gets_over_http() -> None:
    pman = make_pman()
    pj = run(pman.run("echo hi", {"jid": "h"}))
    start(pj.job)
    finish(pj.job, model.COMPLETE, 0, stdout="hi\n")
    stub = make_stub(pman)
    reply = call(stub, "GET", f"/api/v1/_0/endInfo/0/returncode?token={TOKEN}").json()
    assert reply["status"] is True and reply["GET"] == {pj.root: {"endInfo": {"0": {"returncode": 0}}}}
    assert reply["RESTverb"] == "GET" and reply["action"] == "" and reply["path"] == "/api/v1/_0/endInfo/0/returncode"
    assert TOKEN not in reply["RESTheader"] and "token=" in reply["RESTheader"]
    for path in ("/api/v1", "/api/v1/"):
        assert call(stub, "GET", path).json()["GET"] == {pj.root: {}}
    assert call(stub, "GET", "/api/v1/_0/endInfo/").json()["path"] == "/api/v1/_0/endInfo"
    for missing in ("/api/v1/_7/endInfo", "/api/v1/_0/nothing", "/api/v1/nobody/jid", "/api/v1/_zz"):
        answer = call(stub, "GET", missing)
        assert answer.code == 200 and answer.json()["status"] is False, missing


def test_pfurl_style_lower_case_bearer_is_accepted_and_a_wrong_token_is_not() -> None:
    stub = make_stub(make_pman())
    body = {"payload": {"action": "hello", "meta": {"askAbout": "echoBack", "echoBack": "x"}}}
    assert call(stub, "POST", "/api/v1/cmd", body, auth=f"bearer {TOKEN}").json()["status"] is True
    answer = call(stub, "POST", "/api/v1/cmd", body, auth="bearer wrong")
    assert answer.code == 401 and "error" in answer.json()


def test_other_methods_get_json_405() -> None:
    stub = make_stub(make_pman())
    for method, path in [("DELETE", "/api/v1/cmd"), ("POST", "/api/v1/_0")]:
        answer = call(stub, method, path, "{}")
        assert answer.code == 405 and answer.json()["status"] is False


def test_envelope_redacts_the_token_query_parameter() -> None:
    class Request:
        method, clientproto = b"GET", b"HTTP/1.1"
        uri, path = b"/api/v1/_0?a=1&token=secret", b"/api/v1/_0/"

        class requestHeaders:  # noqa: N801 - stands in for twisted's Headers
            @staticmethod
            def getAllRawHeaders():
                return [(b"Authorization", [b"Bearer secret"]), (b"Host", [b"h"])]

    reply = envelope(Request(), "")
    assert "secret" not in json.dumps(reply)
    assert reply["RESTheader"] == "GET /api/v1/_0?a=1&token=<not echoed> HTTP/1.1\r"
    assert reply["path"] == "/api/v1/_0" and "Host: h\r" in reply["receivedByServer"]


def test_openapi_documents_every_pman_route_and_nothing_else() -> None:
    import re

    from openapi_spec_validator import validate

    validate(document([PMAN_PATHS, ROOT_PATHS]))
    served = {(re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule), method.lower())
              for rule in PmanAPI.app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, item in PMAN_PATHS.items() for method in item}
    assert served == documented


def test_pmans_older_put_run_with_context_db_is_dbctl() -> None:
    stub = make_stub(make_pman())
    body = {"payload": {"action": "run", "meta": {"context": "db", "operation": "save", "dbpath": "/tmp/pman"}}}
    reply = call(stub, "PUT", "/api/v1/cmd", body).json()
    assert reply["status"] is True and reply["action"] == "run" and reply["RESTverb"] == "PUT"
    assert "durable" in reply["message"]
