"""wmgr.jobs.model: keys, value parsers, job definitions, the wr status object and grouping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wmgr.errors import InvalidRequest
from wmgr.jobs import model
from wmgr.jobs.model import Job, grouped, job_key, normalise, parse_defaults, parse_duration, parse_memory, parse_spec

SEED = Path("/work/shared/seeds/003_0c1595c3bcb80203.txt")


def make_job(cmd: str = "true", state: str = model.READY, seq: int = 1, **props) -> Job:
    spec = normalise(parse_spec(dict(cmd=cmd, **props), {}))
    return Job(job_key(spec), spec, state, seq)


# -- keys --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, key",
    [
        ({"cmd": "sleep 5"}, "ea4266bc0fc7dd493caeb2fff1963e4a"),
        ({"cmd": "sleep 5 && echo mymsg && false"}, "58cef10e7a340c3b7fa09ea304a3cb98"),
        ({"cmd": "echo 1 && true"}, "de6d167c58701e55f5b9f9e1e91d7807"),
        ({"cmd": "echo 3 && false", "cwd": "/tmp", "cwd_matters": True}, "db1e7d99becace3306c1c2470331c78e"),
    ],
)
def test_wr_key_vectors(spec, key):
    assert job_key(spec) == key
    assert model.is_key(key)


def test_cwd_is_only_in_the_key_when_it_matters():
    plain = job_key({"cmd": "echo 3 && false", "cwd": "/tmp"})
    assert plain == job_key({"cmd": "echo 3 && false", "cwd": "/elsewhere"})
    assert plain != job_key({"cmd": "echo 3 && false", "cwd": "/tmp", "cwd_matters": True})
    assert job_key({"cmd": "x", "cwd": "/a", "cwd_matters": True}) != job_key({"cmd": "x", "cwd": "/b", "cwd_matters": True})


def test_keys_ignore_properties_other_than_cmd_and_cwd():
    base = normalise(parse_spec({"cmd": "sleep 5"}, {}))
    other = normalise(parse_spec({"cmd": "sleep 5", "rep_grp": "x", "memory": "3G", "priority": 9, "env": ["A=1"]}, {}))
    assert job_key(base) == job_key(other) == "ea4266bc0fc7dd493caeb2fff1963e4a"


@pytest.mark.parametrize("text", ["", "ea4266bc0fc7dd493caeb2fff1963e4", "EA4266BC0FC7DD493CAEB2FFF1963E4A",
                                  "ea4266bc0fc7dd493caeb2fff1963e4g", "myid"])
def test_is_key_refuses(text):
    assert not model.is_key(text)


# -- memory and durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, mb",
    [("5M", 5), ("3G", 3072), ("1T", 1024 * 1024), ("1.5G", 1536), ("2048K", 2), ("512K", 1),
     ("5MB", 5), ("5m", 5), (" 5 M ", 5), ("1g", 1024)],
)
def test_parse_memory_accepts(text, mb):
    assert parse_memory(text) == mb


@pytest.mark.parametrize("value", ["5", "", "M", "5X", "-5M", "5 G B", "five M", None, 5, 5.0, ["5M"]])
def test_parse_memory_refuses(value):
    with pytest.raises(InvalidRequest, match="memory"):
        parse_memory(value)


@pytest.mark.parametrize(
    "text, seconds",
    [("5s", 5.0), ("0", 0.0), ("0s", 0.0), ("30m", 1800.0), ("1h", 3600.0), ("1h30m", 5400.0), ("1.5h", 5400.0),
     ("300ms", 0.3), (".5s", 0.5), ("2h45m30.5s", 9930.5), ("1500us", 0.0015), ("1000000ns", 0.001), (" 5s ", 5.0)],
)
def test_parse_duration_accepts(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5", "", "s", "1d", "5s5", "1h 30m", "-5s", "5 s", "h1", "1x", None, 5, 5.0])
def test_parse_duration_refuses(value):
    with pytest.raises(InvalidRequest, match="time"):
        parse_duration(value)


# -- parse_defaults (query parameters) -------------------------------------------------------------------


def test_parse_defaults_quick_start():
    assert parse_defaults({"rep_grp": "myid", "cpus": "2", "memory": "3G", "time": "5s"}) == {
        "rep_grp": "myid", "cpus": 2.0, "memory": 3072, "time": 5.0,
    }


def test_parse_defaults_ignores_the_token():
    assert parse_defaults({"token": "secret", "priority": "3"}) == {"priority": 3}


def test_parse_defaults_refuses_cmd_and_unknown_names():
    with pytest.raises(InvalidRequest, match="cmd"):
        parse_defaults({"cmd": "true"})
    with pytest.raises(InvalidRequest, match="'colour' is not a job property"):
        parse_defaults({"colour": "red"})


def test_parse_defaults_string_forms():
    defaults = parse_defaults({
        "dep_grps": "a,b", "deps": "x", "env": "A=1,B=2", "cwd_matters": "true", "change_home": "0",
        "on_failure": '[{"cleanup":true}]', "on_exit": '{"run":"echo bye"}', "mounts": "[]",
    })
    assert defaults["dep_grps"] == ["a", "b"]
    assert defaults["deps"] == ["x"]
    assert defaults["env"] == ["A=1", "B=2"]
    assert defaults["cwd_matters"] is True
    assert defaults["change_home"] is False
    assert defaults["on_failure"] == [{"cleanup": True}]
    assert defaults["on_exit"] == [{"run": "echo bye"}]
    assert defaults["mounts"] == []


@pytest.mark.parametrize("name, value", [
    ("memory", "5"), ("time", "5"), ("priority", "256"), ("retries", "-1"), ("override", "3"), ("cpus", "-1"),
    ("cpus", "lots"), ("cwd_matters", "maybe"), ("on_failure", "{not json"), ("mounts", '[{"Mount":"/x"}]'),
    ("with_docker", "ubuntu"), ("with_singularity", "img.sif"),
])
def test_parse_defaults_refuses_bad_values(name, value):
    with pytest.raises(InvalidRequest):
        parse_defaults({name: value})


# -- parse_spec (one job object) ----------------------------------------------------------------------


def test_parse_spec_merges_over_defaults():
    defaults = parse_defaults({"rep_grp": "myid", "cpus": "2", "memory": "3G", "time": "5s"})
    spec = parse_spec({"cmd": "sleep 5 && echo mymsg && false", "memory": "5M", "cpus": 1}, defaults)
    assert spec == {"cmd": "sleep 5 && echo mymsg && false", "rep_grp": "myid", "cpus": 1, "memory": 5, "time": 5.0}
    assert defaults["memory"] == 3072, "parse_spec must not change the shared defaults"


def test_parse_spec_null_keeps_the_default():
    assert parse_spec({"cmd": "true", "priority": None}, {"priority": 4})["priority"] == 4


def test_parse_spec_requires_cmd():
    for raw in ({}, {"cmd": ""}, {"cmd": "   "}, {"cmd": None}, {"rep_grp": "x"}):
        with pytest.raises(InvalidRequest, match="cmd was not specified"):
            parse_spec(raw, {})


@pytest.mark.parametrize("raw", [["cmd"], "true", 5, None])
def test_parse_spec_refuses_non_objects(raw):
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_spec(raw, {})


def test_parse_spec_refuses_unknown_property():
    with pytest.raises(InvalidRequest, match="'colour' is not a job property"):
        parse_spec({"cmd": "true", "colour": "red"}, {})


def test_parse_spec_refuses_non_string_cmd_and_nul():
    with pytest.raises(InvalidRequest):
        parse_spec({"cmd": 5}, {})
    with pytest.raises(InvalidRequest, match="NUL"):
        parse_spec({"cmd": "echo \x00"}, {})


@pytest.mark.parametrize("name, low, high", [("priority", 0, 255), ("retries", 0, 255), ("override", 0, 2)])
def test_integer_ranges(name, low, high):
    assert parse_spec({"cmd": "true", name: low}, {})[name] == low
    assert parse_spec({"cmd": "true", name: high}, {})[name] == high
    for bad in (low - 1, high + 1, 1.5, True, "x", [1]):
        with pytest.raises(InvalidRequest, match=name):
            parse_spec({"cmd": "true", name: bad}, {})


def test_cpus():
    assert parse_spec({"cmd": "true", "cpus": 0}, {})["cpus"] == 0
    assert parse_spec({"cmd": "true", "cpus": 0.5}, {})["cpus"] == 0.5
    for bad in (-1, True, "many", [1]):
        with pytest.raises(InvalidRequest, match="cpus"):
            parse_spec({"cmd": "true", "cpus": bad}, {})


@pytest.mark.parametrize("value, parsed", [
    ([{"cleanup": True}], [{"cleanup": True}]),
    ([{"cleanup_all": True}], [{"cleanup_all": True}]),
    ([{"run": "echo done"}], [{"run": "echo done"}]),
    ([{"run": "a"}, {"cleanup": True}], [{"run": "a"}, {"cleanup": True}]),
    ({"cleanup": True}, [{"cleanup": True}]),
    ('[{"run":"echo q"}]', [{"run": "echo q"}]),
])
def test_behaviours_accepted(value, parsed):
    for event in model.BEHAVIOUR_EVENTS:
        assert parse_spec({"cmd": "true", event: value}, {})[event] == parsed


@pytest.mark.parametrize("value", [
    [{"cleanup": True, "run": "x"}], [{}], [{"run": 5}], [{"cleanup": "yes"}], [{"explode": True}], ["cleanup"],
    [[{"cleanup": True}]], 5, "{nope",
])
def test_behaviours_refused(value):
    with pytest.raises(InvalidRequest, match="on_failure"):
        parse_spec({"cmd": "true", "on_failure": value}, {})


def test_env_form():
    assert parse_spec({"cmd": "true", "env": ["A=1", "B=x=y"]}, {})["env"] == ["A=1", "B=x=y"]
    for bad in ([1], {"A": "1"}, [["A=1"]], 5):
        with pytest.raises(InvalidRequest, match="env"):
            parse_spec({"cmd": "true", "env": bad}, {})
    for bad_entry in ("NOVALUE", "=x"):
        with pytest.raises(InvalidRequest, match="NAME=value"):
            normalise(parse_spec({"cmd": "true", "env": [bad_entry]}, {}))


def test_mounts_and_containers_refused():
    assert parse_spec({"cmd": "true", "mounts": []}, {})["mounts"] == []
    with pytest.raises(InvalidRequest, match="mounts are not supported"):
        parse_spec({"cmd": "true", "mounts": [{"Mount": "/m", "Targets": [{"Path": "s3://b"}]}]}, {})
    for name in ("with_docker", "with_singularity"):
        assert parse_spec({"cmd": "true", name: ""}, {})[name] == ""
        with pytest.raises(InvalidRequest, match="not supported"):
            parse_spec({"cmd": "true", name: "ubuntu:latest"}, {})


# -- normalise ---------------------------------------------------------------------------------------


def test_normalise_fills_wr_rest_defaults():
    spec = normalise(parse_spec({"cmd": "/usr/bin/sleep 5", "rerun": True}, {}))
    assert spec == {
        "cmd": "/usr/bin/sleep 5", "cwd": "/tmp", "rep_grp": "manually_added", "req_grp": "sleep",
        "memory": 1000, "time": 3600.0, "cpus": 0, "priority": 0, "retries": 0,
    }


def test_normalise_keeps_given_values_and_sorts_groups():
    spec = normalise(parse_spec({"cmd": "true", "cwd": "/var", "req_grp": "r", "dep_grps": ["b", "a", "b"],
                                 "deps": ["z", "y"], "limit_grps": ["l"]}, {}))
    assert spec["cwd"] == "/var"
    assert spec["req_grp"] == "r"
    assert spec["dep_grps"] == ["a", "b"]
    assert spec["deps"] == ["y", "z"]


def test_normalise_refuses_relative_cwd():
    with pytest.raises(InvalidRequest, match="absolute"):
        normalise(parse_spec({"cmd": "true", "cwd": "relative/dir"}, {}))


# -- the status object ----------------------------------------------------------------------------------


def seed_status_fields() -> list[str]:
    """The JStatus property names of the seed: its table of properties plus the keys of the Quick
    Start replies (HostID, HostIP and Env appear only there)."""
    text = SEED.read_text()
    table = text[text.index("Property\n\nType\n\nKey"):text.index("POST /rest/v1/jobs/\n\nAdd")]
    lines = [line.strip() for line in table.splitlines() if line.strip()]
    names = lines[2::2]
    example = json.loads(re.search(r"^\[\{\"Key\".*$", text, re.M).group(0))
    return names + [key for key in example[0] if key not in names]


def seed_quick_start_reply() -> list[dict]:
    text = SEED.read_text()
    return json.loads(re.search(r"^\[\{\"Key\".*$", text, re.M).group(0))


TYPES = {
    "Key": str, "RepGroup": str, "Cmd": str, "State": str, "Cwd": str, "CwdBase": str, "Behaviours": str,
    "Mounts": str, "MonitorDocker": str, "WithDocker": str, "WithSingularity": str, "ContainerMounts": str,
    "FailReason": str, "Host": str, "HostID": str, "HostIP": str, "StdErr": str, "StdOut": str,
    "HomeChanged": bool, "Exited": bool,
    "ExpectedRAM": int, "RequestedDisk": int, "Cores": int, "PeakRAM": int, "Exitcode": int, "Pid": int,
    "Started": int, "Ended": int, "Attempts": int, "Similar": int,
    "ExpectedTime": float, "Walltime": float, "CPUtime": float,
    "DepGroups": (list, type(None)), "Dependencies": (list, type(None)), "OtherRequests": (list, type(None)),
    "Env": (list, type(None)),
}


def test_seed_field_list_is_what_we_think():
    names = seed_status_fields()
    assert len(names) == len(set(names)) == 37
    assert set(names) == set(TYPES)


def test_status_has_exactly_the_seed_fields_with_their_types():
    job = make_job("sleep 5", cpus=1)
    for status in (job.status(1000.0), job.status(1000.0, std=True, env=True, similar=3)):
        assert set(status) == set(seed_status_fields())
        for name, value in status.items():
            expected = TYPES[name]
            assert isinstance(value, expected), (name, value)
            if expected in (int, float):
                assert not isinstance(value, bool), name


def test_status_types_after_a_run():
    job = make_job("echo hi", state=model.COMPLETE, env=["A=1"], dep_grps=["g"], deps=["d"],
                   cloud_os="ubuntu", on_failure=[{"cleanup": True}])
    job.restore_run({"attempts": 1, "pid": 42, "host": "h", "host_ip": "10.0.0.1", "started": 100.5,
                     "ended": 103.0, "exited": True, "exitcode": 0, "peak_ram": 12, "cpu_time": 0.25,
                     "actual_cwd": "/wr_cwd/x/cwd"})
    job.stdout, job.stderr = "hi\n", "warn\n"
    status = job.status(2000.0, std=True, env=True, similar=2)
    for name, value in status.items():
        assert isinstance(value, TYPES[name]), (name, value)
    assert status["Env"] == ["A=1"]
    assert status["DepGroups"] == ["g"] and status["Dependencies"] == ["d"]
    assert status["OtherRequests"] == ["cloud_os:ubuntu"]
    assert json.loads(status["Behaviours"]) == {"on_failure": [{"cleanup": True}]}
    assert status["Started"] == 100 and status["Ended"] == 103
    assert status["Walltime"] == pytest.approx(2.5)
    assert status["StdOut"] == "hi" and status["StdErr"] == "warn"
    assert status["Similar"] == 2
    quiet = job.status(2000.0)
    assert quiet["StdOut"] == quiet["StdErr"] == "" and quiet["Env"] is None


def test_status_matches_the_seed_quick_start_reply():
    """The second job of the seed's Quick Start, as its POST reply shows it (the fields it has)."""
    defaults = parse_defaults({"rep_grp": "myid", "cpus": "2", "memory": "3G", "time": "5s"})
    spec = normalise(parse_spec({"cmd": "sleep 5", "cpus": 1}, defaults))
    job = Job(job_key(spec), spec, model.READY, 2)
    expected = seed_quick_start_reply()[1]
    status = job.status(12345.0)
    assert {name: status[name] for name in expected} == expected


def test_fractional_cores_stay_fractional():
    assert make_job(cpus=0.5).status(0)["Cores"] == 0.5
    assert make_job(cpus=2.0).status(0)["Cores"] == 2


def test_walltime_of_a_running_job_grows_with_now():
    job = make_job()
    job.started = 100.0
    assert job.status(150.0)["Walltime"] == 50.0
    assert job.status(160.0)["Walltime"] == 60.0


# -- grouped (limit=N) --------------------------------------------------------------------------------


def test_grouped_keeps_limit_per_group_and_counts_the_rest():
    failed = [make_job(f"false {i}", model.BURIED, seq=i) for i in range(5)]
    for job in failed:
        job.exitcode, job.fail_reason = 1, model.FAIL_NONZERO
    odd = make_job("exit 2", model.BURIED, seq=10)
    odd.exitcode, odd.fail_reason = 2, model.FAIL_NONZERO
    done = make_job("true", model.COMPLETE, seq=11)
    jobs = failed + [odd, done]

    assert grouped(jobs, 2) == [(failed[0], 0), (failed[1], 3), (odd, 0), (done, 0)]
    assert grouped(jobs, 1) == [(failed[0], 4), (odd, 0), (done, 0)]
    assert grouped(jobs, 10) == [(job, 0) for job in jobs]


def test_grouped_separates_fail_reasons():
    a = make_job("a", model.BURIED, seq=1)
    b = make_job("b", model.BURIED, seq=2)
    a.exitcode = b.exitcode = 126
    a.fail_reason, b.fail_reason = model.FAIL_PERMISSION, model.FAIL_NONZERO
    assert grouped([a, b], 1) == [(a, 0), (b, 0)]


def test_grouped_empty():
    assert grouped([], 3) == []


def test_a_lone_surrogate_is_refused_not_a_server_error():
    with pytest.raises(InvalidRequest, match="Unicode"):
        parse_spec({"cmd": "echo \ud800"}, {})
