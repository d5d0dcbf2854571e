"""The Qserv worker manager's services (/services): list them, ask one's state, start, stop or
restart it, in the original's shapes (wmgr.api.qserv) over wmgr.services.ServiceManager.

Beyond the original: each service's answer also has `pid`, `uptime` (seconds) and `restarts`
(null where unknown: an init.d script's process is its own business), and any configured
service is managed, not only mysqld and xrootd.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from wmgr.api.openapi import path_param, reply
from wmgr.api.qserv import (QSERV_ERROR_REPLY, QSERV_SECURITY, InvalidArgument, form_fields,
                             install_qserv_error_handlers, required, result, results)
from wmgr.services import ServiceManager, ServiceState
from wmgr.services.manager import ACTIONS


def service_uri(name: str) -> str:
    return f"/services/{name}"


def service_answer(state: ServiceState) -> dict[str, Any]:
    return {"name": state.name, "state": state.state, "uri": service_uri(state.name), "pid": state.pid,
            "uptime": state.uptime, "restarts": state.restarts}


class QservServicesAPI:
    app = Klein()
    install_qserv_error_handlers(app)

    def __init__(self, services: ServiceManager) -> None:
        self.services = services

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/services", methods=["GET"], strict_slashes=False)
    def list_services(self, request: Any) -> bytes:
        return results(request, ({"name": name, "uri": service_uri(name)} for name in self.services.names()))

    @app.route("/services/<name>", methods=["GET"], strict_slashes=False)
    async def service_state(self, request: Any, name: str) -> bytes:
        return result(request, service_answer(await self.services.state(name)))

    @app.route("/services/<name>", methods=["PUT"], strict_slashes=False)
    async def service_action(self, request: Any, name: str) -> bytes:
        self.services.spec(name)  # an unknown service is a 404 before the form is looked at
        action = required(form_fields(request), "action")
        if action not in ACTIONS:
            raise InvalidArgument(f"Unexpected action: '{action}' (start, stop or restart)")
        return result(request, service_answer(await self.services.act(name, action)))


_NAME = path_param("name", "the service's name ([service:NAME] in the configuration)")
_ERROR = QSERV_ERROR_REPLY
_SERVICE = {"type": "object", "properties": {
    "name": {"type": "string"}, "uri": {"type": "string"},
    "state": {"type": "string", "enum": ["active", "stopped"]},
    "pid": {"type": "integer", "nullable": True}, "uptime": {"type": "number", "nullable": True},
    "restarts": {"type": "integer", "nullable": True}}}

QSERV_SERVICES_PATHS: dict[str, Any] = {
    "/services": {"get": {
        "summary": "the configured services (Qserv worker manager)",
        "security": QSERV_SECURITY,
        "responses": {"200": reply("services", {"type": "object", "properties": {"results": {
            "type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "uri": {"type": "string"}}}}}}),
            "401": _ERROR}}},
    "/services/{name}": {
        "get": {"summary": "a service's state: active (status exits 0 / the process runs) or stopped",
                "security": QSERV_SECURITY,
                "parameters": [_NAME],
                "responses": {"200": reply("the service", {"type": "object", "properties": {"result": _SERVICE}}),
                              "401": _ERROR, "404": _ERROR, "409": _ERROR}},
        "put": {"summary": "start, stop or restart a service; answers its state afterwards",
                "security": QSERV_SECURITY,
                "parameters": [_NAME],
                "requestBody": {"required": True, "content": {
                    "application/x-www-form-urlencoded": {"schema": {
                        "type": "object", "required": ["action"], "properties": {
                            "action": {"type": "string", "enum": list(ACTIONS)}}}},
                    "multipart/form-data": {"schema": {
                        "type": "object", "required": ["action"], "properties": {
                            "action": {"type": "string", "enum": list(ACTIONS)}}}}}},
                "responses": {"200": reply("the service after the action", {"type": "object", "properties": {
                    "result": _SERVICE}}), "400": _ERROR, "401": _ERROR, "404": _ERROR, "409": _ERROR}},
    },
}
