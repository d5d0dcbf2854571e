"""The services wmgr manages for Qserv (mysqld, xrootd, ...): supervised commands and init.d-style
scripts, declared in the configuration (wmgr.services.spec)."""

from wmgr.services.manager import CommandFailure, InvalidService, ServiceManager, ServiceState
from wmgr.services.spec import ServiceSpec, service_spec

__all__ = ["CommandFailure", "InvalidService", "ServiceManager", "ServiceSpec", "ServiceState", "service_spec"]
