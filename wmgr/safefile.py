"""Writing files where others may write too (/tmp, a shared upload root), safely.

A file is never opened by a name someone else could have planted first: its bytes go to a new
temporary file made with O_CREAT|O_EXCL|O_NOFOLLOW under a random name (a symbolic link or any
file already at that name makes the open fail instead of being written through), and it gets its
real name by rename(2), which replaces whatever is there (a planted link included) atomically and
never follows it. The directories on the way are walked one at a time from the root with
O_NOFOLLOW, so a directory swapped for a link after the path was checked is refused rather than
followed; directories this made are removed again when the write fails, so a refused write leaves
nothing behind.

Blocking: call these from a thread (deferToThread), never on the reactor.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from typing import BinaryIO, Optional, Union

from wmgr.errors import InvalidRequest

NAME_MAX = 255  # bytes of one path component (every Linux file system)
PATH_MAX = 4096  # bytes of a whole path, its terminating NUL included
CHUNK = 1 << 20

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_path(path: str) -> list[str]:
    """An absolute path's components, or InvalidRequest if the system could not hold it."""
    if not path.startswith("/"):
        raise InvalidRequest(f"path {path!r} must be absolute")
    if "\x00" in path:
        raise InvalidRequest("the path must not contain a NUL character")
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidRequest("the path is not valid text") from None
    if len(encoded) >= PATH_MAX:
        raise InvalidRequest(f"the path is {len(encoded)} bytes long; at most {PATH_MAX - 1} are allowed")
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise InvalidRequest("the path names a directory, not a file")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InvalidRequest(f"a name in the path is longer than {NAME_MAX} bytes")
        if part in (".", ".."):
            raise InvalidRequest("the path must not contain . or .. (give it resolved)")
    return parts


def write_file(path: str, data: Union[bytes, BinaryIO], mode: int = 0o644, dir_mode: int = 0o755, make_dirs: bool = False,
               sync: bool = True) -> None:
    """Write `data` (bytes, or a file read from where it is to its end) as the file at the
    absolute `path` (resolved: no `..`), atomically: a reader
    sees the old file or the new one, never part of one. With `make_dirs`, missing directories are
    made (with `dir_mode`) and removed again if the write fails."""
    parts = check_path(path)
    made: list[tuple[int, str]] = []  # (parent fd, name) of each directory made here
    fds: list[int] = []
    try:
        fd = os.open("/", _DIRECTORY)
        fds.append(fd)
        for name in parts[:-1]:
            fd = _enter(fd, name, make_dirs, dir_mode, made)
            fds.append(fd)
        _write_in(fd, parts[-1], data, mode, sync)
    except BaseException:
        for parent, name in reversed(made):
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError:
                pass
        raise
    finally:
        for fd in fds:
            os.close(fd)


def _enter(parent: int, name: str, make: bool, dir_mode: int, made: list[tuple[int, str]]) -> int:
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        if not make:
            raise InvalidRequest(f"directory {name!r} does not exist") from None
    except OSError as e:
        raise _refusal(e, name) from None
    try:
        os.mkdir(name, dir_mode, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile by someone else: enter it as it is, if it is a directory
    except OSError as e:
        raise _refusal(e, name) from None
    else:
        made.append((parent, name))
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except OSError as e:
        raise _refusal(e, name) from None


def _write_in(directory: int, name: str, data: Union[bytes, BinaryIO], mode: int, sync: bool) -> None:
    try:
        existing: Optional[os.stat_result] = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise InvalidRequest(f"{name!r} is a directory; a file cannot replace it")
    tmp = f".wmgr-{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, _NEW_FILE, mode, dir_fd=directory)
    except OSError as e:
        raise _refusal(e, name) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                shutil.copyfileobj(data, f, CHUNK)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=directory)
        except OSError:
            pass
        raise
    if sync:
        os.fsync(directory)


def _refusal(error: OSError, name: str) -> Exception:
    """What an OSError on the way to the file means for the client."""
    if error.errno in (errno.ENOTDIR, errno.ELOOP):
        return InvalidRequest(f"{name!r} in the path is not a directory")
    if error.errno == errno.ENAMETOOLONG:
        return InvalidRequest("a name in the path is too long")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InvalidRequest(f"the daemon may not write in {name!r}: {error.strerror}")
    return error
