"""Jobs: what a client defines, how it is checked, its key, and the status object wr clients read.

A job's definition (its "spec") is a plain dict of normalised values: the names are wr's REST
property names, the units are ours (memory in MB, time in seconds). Everything a run produces
lives on the Job as attributes and is stored as the "run" JSON.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
from json.encoder import encode_basestring_ascii as _esc
from typing import Any, Iterable, Mapping, Optional

import farmhash

from wmgr.compactjson import dumps as _dumps
from wmgr.errors import InvalidRequest
from wmgr.jobs.limits import parse_limit_groups

# -- states ----------------------------------------------------------------------------------------

DELAYED = "delayed"
READY = "ready"
RESERVED = "reserved"
RUNNING = "running"
LOST = "lost"
BURIED = "buried"
DEPENDENT = "dependent"
COMPLETE = "complete"
DELETED = "deleted"  # only ever in the reply to a DELETE
DELETABLE = "deletable"  # a filter: neither running nor complete

STATES = (DELAYED, READY, RESERVED, RUNNING, LOST, BURIED, DEPENDENT, COMPLETE)
FILTER_STATES = STATES + (DELETABLE,)
ACTIVE_STATES = frozenset({RESERVED, RUNNING})

# wr's "time.Time{}" as unix seconds: what its clients see for a job that has not started or ended.
UNSET_TIME = -62135596800

# wr's fail reasons are part of its observable API; these are the ones this manager produces.
FAIL_NONZERO = "command exited non-zero"
FAIL_PERMISSION = "command permission problem"
FAIL_NOT_FOUND = "command not found"
FAIL_CWD = "working directory does not exist"
FAIL_START = "command failed to start"
FAIL_SIGNAL = "command failed to complete normally"
FAIL_KILLED = "killed by user request"
FAIL_LOST = "lost contact with runner"
FAIL_RESOURCES = "resource requirements cannot be met"
FAIL_RAM = "command used too much RAM"
FAIL_TIME = "command used too much time"

# -- defaults (wr's REST defaults) -----------------------------------------------------------------

DEFAULT_REP_GRP = "manually_added"
DEFAULT_CWD = "/tmp"
DEFAULT_MEMORY_MB = 1000
DEFAULT_TIME_S = 3600.0

# -- bounds: the largest value each number may have (the README lists them) ---------------------
#
# Each is far beyond any machine this runs on, yet small enough that every value stays finite and
# exact in JSON, SQLite (int64) and float arithmetic: a job can never store Infinity or 1e29 MB.

MAX_MEMORY_MB = 64 * 1024**2  # 64 TiB
MAX_TIME_S = 366 * 86400.0  # a year
MAX_CPUS = 4096
MAX_DISK_GB = 1024**2  # 1 PiB
# A limit group's count (name:N) is at most limits.MAX_LIMIT.
MAX_TEXT = 1 << 20  # characters of one string property (cmd, cwd, an env entry...)
MAX_ITEMS = 100_000  # entries of one array property (deps, env...)

# -- value parsers ---------------------------------------------------------------------------------

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP])B?\s*$", re.IGNORECASE)
_MEMORY_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_memory(value: Any) -> int:
    """'5M', '3G', '512K' -> whole megabytes (binary units, as wr). A bare number is refused."""
    match = _MEMORY.match(value) if isinstance(value, str) and len(value) <= 64 else None
    if not match:
        raise InvalidRequest(f"memory {_shown(value)} is not a number followed by a unit such as 5M or 3G")
    megabytes = float(match.group(1)) * _MEMORY_MB[match.group(2).upper()]
    if not megabytes <= MAX_MEMORY_MB:  # also catches inf (a number of 400 digits)
        raise InvalidRequest(
            f"memory {_shown(value)} is more than the most a job may ask for ({MAX_MEMORY_MB // 1024**2}T)")
    return max(1, math.ceil(megabytes))


def parse_duration(value: Any) -> float:
    """A Go duration ('5s', '30m', '1h30m', '1.5h', '0') -> seconds, at most MAX_TIME_S."""
    if isinstance(value, str) and len(value) <= 64:
        text = value.strip()
        if text == "0":
            return 0.0
        position, total = 0, 0.0
        for part in _DURATION_PART.finditer(text):
            if part.start() != position:
                break
            total += float(part.group(1)) * _DURATION_S[part.group(2)]
            position = part.end()
        else:
            if position == len(text) and position:
                if not total <= MAX_TIME_S:  # also catches inf
                    raise InvalidRequest(f"time {_shown(value)} is longer than the most a job may ask for (8784h)")
                return total
    raise InvalidRequest(f"time {_shown(value)} is not a duration such as 5s, 30m or 1h30m")


def _shown(value: Any) -> str:
    """A value as an error message shows it: repr, cut short (a reply must not echo megabytes),
    and with lone surrogates escaped so that the message itself is valid text."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _int_in(name: str, low: int, high: int) -> Any:
    def parse(value: Any) -> int:
        if isinstance(value, str) and len(value) <= 32 and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequest(f"{name} must be a whole number from {low} to {high}, not {_shown(value)}")
        return value

    return parse


def _number(name: str, high: float) -> Any:
    def parse(value: Any) -> float:
        if isinstance(value, str) and len(value) <= 32:
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise InvalidRequest(f"{name} must be a number from 0 to {high}, not {_shown(value)}")
        return value

    return parse


def _boolean(name: str) -> Any:
    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no", ""):
            return value.lower() in ("true", "1", "yes")
        raise InvalidRequest(f"{name} must be true or false, not {_shown(value)}")

    return parse


def check_text(name: str, value: str) -> str:
    """Text that may reach exec, the environment, a file name or the store: no NUL (exec and the
    file system would cut it or fail), no lone surrogate ("\\ud800" is valid JSON but cannot be
    encoded, so it would fail wherever the text is written), and of a sane length."""
    if "\x00" in value:
        raise InvalidRequest(f"{name} must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    if len(value) > MAX_TEXT:
        raise InvalidRequest(f"{name} is longer than {MAX_TEXT} characters")
    return value


def _text(name: str) -> Any:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string, not {_shown(value)}")
        return check_text(name, value)

    return parse


def _strings(name: str) -> Any:
    """A JSON array of strings, or (from a query parameter) one comma-separated string."""

    def parse(value: Any) -> list[str]:
        if isinstance(value, str):
            value = [item for item in value.split(",") if item]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InvalidRequest(f"{name} must be an array of strings, not {_shown(value)}")
        if len(value) > MAX_ITEMS:
            raise InvalidRequest(f"{name} has more than {MAX_ITEMS} entries")
        for item in value:
            check_text(f"each of {name}", item)
        return value

    return parse


def _limit_groups(name: str) -> Any:
    """Limit groups as _strings, each `name` or `name:N` with N within MAX_LIMIT (checked here,
    where a bad one refuses the whole request before anything is queued)."""
    strings = _strings(name)

    def parse(value: Any) -> list[str]:
        value = strings(value)
        parse_limit_groups(value)
        return value

    return parse


_BEHAVIOUR_KINDS = {"cleanup": bool, "cleanup_all": bool, "run": str, "remove": bool, "nothing": bool}


def _behaviours(name: str) -> Any:
    def parse(value: Any) -> list[dict[str, Any]]:
        value = _json_value(name, value)
        if value is None:
            return []
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise InvalidRequest(f"{name} must be an array of behaviour objects")
        for behaviour in value:
            if not isinstance(behaviour, dict) or len(behaviour) != 1:
                raise InvalidRequest(
                    f"each {name} behaviour must be one of {{\"cleanup\":true}}, "
                    f"{{\"cleanup_all\":true}} or {{\"run\":\"command\"}}, not {_shown(behaviour)}"
                )
            ((kind, argument),) = behaviour.items()
            if kind not in _BEHAVIOUR_KINDS or not isinstance(argument, _BEHAVIOUR_KINDS[kind]):
                raise InvalidRequest(f"{name} behaviour {_shown(behaviour)} is not one this manager knows")
            if isinstance(argument, str):  # a command to run: it reaches exec
                check_text(f"{name} {kind}", argument)
        return value

    return parse


def _json_value(name: str, value: Any) -> Any:
    """Query parameters carry JSON-valued properties as (URL-escaped) JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except (ValueError, RecursionError):
            raise InvalidRequest(f"{name} must be JSON, not {_shown(value)}") from None
    return value


def _mounts(name: str) -> Any:
    def parse(value: Any) -> list[Any]:
        value = _json_value(name, value)
        if value in (None, []):
            return []
        # Mounts would need a FUSE filesystem this manager does not have: refusing them at add
        # time is better than queueing a job that can only fail.
        raise InvalidRequest("mounts are not supported by this manager")

    return parse


def _unsupported(name: str) -> Any:
    def parse(value: Any) -> str:
        if value in (None, ""):
            return ""
        raise InvalidRequest(f"{name} is not supported by this manager (no container runtime)")

    return parse


# Each property a job may have: its parser. Query parameters of the same names give defaults.
PARSERS: dict[str, Any] = {
    "cmd": _text("cmd"),
    "cwd": _text("cwd"),
    "cwd_matters": _boolean("cwd_matters"),
    "change_home": _boolean("change_home"),
    "rep_grp": _text("rep_grp"),
    "req_grp": _text("req_grp"),
    "memory": parse_memory,
    "time": parse_duration,
    "cpus": _number("cpus", MAX_CPUS),
    "disk": _int_in("disk", 0, MAX_DISK_GB),
    "override": _int_in("override", 0, 2),
    "priority": _int_in("priority", 0, 255),
    "retries": _int_in("retries", 0, 255),
    "dep_grps": _strings("dep_grps"),
    "deps": _strings("deps"),
    "limit_grps": _limit_groups("limit_grps"),
    "env": _strings("env"),
    "on_failure": _behaviours("on_failure"),
    "on_success": _behaviours("on_success"),
    "on_exit": _behaviours("on_exit"),
    "mounts": _mounts("mounts"),
    "monitor_docker": _text("monitor_docker"),
    "with_docker": _unsupported("with_docker"),
    "with_singularity": _unsupported("with_singularity"),
    "container_mounts": _text("container_mounts"),
    "rerun": _boolean("rerun"),
    "cloud_os": _text("cloud_os"),
    "cloud_username": _text("cloud_username"),
    "cloud_flavor": _text("cloud_flavor"),
    "cloud_script": _text("cloud_script"),
    "cloud_config_files": _text("cloud_config_files"),
    "cloud_ram": _int_in("cloud_ram", 0, MAX_MEMORY_MB),
}
# Beyond wr's properties, a job made by another of wmgr's APIs (pman, tasks) carries `labels`: a
# JSON object that API keeps its own facts in (a pman job's root name, jid, auid...). They are
# not in PARSERS, so no wr client can set them, and they are stored with the job.
OTHER_REQUESTS = ("cloud_os", "cloud_username", "cloud_flavor", "cloud_script", "cloud_config_files", "cloud_ram")
BEHAVIOUR_EVENTS = ("on_failure", "on_success", "on_exit")


def parse_defaults(query: Mapping[str, str]) -> dict[str, Any]:
    """Query parameters as defaults for every job of a POST. Unknown names are refused."""
    defaults: dict[str, Any] = {}
    for name, value in query.items():
        if name == "token":
            continue
        if name == "cmd":
            raise InvalidRequest("cmd cannot be given as a default")
        parser = PARSERS.get(name)
        if parser is None:
            raise InvalidRequest(f"{name!r} is not a job property")
        defaults[name] = parser(value)
    return defaults


def parse_spec(raw: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """One job object of a POST, merged over the defaults and checked, as a normalised spec."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"each job must be a JSON object, not {raw!r}")
    spec = dict(defaults)
    for name, value in raw.items():
        parser = PARSERS.get(name)
        if parser is None:
            raise InvalidRequest(f"{name!r} is not a job property")
        if value is not None:
            spec[name] = parser(value)
    cmd = spec.get("cmd")
    if not cmd or not cmd.strip():
        raise InvalidRequest("cmd was not specified")
    return spec


def normalise(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill in defaults so that every stored spec is complete."""
    cwd = spec.get("cwd") or DEFAULT_CWD
    # os.path.isabs and os.path.basename of a str, without their generality (a big add calls this
    # 200,000 times): this daemon is POSIX-only.
    if not (cwd.startswith("/") if cwd.__class__ is str else os.path.isabs(cwd)):
        raise InvalidRequest(f"cwd {cwd!r} must be an absolute path")
    spec["cwd"] = cwd
    spec.setdefault("rep_grp", DEFAULT_REP_GRP)
    if not spec.get("req_grp"):
        words = spec["cmd"].split(None, 1)  # split once: the first word, if there is one
        first = words[0] if words else ""
        spec["req_grp"] = first[first.rfind("/") + 1:]
    spec.setdefault("memory", DEFAULT_MEMORY_MB)
    spec.setdefault("time", DEFAULT_TIME_S)
    spec.setdefault("cpus", 0)
    spec.setdefault("priority", 0)
    spec.setdefault("retries", 0)
    spec.pop("rerun", None)
    for name in ("dep_grps", "deps", "limit_grps"):
        if spec.get(name):
            spec[name] = sorted(set(spec[name]))
    if spec.get("env"):
        for entry in spec["env"]:
            if "=" not in entry or entry.startswith("="):
                raise InvalidRequest(f"env entry {entry!r} must look like NAME=value")
    return spec


def parse_specs(body: list[Any], defaults: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Every job object of a POST as parse_spec and normalise leave it (errors name the job's
    index); also whether any asked to rerun. See SpecParser."""
    parser = SpecParser(defaults)
    return parser.parse(body), parser.rerun


class SpecParser:
    """The job objects of one POST, parsed a slice at a time (`parse(items, first)`, `first`
    being the index of items[0] in the POST, which errors name), so that a big add can give the
    reactor turns between slices; `rerun` tells whether any asked to rerun.

    A job given as {"cmd": "..."} alone (the usual shape: the other properties come as query
    defaults) takes a fast path: the defaults are checked and normalised once, and each such job
    is a copy of that template with its own cmd and, unless the defaults set one, the req_grp its
    cmd implies: the same spec, with the same keys in the same order, as the general path makes.
    Every slice shares the one template, so the jobs of a POST share their values' objects (the
    reply's encoder counts on it, see status.statuses_json)."""

    def __init__(self, defaults: Mapping[str, Any]) -> None:
        self.defaults = defaults
        self.template = _simple_template(defaults)
        self.derive_req_grp = not defaults.get("req_grp")
        self.encoded = _encoded_template(self.template, self.derive_req_grp) if self.template is not None else None
        self.template_rerun = bool(defaults.get("rerun"))
        self.rerun = False

    def parse(self, items: list[Any], first: int = 0) -> list[dict[str, Any]]:
        template, encoded, derive_req_grp, defaults = self.template, self.encoded, self.derive_req_grp, self.defaults
        cmd_parser = PARSERS["cmd"]
        specs = []
        rerun = self.rerun
        for index, raw in enumerate(items, first):
            try:
                if template is not None and raw.__class__ is dict and len(raw) == 1 and "cmd" in raw:
                    cmd = raw["cmd"]
                    if cmd is not None:
                        cmd = cmd_parser(cmd)
                    if not cmd or not cmd.strip():
                        raise InvalidRequest("cmd was not specified")
                    spec = EncodedSpec(template) if encoded is not None else template.copy()
                    spec["cmd"] = cmd
                    rerun = rerun or self.template_rerun
                    if derive_req_grp:
                        words = cmd.split(None, 1)
                        first_word = words[0] if words else ""
                        req_grp = spec["req_grp"] = first_word[first_word.rfind("/") + 1:]
                    if encoded is not None:
                        if derive_req_grp:
                            values = (cmd, req_grp) if encoded[0] else (req_grp, cmd)
                            spec.json = encoded[1] + _esc(values[0]) + encoded[2] + _esc(values[1]) + encoded[3]
                        else:
                            spec.json = encoded[1] + _esc(cmd) + encoded[2]
                else:
                    spec = parse_spec(raw, defaults)
                    rerun = rerun or bool(spec.get("rerun"))
                    spec = normalise(spec)
            except InvalidRequest as e:
                raise InvalidRequest(f"there was a problem interpreting your job {index}: {e.reason}") from None
            specs.append(spec)
        self.rerun = rerun
        return specs


class EncodedSpec(dict):
    """A spec that also carries its stored JSON text (`json`), made from a template while the
    POST was parsed; `stored_json` hands it over once. Otherwise a dict like any other."""

    __slots__ = ("json",)  # set as soon as it is made (no __init__: one per job of a big add)


def stored_json(spec: dict[str, Any]) -> str:
    """The spec's JSON as stored: compactjson.dumps(spec), or the same text made in advance."""
    if spec.__class__ is EncodedSpec and spec.json is not None:
        text, spec.json = spec.json, None  # once: nothing keeps the text alive afterwards
        return text
    return _dumps(spec)


_CMD_MARK, _REQ_GRP_MARK = "\x00wmgr-cmd\x00", "\x00wmgr-req-grp\x00"


def _encoded_template(template: dict[str, Any], req_grp_varies: bool) -> Optional[tuple[Any, ...]]:
    """compactjson.dumps(template) cut where cmd (and req_grp, if it varies) go: (cmd first?,
    text before the first, between, after), so that a job's JSON is three concatenations."""
    marked = dict(template, cmd=_CMD_MARK)
    if req_grp_varies:
        marked["req_grp"] = _REQ_GRP_MARK
    text = _dumps(marked)
    cmd_mark, req_grp_mark = _esc(_CMD_MARK), _esc(_REQ_GRP_MARK)
    if text.count(cmd_mark) != 1 or text.count(req_grp_mark) != (1 if req_grp_varies else 0):
        return None  # a default that happens to hold a mark: no shortcut
    if not req_grp_varies:
        before, after = text.split(cmd_mark)
        return (True, before, after)
    cmd_first = text.index(cmd_mark) < text.index(req_grp_mark)
    first, second = (cmd_mark, req_grp_mark) if cmd_first else (req_grp_mark, cmd_mark)
    before, rest = text.split(first)
    between, after = rest.split(second)
    return (cmd_first, before, between, after)


def _simple_template(defaults: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The normalised spec of a job {"cmd": <any>} under these defaults, or None when there is no
    such shortcut: the defaults do not normalise (the general path then says why, for the right
    job), or hold lists or objects (each job must have its own)."""
    if any(value.__class__ not in (str, int, float, bool) for value in defaults.values()):
        return None
    spec = dict(defaults)
    spec["cmd"] = "x"
    try:
        return normalise(spec)
    except InvalidRequest:
        return None


def job_key(spec: Mapping[str, Any]) -> str:
    """wr's key: FarmHash Fingerprint128 of cmd (and cwd when it matters), as 32 hex digits.

    Jobs made by wmgr's other APIs may carry `unique` (never settable through wr's REST API): it
    is mixed in so that running the same command again is a new job, as pman's clients expect.
    """
    essence = spec["cmd"] + "."
    if spec.get("cwd_matters"):
        essence = spec["cwd"] + "." + essence
    if spec.get("unique"):
        essence += "#" + spec["unique"]
    high, low = farmhash.fingerprint128(essence)
    return "%016x%016x" % (high, low)


def is_key(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


# -- the job ---------------------------------------------------------------------------------------

# Attributes a run produces, with their values before any run; persisted as the "run" JSON.
RUN_FIELDS: dict[str, Any] = {
    "attempts": 0,
    "pid": 0,
    "host": "",
    "host_ip": "",
    "host_id": "",  # the worker instance that ran it (empty: this daemon)
    "started": None,
    "ended": None,
    "exited": False,
    "exitcode": 0,
    "fail_reason": "",
    "peak_ram": 0,
    "cpu_time": 0.0,
    "actual_cwd": "",
    "home_changed": False,
    "kill_reason": "",
    "failures": 0,  # failed runs since the job was added or last retried by hand
    "delay_until": None,  # when a delayed job becomes ready again
    "memory_floor": 0,  # MB a retry after a RAM failure asks for at least
}


_RUN_NAMES = tuple(RUN_FIELDS)
_run_values = operator.attrgetter(*RUN_FIELDS)


def run_record_of(values: tuple[Any, ...]) -> dict[str, Any]:
    """The persisted "run" record from Job.run_values()."""
    return dict(zip(_RUN_NAMES, values))


class Job:
    """One job of the queue: its definition, its state, and what its latest run produced."""

    __slots__ = ("key", "spec", "state", "seq", "stdout", "stderr", "expected_ram", "expected_time",
                 "stored") + tuple(RUN_FIELDS)

    def __init__(self, key: str, spec: dict[str, Any], state: str, seq: int) -> None:
        self.key = key
        self.spec = spec
        self.state = state
        self.seq = seq
        self.stdout = ""
        self.stderr = ""
        # What the scheduler reserves: the requested values, or learned ones (see learning.py).
        # Bounded again here: a store written before the bounds may hold 1e29 MB or Infinity,
        # which would make every listing that shows the job invalid JSON (NaN fails both tests).
        ram, seconds = spec["memory"], spec["time"]
        self.expected_ram: int = ram if ram <= MAX_MEMORY_MB else MAX_MEMORY_MB
        self.expected_time: float = seconds if seconds <= MAX_TIME_S else MAX_TIME_S
        # (rep group, state, exit code, fail reason) as last written: the store's counters move
        # from this to the new values with every write.
        self.stored: Optional[tuple[str, str, int, str]] = None
        # The values of RUN_FIELDS, assigned directly (a setattr loop costs more than the rest of
        # this method for a big add); a test holds run_record() of a new Job equal to RUN_FIELDS.
        self.attempts = 0
        self.pid = 0
        self.host = ""
        self.host_ip = ""
        self.host_id = ""
        self.started: Optional[float] = None
        self.ended: Optional[float] = None
        self.exited = False
        self.exitcode = 0
        self.fail_reason = ""
        self.peak_ram = 0
        self.cpu_time = 0.0
        self.actual_cwd = ""
        self.home_changed = False
        self.kill_reason = ""
        self.failures = 0
        self.delay_until: Optional[float] = None
        self.memory_floor = 0

    @property
    def rep_grp(self) -> str:
        return self.spec["rep_grp"]

    @property
    def cores(self) -> float:
        return self.spec["cpus"]

    @property
    def memory(self) -> int:
        return max(self.expected_ram, self.memory_floor)

    @property
    def group_key(self) -> tuple[str, str, int, str]:
        return (self.spec["rep_grp"], self.state, self.exitcode, self.fail_reason)

    def run_record(self) -> dict[str, Any]:
        return run_record_of(_run_values(self))

    def run_values(self) -> tuple[Any, ...]:
        """RUN_FIELDS' values now, as a tuple (all immutable): a snapshot that another thread
        may turn into the record (run_record_of) while the job goes on changing."""
        return _run_values(self)

    def restore_run(self, record: Mapping[str, Any]) -> None:
        for name, value in record.items():
            if name in RUN_FIELDS:
                setattr(self, name, value)

    def reset_run(self) -> None:
        """Back to RUN_FIELDS' values, but for attempts, failures and memory_floor (assigned
        directly, as in __init__: this runs once per job start; a test holds it to RUN_FIELDS)."""
        self.pid = 0
        self.host = ""
        self.host_ip = ""
        self.host_id = ""
        self.started = None
        self.ended = None
        self.exited = False
        self.exitcode = 0
        self.fail_reason = ""
        self.peak_ram = 0
        self.cpu_time = 0.0
        self.actual_cwd = ""
        self.home_changed = False
        self.kill_reason = ""
        self.delay_until = None
        self.stdout = self.stderr = ""

    def walltime(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return max(0.0, (self.ended if self.ended is not None else now) - self.started)

    def status(self, now: float, std: bool = False, env: bool = False, similar: int = 0) -> dict[str, Any]:
        """The wr status object (JStatus), with wr's names, types and units (see status.py)."""
        return _status.status_dict(self, now, std, env, similar)


def grouped(jobs: Iterable[Job], limit: int) -> list[tuple[Job, int]]:
    """wr's limit=N: group by (state, exit code, fail reason), keep N of each; the last one kept
    carries how many more were left out (its Similar)."""
    groups: dict[tuple[str, int, str], list[Any]] = {}
    for job in jobs:
        group = groups.get((job.state, job.exitcode, job.fail_reason))
        if group is None:
            groups[(job.state, job.exitcode, job.fail_reason)] = [[job], 0]
        elif len(group[0]) < limit:
            group[0].append(job)
        else:
            group[1] += 1
    result: list[tuple[Job, int]] = []
    for kept, hidden in groups.values():
        result.extend((job, 0) for job in kept[:-1])
        result.append((kept[-1], hidden))
    return result



def statuses_json(pairs: Iterable[tuple[Job, int]], now: float, std: bool = False, env: bool = False) -> bytes:
    """The reply listing these jobs' status objects, as JSON (see status.statuses_json)."""
    return _status.statuses_json(pairs, now, std, env)


# The status object is defined in status.py, which needs the names above: imported last, as a
# module, so that either may be imported first.
from wmgr.jobs import status as _status  # noqa: E402
