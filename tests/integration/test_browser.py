"""The dashboard in a real browser (headless Chromium driven by Playwright for Python): log in, add
jobs through the API and see the bars move without a reload, kill a job and retry a buried one from
the page, job fields shown as text; the connections, services (stop and start one) and databases
views; log out. The screenshot is saved in tests/artifacts/.

The browser runs in its own process (browser_steps.py). Where Chromium or Playwright is missing,
the test is skipped with the reason; .ci/run installs both.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from tests.integration.browser_steps import CHROMIUM, SKIP

pytestmark = pytest.mark.timeout(300)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
STEPS = Path(__file__).resolve().with_name("browser_steps.py")
SERVICES = "[service:sleeper]\ncommand = /bin/sh -c \"exec sleep 1000\"\n"


def unavailable() -> str:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    return ""


@pytest_twisted.ensureDeferred
async def test_dashboard_in_a_real_browser(make_daemon, reactor):
    reason = unavailable()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    daemon = await make_daemon(config=SERVICES)
    try:
        result = subprocess.run([sys.executable, str(STEPS), str(daemon.data_dir), str(ARTIFACTS)],
                                capture_output=True, text=True, timeout=240)
    finally:
        assert await daemon.stop(reactor) == 0, daemon.log()  # it stops the supervised service too
    if result.returncode == SKIP:
        print(f"skipped: {result.stderr.strip()}")
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{daemon.log()[-3000:]}"
    assert "all steps passed" in result.stdout
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10000
