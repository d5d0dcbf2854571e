"""`twistd --help` lists wmgr after a plain (non-editable) install too.

The suite itself runs from an editable install (`pip install -e '.[test]'`), which
test_daemon.py's test_twistd_help_lists_wmgr covers; this builds the project as `pip install .`
would and checks the plugin is found from the installed files alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def test_a_plain_install_puts_the_plugin_where_twistd_finds_it(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, cwd=str(tmp_path),
    )
    if build.returncode != 0 and ("NewConnectionError" in build.stderr or "No matching distribution" in build.stderr):
        pytest.skip("pip could not fetch the build backend (setuptools) from the package index: no network")
    assert build.returncode == 0, build.stderr
    assert (target / "twisted" / "plugins" / "wmgr_plugin.py").exists()
    assert not (target / "twisted" / "__init__.py").exists()  # it would shadow Twisted itself
    for name in ("index.html", "app.css", "app.js"):  # the dashboard, as package data
        assert (target / "wmgr" / "static" / name).exists(), name
    assert (target / "bin" / "wmgr").exists()  # the console script
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = "import wmgr, twisted; print(wmgr.__file__); print(twisted.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd="/")
    wmgr_file, twisted_file = where.stdout.split()
    assert wmgr_file.startswith(str(target)) and not twisted_file.startswith(str(target))
    listing = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                             capture_output=True, text=True, env=env, cwd="/")
    assert "wmgr" in listing.stdout, listing.stdout + listing.stderr
