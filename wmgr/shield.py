"""Work that must run to its end once begun, whoever awaits it.

Klein cancels a request's handler when its client goes away, and cancelling a coroutine cancels
the Deferred it awaits. A change that is committed to the store and then applied in memory must
not be stopped between the two (stored but not applied: jobs deleted on disk that still run, jobs
added on disk that never do). Such work is attached to the store's Deferred, or run as a
Deferred of its own, and awaited through `shielded`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def shielded(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred with d's result; cancelling it leaves d to go on (its result, then, unheard,
    but logged if it is a failure)."""
    out: Deferred[Any] = Deferred()

    def tell(result: Any) -> None:
        if not out.called:
            (out.errback if isinstance(result, Failure) else out.callback)(result)
        elif isinstance(result, Failure):
            log.failure("work whose caller went away failed", result)

    d.addBoth(tell)
    return out
