"""Writing files safely, in directories others may write to as well.

One way for every file the daemon writes whole: a temporary name made with O_EXCL|O_NOFOLLOW
(so a symlink or file planted at that name is never written through, nor followed), the data
fsynced, then an atomic rename over the target (so a crash leaves the old file or the new one,
never a part).
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@contextmanager
def open_atomic(path: Path | str, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A file to write `path` through, in as many pieces as wanted (a streamed upload): it
    replaces `path` only when the block ends without an exception, else it is removed."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    # A random temporary name: O_EXCL refuses one that exists, so nobody can make us write into a
    # file they placed, and a stale one left by a crash does not block the next write.
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, _TMP_FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Write `data` as the whole of `path`, created with `mode` (less the umask)."""
    with open_atomic(path, mode) as f:
        f.write(data)


def write_private(path: Path | str, data: bytes) -> None:
    """A file readable by its owner only."""
    write_atomic(path, data, 0o600)


def write_public(path: Path | str, data: bytes) -> None:
    """A file anyone may read (certificates, the URL file)."""
    write_atomic(path, data, 0o644)
