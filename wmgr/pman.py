"""pman's process manager on the wr job queue: pman jobs, their job tree, and pman's actions.

A pman job is an ordinary job of the queue (same runner, store, capacity and memory limit; no time
limit, as pman had none) whose rep group is `pman`. What pman needs beyond a wr job (its job root
name, jid, auid and the request's meta) is kept in the job's `labels` under "pman", stored and
restored with the job. The root name is also the job's `unique`, which goes into its key: pman
runs the same command again as a new job, where a bare wr key (a hash of the command) would hand
back the first one.

The job tree is built from the job each time it is asked for, laid out as pman's "database in the
filesystem": `<root>/{d_meta,cmd,jid,auid,jobCount,startInfo,endInfo,start/<n>/startInfo/<k>/...,
end/<n>/endInfo/<k>/...}`. The command runs as one step (index 0) whose return code is the whole
command's, where pman split the command on `;` and looked at the first part only.

Nothing here knows HTTP: the API layer (wmgr.api.pman) parses requests and wraps the results of
`Pman.perform` in pman's reply envelope.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Optional

import psutil
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from wmgr import __version__
from wmgr.errors import InvalidRequest
from wmgr.host import host_address, host_name
from wmgr.jobs import model
from wmgr.jobs.model import Job

log = Logger()

REP_GRP = "pman"
LABEL = "pman"

# pman's status words (l_status), and ours for a job the queue lost track of (pman's own word for
# a state it cannot tell: its container jobs used it).
NOT_STARTED = "notstarted"
STARTED = "started"
FINISHED_OK = "finishedSuccessfully"
FINISHED_ERROR = "finishedWithError"
UNDEFINED = "undefined"

_WORDS = {
    model.READY: NOT_STARTED,
    model.DEPENDENT: NOT_STARTED,
    # a delayed job ran and waits to be retried: it has started and is not finished.
    model.DELAYED: STARTED,
    model.RESERVED: STARTED,
    model.RUNNING: STARTED,
    model.COMPLETE: FINISHED_OK,
    model.BURIED: FINISHED_ERROR,
    model.LOST: UNDEFINED,
}


def status_word(job: Job) -> str:
    return _WORDS.get(job.state, UNDEFINED)


def timestamp(now: Optional[datetime.datetime] = None) -> str:
    """pman's compact time stamp, used in job root names and by hello's timestamp."""
    return (now or datetime.datetime.now()).strftime("%Y%m%d%H%M%S.%f")


def new_root(now: Optional[datetime.datetime] = None) -> str:
    """A job root name as pman makes them: `<YYYYmmddHHMMSS.ffffff>_<uuid4>`."""
    return f"{timestamp(now)}_{uuid.uuid4()}"


@dataclass
class PmanJob:
    """A queue job seen as a pman job."""

    job: Job
    root: str
    cmd: str
    jid: str
    auid: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_job(cls, job: Job) -> Optional["PmanJob"]:
        if job.spec.get("rep_grp") != REP_GRP:
            return None
        identity = (job.spec.get("labels") or {}).get(LABEL)
        if not isinstance(identity, dict) or not isinstance(identity.get("root"), str):
            return None
        cmd = job.spec["cmd"]
        meta = identity.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        return cls(job, identity["root"], cmd, _label(meta.get("jid")), _label(meta.get("auid")), meta)

    @property
    def status(self) -> str:
        return status_word(self.job)

    @property
    def started(self) -> bool:
        return self.job.started is not None and self.status != NOT_STARTED

    @property
    def ended(self) -> bool:
        return self.status in (FINISHED_OK, FINISHED_ERROR)

    @property
    def returncode(self) -> Optional[int]:
        if not self.ended:
            return None
        # A job that did not exit by itself (killed, never started) has no exit status of its own;
        # -1 keeps it from reading as a success to clients that only look at the code.
        return self.job.exitcode if self.job.exited else -1


# -- the job tree ----------------------------------------------------------------------------------


def _stamp(seconds: Optional[float]) -> str:
    # pman wrote str(datetime.now()): "2017-07-01 12:00:00.123456".
    return str(datetime.datetime.fromtimestamp(seconds)) if seconds is not None else ""


def step_record(pj: PmanJob, host: dict[str, Any], at_end: bool) -> dict[str, Any]:
    """The record of the one step (crunner's per-sub-job record), as seen at its start or end."""
    job = pj.job
    done = at_end and pj.ended
    return {
        "cmd": pj.cmd,
        "started": pj.started,
        "startTrigger": pj.started,
        "done": done,
        "doneTrigger": done,
        "eventFunctionDone": done,
        **host,
        "startstamp": _stamp(job.started),
        "endstamp": _stamp(job.ended) if done else "",
        "pid": job.pid,
        "returncode": pj.returncode if done else None,
        "stdout": job.stdout if done else "",
        "stderr": job.stderr if done else "",
    }


def job_tree(pj: PmanJob, host: dict[str, Any]) -> dict[str, Any]:
    """One job root's sub-tree, laid out as pman's (plus `key`, `state`, `status`, `failReason`:
    the wr job behind it, which pman did not have)."""
    meta = dict(pj.meta)
    meta.setdefault("cmd", pj.cmd)
    node: dict[str, Any] = {"d_meta": json.dumps(meta), "cmd": pj.cmd}
    # pman wrote jid and auid only when they were given.
    if pj.jid:
        node["jid"] = pj.jid
    if pj.auid:
        node["auid"] = pj.auid
    node["jobCount"] = 1 if pj.ended else 0
    start: dict[str, Any] = {}
    end: dict[str, Any] = {}
    if pj.started or pj.ended:
        first = {"0": step_record(pj, host, at_end=False)}
        start["0"] = {"startInfo": first}
        node["startInfo"] = dict(first)
    if pj.ended:
        last = {"0": step_record(pj, host, at_end=True)}
        end["0"] = {"endInfo": last}
        # pman closed both lists with a sentinel step and overwrote startInfo/endInfo with it;
        # here the sentinel is added beside the step, so that `endInfo/0/returncode` (and the
        # seed's `endInfo` for "the pid and status") still answer after the end.
        start["1"] = {"startInfo": {"allJobsStarted": True}}
        end["1"] = {"endInfo": {"allJobsDone": True}}
        node["startInfo"]["allJobsStarted"] = True
        node["endInfo"] = {**last, "allJobsDone": True}
    node["start"] = start
    node["end"] = end
    node["key"] = pj.job.key
    node["state"] = pj.job.state
    node["status"] = pj.status
    node["failReason"] = pj.job.fail_reason
    return node


def nest(path: list[str], value: Any) -> Any:
    """pman's GET answers repeat the path: ["a", "b"], 1 -> {"a": {"b": 1}}."""
    for name in reversed(path):
        value = {name: value}
    return value


def walk(node: Any, path: list[str]) -> tuple[bool, Any]:
    """Follow path into nested dicts and lists (a list by index); (found, value)."""
    for name in path:
        if isinstance(node, dict) and name in node:
            node = node[name]
        elif isinstance(node, list) and _is_index(name) and -len(node) <= int(name) < len(node):
            node = node[int(name)]
        else:
            return False, None
    return True, node


def _is_index(text: str) -> bool:
    return text.lstrip("-").isdigit()


# -- facts about this host (blocking calls: run in a thread) ---------------------------------------


def host_facts() -> dict[str, Any]:
    """The platform fields of crunner's records."""
    uname = platform.uname()
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "uname": [uname.system, uname.node, uname.release, uname.version, uname.machine, uname.processor],
        "version": platform.version(),
    }


def sysinfo() -> dict[str, Any]:
    """hello's sysinfo. Blocking (cpu_percent samples for 0.1 s, platform may run `uname -p`)."""
    facts = host_facts()
    return {
        "system": facts["system"],
        "machine": facts["machine"],
        "platform": facts["platform"],
        "uname": facts["uname"],
        "version": facts["version"],
        "memory": list(psutil.virtual_memory()),
        "cpucount": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "cpu_percent": psutil.cpu_percent(interval=0.1),
        "hostname": host_name(),
        "inet": host_address(),
    }


# -- actions ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """What an action answers: pman's `status` and `d_ret`, a message when it failed, and
    whether the daemon should stop once the reply has gone (quit)."""

    status: bool
    d_ret: Any = field(default_factory=dict)
    message: str = ""
    stop: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _text_field(meta: dict[str, Any], name: str) -> str:
    value = meta.get(name)
    if value is None:
        return ""
    # pman turned an integer jid into text; anything else structured is a mistake.
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise InvalidRequest(f"meta.{name} must be a string, not {value!r}")


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _required(meta: dict[str, Any], *names: str) -> None:
    missing = [name for name in names if name not in meta]
    if missing:
        raise InvalidRequest(f"meta needs {' and '.join(missing)} for this action")


def _same(stored: Any, wanted: Any) -> bool:
    # pman compared the stored file's value with `value` as given; a number given for a jid that
    # was stored as text (pman stored an integer jid as text) still matches.
    if stored == wanted:
        return True
    return isinstance(wanted, (int, float)) and not isinstance(wanted, bool) and stored == str(wanted)


class Pman:
    """pman's actions over the job queue.

    `queue` needs `add(specs)`, `select(ids)` and `kill(jobs)` (wmgr.jobs.queue.JobQueue);
    `run_in_thread` defaults to Twisted's thread pool and is replaceable in tests.
    """

    def __init__(self, queue: Any, allow_quit: bool = False,
                 run_in_thread: Callable[..., Awaitable[Any]] = deferToThread) -> None:
        self.queue = queue
        self.allow_quit = allow_quit
        self._in_thread = run_in_thread
        self._host: Optional[dict[str, Any]] = None

    # -- the jobs ------------------------------------------------------------------------------

    async def jobs(self) -> list[PmanJob]:
        """Every pman job, oldest first: `_N` indexes this list, so its order must survive
        restarts, and the queue's seq does."""
        found = [PmanJob.from_job(job) for job in await self.queue.select([REP_GRP])]
        return sorted((pj for pj in found if pj is not None), key=lambda pj: pj.job.seq)

    async def host(self) -> dict[str, Any]:
        if self._host is None:
            self._host = await self._in_thread(host_facts)
        return self._host

    async def run(self, cmd: Any, meta: dict[str, Any]) -> PmanJob:
        if not isinstance(cmd, str) or not cmd.strip():
            raise InvalidRequest("run needs a command: meta.cmd (or exec.cmd) as a non-empty string")
        jid, auid = _text_field(meta, "jid"), _text_field(meta, "auid")
        root = new_root()
        stored_meta = {name: value for name, value in meta.items() if name != "cmd"}
        # jid and auid are read back from the meta; the command is the job's own.
        identity = {"root": root, "meta": dict(stored_meta, jid=jid, auid=auid)}
        spec = model.parse_spec({
            "cmd": cmd,
            "rep_grp": REP_GRP,
            # pman had no time limit: "0" is none. override 2 keeps the requested values, so what
            # the queue learned from other runs of the same program never shrinks a pman job.
            "time": "0",
            "override": 2,
        }, {})
        spec["labels"] = {LABEL: identity}
        spec["unique"] = root
        added = await self.queue.add([model.normalise(spec)])
        if not added:
            raise InvalidRequest("the queue did not take the job")
        pj = PmanJob.from_job(added[0])
        assert pj is not None
        log.info("pman job {root} (jid {jid!r}, auid {auid!r}) queued as {key}",
                 root=root, jid=jid, auid=auid, key=pj.job.key)
        return pj

    async def matching(self, meta: dict[str, Any]) -> list[tuple[PmanJob, dict[str, Any]]]:
        """Jobs whose top-level leaf `meta.key` equals `meta.value` (jid, auid, cmd...; also
        `jobRoot`, the root's name), with their trees."""
        _required(meta, "key", "value")
        name, wanted = meta["key"], meta["value"]
        if not isinstance(name, str):
            raise InvalidRequest("meta.key must be the name of a job's top-level field, such as jid")
        host = await self.host()
        hits = []
        for pj in await self.jobs():
            tree = job_tree(pj, host)
            stored = pj.root if name == "jobRoot" else tree.get(name)
            if stored is not None and not isinstance(stored, dict) and _same(stored, wanted):
                hits.append((pj, tree))
        return hits

    async def get(self, path: Iterable[str]) -> tuple[bool, Any]:
        """A path in the job tree (below /api/v1): (found, pman's GET value). The first segment
        is a root name or `_N`, the N-th job (0 first, as pman; `_01` is `_1`; negative counts
        from the newest). An unknown path is echoed with false at its end, as pman did."""
        segments = [segment for segment in path if segment]
        jobs = await self.jobs()
        if not segments:
            return True, {pj.root: {} for pj in jobs}
        first, rest = segments[0], segments[1:]
        if first.startswith("_"):
            try:
                pj: Optional[PmanJob] = jobs[int(first[1:])]
            except (ValueError, IndexError):
                return False, False
        else:
            pj = next((candidate for candidate in jobs if candidate.root == first), None)
            if pj is None:
                return False, nest(segments, False)
        found, value = walk(job_tree(pj, await self.host()), rest)
        return found, nest([pj.root, *rest], value if found else False)

    # -- actions -------------------------------------------------------------------------------

    ACTIONS = ("hello", "run", "status", "done", "info", "search", "get", "kill", "quit", "DBctl")

    async def perform(self, action: str, meta: dict[str, Any], payload: Optional[dict[str, Any]] = None) -> Result:
        """Do one action. Invalid input comes back as a failed Result (pman's `status: false`)."""
        handler = getattr(self, "_" + action, None) if action in self.ACTIONS else None
        if handler is None:
            return Result(False, {}, f"unknown action {action!r}; this server knows "
                                     f"{', '.join(self.ACTIONS)}")
        try:
            return await handler(meta, payload or {})
        except InvalidRequest as e:
            return Result(False, {}, e.reason)

    async def _hello(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        if "askAbout" not in meta:
            return Result(False, {}, "hello needs meta.askAbout: timestamp, sysinfo or echoBack")
        ask = meta["askAbout"]
        d_ret: dict[str, Any] = {"name": "wmgr", "version": __version__}
        if ask == "timestamp":
            d_ret["timestamp"] = {"now": timestamp()}
        elif ask == "sysinfo":
            d_ret["sysinfo"] = await self._in_thread(sysinfo)
        elif ask == "echoBack":
            d_ret["echoBack"] = {"msg": meta.get("echoBack")}
        else:
            return Result(False, d_ret, f"askAbout {ask!r} is not one of timestamp, sysinfo, echoBack")
        return Result(True, d_ret)

    async def _run(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        cmd = meta.get("cmd")
        # The seed's (pre-0.1) shape carries the command beside meta: {"exec": {"cmd": ...}}.
        exec_part = payload.get("exec")
        if cmd is None and isinstance(exec_part, dict):
            cmd = exec_part.get("cmd")
        pj = await self.run(cmd, meta)
        d_ret = {"jobRoot": pj.root, "jid": pj.jid, "auid": pj.auid, "key": pj.job.key, "status": pj.status}
        # pman 0.x-1.0 told a threaded run's root as jobRootDir; its clients may still read it.
        return Result(True, d_ret, extra={"jobRootDir": pj.root})

    async def _job_state(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[PmanJob]]:
        d_ret: dict[str, Any] = {}
        hits = [pj for pj, _ in await self.matching(meta)]
        for index, pj in enumerate(hits):
            d_ret[f"{index}.container"] = {"jobRoot": pj.root, "tree": None}
            d_ret[f"{index}.start"] = {"jobRoot": pj.root, "startTrigger": [True] if pj.started else []}
            d_ret[f"{index}.end"] = {"jobRoot": pj.root, "returncode": [pj.returncode] if pj.ended else []}
        if not hits:
            d_ret["-1.start"] = {"jobRoot": None, "startTrigger": None}
            d_ret["-1.end"] = {"jobRoot": None, "returncode": None}
            d_ret["-1.container"] = {"jobRoot": None, "tree": None}
        return d_ret, hits

    async def _status(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        d_ret, hits = await self._job_state(meta)
        d_ret["l_status"] = [pj.status for pj in hits]
        d_ret["l_logs"] = []
        return Result(bool(hits), d_ret, "" if hits else "no job matches")

    async def _done(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        d_ret, hits = await self._job_state(meta)
        return Result(bool(hits), d_ret, "" if hits else "no job matches")

    async def _search(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        hits = await self.matching(meta)
        when = meta.get("when", "end")
        d_ret: dict[str, Any] = {}
        for index, (pj, _) in enumerate(hits):
            if "job" in meta:
                step = str(meta["job"])
                path = [pj.root, str(when), step, f"{when}Info", step, str(meta.get("field", ""))]
            elif "path" in meta:
                path = [pj.root, *_segments(meta["path"])]
            else:
                path = [pj.root, meta["key"]]
            d_ret[str(index)] = (await self.get(path))[1]
        return Result(bool(hits), d_ret, "" if hits else "no job matches")

    async def _info(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        hits = await self.matching(meta)
        d_ret: dict[str, Any] = {}
        for index, (pj, _) in enumerate(hits):
            d_ret[f"{index}.0"] = (await self.get([pj.root, "startInfo"]))[1]
            d_ret[f"{index}.1"] = (await self.get([pj.root, "endInfo"]))[1]
        if not hits:
            return Result(False, {"-1": {"noJobFound": {"endInfo": {"allJobsDone": None}}}}, "no job matches")
        return Result(True, d_ret)

    async def _get(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        _required(meta, "path")
        found, value = await self.get(_segments(meta["path"]))
        return Result(found, value, "" if found else "no such path in the job tree")

    async def _kill(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        """pman promised `kill` and never had it: stop each matching running job's process
        group (TERM, then KILL after the queue's grace period); the job ends finishedWithError."""
        hits = [pj for pj, _ in await self.matching(meta)]
        running = [pj.job for pj in hits if pj.job.state in model.ACTIVE_STATES]
        killed = {job.key for job in await self.queue.kill(running)} if running else set()
        d_ret = {
            str(index): {"jobRoot": pj.root, "jid": pj.jid, "killed": pj.job.key in killed,
                         "status": pj.status}
            for index, pj in enumerate(hits)
        }
        for pj in hits:
            if pj.job.key in killed:
                log.info("pman job {root} (key {key}) killed by request", root=pj.root, key=pj.job.key)
        if not hits:
            return Result(False, d_ret, "no job matches")
        if not killed:
            return Result(False, d_ret, "no matching job is running")
        return Result(True, d_ret)

    async def _quit(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        # saveDB needs no work: every change is in the store already.
        if not self.allow_quit:
            return Result(False, {}, "quit is disabled on this server ([pman] allow_quit = false); "
                                     "the store is always saved, so there is nothing to save")
        log.info("pman quit requested: stopping the daemon")
        return Result(True, {}, stop=True)

    async def _DBctl(self, meta: dict[str, Any], payload: dict[str, Any]) -> Result:
        do = meta.get("do")
        listing = (await self.get([]))[1]
        if do in ("save", "load"):
            # The store is written on every change and is what the daemon reads: both are done.
            return Result(True, listing, f"{do}: the job store is durable and always current")
        if do == "clear":
            # pman forgot every job; a job still running here is a process, and forgetting it
            # would leave it unaccounted for: those stay.
            jobs = [pj.job for pj in await self.jobs()]
            forgotten = await self.queue.forget(jobs)
            kept = len(jobs) - len(forgotten)
            return Result(True, (await self.get([]))[1],
                          f"clear: {len(forgotten)} finished pman jobs removed; {kept} still running kept")
        return Result(False, listing, "DBctl needs meta.do: save, load or clear")


def _segments(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise InvalidRequest("meta.path must be a path such as /_0/endInfo")
    return [segment for segment in path.split("/") if segment]
