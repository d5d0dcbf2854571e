"""How the queue treats jobs: the settings it runs by, from the daemon's Config."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class QueuePolicy:
    """How the queue treats jobs. Every field is a setting of wmgr.config.Config (documented in
    etc/wmgr.cnf), with its default stated there only: build one with `from_config`."""

    output_limit: int
    kill_grace: float
    # Retry back-off: base * 2^(failures-1), capped, plus up to `retry_jitter` of itself at random.
    retry_base: float
    retry_cap: float
    retry_jitter: float
    # Limits: a run over its memory or time by more than the margin is stopped.
    enforce_limits: bool
    memory_margin: float
    time_margin: float
    # History pruning: completed jobs older than max_age seconds, or beyond the newest max_count,
    # are removed (0: keep).
    history_max_age: float
    history_max_count: int
    # Whether this daemon starts ready jobs itself; with False only workers run them (pulled).
    run_local: bool

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any) -> "QueuePolicy":
        """The policy of a Config (the defaults' when None), with some fields overridden."""
        if config is None:
            from wmgr.config import Config

            config = Config(data_dir=Path("."))
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        values.update(overrides)
        return cls(**values)

    def backoff(self, failures: int) -> float:
        delay = min(self.retry_cap, self.retry_base * 2 ** max(0, failures - 1))
        return delay + random.uniform(0, delay * self.retry_jitter)


def limit_of(requested: float, expected: float) -> float:
    """Limits are enforced at the larger of what was asked for and what is expected: learning may
    lower what the scheduler reserves, but never stops a job below what its owner asked for."""
    return max(requested, expected)
