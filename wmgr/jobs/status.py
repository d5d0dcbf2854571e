"""The wr status object (JStatus), defined once: FIELDS below. From it come Job.status's dict,
the JSON encoder of the hot paths (statuses_json) and the OpenAPI schema (SCHEMA).

A reply to a big add or GET is one status object per job: building each as a dict and then having
json.dumps walk it (escaping the same 37 keys again for every job) took half of the daemon's time
for a 100,000-job add. So the encoders are generated from FIELDS as straight-line code: keys are
constant text, each value is encoded as json.dumps encodes it, and a job that has never run (every
field that has an initial value has it, with its exact type) with no optional properties takes a
path where those fields are constant text.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, NamedTuple, Optional

from wmgr.jobs.model import BEHAVIOUR_EVENTS, OTHER_REQUESTS, UNSET_TIME

_STR: dict[str, Any] = {"type": "string"}
_STRS: dict[str, Any] = {"type": "array", "items": {"type": "string"}, "nullable": True}
_INT: dict[str, Any] = {"type": "integer"}
_NUM: dict[str, Any] = {"type": "number"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_NONE = object()  # no initial value: computed for every job


class Field(NamedTuple):
    name: str  # wr's name
    value: str  # a Python expression over job, spec, now, std, env, similar
    schema: dict[str, Any]
    # The value every job that has never run has, when it has none of the optional properties
    # (OPTIONAL_SHOWN): then written as constant text.
    initial: Any = _NONE


FIELDS = (
    Field("Key", "job.key", _STR),
    Field("RepGroup", 'spec["rep_grp"]', _STR),
    Field("DepGroups", 'spec.get("dep_grps") or None', _STRS, None),
    Field("Dependencies", 'spec.get("deps") or None', _STRS, None),
    Field("Cmd", 'spec["cmd"]', _STR),
    Field("State", "job.state", _STR),
    Field("Cwd", "job.actual_cwd", _STR, ""),
    Field("CwdBase", 'spec["cwd"]', _STR),
    Field("HomeChanged", "job.home_changed", _BOOL, False),
    Field("Behaviours", "_behaviours(spec)", _STR, ""),
    Field("Mounts", '""', _STR, ""),
    Field("MonitorDocker", 'spec.get("monitor_docker", "")', _STR, ""),
    Field("WithDocker", '""', _STR, ""),
    Field("WithSingularity", '""', _STR, ""),
    Field("ContainerMounts", 'spec.get("container_mounts", "")', _STR, ""),
    Field("ExpectedRAM", "job.memory", _INT),
    Field("ExpectedTime", "job.expected_time", _NUM),
    Field("RequestedDisk", 'spec.get("disk", 0)', _INT, 0),
    Field("Cores", '_cores(spec["cpus"])', _NUM),
    Field("PeakRAM", "job.peak_ram", _INT, 0),
    Field("OtherRequests", "_others(spec)", _STRS, None),
    Field("Exited", "job.exited", _BOOL, False),
    Field("Exitcode", "job.exitcode", _INT, 0),
    Field("FailReason", "job.fail_reason", _STR, ""),
    Field("Pid", "job.pid", _INT, 0),
    Field("Host", "job.host", _STR, ""),
    Field("HostID", "job.host_id", _STR, ""),
    Field("HostIP", "job.host_ip", _STR, ""),
    Field("Walltime", "job.walltime(now)", _NUM, 0.0),
    Field("CPUtime", "job.cpu_time", _NUM),
    Field("Started", "_time(job.started)", _INT, UNSET_TIME),
    Field("Ended", "_time(job.ended)", _INT, UNSET_TIME),
    # wr shows output without its final newline ("mymsg", not "mymsg\n").
    Field("StdErr", '_output(job.stderr) if std else ""', _STR, ""),
    Field("StdOut", '_output(job.stdout) if std else ""', _STR, ""),
    Field("Env", '(spec.get("env") or None) if env else None', _STRS, None),
    Field("Attempts", "job.attempts", _INT, 0),
    Field("Similar", "similar", _INT),
)

SCHEMA: dict[str, Any] = {"type": "object", "properties": {f.name: f.schema for f in FIELDS},
                          "required": [f.name for f in FIELDS]}

# Spec properties the status object shows beyond the ones every normalised spec has.
OPTIONAL_SHOWN = frozenset(("dep_grps", "deps", "monitor_docker", "container_mounts", "disk", "env")
                           + BEHAVIOUR_EVENTS + OTHER_REQUESTS)

# The job attributes a never-run job has at their initial values (with their exact types): a job
# whose attributes all are shows the initial value of every field that has one.
_FRESH_ATTRIBUTES = {"actual_cwd": "", "home_changed": False, "peak_ram": 0, "exited": False, "exitcode": 0,
                     "fail_reason": "", "pid": 0, "host": "", "host_ip": "", "host_id": "", "started": None, "ended": None,
                     "attempts": 0, "memory_floor": 0}


def _behaviours(spec: dict[str, Any]) -> str:
    behaviours = {event: spec[event] for event in BEHAVIOUR_EVENTS if spec.get(event)}
    return json.dumps(behaviours) if behaviours else ""


def _others(spec: dict[str, Any]) -> Optional[list[str]]:
    return [f"{name}:{spec[name]}" for name in OTHER_REQUESTS if spec.get(name)] or None


def _cores(cores: Any) -> Any:
    return int(cores) if float(cores).is_integer() else cores


def _output(text: str) -> str:
    return text.rstrip("\n")


def _time(seconds: Optional[float]) -> int:
    return int(seconds) if seconds is not None else UNSET_TIME


_esc = json.encoder.encode_basestring_ascii  # what json.dumps (ensure_ascii) writes for a str
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(value, separators=(",", ":"))
_INF = float("inf")
_MAX_CUTS = 64  # see statuses_json


def _json(value: Any) -> str:
    """One value exactly as json.dumps(value, separators=(",", ":")) writes it."""
    cls = value.__class__
    if cls is str:
        return _esc(value)
    if cls is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if cls is float:
        if value != value:
            return "NaN"
        if value == _INF:
            return "Infinity"
        if value == -_INF:
            return "-Infinity"
        return float.__repr__(value)
    return _encode(value)


def _exactly(expression: str, value: Any) -> str:
    """Source testing that `expression` is `value` with its exact type (False is not 0)."""
    if value is None or value is True or value is False:
        return f"({expression}) is {value!r}"
    return f"({expression}).__class__ is {type(value).__name__} and ({expression}) == {value!r}"


def _generate() -> dict[str, Any]:
    """The three functions, as source built from FIELDS (print _SOURCE to read them)."""
    dict_items = ", ".join(f"{f.name!r}: {f.value}" for f in FIELDS)
    general = ",".join(f'{_esc(f.name)}:{{_json({f.value})}}' for f in FIELDS)
    fresh = ",".join(
        f'{_esc(f.name)}:{_json(f.initial).replace("{", "{{").replace("}", "}}")}' if f.initial is not _NONE
        else f'{_esc(f.name)}:{{_json({f.value})}}' for f in FIELDS)
    checks = " and ".join(_exactly(f"job.{name}", value) for name, value in _FRESH_ATTRIBUTES.items())
    # The fresh text with the key and the cmd left out (a NUL where each goes: every NUL a value
    # holds is written \u0000), and the values that vary besides them: see statuses_json.
    marked = fresh.replace("{_json(job.key)}", "\\x00", 1).replace('{_json(spec["cmd"])}', "\\x00", 1)
    names = [f.name for f in FIELDS]
    assert marked.count("\\x00") == 2 and names.index("Key") < names.index("Cmd"), "a NUL for each, Key first"
    varying = ", ".join(f.value for f in FIELDS if f.initial is _NONE and f.name not in ("Key", "Cmd"))
    source = f'''
def status_dict(job, now, std=False, env=False, similar=0):
    spec = job.spec
    return {{{dict_items}}}

def status_json(job, now, std, env, similar):
    spec = job.spec
    if ({checks} and _OPTIONAL_SHOWN.isdisjoint(spec)
            and (not std or (job.stdout.__class__ is str and not job.stdout
                             and job.stderr.__class__ is str and not job.stderr))):
        return f'{{{{{fresh}}}}}'
    return f'{{{{{general}}}}}'

def is_fresh(job, spec, std):
    return ({checks} and _OPTIONAL_SHOWN.isdisjoint(spec)
            and (not std or (job.stdout.__class__ is str and not job.stdout
                             and job.stderr.__class__ is str and not job.stderr)))

def fresh_varying(job, spec, similar):
    return ({varying},)

def fresh_cut(job, now, similar):
    spec = job.spec
    return f'{{{{{marked}}}}}'.split("\\x00")
'''
    namespace: dict[str, Any] = {"_json": _json, "_behaviours": _behaviours, "_others": _others, "_cores": _cores,
                                 "_time": _time, "_output": _output, "_OPTIONAL_SHOWN": OPTIONAL_SHOWN}
    exec(compile(source, "<wmgr.jobs.status>", "exec"), namespace)
    namespace["_SOURCE"] = source
    return namespace


_generated = _generate()
status_dict = _generated["status_dict"]
status_json = _generated["status_json"]
is_fresh = _generated["is_fresh"]
fresh_varying = _generated["fresh_varying"]
fresh_cut = _generated["fresh_cut"]


def statuses_json(pairs: Iterable[tuple[Any, int]], now: float, std: bool = False, env: bool = False) -> bytes:
    """The reply listing these jobs' status objects: the same bytes as
    json.dumps([job.status(now, std, env, similar) for job, similar in pairs],
    separators=(",", ":")).encode("utf-8")."""
    return json_array(status_parts(pairs, now, std, env))


def status_parts(pairs: Iterable[tuple[Any, int]], now: float, std: bool = False, env: bool = False) -> list[bytes]:
    """Each job's status object as JSON, encoded: what statuses_json joins (a big reply is made a
    slice of jobs at a time, and joined once)."""
    # Jobs that have never run and were added alike (one POST's, mostly) differ only in their
    # key and cmd: their text is cut once per distinct set of the other varying values (told
    # apart by identity, never by equality: 0 == False == -0.0 but they are written apart; the
    # values are kept in `cuts` so that no id is reused meanwhile), and each job's is the cut
    # text with its two values put in.
    # Jobs whose values are not shared (read back from the store, each its own objects) would
    # each make a cut: past _MAX_CUTS this is given up for the rest of the reply.
    parts = []
    append = parts.append
    cuts: dict[tuple[int, ...], tuple[list[str], tuple[Any, ...]]] = {}
    cutting = True
    for job, similar in pairs:
        spec = job.spec
        if cutting and job.key.__class__ is str and spec["cmd"].__class__ is str and is_fresh(job, spec, std):
            varying = fresh_varying(job, spec, similar)
            ident = tuple(map(id, varying))
            cut = cuts.get(ident)
            if cut is None:
                if len(cuts) < _MAX_CUTS:
                    cut = cuts[ident] = (fresh_cut(job, now, similar), varying)
                else:
                    cutting = False
            if cut is not None:
                before, between, after = cut[0]
                append(f"{before}{_esc(job.key)}{between}{_esc(spec['cmd'])}{after}".encode())
                continue
        append(status_json(job, now, std, env, similar).encode("utf-8"))
    return parts


def json_array(parts: list[bytes]) -> bytes:
    """Encoded JSON values as one JSON array (`parts` is used up)."""
    if not parts:
        return b"[]"
    # The text is ASCII (json.dumps escapes everything else). Tens of MB: encoding each part and
    # joining the bytes once copies the whole reply once.
    parts[0] = b"[" + parts[0]
    parts[-1] += b"]"
    return b",".join(parts)
