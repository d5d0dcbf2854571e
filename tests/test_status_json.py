"""model.statuses_json: the same bytes as json.dumps of Job.status for every job, and Job's run fields."""

from __future__ import annotations

import json
import random

import pytest

from wmgr.jobs import model
from wmgr.jobs.model import RUN_FIELDS, Job, job_key, normalise, parse_defaults, parse_spec, statuses_json

NOW = 1_700_000_123.456


def reference(pairs, now, std=False, env=False) -> bytes:
    return json.dumps([job.status(now, std, env, similar) for job, similar in pairs],
                      separators=(",", ":")).encode("utf-8")


def check(pairs, now=NOW) -> None:
    """statuses_json equals the reference, byte for byte, for every std/env combination."""
    pairs = list(pairs)
    for std in (False, True):
        for env in (False, True):
            expected = reference(pairs, now, std, env)
            got = statuses_json(pairs, now, std, env)
            assert isinstance(got, bytes)
            if got != expected:  # find the first job that differs, for a readable failure
                for job, similar in pairs:
                    one = statuses_json([(job, similar)], now, std, env)
                    assert one == reference([(job, similar)], now, std, env), (job.key, std, env)
            assert got == expected
            assert json.loads(got) == json.loads(expected)


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


# -- statuses_json -------------------------------------------------------------------------------------


def test_empty_and_single():
    assert statuses_json([], NOW) == b"[]"
    check([(make_job(), 0)])


def test_fresh_jobs_of_one_post_share_defaults():
    defaults = parse_defaults({"rep_grp": "bench", "cwd": "/tmp/jobs"})
    check([(make_job(f"true #{i}", seq=i, defaults=defaults), 0) for i in range(50)])


def test_fresh_jobs_with_every_optional_property():
    jobs = [
        make_job("a", dep_grps=["g2", "g1"], deps=["d"]),
        make_job("b", env=["A=1", "B=é\"x\\"]),
        make_job("c", on_failure=[{"cleanup": True}], on_success={"run": "echo ünï"}, on_exit=[{"remove": True}]),
        make_job("d", monitor_docker="name", container_mounts="/a:/b"),
        make_job("e", disk=0), make_job("f", disk=5),
        make_job("g", cloud_os="ubuntu", cloud_ram=2048, cloud_flavor="m1", cloud_username="u"),
        make_job("h", cpus=0.5), make_job("i", cpus=2.0), make_job("j", cpus=3), make_job("k", cpus="1.5"),
        make_job("l", memory="512K", time="1.5h", priority=9, retries=3, override=2),
        make_job("m", time="0"), make_job("n", time="100ns"),
        make_job("o", rep_grp="ünïcödé \u2603 \"q\" \\ \x01\t\n"),
        make_job("p \U0001f600 \x7f \x1f", cwd="/tmp/\u00e9", rep_grp="lone \ud800 surrogate"),
        make_job("q", cwd_matters=True, change_home=True, req_grp="rg", limit_grps=["l:2"]),
        make_job("r", env=[], dep_grps=[], deps=[]),  # empty lists: null, as status() says
    ]
    check([(job, 0) for job in jobs])
    check([(job, i * 7) for i, job in enumerate(jobs)])


@pytest.mark.parametrize("state", model.STATES + (model.DELETED,))
def test_every_state(state):
    check([(make_job("x", state=state), 0), (ran(make_job("y", state=state)), 3)])


def test_jobs_with_runs():
    jobs = [
        ran(make_job("a")),
        ran(make_job("b"), ended=None),  # running: Walltime from now
        ran(make_job("c"), started=None, ended=None, attempts=0),
        ran(make_job("d"), exitcode=1, fail_reason=model.FAIL_NONZERO, exited=True),
        ran(make_job("e"), exitcode=-9, fail_reason=model.FAIL_KILLED, exited=False, home_changed=True),
        ran(make_job("f"), cpu_time=5.0, peak_ram=0, pid=0),
        ran(make_job("g"), cpu_time=0.1, started=0.0, ended=1e-7),
        ran(make_job("h"), cpu_time=1e-7, started=1e10, ended=1e10 + 0.5),
        ran(make_job("i"), cpu_time=123456789.123456789, attempts=2 ** 40, pid=2 ** 31 - 1),
        ran(make_job("j"), cpu_time=-0.0),
        ran(make_job("k"), memory_floor=4000),
        ran(make_job("l"), memory_floor=0, peak_ram=2 ** 62),
        ran(make_job("m"), host="hôst \u2603", host_ip="::1", actual_cwd="/tmp/\"q\"/\\"),
        ran(make_job("n"), cpu_time=float("nan")),
        ran(make_job("o"), cpu_time=float("inf")),
        ran(make_job("p"), started=-1.5, ended=float(10 ** 15)),
    ]
    outputs = ["", "mymsg\n", "mymsg\n\n", "a\r\nb\n", "\"quoted\" \\ back", "tab\tnul\x00 bell\x07 esc\x1b",
               "ünïcödé ☃ \U0001f600", "\ud83d lone surrogate", "\u2028\u2029", "x" * 5000]
    for i, job in enumerate(jobs):
        job.stdout = outputs[i % len(outputs)]
        job.stderr = outputs[(i + 3) % len(outputs)]
    check([(job, i) for i, job in enumerate(jobs)])


def test_learned_expectations_of_other_types():
    jobs = [make_job(f"x{i}") for i in range(8)]
    jobs[0].expected_ram, jobs[0].expected_time = 1500, 3600  # int time
    jobs[1].expected_ram, jobs[1].expected_time = 1500.5, 0.1  # float RAM
    jobs[2].expected_ram, jobs[2].expected_time = 0, 0.0
    jobs[3].expected_ram, jobs[3].expected_time = -5, 1e-7  # max(-5, floor 0) is 0
    jobs[4].expected_ram, jobs[4].expected_time = 10 ** 20, 1e300
    jobs[5].expected_ram = True  # a bool is not an int in JSON
    jobs[6].memory_floor = 2000
    jobs[7].expected_time = float("nan")
    check([(job, 0) for job in jobs])


def test_values_of_unexpected_types_are_encoded_as_json_dumps_would():
    class Text(str):
        pass

    class Number(int):
        pass

    jobs = [make_job(f"y{i}") for i in range(10)]
    jobs[0].spec["rep_grp"] = Text("sub")
    jobs[1].spec["cpus"] = True
    jobs[2].pid = Number(7)
    jobs[3].peak_ram = False
    jobs[4].exitcode = 1.0
    jobs[5].spec["dep_grps"] = ("a", "b")  # a tuple: a JSON array
    jobs[6].attempts = Number(0)
    jobs[7].spec["cmd"] = 12345  # not a str where one is expected
    jobs[8].spec["rep_grp"] = None
    jobs[9].key = 7
    check([(job, 0) for job in jobs])
    check([(make_job("z"), Number(4)), (make_job("w"), True)])


def test_a_value_json_cannot_encode_fails_as_json_dumps_does():
    job = make_job("x")
    job.spec["rep_grp"] = b"bytes"
    with pytest.raises(TypeError):
        reference([(job, 0)], NOW)
    with pytest.raises(TypeError):
        statuses_json([(job, 0)], NOW)


def test_jobs_restored_from_the_store():
    """A job read back (json.loads of its spec and run) has equal values but other objects."""
    jobs = []
    for i, job in enumerate([make_job("a"), make_job("b", dep_grps=["g"]), ran(make_job("c")), make_job("d", cpus=1.5)]):
        again = Job(job.key, json.loads(json.dumps(job.spec)), job.state, i)
        again.restore_run(json.loads(json.dumps(job.run_record())))
        jobs.append(again)
    check([(job, 0) for job in jobs])


def test_a_broad_random_set():
    rng = random.Random(3)
    texts = ["", "a", "é", "\u2603", "\U0001f600", "\"", "\\", "\x00", "\x1f", "\n", "\x7f", "/", " ", "\ud800", "<>&'"]
    numbers = [0, 1, 7, 1000, 2 ** 53 + 1, 0.0, -0.0, 0.1, 5.0, 1e-7, 1e21, 123.456, 3600.0, 1.5]

    def text(n=4, nul=False):
        """A job's properties are refused with a NUL; what a run records may have one."""
        return "".join(rng.choice(texts if nul else texts[:7] + texts[8:]) for _ in range(rng.randrange(n)))

    defaults = parse_defaults({"rep_grp": "shared", "cwd": "/tmp/shared"})
    pairs = []
    for i in range(600):
        props = {}
        if rng.random() < 0.3:
            props["rep_grp"] = "g" + text()
        if rng.random() < 0.3:
            props["cwd"] = "/" + text()
        if rng.random() < 0.2:
            props["dep_grps"] = [text() + "g" for _ in range(rng.randrange(3))]
        if rng.random() < 0.2:
            props["deps"] = [text() + "d" for _ in range(rng.randrange(3))]
        if rng.random() < 0.2:
            props["env"] = [f"V{k}={text()}" for k in range(rng.randrange(3))]
        if rng.random() < 0.2:
            props["cpus"] = rng.choice([0, 1, 2.0, 0.25, 3.5, 16])
        if rng.random() < 0.1:
            props["on_exit"] = [{"run": text() + "x"}]
        if rng.random() < 0.1:
            props["cloud_script"] = text()
        if rng.random() < 0.1:
            props["disk"] = rng.randrange(3)
        if rng.random() < 0.1:
            props["monitor_docker"] = text()
        # (a lone surrogate cannot be in a command: its key is a hash of its UTF-8)
        job = make_job(f"cmd {i} {text(6)}".replace("\ud800", "?"), state=rng.choice(model.STATES), seq=i,
                       defaults=defaults if rng.random() < 0.5 else None, **props)
        if rng.random() < 0.5:
            ran(job, attempts=rng.randrange(5), pid=rng.choice(numbers[:5]), host=text(nul=True), host_ip=text(),
                started=rng.choice([None, 1.0e9, 1.7e9 + 0.5, 0.0]), ended=rng.choice([None, 1.7e9 + 9.99]),
                exited=rng.random() < 0.5, exitcode=rng.choice([0, 1, 255, -15]), fail_reason=text(),
                peak_ram=rng.choice(numbers[:5]), cpu_time=rng.choice(numbers[5:]), actual_cwd=text(),
                home_changed=rng.random() < 0.5, memory_floor=rng.choice([0, 0, 3000]))
            job.stdout, job.stderr = text(10, True) + "\n" * rng.randrange(3), text(10, True)
        if rng.random() < 0.2:
            job.expected_ram = rng.choice([1, 1000, 2048.5])
            job.expected_time = rng.choice(numbers)
        pairs.append((job, rng.choice([0, 0, 0, 1, 99, 100_000])))
    check(pairs)
    check(pairs, now=0.0)
