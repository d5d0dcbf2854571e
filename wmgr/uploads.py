"""Files uploaded to the manager's machine (wr's PUT /rest/v1/upload/).

A path given as `~/...` lands under the daemon user's home, an absolute path anywhere inside the
configured roots; with no path, the file is stored by content under DATA_DIR/uploads, as
<m0>/<m1>/<m2>/<rest of the MD5>, so uploading the same bytes twice gives the same path. A path
that resolves (after `..` and symbolic links) outside the roots is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

from twisted.internet.threads import deferToThread

from wmgr.errors import InvalidRequest


class Uploads:
    def __init__(self, directory: Path, roots: Iterable[str]) -> None:
        self.directory = Path(directory)
        self.home = os.path.realpath(os.path.expanduser("~"))
        self.roots = [os.path.realpath(os.path.expanduser(root)) for root in roots]

    def target(self, path: Optional[str], data: bytes) -> str:
        """Where these bytes go; raises InvalidRequest for a path outside the allowed roots."""
        if not path:
            digest = hashlib.md5(data).hexdigest()
            return str(self.directory / digest[0] / digest[1] / digest[2] / digest[3:])
        if "\x00" in path:
            raise InvalidRequest("the path must not contain a NUL character")
        if path == "~" or path.startswith("~/"):
            resolved = os.path.realpath(self.home + path[1:])
            allowed = [self.home]
        elif os.path.isabs(path):
            resolved = os.path.realpath(path)
            allowed = self.roots
        else:
            raise InvalidRequest(f"path {path!r} must be absolute or start with ~/")
        if not any(resolved.startswith(root + os.sep) for root in allowed):
            raise InvalidRequest(f"path {path!r} is outside the places uploads may go ({', '.join(allowed)})")
        return resolved

    async def save(self, path: Optional[str], data: bytes) -> str:
        target = self.target(path, data)
        await deferToThread(_write, target, data)
        return target


def _write(target: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
