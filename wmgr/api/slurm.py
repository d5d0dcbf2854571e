"""The Slurm runners of this manager (/slurm/v1/runners): what `wmgr slurm` lists.

Present only with `[scheduler] backend = slurm`. Each runner is one Slurm job: its id, state and
reason as squeue last showed them, its allocation, whether it has registered as a worker (its
name, slurm-ID, is then in GET /workers too) and how many jobs it holds, and why it ended.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from wmgr.api.common import install_error_handlers, json_response


class SlurmAPI:
    app = Klein()
    install_error_handlers(app)

    def __init__(self, runners: Any) -> None:
        self.runners = runners

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/slurm/v1/runners", methods=["GET"])
    def runners(self, request: Any) -> bytes:
        service = self.runners
        return json_response(request, {
            "job_name": service.job_name, "max_runners": service.settings.max_runners,
            "submitted": service.submitted, "submit_failures": service.submit_failures,
            "runner_failures": service.runner_failures,
            "held_for": service.held_for(),
            "runners": service.listing(),
        })


_RUNNER = {"type": "object", "properties": {
    "job_id": {"type": "string"}, "name": {"type": "string"}, "state": {"type": "string"},
    "reason": {"type": "string"}, "node": {"type": "string"}, "cpus": {"type": "integer"},
    "memory": {"type": "string"}, "time_limit": {"type": "string"}, "registered": {"type": "boolean"},
    "jobs": {"type": "integer"}, "ended": {"type": "string"}}}
SLURM_PATHS: dict[str, Any] = {
    "/slurm/v1/runners": {"get": {
        "summary": "this manager's Slurm runners (with [scheduler] backend = slurm)",
        "responses": {"200": {"description": "the runners", "content": {"application/json": {"schema": {
            "type": "object", "properties": {
                "job_name": {"type": "string"}, "max_runners": {"type": "integer"},
                "submitted": {"type": "integer"}, "submit_failures": {"type": "integer"},
                "runner_failures": {"type": "integer"}, "held_for": {"type": "number"},
                "runners": {"type": "array", "items": _RUNNER}}}}}}},
    }},
}
