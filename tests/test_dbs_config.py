"""The [dbs] options: defaults, and bad values refused when the file is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from wmgr.config import Config
from wmgr.errors import InvalidRequest


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "wmgr.cnf"
    path.write_text(text)
    return Config.load(str(path))


def test_defaults_are_sqlite_and_qservw_worker(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert (config.dbs_backend, config.dbs_url, config.dbs_proxy_url, config.dbs_xrootd_db) == (
        "sqlite", "", "", "qservw_worker")


def test_mysql_settings(tmp_path: Path) -> None:
    config = load(tmp_path, "[dbs]\nbackend = mysql\nurl = mysql://qsmaster:p%40ss@db.example:13306\n"
                            "proxy_url = mysql://qsmaster@czar:4040\nxrootd_db = qservw_worker\n")
    assert (config.dbs_backend, config.dbs_url) == ("mysql", "mysql://qsmaster:p%40ss@db.example:13306")


@pytest.mark.parametrize("text, reason", [
    ("[dbs]\nbackend = postgres\n", "sqlite or mysql"),
    ("[dbs]\nbackend = mysql\n", "needs url"),
    ("[dbs]\nurl = http://db:3306\n", "mysql://"),
    ("[dbs]\nurl = mysql://db:port\n", "url"),
    ("[dbs]\nxrootd_db = qserv-worker\n", "database name"),
    ("[dbs]\nthreads = 4\n", "not a wmgr option"),
])
def test_bad_values_are_refused(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load(tmp_path, text)
    assert reason in caught.value.reason
