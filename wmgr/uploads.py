"""Files uploaded to the manager's machine (wr's PUT /rest/v1/upload/).

A path given as `~/...` lands under the daemon user's home, an absolute path anywhere inside the
configured roots; with no path, the file is stored by content under DATA_DIR/uploads, as
<m0>/<m1>/<m2>/<rest of the MD5>, so uploading the same bytes twice gives the same path. A path
whose directory resolves (after `..` and symbolic links) outside the roots is refused.

The roots are places others may write to (/tmp), so the file is written by wmgr.safefile: never
through a link planted at its temporary name or on the way to it, and a refused upload (onto a
directory, under a regular file, a name the system cannot hold) leaves no directory behind. The
body is copied from the request's spool file (Twisted keeps bodies over 100 KB in a temporary
file) in chunks, never held in memory whole.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

from twisted.internet.threads import deferToThread

from wmgr.errors import InvalidRequest
from wmgr.safefile import CHUNK, check_path, write_file


class Uploads:
    def __init__(self, directory: Path, roots: Iterable[str]) -> None:
        self.directory = Path(os.path.realpath(directory))
        self.home = os.path.realpath(os.path.expanduser("~"))
        self.roots = [os.path.realpath(os.path.expanduser(root)) for root in roots]

    def target(self, path: str) -> str:
        """Where a file asked for at `path` goes; raises InvalidRequest for a path outside the
        allowed roots or one the system could not hold."""
        if path == "~" or path.startswith("~/"):
            path, allowed = self.home + path[1:], [self.home]
        elif os.path.isabs(path):
            allowed = self.roots
        else:
            raise InvalidRequest(f"path {path!r} must be absolute or start with ~/")
        check_path(os.path.normpath(path))
        # The directory is resolved (links on the way may lead anywhere inside the roots), the
        # file's own name is not: a link planted at that name is replaced, never written through.
        directory, name = os.path.split(os.path.normpath(path))
        if name in ("", ".", ".."):
            raise InvalidRequest(f"path {path!r} names a directory, not a file")
        resolved = os.path.join(os.path.realpath(directory), name)
        if not any(resolved.startswith(root + os.sep) for root in allowed):
            raise InvalidRequest(f"path {path!r} is outside the places uploads may go ({', '.join(allowed)})")
        return resolved

    async def save(self, path: Optional[str], body: BinaryIO) -> str:
        """Store the request body (a file, read from its start) and say where it went."""
        target = self.target(path) if path else None
        return await deferToThread(self._save, target, body)

    def _save(self, target: Optional[str], body: BinaryIO) -> str:
        body.seek(0)
        if target is None:
            digest = hashlib.md5()
            for chunk in iter(lambda: body.read(CHUNK), b""):
                digest.update(chunk)
            hexdigest = digest.hexdigest()
            target = str(self.directory / hexdigest[0] / hexdigest[1] / hexdigest[2] / hexdigest[3:])
            body.seek(0)
        write_file(target, body, mode=0o600, make_dirs=True)
        return target
