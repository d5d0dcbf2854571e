"""Flamenco's manager API (wmgr.api.flamenco over wmgr.flamenco): tasks compiled into jobs, their
statuses from the jobs, the frames parser over forwarded output, and the workers' routes; the
real queue and registry under a Clock, HTTP through StubTreq."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from treq.testing import StubTreq

from tests.test_api import Answer
from tests.test_workers import Manager
from wmgr.api.flamenco import FlamencoAPI
from wmgr.api.openapi import ROOT_PATHS, document
from wmgr.api.root import Root, RootApp
from wmgr.errors import InvalidRequest
from wmgr.flamenco import Flamenco, chunk_text, compile_task, parse_frames
from wmgr.jobs import model

TOKEN = "client-token"
TASK_FIELDS = {"id", "worker_id", "priority", "frame_start", "frame_end", "frame_current", "status", "format"}
WORKER_FIELDS = {"activity", "connection", "current_task", "hostname", "id", "ip_address", "log", "port", "status",
                 "system", "time_cost"}


class Setup(Manager):
    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.start()
        self.flamenco = Flamenco(self.queue, self.workers, self.store)
        self.flamenco.startService()
        surfaces = [(("workers", "tasks"), FlamencoAPI(self.flamenco, self.workers).resource())]
        self.stub = StubTreq(Root(TOKEN, surfaces, RootApp(document([ROOT_PATHS])).app.resource()))

    def call(self, method: str, path: str, json_body: Any = None, form: Any = None) -> Answer:
        headers = {b"Authorization": [f"Bearer {TOKEN}".encode()]}
        data = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers[b"Content-Type"] = [b"application/json"]
        elif form is not None:
            data = urlencode(form).encode()
            headers[b"Content-Type"] = [b"application/x-www-form-urlencoded"]
        d = self.stub.request(method, "https://manager.test" + path, headers=headers, data=data)
        for _ in range(10):
            self.stub.flush()
            self.settle()
        out: list[Any] = []
        d.addBoth(out.append)
        assert out, "no answer"
        return Answer(out[0])

    def frames_task(self, task_id: int = 12, **settings: Any) -> Answer:
        settings = dict({"command": "render -s {frame_start} -e {frame_end}", "frames": "1-10,15,20-22",
                         "chunk_size": 5}, **settings)
        return self.call("POST", "/tasks", form={"task_id": task_id, "job_id": 3, "priority": 10, "type": "frames",
                                                 "settings": json.dumps(settings), "parser": "frames"})


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_frames_are_parsed_chunked_and_filled_in() -> None:
    assert parse_frames("1-10,15,20-22") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 21, 22]
    assert chunk_text([15, 20, 21, 22]) == "15,20-22"
    jobs = compile_task("frames", {"command": "r {frame_start} {frame_end} {frames}", "frames": "1-10,15,20-22",
                                   "chunk_size": 5})
    assert jobs == [("r 1 5 1-5", 1, 5), ("r 6 10 6-10", 6, 10), ("r 15 22 15,20-22", 15, 22)]
    for bad in ("", "a-b", "5-1", "1-999999999"):
        with pytest.raises(InvalidRequest):
            parse_frames(bad)
    with pytest.raises(InvalidRequest):
        compile_task("frames", {"command": "r {nope}", "frames": "1"})


def test_a_frames_task_becomes_one_job_per_chunk(s: Setup) -> None:
    answer = s.frames_task()
    assert answer.code == 202
    body = answer.json()
    assert TASK_FIELDS <= set(body)
    assert {k: body[k] for k in TASK_FIELDS} == {"id": 12, "worker_id": None, "priority": 10, "frame_start": 1,
                                                   "frame_end": 22, "frame_current": 1, "status": "waiting",
                                                   "format": ""}
    cmds = sorted(job.spec["cmd"] for job in s.queue.live.values())
    assert cmds == ["render -s 1 -e 5", "render -s 15 -e 22", "render -s 6 -e 10"]
    assert {job.rep_grp for job in s.queue.live.values()} == {"flamenco.12"}
    again = s.frames_task()
    assert again.code == 409 and set(again.json()) == {"code", "message"}


def test_a_task_runs_on_a_worker_moves_its_frames_and_completes(s: Setup) -> None:
    s.frames_task()
    session = s.join("w1")
    pulled = s.pull("w1", session)
    assert len(pulled) == 3
    task = s.call("GET", "/tasks/12").json()
    assert task["status"] == "active" and task["worker_id"] == s.workers.workers["w1"].id
    assert s.call("GET", "/workers").json()["w1"]["current_task"] == 12
    s.workers.beat("w1", session, [p["key"] for p in pulled], output={pulled[0]["key"]: "Fra:3 Mem:10M\nFra:4 Mem:11M"})
    task = s.call("GET", "/tasks/12").json()
    assert task["frame_current"] == 4 and json.loads(task["activity"]) == {"current_frame": 4}
    for payload in pulled:
        s.report("w1", payload, "end", exitcode=0)
    task = s.call("GET", "/tasks/12").json()
    assert task["status"] == "completed" and task["frame_current"] == 22 and task["worker_id"] is None


def test_a_task_whose_worker_goes_offline_is_waiting_again(s: Setup) -> None:
    s.call("POST", "/tasks", json_body={"task_id": 1, "type": "shell", "settings": {"command": "echo hi"}})
    session = s.join("w1")
    s.pull("w1", session)
    assert s.call("GET", "/tasks/1").json()["status"] == "active"
    s.clock.advance(61)
    s.workers.check()
    s.settle()
    assert s.call("GET", "/tasks/1").json()["status"] == "waiting"
    assert s.call("GET", "/workers").json()["w1"]["connection"] == "offline"


def test_a_task_fails_when_one_of_its_jobs_is_buried(s: Setup) -> None:
    s.frames_task(retries=0)
    session = s.join("w1")
    pulled = s.pull("w1", session)
    s.report("w1", pulled[0], "end", exitcode=1)
    assert s.call("GET", "/tasks/12").json()["status"] == "failed"


def test_cancel_stops_running_jobs_on_the_worker_and_removes_the_rest(s: Setup) -> None:
    s.frames_task()
    session = s.join("w1")
    pulled = s.pull("w1", session, cores=0, slots=1)
    answer = s.call("DELETE", "/tasks/12")
    assert answer.code == 202 and answer.json()["status"] == "canceled"
    assert s.workers.beat("w1", session, [pulled[0]["key"]])["kill"] == {pulled[0]["key"]: model.FAIL_KILLED}
    assert [job.key for job in s.queue.live.values()] == [pulled[0]["key"]]  # the two waiting ones are gone
    assert s.call("GET", "/tasks").json()[0]["status"] == "canceled"


def test_patch_task_records_a_workers_report(s: Setup) -> None:
    s.frames_task()
    answer = s.call("PATCH", "/tasks/12", form={"status": "active", "log": "rendering", "time_cost": "5"})
    assert answer.code == 204 and answer.body == b""
    task = s.call("GET", "/tasks/12").json()
    assert task["log"] == "rendering" and task["time_cost"] == 5
    assert s.call("PATCH", "/tasks/12", form={"status": "exploded"}).code == 400
    assert s.call("PATCH", "/tasks/99", form={"status": "active"}).json() == {"code": 404, "message": "no task 99"}


def test_bad_tasks_are_refused_and_change_nothing(s: Setup) -> None:
    for form in ({"task_id": "x", "type": "shell", "settings": "{}"},
                 {"task_id": 1, "type": "python", "settings": '{"command": "x"}'},
                 {"task_id": 1, "type": "shell", "settings": "not json"},
                 {"task_id": 1, "type": "shell", "settings": '{"command": "x"}', "parser": "blender"},
                 {"task_id": 1, "type": "frames", "settings": '{"command": "x", "frames": "9-1"}'}):
        answer = s.call("POST", "/tasks", form=form)
        assert answer.code == 400, form
    assert s.queue.live == {} and s.flamenco.tasks == {}


def test_workers_register_with_form_fields_and_show_in_the_seeds_shape(s: Setup) -> None:
    answer = s.call("POST", "/workers", form={"hostname": "fsiddi-macpro.local", "system": "Darwin 14.1.0",
                                              "port": "5000", "mac_address": "158929712651",
                                              "update_frequent": json.dumps({"load_average": {"1min": 2.18},
                                                                             "worker_cpu_percent": 7.0})})
    assert answer.code == 204
    workers = s.call("GET", "/workers").json()
    worker = workers["fsiddi-macpro.local"]
    assert set(worker) == WORKER_FIELDS
    assert worker["connection"] == "online" and worker["status"] == "enabled" and worker["port"] == 5000
    assert worker["system"] == "Darwin 14.1.0" and worker["current_task"] is None
    info = s.call("GET", f"/workers/{worker['id']}").json()
    assert info["hostname"] == "fsiddi-macpro.local" and info["mac_address"] == "158929712651"
    assert info["update_frequent"] == {"load_average": {"1min": 2.18}, "worker_cpu_percent": 7.0}
    assert set(info["update_less_frequent"]) == {"worker_architecture", "worker_disk_percent",
                                                 "worker_mem_percent", "worker_num_cpus"}
    assert s.call("GET", "/workers/999").code == 404
    assert s.call("POST", "/workers", form={"system": "Linux"}).code == 400


def test_a_disabled_worker_gets_no_new_work(s: Setup) -> None:
    s.frames_task()
    session = s.join("w1")
    worker_id = s.workers.workers["w1"].id
    answer = s.call("PATCH", f"/workers/{worker_id}", form={"status": "disabled"})
    assert answer.json() == {"task_id": None}
    assert s.call("GET", "/workers").json()["w1"]["status"] == "disabled"
    assert s.pull("w1", session) == []
    s.call("PATCH", f"/workers/{worker_id}", json_body={"status": "enabled"})
    assert len(s.pull("w1", session)) == 3
    answer = s.call("PATCH", f"/workers/{worker_id}", form={"activity": "rendering", "time_cost": "3"})
    assert answer.json() == {"task_id": 12} and s.call("GET", "/workers").json()["w1"]["activity"] == "rendering"


def test_the_dashboards_workers_view_is_served_and_uses_only_its_own_elements() -> None:
    import re

    from wmgr.api.dashboard import STATIC_DIR, STATIC_TYPES

    script = (STATIC_DIR / "workers.js").read_text()
    html = (STATIC_DIR / "index.html").read_text()
    assert STATIC_TYPES["workers.js"].startswith(b"text/javascript")
    assert '<script src="workers.js" defer></script>' in html and 'data-view="workers-view"' in html
    for element in set(re.findall(r'\$\("([\w-]+)"\)', script)):
        assert f'id="{element}"' in html, element
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)
    for method, path in re.findall(r'api\("(\w+)", "(/\w+)', script):
        assert path in ("/workers", "/tasks"), path


def test_a_task_whose_caller_goes_away_is_still_stored_with_all_its_jobs(tmp_path: Path) -> None:
    # Klein cancels a request's handler when the client goes away: the task is not left
    # stored without its jobs.
    from twisted.internet.defer import CancelledError, ensureDeferred

    from tests.test_queue import HeldWrites

    s = Setup(tmp_path)
    with HeldWrites(s.store) as writes:
        creating = ensureDeferred(s.flamenco.create(7, 1, 10, "shell", {"command": "echo hi"}, "none"))
    creating.cancel()
    cancelled: list[Any] = []
    creating.addErrback(cancelled.append)
    assert cancelled and cancelled[0].check(CancelledError)
    writes.release()
    s.settle()
    assert 7 in s.flamenco.tasks
    [job] = [job for job in s.queue.live.values() if job.spec["cmd"] == "echo hi"]
    assert job.key in s.flamenco.tasks[7].keys
