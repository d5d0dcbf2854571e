"""Hosts that stopped answering ("bad servers" in wr's REST API).

wr fills this from cloud servers it can no longer reach; in wmgr the worker role reports a worker
that went silent. A server comes off the list when it answers again, or when a user confirms it
dead (DELETE /rest/v1/servers/?id=...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wmgr.errors import NotFound


@dataclass
class BadServer:
    id: str
    name: str
    ip: str
    date: int
    problem: str = ""

    def status(self) -> dict[str, Any]:
        return {"ID": self.id, "Name": self.name, "IP": self.ip, "Date": self.date, "IsBad": True,
                "Problem": self.problem}


class BadServers:
    def __init__(self, clock: Any) -> None:
        self._clock = clock  # the reactor (a Clock in tests): when a server was reported
        self._servers: dict[str, BadServer] = {}

    def report(self, server_id: str, name: str, ip: str, problem: str = "") -> None:
        if server_id not in self._servers:
            self._servers[server_id] = BadServer(server_id, name, ip, int(self._clock.seconds()), problem)

    def recovered(self, server_id: str) -> None:
        self._servers.pop(server_id, None)

    def all(self) -> list[dict[str, Any]]:
        return [server.status() for server in self._servers.values()]

    def confirm(self, server_id: str) -> BadServer:
        try:
            return self._servers.pop(server_id)
        except KeyError:
            raise NotFound(f"server {server_id!r} was not known to be bad") from None
