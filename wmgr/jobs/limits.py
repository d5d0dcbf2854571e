"""Limit groups: at most N jobs of a group run at once.

A job names its groups in `limit_grps`; `name:N` also sets the group's limit to N (and is stored as
plain `name`). A group without a limit is unlimited; a limit of 0 holds its jobs back.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from wmgr.errors import InvalidRequest

_GROUP = re.compile(r"^([^:\s]+)(?::(\d{1,7}))?$")
MAX_LIMIT = 1_000_000


def parse_limit_groups(entries: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """['a', 'b:2'] -> (['a', 'b'], {'b': 2})."""
    names: list[str] = []
    limits: dict[str, int] = {}
    for entry in entries:
        match = _GROUP.match(entry.strip())
        if not match or (match.group(2) is not None and int(match.group(2)) > MAX_LIMIT):
            shown = repr(entry[:80]).encode("utf-8", "backslashreplace").decode("utf-8")
            raise InvalidRequest(f"limit group {shown} must be a name, optionally followed by :N "
                                 f"(N from 0 to {MAX_LIMIT})")
        names.append(match.group(1))
        if match.group(2) is not None:
            limits[match.group(1)] = int(match.group(2))
    return sorted(set(names)), limits


class LimitGroups:
    def __init__(self) -> None:
        self.limits: dict[str, int] = {}
        self.running: dict[str, int] = {}

    def set_limit(self, name: str, limit: Optional[int]) -> None:
        if limit is None:
            self.limits.pop(name, None)
        else:
            self.limits[name] = limit

    def permits(self, groups: Iterable[str]) -> bool:
        for name in groups:
            limit = self.limits.get(name)
            if limit is not None and self.running.get(name, 0) >= limit:
                return False
        return True

    def take(self, groups: Iterable[str]) -> None:
        for name in groups:
            self.running[name] = self.running.get(name, 0) + 1

    def release(self, groups: Iterable[str]) -> None:
        for name in groups:
            left = self.running.get(name, 0) - 1
            if left > 0:
                self.running[name] = left
            else:
                self.running.pop(name, None)
