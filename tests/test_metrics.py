"""wmgr.metrics with fakes of the domain's hooks, and GET /metrics through Root (issue 9)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq

from tests.test_api import BASE, TOKEN, Answer, result_of
from wmgr.api.metrics import METRICS_PATHS, MetricsAPI
from wmgr.api.openapi import ROOT_PATHS, WR_PATHS, document
from wmgr.api.root import Root, RootApp, Surface
from wmgr import metrics as metrics_module
from wmgr.metrics import UNMATCHED, Metrics, RouteTemplates


class FakeQueue:
    def __init__(self) -> None:
        self.counters = SimpleNamespace(started=7, completed=5, failed=1)
        self.states = {"running": 1, "ready": 3, "buried": 1}

    def state_counts(self) -> dict:
        return dict(self.states)

    def usage(self) -> dict:
        return {"running": 1, "cores_used": 1.5, "cores_total": 8, "memory_used_mb": 100, "memory_total_mb": 1024}


def samples(metrics: Metrics) -> dict:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def watched():
    queue, launcher, store = FakeQueue(), SimpleNamespace(restarts=2), SimpleNamespace(commit_observers=[])
    metrics = Metrics(document([WR_PATHS, ROOT_PATHS, METRICS_PATHS])["paths"])
    metrics.watch(queue, launcher, store)
    return metrics, queue, launcher, store


def test_the_job_hooks_are_read_when_scraped(watched) -> None:
    metrics, queue, launcher, store = watched
    got = samples(metrics)
    assert got[("wmgr_jobs", (("state", "ready"),))] == 3
    assert got[("wmgr_jobs_started_total", ())] == 7 and got[("wmgr_jobs_completed_total", ())] == 5
    assert got[("wmgr_jobs_failed_total", ())] == 1
    assert got[("wmgr_runner_slots_used", ())] == 1 and got[("wmgr_runner_cores_used", ())] == 1.5
    assert got[("wmgr_runner_memory_used_bytes", ())] == 100 * 1024 * 1024
    assert got[("wmgr_launcher_restarts_total", ())] == 2
    queue.counters.completed += 10
    queue.states["ready"] = 0
    launcher.restarts = 3
    got = samples(metrics)
    assert got[("wmgr_jobs_completed_total", ())] == 15 and got[("wmgr_jobs", (("state", "ready"),))] == 0
    assert got[("wmgr_launcher_restarts_total", ())] == 3


def test_store_commits_feed_a_histogram(watched) -> None:
    metrics, queue, launcher, store = watched
    for seconds in (0.001, 0.002, 0.2):
        for observe in store.commit_observers:
            observe(seconds)
    got = samples(metrics)
    assert got[("wmgr_store_commit_duration_seconds_count", ())] == 3
    assert got[("wmgr_store_commit_duration_seconds_bucket", (("le", "0.0025"),))] == 2


def test_requests_are_counted_by_route_template_not_raw_path(watched) -> None:
    metrics = watched[0]
    for key in ("a" * 32, "b" * 32, "rep,group"):
        metrics.observe_request(b"GET", f"/rest/v1/jobs/{key}".encode(), 200, 0.01)
    metrics.observe_request(b"POST", b"/rest/v1/jobs/abc/retry", 200, 0.01)
    metrics.observe_request(b"BREW", b"/no/such/\xff", 404, 0.001)
    got = samples(metrics)
    requests = {labels: value for (name, labels), value in got.items() if name == "wmgr_http_requests_total"}
    assert requests[(("method", "GET"), ("route", "/rest/v1/jobs/{ids}"), ("status", "200"))] == 3
    assert requests[(("method", "POST"), ("route", "/rest/v1/jobs/{ids}/retry"), ("status", "200"))] == 1
    assert got[("wmgr_http_requests_total", (("method", "other"), ("route", UNMATCHED), ("status", "404")))] == 1
    assert got[("wmgr_http_request_duration_seconds_count", (("method", "GET"), ("route", "/rest/v1/jobs/{ids}")))] == 3
    routes = {labels for (name, labels) in got if name == "wmgr_http_requests_total"}
    assert len(routes) == 3


def test_each_daemon_has_its_own_registry(watched) -> None:
    other = Metrics(["/x"])
    other.observe_request(b"GET", b"/x", 200, 0.1)
    assert not any(name == "wmgr_http_requests_total" for name, _ in samples(watched[0]))


def test_templates_match_with_or_without_the_trailing_slash() -> None:
    routes = RouteTemplates(["/rest/v1/jobs/", "/rest/v1/jobs/{ids}", "/api/v1/{path}", "/api/v1/cmd/"])
    assert routes.match("/rest/v1/jobs") == "/rest/v1/jobs/"
    assert routes.match("/api/v1/cmd") == "/api/v1/cmd/"
    assert routes.match("/api/v1/_0/endInfo/0") == "/api/v1/{path}"


def test_matched_paths_are_remembered_within_a_bound(monkeypatch) -> None:
    monkeypatch.setattr(metrics_module, "PATH_CACHE_SIZE", 3)
    routes = RouteTemplates(["/rest/v1/jobs/{ids}", "/publish"])
    for _ in range(2):
        for path in ("/publish", "/rest/v1/jobs/a", "/rest/v1/jobs/b", "/nowhere", "/publish"):
            assert routes.match(path) == {"/publish": "/publish", "/nowhere": UNMATCHED}.get(path, "/rest/v1/jobs/{ids}")
            assert len(routes._known) <= 3


def stub(metrics: Metrics, open_without_token: bool) -> StubTreq:
    surfaces = [Surface(("metrics",), MetricsAPI(metrics, open_without_token).resource(), own_auth=True)]
    return StubTreq(Root(TOKEN, surfaces, RootApp({}).app.resource()))


def get(client: StubTreq, path: str, token: bool) -> Answer:
    headers = {b"Authorization": [f"Bearer {TOKEN}".encode()]} if token else {}
    d = client.get(BASE + path, headers=headers)
    client.flush()
    return Answer(result_of(d))


@pytest.mark.parametrize("open_without_token", [False, True])
def test_metrics_need_the_token_unless_open(watched, open_without_token: bool) -> None:
    client = stub(watched[0], open_without_token)
    with_token = get(client, "/metrics", token=True)
    assert with_token.code == 200 and with_token.content_type.startswith("text/plain")
    assert "wmgr_jobs_started_total 7.0" in with_token.body.decode()
    without = get(client, "/metrics", token=False)
    if open_without_token:
        assert without.code == 200
    else:
        assert without.code == 401 and "token" in without.json()["error"]


def test_the_connection_registry_is_read_when_scraped(watched) -> None:
    metrics = watched[0]
    connections = SimpleNamespace(partitions=lambda: [{"partition": "ses1", "entries": 3},
                                                      {"partition": "ses2", "entries": 0}],
                                  stats=SimpleNamespace(publishes=12, lookups=40))
    metrics.watch_connections(connections)
    got = samples(metrics)
    assert got[("wmgr_connections", (("partition", "ses1"),))] == 3
    assert got[("wmgr_connections", (("partition", "ses2"),))] == 0
    assert got[("wmgr_connections_publishes_total", ())] == 12
    assert got[("wmgr_connections_lookups_total", ())] == 40


def test_supervised_services_are_read_when_scraped(watched) -> None:
    metrics = watched[0]
    states = [SimpleNamespace(name="xrootd", state="active", restarts=2),
              SimpleNamespace(name="mysqld", state="stopped", restarts=None)]
    metrics.watch_services(SimpleNamespace(supervised_states=lambda: states))
    got = samples(metrics)
    assert got[("wmgr_service_up", (("name", "xrootd"),))] == 1
    assert got[("wmgr_service_up", (("name", "mysqld"),))] == 0
    assert got[("wmgr_service_restarts_total", (("name", "xrootd"),))] == 2


def test_the_workers_are_read_when_scraped(watched, tmp_path) -> None:
    from tests.test_workers import Manager

    metrics = watched[0]
    m = Manager(tmp_path)
    m.start()
    metrics.watch_workers(m.workers)
    m.add({"cmd": "sleep 1"}, {"cmd": "sleep 2"})
    a, _ = m.join("a"), m.join("b")
    m.pull("a", a)
    got = samples(metrics)
    assert got[("wmgr_workers", (("connection", "online"),))] == 2
    assert got[("wmgr_workers", (("connection", "offline"),))] == 0
    assert got[("wmgr_worker_leases", ())] == 2
    m.clock.advance(61)
    m.workers.check()
    m.settle()
    got = samples(metrics)
    assert got[("wmgr_workers", (("connection", "offline"),))] == 2 and got[("wmgr_worker_leases", ())] == 0


def test_garbage_collections_feed_a_histogram_while_the_service_runs() -> None:
    import gc

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    ticks = iter([10.0, 10.25])
    pauses = metrics_module.GcPauses(registry, clock=lambda: next(ticks))
    pauses.startService()
    assert pauses in gc.callbacks
    pauses("start", {"generation": 2})
    pauses("stop", {"generation": 2})
    pauses.stopService()
    assert pauses not in gc.callbacks
    assert registry.get_sample_value("wmgr_gc_pause_seconds_count", {"generation": "2"}) == 1
    assert registry.get_sample_value("wmgr_gc_pause_seconds_sum", {"generation": "2"}) == 0.25
    assert registry.get_sample_value("wmgr_gc_pause_seconds_bucket", {"generation": "2", "le": "0.1"}) == 0
    gc.collect()  # no longer watched: nothing more
    assert registry.get_sample_value("wmgr_gc_pause_seconds_count", {"generation": "2"}) == 1


def test_the_reactor_lag_is_how_late_a_timer_ran() -> None:
    from prometheus_client import CollectorRegistry
    from twisted.internet.task import Clock

    registry, clock = CollectorRegistry(), Clock()
    lag = metrics_module.ReactorLag(registry, clock, interval=0.1)
    lag.startService()
    clock.advance(0.1)  # on time
    clock.advance(0.35)  # a turn that took 0.35 s: the timer ran 0.25 s late
    assert registry.get_sample_value("wmgr_reactor_lag_seconds_count") == 2
    assert registry.get_sample_value("wmgr_reactor_lag_seconds_bucket", {"le": "0.001"}) == 1
    assert abs(registry.get_sample_value("wmgr_reactor_lag_seconds_sum") - 0.25) < 1e-9
    lag.stopService()
    assert clock.getDelayedCalls() == []
