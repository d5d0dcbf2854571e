"""GET /metrics: the daemon's metrics in Prometheus' text format (see wmgr.metrics).

Registered as a Surface with own_auth: the token is required unless `[metrics] open = true`, so a
Prometheus server without the token can be allowed to scrape while every other path still needs
it."""

from __future__ import annotations

from typing import Any

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST

from wmgr.api.common import install_error_handlers, json_response
from wmgr.api.openapi import ERROR
from wmgr.metrics import Metrics


class MetricsAPI:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, metrics: Metrics, open_without_token: bool) -> None:
        self.metrics = metrics
        self.open_without_token = open_without_token

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/metrics", methods=["GET"], strict_slashes=False)
    def scrape(self, request: Any) -> bytes:
        if not (self.open_without_token or getattr(request, "wmgr_token_ok", False)):
            return json_response(request, {"error": "a valid token is required (Authorization: Bearer <token>), "
                                                    "unless [metrics] open = true"}, 401)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition()


METRICS_PATHS: dict[str, Any] = {
    "/metrics": {"get": {
        "summary": "metrics in Prometheus text format: jobs by state, runs, runner slots, launcher restarts, "
                   "HTTP requests by route template and status with latencies, store commit latency "
                   "(the token is needed unless [metrics] open = true)",
        "responses": {"200": {"description": "Prometheus text exposition format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "401": ERROR}}},
}
