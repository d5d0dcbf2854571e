"""Scheduler warnings, as GET /rest/v1/warnings/ shows them."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger()


class Notices:
    """Scheduler warnings for GET /rest/v1/warnings/: one entry per distinct message, with its
    first and last time and count; reading them removes them (as wr does)."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._entries: dict[str, list[Any]] = {}

    def warn(self, message: str) -> None:
        now = int(self._clock.seconds())
        entry = self._entries.get(message)
        if entry is None:
            self._entries[message] = [now, now, 1]
            log.warn("{message}", message=message)
        else:
            entry[1] = now
            entry[2] += 1

    def peek(self) -> list[dict[str, Any]]:
        """The warnings, left in place (for live views; only a client's read removes them)."""
        return [{"Msg": m, "FirstDate": e[0], "LastDate": e[1], "Count": e[2]} for m, e in self._entries.items()]

    def take(self) -> list[dict[str, Any]]:
        entries, self._entries = self._entries, {}
        return [{"Msg": m, "FirstDate": e[0], "LastDate": e[1], "Count": e[2]} for m, e in entries.items()]
