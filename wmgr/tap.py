"""`twistd wmgr`: the command-line options and the service tree they build."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any, Optional

from twisted.application.service import IService
from twisted.python import usage

from wmgr.config import Config
from wmgr.errors import InvalidRequest


class Options(usage.Options):
    synopsis = ("[--config PATH] [--data-dir DIR] [--interface ADDR] [--port N] [--http-port N] "
                "[--manager URL --manager-ca PATH --manager-token-file PATH [--worker-name NAME]]")
    longdesc = (
        "Serve the wr job queue (/rest/v1/), the pman API (/api/v1/), the DUNE connection registry "
        "(/publish, /getconnection/...), the Qserv worker manager's services and databases (/services, "
        "/dbs, /xrootd), the worker protocol (/worker/v1/) and Flamenco's workers and tasks (/workers, "
        "/tasks) over HTTPS with the daemon's own CA and a bearer token, and /metrics; with --manager, "
        "also run another wmgr's jobs as its worker. Command-line options override the configuration "
        "file; etc/wmgr.cnf documents every option."
    )
    optParameters = [
        ["config", "c", None, "An INI configuration file in the format of etc/wmgr.cnf."],
        ["data-dir", "d", None, "Data directory: store, CA, token, run files "
                                "(default: $WMGR_DATA_DIR, else ~/.wmgr)."],
        ["interface", "i", None, "Address to listen on (default 127.0.0.1)."],
        ["port", "p", None, "HTTPS port (default 5012; 0 picks a free one).", int],
        ["http-port", None, None, "Also serve plain HTTP on this port, same interface and token "
                                  "(default: off; 0 picks a free one).", int],
        ["manager", None, None, "Also be a worker of the wmgr manager at this URL (pulls and runs its jobs)."],
        ["manager-ca", None, None, "The manager's CA certificate (its ca.pem) to trust."],
        ["manager-token-file", None, None, "A file holding the manager's worker.token (or client.token)."],
        ["worker-name", None, None, "This worker's name at the manager (default: the host name)."],
    ]

    def postOptions(self) -> None:
        try:
            self.config = Config.load(self["config"], {
                "data_dir": _path(self["data-dir"]),
                "interface": self["interface"],
                "port": self["port"],
                "http_port": self["http-port"],
                "manager_url": self["manager"],
                "manager_ca": self["manager-ca"],
                "manager_token_file": self["manager-token-file"],
                "worker_name": self["worker-name"],
            })
        except InvalidRequest as e:
            raise usage.UsageError(e.reason) from None


def _path(text: Optional[str]) -> Any:
    if text is None:
        return None
    from wmgr.config import _data_dir

    return _data_dir(text)


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from wmgr.daemon import WmgrService

    service = WmgrService(options.config, reactor, settle=True)
    atexit.register(exit_status, service)
    return service


def exit_status(service: Any) -> None:
    """Make a failed start (port taken, data directory unusable...) exit 1.

    The start is asynchronous (it awaits the store before it listens), so its failure can only
    stop the reactor; twistd then returns normally and has no way to be told an exit status (its
    only channel is the signal that stopped the reactor). This runs at interpreter exit, after
    twistd has stopped logging and removed its pid file, and ends the process with status 1 when
    the start failed; a daemon that started and stopped keeps its normal exit."""
    if getattr(service, "start_failure", None) is None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(1)
