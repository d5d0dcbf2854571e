"""The configuration: built-in defaults, then the INI file (etc/wmgr.cnf documents every option),
then the command line, merged into one typed object."""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from wmgr.errors import InvalidRequest


def _optional_int(text: str) -> Optional[int]:
    return None if text.strip() in ("", "auto", "none") else int(text)


def _optional_float(text: str) -> Optional[float]:
    return None if text.strip() in ("", "auto", "none") else float(text)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.replace(",", " ").split() if name.strip()]


def _memory_mb(text: str) -> Optional[int]:
    if text.strip() in ("", "auto", "none"):
        return None
    from wmgr.jobs.model import parse_memory

    return parse_memory(text)


_SIZE = re.compile(r"^(\d{1,15})\s*([KMGT]?)B?$", re.IGNORECASE)


def _size(text: str) -> int:
    """'4096', '512K', '16M', '4G' -> bytes (binary units)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"not a size such as 512K, 16M or 4G: {text!r}")
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")


def _body_limits(text: str) -> list[tuple[str, int]]:
    """'/=1M /rest/v1/upload/=4G' -> [('/', 1048576), ('/rest/v1/upload/', 4294967296)]."""
    limits = []
    for item in _names(text):
        prefix, sep, size = item.rpartition("=")
        if not sep or not prefix.startswith("/"):
            raise ValueError(f"each body limit is PATH_PREFIX=SIZE, such as /rest/v1/upload/=4G, not {item!r}")
        limits.append((prefix, _size(size)))
    if not any(prefix == "/" for prefix, _ in limits):
        raise ValueError("the body limits need one for / (every other path)")
    return limits


# The connection routes check their own, smaller limit ([connections] max_body: a 400, as DUNE
# clients expect); these let such bodies through to that check. /dbs/ takes Qserv's table
# uploads, streamed from the spool file to the database.
DEFAULT_BODY_LIMITS = ("/=1M /rest/v1/jobs/=256M /rest/v1/upload/=4G /api/v1/=16M "
                       "/publish=16M /getconnection/=16M /retract=16M /retract-partition=16M /dbs/=16G /worker/=64M")


def _data_dir(text: str) -> Path:
    return Path(os.path.expanduser(text)).absolute()


def _optional_path(text: str) -> Optional[Path]:
    return Path(os.path.expanduser(text.strip())).absolute() if text.strip() else None


def _qserv_auth(text: str) -> list[str]:
    schemes = [name.lower() for name in _names(text)]
    if schemes != ["none"] and not (schemes and set(schemes) <= {"basic", "digest"}):
        raise ValueError("auth is none, or basic and/or digest")
    return schemes


def _service_section(name: str, options: Mapping[str, str]) -> Any:
    from wmgr.services.spec import service_spec

    return service_spec(name, options)


def _dbs_backend(text: str) -> str:
    if text.strip() not in ("sqlite", "mysql"):
        raise ValueError("backend is sqlite or mysql")
    return text.strip()


def _mysql_url(text: str) -> str:
    if text.strip():
        from urllib.parse import urlsplit

        parts = urlsplit(text.strip())
        if parts.scheme != "mysql" or not parts.hostname:
            raise ValueError("not a mysql://user:password@host:port URL")
        parts.port  # a port that is not a number raises ValueError here
    return text.strip()


def _db_name(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z_][0-9A-Za-z_]{0,63}", text.strip()):
        raise ValueError("not a database name")
    return text.strip()


def _backend(text: str) -> str:
    if text.strip() not in ("local", "slurm"):
        raise ValueError("backend is local or slurm")
    return text.strip()


def _shell_words(text: str) -> list[str]:
    import shlex

    return shlex.split(text)


def default_data_dir() -> Path:
    return _data_dir(os.environ.get("WMGR_DATA_DIR") or "~/.wmgr")


@dataclass
class Config:
    """Every setting, with its default. The INI section and option name of each is in `meta`."""

    data_dir: Path = field(default_factory=default_data_dir, metadata={"ini": ("server", "data_dir", _data_dir)})
    interface: str = field(default="127.0.0.1", metadata={"ini": ("server", "interface", str)})
    port: int = field(default=5012, metadata={"ini": ("server", "port", int)})
    http_port: Optional[int] = field(default=None, metadata={"ini": ("server", "http_port", _optional_int)})
    deployment: str = field(default="production", metadata={"ini": ("server", "deployment", str)})
    tls_names: list[str] = field(default_factory=list, metadata={"ini": ("tls", "names", _names)})
    renew_check_interval: float = field(default=86400.0, metadata={"ini": ("tls", "renew_check_interval", float)})
    max_cores: Optional[float] = field(default=None, metadata={"ini": ("jobs", "max_cores", _optional_float)})
    max_memory: Optional[int] = field(default=None, metadata={"ini": ("jobs", "max_memory", _memory_mb)})
    zero_core_slots: Optional[int] = field(default=None, metadata={"ini": ("jobs", "zero_core_slots", _optional_int)})
    launchers: Optional[int] = field(default=None, metadata={"ini": ("jobs", "launchers", _optional_int)})
    output_limit: int = field(default=4096, metadata={"ini": ("jobs", "output_limit", int)})
    kill_grace: float = field(default=5.0, metadata={"ini": ("jobs", "kill_grace", float)})
    sample_interval: float = field(default=1.0, metadata={"ini": ("jobs", "sample_interval", float)})
    retry_base: float = field(default=30.0, metadata={"ini": ("jobs", "retry_base", float)})
    retry_cap: float = field(default=1800.0, metadata={"ini": ("jobs", "retry_cap", float)})
    retry_jitter: float = field(default=0.25, metadata={"ini": ("jobs", "retry_jitter", float)})
    enforce_limits: bool = field(default=True, metadata={"ini": ("jobs", "enforce_limits", _boolean)})
    memory_margin: float = field(default=0.10, metadata={"ini": ("jobs", "memory_margin", float)})
    time_margin: float = field(default=0.10, metadata={"ini": ("jobs", "time_margin", float)})
    history_max_age: float = field(default=0.0, metadata={"ini": ("history", "max_age", float)})
    history_max_count: int = field(default=0, metadata={"ini": ("history", "max_count", int)})
    prune_interval: float = field(default=3600.0, metadata={"ini": ("history", "prune_interval", float)})
    upload_roots: list[str] = field(default_factory=lambda: ["~", "/tmp"],
                                    metadata={"ini": ("upload", "roots", _names)})
    dbs_backend: str = field(default="sqlite", metadata={"ini": ("dbs", "backend", _dbs_backend)})
    dbs_url: str = field(default="", metadata={"ini": ("dbs", "url", _mysql_url)})
    dbs_proxy_url: str = field(default="", metadata={"ini": ("dbs", "proxy_url", _mysql_url)})
    dbs_xrootd_db: str = field(default="qservw_worker", metadata={"ini": ("dbs", "xrootd_db", _db_name)})
    pman_allow_quit: bool = field(default=False, metadata={"ini": ("pman", "allow_quit", _boolean)})
    header_timeout: float = field(default=10.0, metadata={"ini": ("http", "header_timeout", float)})
    body_limits: list[tuple[str, int]] = field(default_factory=lambda: _body_limits(DEFAULT_BODY_LIMITS),
                                               metadata={"ini": ("http", "body_limits", _body_limits)})
    metrics_open: bool = field(default=False, metadata={"ini": ("metrics", "open", _boolean)})
    connections_ttl: float = field(default=10.0, metadata={"ini": ("connections", "ttl", float)})
    connections_match: str = field(default="fullmatch", metadata={"ini": ("connections", "match", str)})
    connections_open: bool = field(default=False, metadata={"ini": ("connections", "open", _boolean)})
    connections_max_body: int = field(default=8 << 20, metadata={"ini": ("connections", "max_body", int)})
    connections_max_regex: int = field(default=1024, metadata={"ini": ("connections", "max_regex", int)})
    qserv_auth: list[str] = field(default_factory=lambda: ["digest"], metadata={"ini": ("qserv", "auth", _qserv_auth)})
    qserv_secret_file: Optional[Path] = field(default=None,
                                              metadata={"ini": ("qserv", "secret_file", _optional_path)})
    services_script_timeout: float = field(default=30.0, metadata={"ini": ("services", "script_timeout", float)})
    services_kill_grace: float = field(default=5.0, metadata={"ini": ("services", "kill_grace", float)})
    services_restart_min_delay: float = field(default=1.0,
                                              metadata={"ini": ("services", "restart_min_delay", float)})
    services_restart_max_delay: float = field(default=60.0,
                                              metadata={"ini": ("services", "restart_max_delay", float)})
    # One item per "[service:NAME]" section (a family of sections: "family", not "ini").
    services: dict[str, Any] = field(default_factory=dict, metadata={"family": ("service", _service_section)})

    # The manager's side of the worker protocol.
    workers_timeout: float = field(default=60.0, metadata={"ini": ("workers", "timeout", float)})
    workers_check_interval: float = field(default=5.0, metadata={"ini": ("workers", "check_interval", float)})
    run_local: bool = field(default=True, metadata={"ini": ("workers", "run_local", _boolean)})
    # The worker role: this daemon runs jobs of the manager at manager_url as well.
    manager_url: str = field(default="", metadata={"ini": ("worker", "manager", str)})
    manager_ca: str = field(default="", metadata={"ini": ("worker", "manager_ca", str)})
    manager_token_file: str = field(default="", metadata={"ini": ("worker", "manager_token_file", str)})
    worker_name: str = field(default="", metadata={"ini": ("worker", "name", str)})
    worker_heartbeat: float = field(default=5.0, metadata={"ini": ("worker", "heartbeat", float)})
    worker_cores: Optional[float] = field(default=None, metadata={"ini": ("worker", "max_cores", _optional_float)})
    worker_memory: Optional[int] = field(default=None, metadata={"ini": ("worker", "max_memory", _memory_mb)})

    # Where jobs run: "local" (this daemon, and any workers) or "slurm" (runners submitted to Slurm).
    scheduler_backend: str = field(default="local", metadata={"ini": ("scheduler", "backend", _backend)})
    slurm_partition: str = field(default="", metadata={"ini": ("slurm", "partition", str)})
    slurm_account: str = field(default="", metadata={"ini": ("slurm", "account", str)})
    slurm_qos: str = field(default="", metadata={"ini": ("slurm", "qos", str)})
    slurm_extra_args: list[str] = field(default_factory=list, metadata={"ini": ("slurm", "extra_args", _shell_words)})
    slurm_max_runners: int = field(default=4, metadata={"ini": ("slurm", "max_runners", int)})
    slurm_max_cpus: int = field(default=2, metadata={"ini": ("slurm", "max_cpus", int)})
    slurm_pack: int = field(default=8, metadata={"ini": ("slurm", "pack", int)})
    slurm_idle_exit: float = field(default=30.0, metadata={"ini": ("slurm", "idle_exit", float)})
    slurm_poll_interval: float = field(default=2.0, metadata={"ini": ("slurm", "poll_interval", float)})
    slurm_min_time: float = field(default=600.0, metadata={"ini": ("slurm", "min_time", float)})
    slurm_runner_memory: int = field(default=200, metadata={"ini": ("slurm", "runner_memory", int)})
    slurm_memory_margin: float = field(default=0.10, metadata={"ini": ("slurm", "memory_margin", float)})
    slurm_time_margin: float = field(default=0.10, metadata={"ini": ("slurm", "time_margin", float)})
    slurm_backoff_base: float = field(default=5.0, metadata={"ini": ("slurm", "backoff_base", float)})
    slurm_backoff_cap: float = field(default=600.0, metadata={"ini": ("slurm", "backoff_cap", float)})
    slurm_heartbeat: float = field(default=2.0, metadata={"ini": ("slurm", "heartbeat", float)})
    slurm_python: str = field(default="", metadata={"ini": ("slurm", "python", str)})
    slurm_manager_url: str = field(default="", metadata={"ini": ("slurm", "manager_url", str)})
    slurm_output: str = field(default="/dev/null", metadata={"ini": ("slurm", "output", str)})
    slurm_sbatch: str = field(default="sbatch", metadata={"ini": ("slurm", "sbatch", str)})
    slurm_squeue: str = field(default="squeue", metadata={"ini": ("slurm", "squeue", str)})
    slurm_scontrol: str = field(default="scontrol", metadata={"ini": ("slurm", "scontrol", str)})
    slurm_scancel: str = field(default="scancel", metadata={"ini": ("slurm", "scancel", str)})

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> "Config":
        """Defaults, then the INI file at `path` (if any), then `overrides` (unset ones are None)."""
        config = cls()
        if path:
            config.read_ini(path)
        for name, value in (overrides or {}).items():
            if value is not None:
                setattr(config, name, value)
        config.check()
        return config

    def read_ini(self, path: str) -> None:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except OSError as e:
            raise InvalidRequest(f"cannot read the configuration file {path}: {e.strerror}") from None
        except configparser.Error as e:
            raise InvalidRequest(f"{path}: {e}") from None
        known = {f.metadata["ini"][:2]: f for f in fields(self) if "ini" in f.metadata}
        families = {f.metadata["family"][0]: f for f in fields(self) if "family" in f.metadata}
        for section in parser.sections():
            family, colon, name = section.partition(":")
            if colon and family in families:
                spec = families[family]
                try:
                    getattr(self, spec.name)[name] = spec.metadata["family"][1](name, dict(parser.items(section)))
                except ValueError as e:
                    raise InvalidRequest(f"{path}: [{section}]: {e}") from None
                continue
            for option, text in parser.items(section):
                spec = known.get((section, option))
                if spec is None:
                    raise InvalidRequest(f"{path}: [{section}] {option} is not a wmgr option")
                try:
                    setattr(self, spec.name, spec.metadata["ini"][2](text))
                except ValueError as e:
                    raise InvalidRequest(f"{path}: [{section}] {option} = {text!r}: {e}") from None
                except InvalidRequest as e:
                    raise InvalidRequest(f"{path}: [{section}] {option}: {e.reason}") from None

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidRequest(f"port {self.port} is out of range")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise InvalidRequest(f"http_port {self.http_port} is out of range")
        if self.output_limit < 0 or self.kill_grace < 0 or self.sample_interval <= 0:
            raise InvalidRequest("output_limit and kill_grace must be >= 0, sample_interval > 0")
        if self.retry_base < 0 or self.retry_cap < 0 or self.retry_jitter < 0:
            raise InvalidRequest("retry_base, retry_cap and retry_jitter must be >= 0")
        if self.memory_margin < 0 or self.time_margin < 0:
            raise InvalidRequest("memory_margin and time_margin must be >= 0")
        if self.workers_timeout <= 0 or self.workers_check_interval <= 0 or self.worker_heartbeat <= 0:
            raise InvalidRequest("[workers] timeout and check_interval and [worker] heartbeat must be > 0")
        if self.manager_url:
            if not self.manager_url.startswith(("https://", "http://")):
                raise InvalidRequest(f"--manager {self.manager_url!r} is not an http(s) URL")
            if not self.manager_token_file:
                raise InvalidRequest("--manager needs --manager-token-file (the manager's worker.token)")
            if len(self.worker_name) > 200 or any(not c.isprintable() or c in "/ " for c in self.worker_name):
                raise InvalidRequest(f"--worker-name {self.worker_name!r} must be printable, without / or spaces")
        if self.history_max_age < 0 or self.history_max_count < 0 or self.prune_interval <= 0:
            raise InvalidRequest("history max_age and max_count must be >= 0, prune_interval > 0")
        if not 0 < self.header_timeout <= 3600:
            raise InvalidRequest("header_timeout must be more than 0 and at most 3600 seconds")
        if self.connections_ttl <= 0 or self.connections_max_body <= 0 or self.connections_max_regex <= 0:
            raise InvalidRequest("[connections] ttl, max_body and max_regex must be > 0")
        if self.connections_match not in ("fullmatch", "search"):
            raise InvalidRequest("[connections] match must be fullmatch or search")
        if self.dbs_backend == "mysql" and not self.dbs_url:
            raise InvalidRequest("[dbs] backend = mysql needs url = mysql://user:password@host:port")
        if self.slurm_max_runners < 1 or self.slurm_pack < 1 or self.slurm_max_cpus < 1 or self.slurm_idle_exit < 0 or \
                self.slurm_poll_interval <= 0 or self.slurm_heartbeat <= 0 or self.slurm_min_time < 0 or \
                self.slurm_runner_memory < 0 or self.slurm_memory_margin < 0 or self.slurm_time_margin < 0 or \
                not 0 < self.slurm_backoff_base <= self.slurm_backoff_cap:
            raise InvalidRequest("[slurm] max_runners, max_cpus and pack must be >= 1, poll_interval and heartbeat > 0, "
                                 "idle_exit, min_time, runner_memory and margins >= 0, "
                                 "0 < backoff_base <= backoff_cap")
        if self.slurm_manager_url and not self.slurm_manager_url.startswith(("https://", "http://")):
            raise InvalidRequest(f"[slurm] manager_url {self.slurm_manager_url!r} is not an http(s) URL")
        if self.services_script_timeout <= 0 or self.services_kill_grace < 0 or \
                not 0 < self.services_restart_min_delay <= self.services_restart_max_delay:
            raise InvalidRequest("[services] script_timeout must be > 0, kill_grace >= 0, "
                                 "0 < restart_min_delay <= restart_max_delay")
