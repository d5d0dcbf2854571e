"""The domain's failures, one type per kind. Each API maps them to its own envelope and status
code in one place (wmgr.api.common), so the domain never thinks about HTTP."""


class WmgrError(Exception):
    """Base of every failure the domain reports to a client."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidRequest(WmgrError):
    """The request is malformed or names impossible values; nothing was changed."""


class NotFound(WmgrError):
    """The thing asked for does not exist."""


class Conflict(WmgrError):
    """The request contradicts the current state (a duplicate, a job still depended upon...)."""


class Unauthorized(WmgrError):
    """No valid token."""
