"""The OpenAPI 3 document of every route the daemon serves. Each API surface contributes its paths
(a `PATHS` mapping in this module, or one it passes in); the tests validate the whole document and
check that every Klein route appears in it."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from wmgr import __version__
from wmgr.jobs.status import SCHEMA as JOB_STATUS_SCHEMA


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": dict(schema)}}


def reply(description: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = json_content(schema)
    return answer


ERROR = reply("an error, with its reason", _ref("Error"))


def query_param(name: str, description: str, schema: Mapping[str, Any] | None = None, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": dict(schema or {"type": "string"})}


def path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


_JOB_QUERY = [
    query_param("std", "include StdOut and StdErr", {"type": "boolean"}),
    query_param("env", "include Env", {"type": "boolean"}),
    query_param("limit", "group similar jobs, showing this many per group", {"type": "integer", "minimum": 0}),
    query_param("state", "only jobs in this state", {"type": "string", "enum": [
        "delayed", "ready", "reserved", "running", "lost", "buried", "dependent", "complete", "deletable"]}),
    query_param("search", "match rep groups by substring", {"type": "boolean"}),
]
_DELETE_QUERY = [
    query_param("state", "what to do: kill running jobs, confirm lost ones, or delete deletable ones",
                {"type": "string", "enum": ["running", "lost", "deletable"]}, required=True),
    query_param("search", "match rep groups by substring", {"type": "boolean"}),
]
_JOBS_REPLY = reply("job status objects", {"type": "array", "items": _ref("JobStatus")})
_IDS = path_param("ids", "comma-separated job keys (32 hex digits) and/or rep groups")

WR_PATHS: dict[str, Any] = {
    "/rest/version/": {"get": {
        "summary": "the manager's version and API version (no token needed)", "security": [],
        "responses": {"200": reply("version", {"type": "object", "properties": {
            "Version": {"type": "string"}, "API": {"type": "string"}}})}}},
    "/rest/v1/info/": {"get": {
        "summary": "information about the manager",
        "responses": {"200": reply("server information", _ref("ServerInfo")), "401": ERROR}}},
    "/rest/v1/jobs/": {
        "get": {"summary": "status of all incomplete jobs", "parameters": _JOB_QUERY,
                "responses": {"200": _JOBS_REPLY, "400": ERROR, "401": ERROR}},
        "post": {"summary": "add jobs; query parameters give defaults for every job",
                 "parameters": [query_param("rerun", "run again jobs that already completed", {"type": "boolean"})],
                 "requestBody": {"required": True, "content": json_content(
                     {"type": "array", "items": _ref("JobDefinition")})},
                 "responses": {"201": reply("the jobs now in the queue", {"type": "array", "items": _ref("JobStatus")}),
                               "400": ERROR, "401": ERROR}},
        "delete": {"summary": "kill, confirm lost, or delete incomplete jobs", "parameters": _DELETE_QUERY,
                   "responses": {"200": _JOBS_REPLY, "202": _JOBS_REPLY, "400": ERROR, "401": ERROR}},
    },
    "/rest/v1/jobs/{ids}": {
        "get": {"summary": "status of jobs by key or rep group, completed ones included",
                "parameters": [_IDS] + _JOB_QUERY, "responses": {"200": _JOBS_REPLY, "400": ERROR, "401": ERROR}},
        "delete": {"summary": "kill, confirm lost, or delete jobs by key or rep group",
                   "parameters": [_IDS] + _DELETE_QUERY,
                   "responses": {"200": _JOBS_REPLY, "202": _JOBS_REPLY, "400": ERROR, "401": ERROR}},
    },
}

_INFO_REPLY = reply("server information; Mode says started, paused or draining", _ref("ServerInfo"))
_JOBS_ONLY = reply("the jobs affected", {"type": "array", "items": _ref("JobStatus")})

WR_PATHS.update({
    "/rest/v1/jobs/{ids}/retry": {"post": {
        "summary": "put buried jobs back in the queue with their retries renewed (beyond wr's REST)",
        "parameters": [_IDS, query_param("search", "match rep groups by substring", {"type": "boolean"})],
        "responses": {"200": _JOBS_ONLY, "400": ERROR, "401": ERROR}}},
    "/rest/v1/manager/{action}": {"post": {
        "summary": "pause (start nothing new), resume, or drain (start nothing new and stop the daemon once "
                   "running jobs end) the manager (beyond wr's REST)",
        "parameters": [{"name": "action", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": ["pause", "resume", "drain"]}}],
        "responses": {"200": _INFO_REPLY, "401": ERROR, "404": ERROR}}},
    "/rest/v1/upload/": {"put": {
        "summary": "store the body as a file on the manager's machine",
        "parameters": [query_param("path", "where: ~/... under the daemon user's home, or an absolute path inside "
                                           "the configured upload roots; none: DATA_DIR/uploads by MD5")],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
            "type": "string", "format": "binary"}}}},
        "responses": {"200": reply("where the file was stored", {"type": "object", "properties": {
            "path": {"type": "string"}}}), "400": ERROR, "401": ERROR}}},
    "/rest/v1/warnings/": {"get": {
        "summary": "scheduler warnings; reading them removes them",
        "responses": {"200": reply("warnings", {"type": "array", "items": _ref("Warning")}), "401": ERROR}}},
    "/rest/v1/servers/": {
        "get": {"summary": "hosts reported bad; nothing reports them yet (the worker role will), so "
                         "the list is empty today",
                "responses": {"200": reply("bad servers", {"type": "array", "items": _ref("BadServer")}),
                              "401": ERROR}},
        "delete": {"summary": "confirm that a bad server is dead",
                   "parameters": [query_param("id", "the server's ID", required=True)],
                   "responses": {"200": reply("the server confirmed", _ref("BadServer")), "400": ERROR,
                                 "401": ERROR, "404": ERROR}},
    },
})
WR_PATHS["/rest/v1/jobs/{ids}"]["patch"] = {
    "summary": "change properties of queued jobs: priority, retries, memory, time, cpus, disk, override, "
               "limit_grps, env, rep_grp, req_grp, behaviours, change_home (beyond wr's REST)",
    "parameters": [_IDS, query_param("search", "match rep groups by substring", {"type": "boolean"})],
    "requestBody": {"required": True, "content": json_content(_ref("JobChanges"))},
    "responses": {"200": _JOBS_ONLY, "400": ERROR, "401": ERROR},
}

ROOT_PATHS: dict[str, Any] = {
    "/openapi.json": {"get": {"summary": "this document",
                              "responses": {"200": reply("the OpenAPI document", {"type": "object"})}}},
}

_STRINGS = {"type": "array", "items": {"type": "string"}, "nullable": True}
# Text that may reach exec or the file system: no NUL (nor lone surrogates, which JSON Schema
# cannot say).
_TEXT = {"type": "string", "pattern": r"^[^\x00]*$"}
_TEXTS = {"type": "array", "items": _TEXT, "nullable": True}
_COMMAND_TEXT = {"type": "string", "pattern": r"^[^\x00]*[^\x00\s][^\x00]*$", "description": "not blank"}
_BEHAVIOURS = {"type": "array", "nullable": True, "items": {"oneOf": [
    {"type": "object", "required": [kind], "additionalProperties": False, "properties": {kind: {"type": "boolean"}}}
    for kind in ("cleanup", "cleanup_all", "remove", "nothing")] + [
    {"type": "object", "required": ["run"], "additionalProperties": False, "properties": {"run": _TEXT}}]}}

SCHEMAS: dict[str, Any] = {
    "Warning": {"type": "object", "properties": {
        "Msg": {"type": "string"}, "FirstDate": {"type": "integer"}, "LastDate": {"type": "integer"},
        "Count": {"type": "integer"}}},
    "BadServer": {"type": "object", "properties": {
        "ID": {"type": "string"}, "Name": {"type": "string"}, "IP": {"type": "string"},
        "Date": {"type": "integer"}, "IsBad": {"type": "boolean"}, "Problem": {"type": "string"}}},
    "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
    "ServerInfo": {"type": "object", "properties": {
        name: {"type": "integer"} if name == "PID" else {"type": "string"}
        for name in ("Addr", "Host", "Port", "WebPort", "PID", "Deployment", "Scheduler", "Mode")}},
    "JobDefinition": {"type": "object", "required": ["cmd"], "properties": {
        "cmd": _COMMAND_TEXT, "cwd": {"type": "string", "pattern": r"^/[^\x00]*$"},
        "cwd_matters": {"type": "boolean"},
        "change_home": {"type": "boolean"}, "rep_grp": _TEXT, "req_grp": _TEXT,
        "memory": {"type": "string", "example": "5M", "pattern": r"^[0-9]{1,8}(\.[0-9]{1,3})?[KMGkmg]B?$",
                   "description": "at most 64T"},
        "time": {"type": "string", "example": "1h30m", "pattern": r"^([0-9]{1,4}(h|m|s|ms))+$",
                 "description": "a Go duration of at most 8784h"},
        "cpus": {"type": "number", "minimum": 0, "maximum": 4096},
        "disk": {"type": "integer", "minimum": 0, "maximum": 1024 ** 2, "description": "GB"},
        "override": {"type": "integer", "minimum": 0, "maximum": 2},
        "priority": {"type": "integer", "minimum": 0, "maximum": 255},
        "retries": {"type": "integer", "minimum": 0, "maximum": 255},
        "dep_grps": _TEXTS, "deps": _TEXTS,
        "limit_grps": {"type": "array", "nullable": True, "items": {
            "type": "string", "pattern": r"^[^:\s]+(:[0-9]{1,6})?$",
            "description": "a group name, optionally :N (0 to 1000000 running at once)"}},
        "env": {"type": "array", "nullable": True,
                "items": {"type": "string", "pattern": r"^[^=\x00][^=\x00]*=[^\x00]*$"}},
        "on_failure": _BEHAVIOURS, "on_success": _BEHAVIOURS, "on_exit": _BEHAVIOURS,
        "mounts": {"type": "array", "maxItems": 0, "description": "not supported: must be empty"},
        "monitor_docker": _TEXT,
        "with_docker": {"type": "string", "maxLength": 0, "description": "not supported: must be empty"},
        "with_singularity": {"type": "string", "maxLength": 0, "description": "not supported: must be empty"},
        "container_mounts": _TEXT, "rerun": {"type": "boolean"},
        "cloud_os": _TEXT, "cloud_username": _TEXT, "cloud_flavor": _TEXT,
        "cloud_script": _TEXT, "cloud_config_files": _TEXT,
        "cloud_ram": {"type": "integer", "minimum": 0, "maximum": 64 * 1024 ** 2}},
        "additionalProperties": False},
    "JobStatus": JOB_STATUS_SCHEMA,
}


# What PATCH may change (the job queue's MODIFIABLE): cmd and cwd make a job's key, so they are not.
SCHEMAS["JobChanges"] = {
    "type": "object", "minProperties": 1, "additionalProperties": False,
    "properties": {name: SCHEMAS["JobDefinition"]["properties"][name] for name in (
        "priority", "retries", "memory", "time", "cpus", "disk", "override", "limit_grps", "env", "rep_grp",
        "req_grp", "on_failure", "on_success", "on_exit", "change_home")}}


def document(path_sets: Iterable[Mapping[str, Any]], schemas: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path_set in path_sets:
        paths.update(path_set)
    components: dict[str, Any] = dict(SCHEMAS)
    for extra in schemas:
        components.update(extra)
    return {
        "openapi": "3.0.3",
        "info": {"title": "wmgr", "version": __version__,
                 "description": "One HTTPS daemon per machine: the wr job queue, the pman API, the DUNE "
                                "connection registry and the Qserv worker manager's services and databases."},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "tokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
                # The Qserv routes' legacy clients: the user:password of [qserv] secret_file.
                "qservBasic": {"type": "http", "scheme": "basic"},
                "qservDigest": {"type": "http", "scheme": "digest"},
            },
            "schemas": components,
        },
        "security": [{"bearer": []}, {"tokenQuery": []}],
        "paths": paths,
    }
