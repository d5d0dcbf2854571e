"""The wr status object (wmgr.jobs.status): statuses_json writes the same bytes as json.dumps of
Job.status, for jobs of every kind, with values of every type; the OpenAPI schema is the same
definition; and Job's run fields."""

from __future__ import annotations

import json
import random

import pytest

from wmgr.api import openapi
from wmgr.jobs import model, status
from wmgr.jobs.model import RUN_FIELDS, Job, job_key, normalise, parse_defaults, parse_spec, statuses_json

NOW = 1_700_000_123.456


def _no_lone_surrogates(value):
    """Job properties refuse lone surrogates (they are no text); run fields such as StdOut can still
    carry anything, and the tests put them there."""
    if isinstance(value, str):
        return "".join("?" if "\ud800" <= c <= "\udfff" else c for c in value)
    if isinstance(value, list):
        return [_no_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _no_lone_surrogates(v) for k, v in value.items()}
    return value


def make_job(cmd: str = "true", state: str = model.READY, seq: int = 1, defaults=None, **props) -> Job:
    props, defaults = _no_lone_surrogates(props), _no_lone_surrogates(defaults or {})
    spec = normalise(parse_spec(dict(cmd=cmd, **props), defaults))
    return Job(job_key(spec), spec, state, seq)


def ran(job: Job, **run) -> Job:
    record = {"attempts": 1, "pid": 4242, "host": "node-1", "host_ip": "10.0.0.7", "started": 1_700_000_000.75,
              "ended": 1_700_000_010.25, "exited": True, "exitcode": 0, "peak_ram": 12, "cpu_time": 0.25,
              "actual_cwd": "/tmp/wr_cwd/a/b/cwd", "home_changed": False}
    record.update(run)
    job.restore_run(record)
    return job


# -- Job's run fields ----------------------------------------------------------------------------------


def test_a_new_job_has_exactly_the_run_fields_and_their_initial_values():
    job = make_job()
    record = job.run_record()
    assert record == RUN_FIELDS
    assert list(record) == list(RUN_FIELDS)
    for name, value in record.items():
        assert type(value) is type(RUN_FIELDS[name]), name  # 0 is not False, 0.0 is not 0
    assert set(RUN_FIELDS) <= set(Job.__slots__)


def test_reset_run_gives_back_the_initial_values_but_keeps_the_counters():
    job = ran(make_job(), failures=2, memory_floor=3000, attempts=3)
    job.stdout = "x"
    # Every run field away from its initial value, so that one the reset forgets shows.
    for name, initial in RUN_FIELDS.items():
        if getattr(job, name) == initial and name not in ("attempts", "failures", "memory_floor"):
            setattr(job, name, "x" if isinstance(initial, str) else 1 if initial is None else initial or 1)
    job.reset_run()
    assert job.run_record() == {**RUN_FIELDS, "attempts": 3, "failures": 2, "memory_floor": 3000}
    assert job.stdout == ""


def test_normalise_req_grp_is_the_first_words_base_name():
    assert make_job("/usr/bin/sleep 5").spec["req_grp"] == "sleep"
    assert make_job("  sort\t-k1 x").spec["req_grp"] == "sort"
    assert make_job("a/b/").spec["req_grp"] == ""
    assert make_job("echo", req_grp="given").spec["req_grp"] == "given"
    spec = {"cmd": "   ", "cwd": "/x"}
    assert normalise(spec)["req_grp"] == ""


# -- the status object ---------------------------------------------------------------------------------


def test_one_definition_gives_the_dict_and_the_schema():
    job = ran(make_job("x"))
    assert list(job.status(NOW)) == [f.name for f in status.FIELDS] == list(status.SCHEMA["properties"])
    assert status.SCHEMA is openapi.SCHEMAS["JobStatus"]
    assert statuses_json([], NOW) == b"[]"


class Text(str):
    pass


class Number(int):
    pass


def odd(job: Job, i: int) -> Job:
    """Values of types the encoder must not take for what they resemble (False is not 0...)."""
    name, value = [("peak_ram", False), ("pid", Number(7)), ("exitcode", 1.0), ("attempts", Number(0)),
                   ("cpu_time", float("nan")), ("started", -1.5), ("host", Text("h")), ("memory_floor", 4000),
                   ("expected_ram", True), ("expected_time", 3600), ("ended", float(10 ** 15))][i % 11]
    setattr(job, name, value)
    return job


def test_the_encoder_writes_what_json_dumps_writes():
    rng = random.Random(3)
    texts = ["", "a", "é", "\u2603", "\U0001f600", "\"", "\\", "\x1f", "\n", "\x7f", " ", "<>&'", "\u2028"]

    def text(n: int = 4) -> str:
        return "".join(rng.choice(texts) for _ in range(rng.randrange(n)))

    defaults = parse_defaults({"rep_grp": "shared", "cwd": "/tmp/shared"})
    optional = [("dep_grps", lambda: [text() + "g"]), ("deps", lambda: [text() + "d", "e"]),
                ("env", lambda: [f"V={text()}"]), ("cpus", lambda: rng.choice([0, 1, 2.0, 0.25, "1.5"])),
                ("on_exit", lambda: [{"run": text() + "x"}]), ("cloud_ram", lambda: 2048),
                ("disk", lambda: rng.randrange(3)), ("monitor_docker", text), ("container_mounts", text),
                ("rep_grp", lambda: "g" + text()), ("cwd", lambda: "/" + text())]
    pairs = []
    for i in range(400):
        props = {name: make() for name, make in optional if rng.random() < 0.15}
        job = make_job(f"cmd {i} {text(6)}", state=rng.choice(model.STATES + (model.DELETED,)), seq=i,
                       defaults=defaults if rng.random() < 0.5 else None, **props)
        if rng.random() < 0.5:
            ran(job, attempts=rng.randrange(3), started=rng.choice([None, 1.7e9 + 0.5, 0.0]),
                ended=rng.choice([None, 1.7e9 + 9.99]), cpu_time=rng.choice([0.0, -0.0, 1e-7, 5.0, float("inf")]),
                fail_reason=text(), actual_cwd=text(), host_ip=text(), home_changed=rng.random() < 0.5)
            job.stdout, job.stderr = text(10) + "\n" * rng.randrange(3), text(10) + "\x00\ud83d"
        if rng.random() < 0.1:
            odd(job, i)
        pairs.append((job, rng.choice([0, 0, 1, 100_000, Number(4), True])))
    for std in (False, True):
        for env in (False, True):
            for now in (NOW, 0.0):
                expected = json.dumps([job.status(now, std, env, similar) for job, similar in pairs],
                                      separators=(",", ":")).encode("utf-8")
                assert statuses_json(pairs, now, std, env) == expected


def test_a_value_json_cannot_encode_fails_as_json_dumps_does():
    job = make_job("x")
    job.spec["rep_grp"] = b"bytes"
    with pytest.raises(TypeError):
        json.dumps(job.status(NOW))
    with pytest.raises(TypeError):
        statuses_json([(job, 0)], NOW)
