"""`wmgr`: the command line for people, on the treq client (wmgr.client).

It finds the daemon as the daemon finds its data (--url, --data-dir, $WMGR_DATA_DIR, ~/.wmgr),
trusts the daemon's own CA and sends its token. Tables and progress bars are rich's; --json
prints plain JSON for scripts. Every failure is one line on stderr and an exit code a script can
rely on, never a traceback:

  0  done
  1  the daemon did it but the outcome is a failure (a job buried, nothing matched, not found)
  2  usage: bad arguments, or values the daemon refused (400)
  3  cannot reach or authenticate: no daemon, refused connection, bad token, certificate mismatch
  130  interrupted (Ctrl-C or SIGTERM)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C
STATES = ("complete", "buried", "lost", "running", "ready", "dependent", "delayed")
UNFINISHED = ("lost", "running", "ready", "dependent", "delayed")
STATE_STYLE = {"complete": "green", "buried": "red", "lost": "magenta", "running": "blue", "reserved": "blue",
               "ready": "yellow", "dependent": "bright_black", "delayed": "dark_orange"}


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- finding the daemon ------------------------------------------------------------------------


def data_dir_of(args: argparse.Namespace) -> Path:
    chosen = args.data_dir or os.environ.get("WMGR_DATA_DIR") or "~/.wmgr"
    return Path(chosen).expanduser()


def connect(args: argparse.Namespace, reactor: Any) -> Any:
    from wmgr.client import Client

    data_dir = data_dir_of(args)
    url = args.url
    if not url:
        try:
            url = (data_dir / "wmgr.url").read_text().strip()
        except OSError:
            raise CliError(f"no daemon found: {data_dir}/wmgr.url does not exist (is `twistd wmgr --data-dir "
                           f"{data_dir}` running? or give --url)", EXIT_UNREACHABLE) from None
    try:
        token = (data_dir / "client.token").read_text().strip()
    except OSError as e:
        raise CliError(f"cannot read the token: {data_dir}/client.token: {e.strerror}", EXIT_UNREACHABLE) from None
    ca_pem = None
    if url.startswith("https:"):
        try:
            ca_pem = (data_dir / "ca.pem").read_bytes()
        except OSError as e:
            raise CliError(f"cannot read the daemon's CA: {data_dir}/ca.pem: {e.strerror}", EXIT_UNREACHABLE) from None
    return Client(reactor, url, ca_pem, token, persistent=False)


def explain_failure(error: BaseException, url: str, data_dir: Path) -> CliError:
    """A connection-level failure as one line a person can act on."""
    from OpenSSL import SSL
    from twisted.internet import error as neterr
    from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

    reasons = [error]
    if isinstance(error, (ResponseNeverReceived, ResponseFailed)):
        reasons = [reason.value for reason in error.reasons]
    for reason in reasons:
        if isinstance(reason, SSL.Error) or "certificate" in str(reason).lower():
            return CliError(f"certificate mismatch: the daemon at {url} did not present a certificate signed by "
                            f"the CA in {data_dir}/ca.pem for that host name ({reason})", EXIT_UNREACHABLE)
    for reason in reasons:
        if isinstance(reason, neterr.ConnectionRefusedError):
            return CliError(f"cannot reach the daemon at {url}: connection refused (is it running?)",
                            EXIT_UNREACHABLE)
        if isinstance(reason, neterr.DNSLookupError):
            return CliError(f"cannot reach the daemon at {url}: unknown host", EXIT_UNREACHABLE)
        if isinstance(reason, (neterr.TimeoutError, neterr.ConnectingCancelledError)) or \
                type(reason).__name__ == "CancelledError":
            return CliError(f"cannot reach the daemon at {url}: no answer in time", EXIT_UNREACHABLE)
    detail = "; ".join(str(reason) or type(reason).__name__ for reason in reasons)
    return CliError(f"cannot talk to the daemon at {url}: {detail}", EXIT_UNREACHABLE)


class Session:
    """One run of the command: the client, the console, and error handling for each request."""

    def __init__(self, args: argparse.Namespace, reactor: Any) -> None:
        from rich.console import Console

        self.args = args
        self.reactor = reactor
        self.data_dir = data_dir_of(args)
        self.client = connect(args, reactor)
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    async def call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        try:
            reply = await self.client.request(method, path, timeout=self.args.timeout, **kw)
        except Exception as e:
            raise explain_failure(e, self.client.base_url, self.data_dir) from None
        if reply.code in ok:
            return reply.json()
        raise self.refused(reply, method, path)

    def refused(self, reply: Any, method: str, path: str) -> CliError:
        try:
            body = reply.json()
            reason = body.get("error") or body.get("message") or reply.text  # wmgr's or Qserv's envelope
        except (ValueError, AttributeError):
            reason = reply.text.strip() or f"HTTP {reply.code}"
        if reply.code == 401:
            return CliError(f"bad token: the daemon at {self.client.base_url} refused the token in "
                            f"{self.data_dir}/client.token ({reason})", EXIT_UNREACHABLE)
        if reply.code == 400:
            return CliError(f"refused: {reason}", EXIT_USAGE)
        return CliError(f"{method} {path} failed ({reply.code}): {reason}", EXIT_FAILED)

    def print_json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2) + "\n")

    async def stream_counts(self, on_snapshot: Callable[[dict[str, Any]], bool]) -> None:
        """Follow GET /ui/events until on_snapshot returns True."""
        from wmgr.client import EventStreamRefused

        try:
            await self.client.follow_events("ui/events", on_snapshot)
        except CliError:
            raise
        except EventStreamRefused as e:
            raise self.refused(e.reply, "GET", "ui/events") from None
        except Exception as e:
            raise explain_failure(e, self.client.base_url, self.data_dir) from None


# -- verbs ---------------------------------------------------------------------------------------


def ids_path(ids: list[str], suffix: str = "") -> str:
    return "rest/v1/jobs/" + ",".join(quote(i, safe="") for i in ids) + suffix


def read_commands(source: str) -> list[str]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as e:
        raise CliError(f"cannot read {source}: {e.strerror}", EXIT_USAGE) from None
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("rep_grp", "req_grp", "memory", "time", "cwd", "cpus", "disk", "priority", "retries", "override"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    for name in ("deps", "dep_grps", "limit_grps"):
        value = getattr(args, name)
        if value:
            options[name] = [part for item in value for part in item.split(",") if part]
    if args.env:
        options["env"] = list(args.env)
    for name in ("cwd_matters", "change_home"):
        if getattr(args, name):
            options[name] = True
    return options


async def verb_add(s: Session) -> int:
    options = job_options(s.args)
    jobs = []
    for number, line in enumerate(read_commands(s.args.file), start=1):
        cmd, tab, extra = line.partition("\t")
        job = {"cmd": cmd, **options}
        if tab:  # as wr add: a tab, then a JSON object of this job's own options
            try:
                own = json.loads(extra)
            except ValueError as e:
                raise CliError(f"line {number}: the options after the tab are not JSON: {e}", EXIT_USAGE) from None
            if not isinstance(own, dict):
                raise CliError(f"line {number}: the options after the tab must be a JSON object", EXIT_USAGE)
            job.update(own)
        jobs.append(job)
    if not jobs:
        raise CliError("no commands given (one per line, from the file or standard input)", EXIT_USAGE)
    params = {"rerun": "true"} if s.args.rerun else {}
    queued = await s.call("POST", "rest/v1/jobs/", ok=(201,), body=jobs, params=params)
    if s.args.json:
        s.print_json(queued)
        return EXIT_OK
    groups = sorted({job["RepGroup"] for job in queued})
    s.out.print(f"{len(queued)} of {len(jobs)} job(s) queued in rep group {', '.join(groups) or '-'}")
    if len(queued) < len(jobs):
        s.out.print(f"{len(jobs) - len(queued)} had already completed and were left alone (--rerun runs them again)")
    return EXIT_OK


def counts_table(title: str, groups: dict[str, dict[str, int]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    # Only the states some group has jobs in: seven mostly-empty columns do not fit a terminal.
    shown = [state for state in STATES if any(counts.get(state) for counts in groups.values())]
    table = Table(title=title, title_justify="left")
    table.add_column("rep group")
    for state in shown:
        table.add_column(state, justify="right", style=STATE_STYLE[state])
    table.add_column("total", justify="right")
    for name in sorted(groups):
        counts = groups[name]
        table.add_row(Text(name), *(str(counts.get(state, 0)) for state in shown), str(sum(counts.values())))
    return table


async def verb_status(s: Session) -> int:
    if s.args.wait:
        return await wait_for_groups(s)
    snapshot = await s.call("GET", "ui/counts")
    groups = snapshot["groups"]
    wanted = s.args.rep_grps or sorted(groups)
    missing = [g for g in wanted if g not in groups]
    details = {}
    for name in s.args.rep_grps:
        if name in groups:
            details[name] = await s.call("GET", ids_path([name]), params={"limit": 1})
    if s.args.json:
        s.print_json({"groups": {g: groups[g] for g in wanted if g in groups}, "jobs": details,
                      "missing": missing})
    else:
        if wanted and len(missing) < len(wanted):
            s.out.print(counts_table("jobs by rep group and state", {g: groups[g] for g in wanted if g in groups}))
        elif not groups:
            s.out.print("no jobs")
        for name, examples in details.items():
            s.out.print(detail_table(name, examples))
    for name in missing:
        sys.stderr.write(f"wmgr: no jobs in rep group {name}\n")
    return EXIT_FAILED if missing else EXIT_OK


def detail_table(name: str, examples: list[dict[str, Any]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"rep group {name}: jobs by state, exit code and fail reason", title_justify="left")
    for column, justify in (("state", "left"), ("exit code", "right"), ("fail reason", "left"),
                            ("jobs", "right"), ("for example", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for job in examples:
        table.add_row(Text(job["State"], style=STATE_STYLE.get(job["State"], "")),
                      str(job["Exitcode"]) if job["Exited"] else "", Text(job["FailReason"]),
                      str(1 + job["Similar"]), Text(job["Cmd"], overflow="ellipsis", no_wrap=True))
    return table


async def wait_for_groups(s: Session) -> int:
    """A live progress bar per rep group (finished = complete + buried) until every one is done."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    wanted = list(s.args.rep_grps)
    final: dict[str, Any] = {}
    bars: dict[str, Any] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                        console=s.err, disable=s.args.json, transient=False)

    def on_snapshot(snapshot: dict[str, Any]) -> bool:
        groups = snapshot["groups"]
        names = wanted or sorted(groups)
        missing = [name for name in names if name not in groups]
        if missing and not bars:
            raise CliError(f"no jobs in rep group {', '.join(missing)}", EXIT_FAILED)
        for name in names:
            counts = groups.get(name, {})
            total = sum(counts.values())
            finished = counts.get("complete", 0) + counts.get("buried", 0)
            text = ", ".join(f"[{STATE_STYLE[st]}]{st} {counts[st]}[/]" for st in STATES if counts.get(st))
            if name not in bars:
                bars[name] = progress.add_task(escape(name), total=total, counts=text)
            progress.update(bars[name], completed=finished, total=total, counts=text)
        final.clear()
        final.update({name: groups.get(name, {}) for name in names})
        return all(not any(final[name].get(state, 0) for state in UNFINISHED) for name in names)

    with progress:
        await s.stream_counts(on_snapshot)
    buried = {name: counts.get("buried", 0) for name, counts in final.items() if counts.get("buried", 0)}
    if s.args.json:
        s.print_json({"groups": final, "buried": buried})
    elif buried:
        s.err.print("wmgr: buried: " + ", ".join(f"{name} {n}" for name, n in buried.items()) +
                    " (see `wmgr status NAME`; `wmgr retry NAME` runs them again)")
    return EXIT_FAILED if buried else EXIT_OK


def acting_verb(method: str, suffix: str, params: dict[str, str], done: str, what: str) -> Any:
    async def verb(s: Session) -> int:
        call_params = dict(params)
        if getattr(s.args, "lost", False):
            call_params["state"], verb_done, verb_what = "lost", "confirmed dead", "lost"
        else:
            verb_done, verb_what = done, what
        affected = await s.call(method, ids_path(s.args.ids, suffix), ok=(200, 202), params=call_params)
        if s.args.json:
            s.print_json(affected)
        elif affected:
            s.out.print(f"{len(affected)} job(s) {verb_done}")
        if not affected:
            raise CliError(f"no {verb_what} job matched {', '.join(s.args.ids)}", EXIT_FAILED)
        return EXIT_OK

    return verb


verb_kill = acting_verb("DELETE", "", {"state": "running"}, "killed (they end buried)", "running")
verb_remove = acting_verb("DELETE", "", {"state": "deletable"}, "removed", "removable (not running, not complete)")
verb_retry = acting_verb("POST", "/retry", {}, "back in the queue", "buried")


async def verb_info(s: Session) -> int:
    from rich.table import Table

    info = await s.call("GET", "rest/v1/info/")
    version = await s.call("GET", "rest/version/")
    info = {"Version": version.get("Version"), **info, "URL": s.client.base_url, "DataDir": str(s.data_dir)}
    if s.args.json:
        s.print_json(info)
        return EXIT_OK
    from rich.text import Text

    table = Table(show_header=False, title="wmgr daemon", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        table.add_row(key, Text(str(value)))
    s.out.print(table)
    return EXIT_OK


async def verb_warnings(s: Session) -> int:
    from datetime import datetime

    from rich.table import Table
    from rich.text import Text

    warnings = await s.call("GET", "rest/v1/warnings/")
    if s.args.json:
        s.print_json(warnings)
        return EXIT_OK
    if not warnings:
        s.out.print("no scheduler warnings")
        return EXIT_OK
    table = Table(title="scheduler warnings (now cleared)", title_justify="left")
    for column in ("message", "count", "first", "last"):
        table.add_column(column)
    stamp = lambda t: datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")  # noqa: E731
    for w in warnings:
        table.add_row(Text(w["Msg"]), str(w["Count"]), stamp(w["FirstDate"]), stamp(w["LastDate"]))
    s.out.print(table)
    return EXIT_OK


# -- the other APIs: connection registry, Qserv services and databases --------------------------------


async def verb_connections(s: Session) -> int:
    from rich.table import Table
    from rich.text import Text

    answer = await s.call("GET", "connections/partitions")
    if s.args.json:
        s.print_json(answer)
        return EXIT_OK
    if not answer["partitions"]:
        s.out.print("no partitions")
        return EXIT_OK
    table = Table(title=f"connection partitions (entries live {answer['ttl']:g} s)", title_justify="left")
    table.add_column("partition")
    table.add_column("live entries", justify="right")
    for partition in answer["partitions"]:
        table.add_row(Text(partition["partition"]), str(partition["entries"]))
    s.out.print(table)
    return EXIT_OK


async def verb_services(s: Session) -> int:
    from rich.table import Table
    from rich.text import Text

    if s.args.action:
        if not s.args.name:
            raise CliError(f"which service? wmgr services {s.args.action} NAME", EXIT_USAGE)
        answer = await s.call("PUT", f"services/{quote(s.args.name, safe='')}", data=f"action={s.args.action}".encode(),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
        states = [answer["result"]]
    else:
        names = [item["name"] for item in (await s.call("GET", "services"))["results"]]
        states = [(await s.call("GET", f"services/{quote(name, safe='')}"))["result"] for name in names]
    if s.args.json:
        s.print_json(states if not s.args.action else states[0])
        return EXIT_OK
    if not states:
        s.out.print("no services configured")
        return EXIT_OK
    table = Table(title="services", title_justify="left")
    for column, justify in (("service", "left"), ("state", "left"), ("pid", "right"), ("uptime", "right"),
                            ("restarts", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for state in states:
        style = "green" if state["state"] == "active" else "red"
        table.add_row(Text(state["name"]), Text(state["state"], style=style),
                      _or_blank(state.get("pid")), _or_blank(state.get("uptime"), "{:.0f}s"),
                      _or_blank(state.get("restarts")))
    s.out.print(table)
    return EXIT_OK


def _or_blank(value: Any, form: str = "{}") -> str:
    return "" if value is None else form.format(value)


async def verb_dbs(s: Session) -> int:
    from rich.table import Table
    from rich.text import Text

    dbs = [item["name"] for item in (await s.call("GET", "dbs"))["results"]]
    tables = {db: [t["name"] for t in (await s.call("GET", f"dbs/{quote(db, safe='')}/tables"))["results"]]
              for db in dbs}
    if s.args.json:
        s.print_json(tables)
        return EXIT_OK
    if not dbs:
        s.out.print("no databases")
        return EXIT_OK
    table = Table(title="databases", title_justify="left")
    table.add_column("database")
    table.add_column("tables", justify="right")
    table.add_column("names")
    for db, names in tables.items():
        table.add_row(Text(db), str(len(names)), Text(", ".join(names)))
    s.out.print(table)
    return EXIT_OK


# -- workers and Flamenco tasks ---------------------------------------------------------------------


async def verb_workers(s: Session) -> int:
    from rich.table import Table
    from rich.text import Text

    workers = await s.call("GET", "workers")
    if s.args.action:
        if not s.args.name:
            raise CliError(f"which worker? wmgr workers {s.args.action} NAME", EXIT_USAGE)
        if s.args.name not in workers:
            raise CliError(f"no worker {s.args.name!r} (see wmgr workers)", EXIT_FAILED)
        status = "enabled" if s.args.action == "enable" else "disabled"
        await s.call("PATCH", f"workers/{workers[s.args.name]['id']}", body={"status": status})
        workers = await s.call("GET", "workers")
        if not s.args.json:
            s.out.print(f"worker {s.args.name} {status}")
            return EXIT_OK
    if s.args.json:
        s.print_json(workers[s.args.name] if s.args.action else workers)
        return EXIT_OK
    if not workers:
        s.out.print("no workers")
        return EXIT_OK
    table = Table(title="workers", title_justify="left")
    for column, justify in (("worker", "left"), ("id", "right"), ("connection", "left"), ("status", "left"),
                            ("address", "left"), ("task", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, worker in sorted(workers.items()):
        table.add_row(Text(name), str(worker["id"]),
                      Text(worker["connection"], style="green" if worker["connection"] == "online" else "red"),
                      Text(worker["status"]), Text(worker["ip_address"] or ""), _or_blank(worker["current_task"]))
    s.out.print(table)
    return EXIT_OK


async def verb_slurm(s: Session) -> int:
    from rich.table import Table
    from rich.text import Text

    try:
        reply = await s.client.request("GET", "slurm/v1/runners", timeout=s.args.timeout)
    except Exception as e:
        raise explain_failure(e, s.client.base_url, s.data_dir) from None
    if reply.code == 404:
        raise CliError("this daemon does not run its queue on Slurm ([scheduler] backend = local)", EXIT_FAILED)
    if reply.code != 200:
        raise s.refused(reply, "GET", "slurm/v1/runners")
    listing = reply.json()
    if s.args.json:
        s.print_json(listing)
        return EXIT_OK
    held = f", submissions held back {listing['held_for']:.0f}s more" if listing["held_for"] else ""
    s.out.print(f"Slurm jobs named {listing['job_name']}: {listing['submitted']} submitted since the start, "
                f"{listing['submit_failures']} sbatch failures, {listing['runner_failures']} runners failed{held}")
    if not listing["runners"]:
        s.out.print("no runners")
        return EXIT_OK
    table = Table(title="runners", title_justify="left")
    for column, justify in (("runner", "left"), ("state", "left"), ("node", "left"), ("cpus", "right"),
                            ("memory", "right"), ("time limit", "right"), ("jobs", "right"), ("reason", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for runner in listing["runners"]:
        state = runner["state"] + ("" if runner["registered"] or runner["ended"] else " (not registered)")
        style = "green" if runner["registered"] else ("red" if runner["ended"] else "yellow")
        table.add_row(Text(runner["name"]), Text(state, style=style), Text(runner["node"]), str(runner["cpus"]),
                      Text(runner["memory"]), Text(runner["time_limit"]), str(runner["jobs"]),
                      Text(runner["ended"] or runner["reason"]))
    s.out.print(table)
    return EXIT_OK


async def verb_tasks(s: Session) -> int:
    from rich.table import Table
    from rich.text import Text

    if s.args.action == "cancel":
        if not s.args.id:
            raise CliError("which task? wmgr tasks cancel ID", EXIT_USAGE)
        if not s.args.id.isdigit():
            raise CliError(f"a task id is a whole number, not {s.args.id!r}", EXIT_USAGE)
        task = await s.call("DELETE", f"tasks/{s.args.id}", ok=(202,))
        if s.args.json:
            s.print_json(task)
        else:
            s.out.print(f"task {task['id']} {task['status']}")
        return EXIT_OK
    tasks = await s.call("GET", "tasks")
    if s.args.json:
        s.print_json(tasks)
        return EXIT_OK
    if not tasks:
        s.out.print("no tasks")
        return EXIT_OK
    styles = {"completed": "green", "failed": "red", "canceled": "yellow", "active": "cyan"}
    table = Table(title="tasks", title_justify="left")
    for column, justify in (("task", "right"), ("type", "left"), ("status", "left"), ("frames", "left"),
                            ("current", "right"), ("worker", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for task in tasks:
        frames = f"{task['frame_start']}-{task['frame_end']}" if task["type"] == "frames" else ""
        table.add_row(str(task["id"]), Text(task["type"]), Text(task["status"], style=styles.get(task["status"], "")),
                      frames, str(task["frame_current"]) if frames else "", _or_blank(task["worker_id"]))
    s.out.print(table)
    return EXIT_OK


# -- the command line ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="wmgr", description="Talk to the wmgr daemon: add jobs, follow them, act on them.",
        epilog="exit codes: 0 done; 1 failure (a job buried, nothing matched); 2 usage; "
               "3 cannot reach or authenticate the daemon; 130 interrupted")
    top.add_argument("--url", help="the daemon's base URL (default: read from DATA_DIR/wmgr.url)")
    top.add_argument("--data-dir", help="the daemon's data directory, for its URL, CA and token "
                                        "(default: $WMGR_DATA_DIR, else ~/.wmgr)")
    top.add_argument("--json", action="store_true", help="print plain JSON (for scripts)")
    top.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer (default 30)")
    verbs = top.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser("add", help="add jobs: one command per line (a tab, then a JSON object of that "
                                       "job's own options, may follow)")
    add.add_argument("-f", "--file", default="-", help="read commands from this file (default: standard input)")
    add.add_argument("-i", "--rep-grp", dest="rep_grp", help="reporting group (default manually_added)")
    add.add_argument("-g", "--req-grp", dest="req_grp", help="resource group for learning (default: the first word)")
    add.add_argument("-m", "--memory", help="memory with a unit: 500M, 2G")
    add.add_argument("-t", "--time", help="expected time: 30s, 5m, 1h30m")
    add.add_argument("-c", "--cpus", type=float, help="cores")
    add.add_argument("--disk", type=int, help="disk, GB")
    add.add_argument("-p", "--priority", type=int, help="0-255, higher first")
    add.add_argument("-r", "--retries", type=int, help="automatic retries, 0-255")
    add.add_argument("-o", "--override", type=int, choices=(0, 1, 2), help="use learned resources: 0, 1 or 2")
    add.add_argument("--cwd", help="working directory (absolute)")
    add.add_argument("--cwd-matters", action="store_true", help="run in --cwd itself, not a unique directory in it")
    add.add_argument("--change-home", action="store_true", help="set HOME to the job's unique directory")
    add.add_argument("-e", "--env", action="append", metavar="NAME=VALUE",
                     help="the job's environment (repeat; given, it replaces the daemon's)")
    add.add_argument("-d", "--deps", action="append", metavar="GROUPS",
                     help="dependency groups to wait for (comma-separated)")
    add.add_argument("--dep-grps", action="append", metavar="GROUPS", help="dependency groups these jobs belong to")
    add.add_argument("-l", "--limit-grps", action="append", metavar="GROUPS", help="limit groups, name or name:N")
    add.add_argument("--rerun", action="store_true", help="run again commands that already completed")

    status = verbs.add_parser("status", help="jobs by rep group and state; --wait follows them live")
    status.add_argument("rep_grps", nargs="*", metavar="REP_GRP", help="rep groups (default: all)")
    status.add_argument("-w", "--wait", action="store_true",
                        help="show live progress until the groups are done; exit 1 if any job was buried")

    for name, summary in (("kill", "kill running jobs (they end buried)"),
                          ("remove", "remove jobs that are not running or complete"),
                          ("retry", "put buried jobs back in the queue, retries renewed")):
        verb = verbs.add_parser(name, help=summary)
        verb.add_argument("ids", nargs="+", metavar="ID", help="job keys (32 hex digits) or rep groups")
        if name == "kill":
            verb.add_argument("--lost", action="store_true", help="confirm lost jobs dead instead")
    verbs.add_parser("info", help="the daemon: version, address, mode")
    verbs.add_parser("connections", help="the connection registry's partitions and their live entries")
    services = verbs.add_parser("services", help="the configured services and their state; or start, stop or "
                                                 "restart one")
    services.add_argument("action", nargs="?", choices=("start", "stop", "restart"))
    services.add_argument("name", nargs="?", metavar="NAME")
    verbs.add_parser("dbs", help="the Qserv databases and their tables")
    workers = verbs.add_parser("workers", help="the workers of this manager, online or offline; or enable or "
                                               "disable one (a disabled worker gets no new work)")
    workers.add_argument("action", nargs="?", choices=("enable", "disable"))
    workers.add_argument("name", nargs="?", metavar="NAME")
    tasks = verbs.add_parser("tasks", help="Flamenco's tasks and their progress; or cancel one")
    tasks.add_argument("action", nargs="?", choices=("cancel",))
    tasks.add_argument("id", nargs="?", metavar="ID")
    verbs.add_parser("warnings", help="scheduler warnings (reading them clears them)")
    verbs.add_parser("slurm", help="the Slurm runners of a manager with [scheduler] backend = slurm: their Slurm "
                                   "state, node, allocation and jobs")
    return top


VERBS: dict[str, Callable[[Session], Any]] = {
    "add": verb_add, "status": verb_status, "kill": verb_kill, "remove": verb_remove, "retry": verb_retry,
    "info": verb_info, "warnings": verb_warnings, "connections": verb_connections, "services": verb_services,
    "dbs": verb_dbs, "workers": verb_workers, "tasks": verb_tasks, "slurm": verb_slurm,
}


async def run(args: argparse.Namespace, reactor: Any) -> int:
    session: Optional[Session] = None
    # A signal stops the reactor, which drops the connection under a request or event stream: that
    # failure is the interruption, not the daemon's doing.
    interrupted: list[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", interrupted.append, True)
    try:
        session = Session(args, reactor)
        return await VERBS[args.verb](session)
    except CliError as e:
        if interrupted:
            sys.stderr.write("wmgr: interrupted\n")
            return EXIT_INTERRUPTED
        sys.stderr.write(f"wmgr: {e.message}\n")
        return e.code
    except Exception as e:  # a bug: still one line, not a traceback
        sys.stderr.write(f"wmgr: unexpected error: {type(e).__name__}: {e}\n")
        return EXIT_FAILED
    finally:
        if session is not None:
            await session.client.close()


def main(argv: Optional[list[str]] = None) -> None:
    try:
        args = parser().parse_args(argv)
        from twisted.internet.defer import ensureDeferred
        from twisted.internet.task import react

        async def body(reactor: Any) -> None:
            raise SystemExit(await run(args, reactor))

        react(lambda reactor: ensureDeferred(body(reactor)))
    except KeyboardInterrupt:  # before the reactor handles signals
        sys.stderr.write("wmgr: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
