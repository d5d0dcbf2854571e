"""The OpenAPI document: valid, and every route the daemon's Klein apps serve is in it."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from wmgr.api import openapi
from wmgr.api.dashboard import DASHBOARD_PATHS, Dashboard
from wmgr.api.connections import CONNECTIONS_PATHS, ConnectionsAPI
from wmgr.api.flamenco import FLAMENCO_PATHS, FlamencoAPI
from wmgr.api.pman import PMAN_PATHS, PmanAPI
from wmgr.api.qserv import QSERV_SCHEMAS
from wmgr.api.qserv_dbs import QSERV_DBS_PATHS, QservDbsAPI
from wmgr.api.qserv_services import QSERV_SERVICES_PATHS, QservServicesAPI
from wmgr.api.root import RootApp
from wmgr.api.metrics import METRICS_PATHS, MetricsAPI
from wmgr.api.workers import WORKER_PATHS, WorkersAPI
from wmgr.api.wr import WrAPI

ALL_PATHS = [openapi.WR_PATHS, PMAN_PATHS, WORKER_PATHS, FLAMENCO_PATHS, CONNECTIONS_PATHS, QSERV_DBS_PATHS,
             QSERV_SERVICES_PATHS, DASHBOARD_PATHS, openapi.ROOT_PATHS, METRICS_PATHS]


def served_routes(*apps):
    """(OpenAPI path, method) for every rule of the given Klein apps."""
    routes = set()
    for app in apps:
        for rule in app.url_map.iter_rules():
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                routes.add((path, method.lower()))
    return routes


def documented(doc):
    return {(path, method) for path, item in doc["paths"].items() for method in item}


def test_document_is_valid_openapi_3():
    validate(openapi.document(ALL_PATHS, [QSERV_SCHEMAS]))


def test_every_route_is_documented_and_nothing_else():
    doc = openapi.document(ALL_PATHS, [QSERV_SCHEMAS])
    routes = served_routes(WrAPI.app, PmanAPI.app, WorkersAPI.app, FlamencoAPI.app, ConnectionsAPI.app,
                           QservDbsAPI.app, QservServicesAPI.app, Dashboard.app, RootApp.app, MetricsAPI.app)
    assert routes - documented(doc) == set()
    assert documented(doc) - routes == set()
