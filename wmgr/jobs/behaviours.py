"""What happens after a job's command exits: wr's on_success, on_failure and on_exit behaviours.

The behaviours of the outcome (on_success or on_failure) run first, then on_exit, each list in its
order. `run` runs a shell command in the job's working directory with the job's environment;
`cleanup` and `cleanup_all` remove the unique working directory wmgr made for the job (they differ
in wr only for mount caches, which wmgr does not have) and its parents left empty; a job with no
behaviours at all has it removed too, and `nothing` is how a job asks to keep it; `remove` asks
for the job to leave the queue once buried; `nothing` does nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# A behaviour's `run` command that takes longer than this is killed: it must not hold the job.
RUN_TIMEOUT = 300.0


@dataclass
class BehaviourOutcome:
    remove: bool = False
    ran: int = 0
    failed: int = 0


class _Collect(ProcessProtocol):
    def __init__(self, done: Deferred[Optional[int]]) -> None:
        self.done = done

    def processEnded(self, reason: Failure) -> None:
        self.done.callback(getattr(reason.value, "exitCode", None))


def behaviours_for(spec: dict[str, Any], succeeded: bool) -> list[dict[str, Any]]:
    first = spec.get("on_success" if succeeded else "on_failure") or []
    return list(first) + list(spec.get("on_exit") or [])


def has_behaviours(spec: dict[str, Any]) -> bool:
    return bool(spec.get("on_success") or spec.get("on_failure") or spec.get("on_exit"))


def asks_removal(behaviours: list[dict[str, Any]]) -> bool:
    """Whether these behaviours include {"remove": true}: the queue's to carry out, wherever the
    job ran."""
    return any(behaviour.get("remove") for behaviour in behaviours)


async def run_behaviours(reactor: Any, behaviours: list[dict[str, Any]], cwd: Optional[str],
                         env: dict[str, str], work_root: Optional[str], stop_at: Optional[str]) -> BehaviourOutcome:
    """Carry out the behaviours in order. `work_root` is the unique directory wmgr made (None when
    cwd_matters); `stop_at` is the directory above which empty parents are kept."""
    outcome = BehaviourOutcome()
    for behaviour in behaviours:
        ((kind, argument),) = behaviour.items()
        if kind == "run" and cwd and os.path.isdir(cwd):
            code = await _run(reactor, argument, cwd, env)
            outcome.ran += 1
            if code != 0:
                outcome.failed += 1
                log.warn("behaviour command {cmd!r} exited {code}", cmd=argument, code=code)
        elif kind in ("cleanup", "cleanup_all") and argument and work_root:
            remove_tree_and_empty_parents(work_root, stop_at)
        elif kind == "remove" and argument:
            outcome.remove = True
    return outcome


async def _run(reactor: Any, command: str, cwd: str, env: dict[str, str]) -> Optional[int]:
    done: Deferred[Optional[int]] = Deferred()
    transport = reactor.spawnProcess(_Collect(done), "/bin/sh", ["/bin/sh", "-c", command], env=env, path=cwd,
                                     childFDs={0: "w", 1: "r", 2: "r"})
    transport.closeStdin()
    timer = reactor.callLater(RUN_TIMEOUT, _kill, transport)
    code = await done
    if timer.active():
        timer.cancel()
    return code


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass


def remove_tree_and_empty_parents(root: str, stop_at: Optional[str]) -> None:
    shutil.rmtree(root, ignore_errors=True)
    parent = os.path.dirname(root)
    # stop_at itself stays: it is the daemon user's own base directory (see runner.work_base).
    while stop_at and parent.startswith(stop_at + os.sep):
        try:
            os.rmdir(parent)
        except OSError:
            break
        parent = os.path.dirname(parent)
