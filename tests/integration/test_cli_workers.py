"""`wmgr workers` and `wmgr tasks` against the real daemon: Flamenco's workers and tasks from the
command line."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.harness import until
from tests.integration.test_cli import assert_one_clear_line, wmgr

pytestmark = pytest.mark.timeout(120)


@pytest_twisted.ensureDeferred
async def test_workers_are_listed_enabled_and_disabled(daemon, client, reactor):
    assert wmgr(daemon.data_dir, "workers").stdout.strip() == "no workers"
    reply = await client.request("POST", "workers", data=b"hostname=render7&system=Linux&port=5000",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.code == 204, reply
    result = wmgr(daemon.data_dir, "workers")
    assert result.returncode == 0 and "render7" in result.stdout and "online" in result.stdout, result
    result = wmgr(daemon.data_dir, "workers", "disable", "render7")
    assert result.returncode == 0 and result.stdout.strip() == "worker render7 disabled", result
    listing = json.loads(wmgr(daemon.data_dir, "--json", "workers").stdout)
    assert listing["render7"]["status"] == "disabled" and listing["render7"]["hostname"] == "render7"
    assert json.loads(wmgr(daemon.data_dir, "--json", "workers", "enable", "render7").stdout)["status"] == "enabled"
    assert_one_clear_line(wmgr(daemon.data_dir, "workers", "disable", "nope"), 1, "nope")
    assert_one_clear_line(wmgr(daemon.data_dir, "workers", "disable"), 2, "which worker")


@pytest_twisted.ensureDeferred
async def test_tasks_are_listed_and_cancelled(daemon, client, reactor):
    assert wmgr(daemon.data_dir, "tasks").stdout.strip() == "no tasks"
    body = {"task_id": 5, "type": "frames", "parser": "frames",
            "settings": {"command": "for n in $(seq {frame_start} {frame_end}); do echo Fra:$n; done",
                         "frames": "1-4", "chunk_size": 2}}
    assert (await client.post("tasks", body)).code == 202

    async def completed():
        tasks = json.loads(wmgr(daemon.data_dir, "--json", "tasks").stdout)
        return tasks[0]["status"] == "completed" and tasks

    tasks = await until(reactor, completed, timeout=30, every=0.3)
    assert tasks[0]["frame_current"] == 4
    result = wmgr(daemon.data_dir, "tasks")
    assert result.returncode == 0 and "completed" in result.stdout and "1-4" in result.stdout, result
    body = {"task_id": 6, "type": "shell", "settings": {"command": "sleep 30"}}
    assert (await client.post("tasks", body)).code == 202
    result = wmgr(daemon.data_dir, "tasks", "cancel", "6")
    assert result.returncode == 0 and result.stdout.strip() == "task 6 canceled", result
    assert_one_clear_line(wmgr(daemon.data_dir, "tasks", "cancel", "x"), 2, "whole number")
    assert_one_clear_line(wmgr(daemon.data_dir, "tasks", "cancel", "99"), 1, "no task 99")
