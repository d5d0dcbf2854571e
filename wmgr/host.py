"""This machine's identity as jobs and clients are told it: its name and an address other hosts
could reach it by."""

from __future__ import annotations

import socket

import psutil


def host_name() -> str:
    return socket.gethostname()


def host_address() -> str:
    """The first non-loopback IPv4 address, else 127.0.0.1 (best effort, no network traffic:
    pman found it by a UDP "connect" to 8.8.8.8, which needs a route to the internet)."""
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family == socket.AF_INET and not entry.address.startswith("127."):
                return entry.address
    return "127.0.0.1"


def host_identity() -> tuple[str, str]:
    return host_name(), host_address()
