"""Qserv's databases on this worker: the domain (Databases) over a SQLite or MySQL backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wmgr.dbs.service import Databases

__all__ = ["Databases", "make_backend"]


def make_backend(kind: str, data_dir: Path, url: str, xrootd_db: str) -> Any:
    """The backend the configuration names: sqlite (files under DATA_DIR/dbs) or mysql (url)."""
    if kind == "mysql":
        from wmgr.dbs.mysql import MysqlBackend  # pymysql is an extra: only needed here

        return MysqlBackend(url, xrootd_db)
    from wmgr.dbs.sqlite import SqliteBackend

    return SqliteBackend(Path(data_dir) / "dbs", xrootd_db)
