"""The databases domain's failures, each class named as the original Qserv wmgr named it.

The Qserv API answers a domain error with its class name as `exception` and the status of its
kind (wmgr.errors), so the names here are the ones Qserv's tools read. Two cases need the API's
help: DatabaseFailure (a 500 named after the driver's error class, as the original reported
escaped database errors) and NotRegistered (the original's 409 DatabaseMissing under /xrootd).
"""

from __future__ import annotations

from wmgr.errors import Conflict, InvalidRequest, NotFound, WmgrError


# 400: the request is wrong; nothing was changed.
class MissingArgument(InvalidRequest): pass
class InvalidArgument(InvalidRequest): pass
class IllegalOption(InvalidRequest): pass
class MissingFileData(InvalidRequest): pass


# 404: what the request names does not exist (ChunkRegisterFailed is a 404 in the original too).
class DatabaseMissing(NotFound): pass
class TableMissing(NotFound): pass
class ChunkTableMissing(NotFound): pass
class ChunkDeleteFailed(NotFound): pass
class NoMatchingChunks(NotFound): pass
class ChunkRegisterFailed(NotFound): pass


# 409: the state of things contradicts the request.
class DatabaseExists(Conflict): pass
class TableExists(Conflict): pass
class CommandFailure(Conflict): pass


class NotRegistered(Conflict):
    """An xrootd unregister of a database that is not registered (the original: 409 DatabaseMissing)."""


class DatabaseFailure(WmgrError):
    """The database failed for a reason that is not the client's (a 500). `exception` is the
    name to report: the driver's error class (OperationalError...), or DbError / FLushFailed."""

    def __init__(self, message: str, exception: str = "DbError") -> None:
        super().__init__(message)
        self.exception = exception
