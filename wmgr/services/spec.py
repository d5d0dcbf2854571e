"""A service as the configuration declares it: `[service:NAME]` with `command` or `script`."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Mapping, Optional

# Service names appear in URIs (/services/<name>) and in log file names.
SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class ServiceSpec:
    """`command`: an argv wmgr runs and supervises itself (restarted when it dies);
    `script`: an init.d-style script wmgr calls with status, start or stop."""

    name: str
    command: Optional[tuple[str, ...]] = None
    script: Optional[str] = None

    @property
    def kind(self) -> str:
        return "command" if self.command else "script"


def service_spec(name: str, options: Mapping[str, str]) -> ServiceSpec:
    """The spec of one `[service:NAME]` section; ValueError says what is wrong with it."""
    if not SERVICE_NAME_RE.match(name):
        raise ValueError(f"a service name is letters, digits, _ . - (not starting with . or -): {name!r}")
    unknown = set(options) - {"command", "script"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}: a service has command or script")
    command, script = options.get("command", "").strip(), options.get("script", "").strip()
    if bool(command) == bool(script):
        raise ValueError("a service needs exactly one of command (supervised by wmgr) or script (init.d-style)")
    if command:
        try:
            argv = tuple(shlex.split(command))
        except ValueError as e:
            raise ValueError(f"command: {e}") from None
        return ServiceSpec(name, command=argv)
    if not script.startswith("/"):
        raise ValueError(f"script must be an absolute path: {script!r}")
    return ServiceSpec(name, script=script)
