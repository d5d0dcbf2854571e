"""Reusing finished jobs' directories and run files in the launcher, instead of making new ones.

Why: each job costs three new directories (its unique root, `cwd` and `tmp`) and three new files
(its stdout, stderr and status files), all removed a moment after it ends. On ext4 without a
journal (this machine's root filesystem) the kernel will not reuse an inode freed in the last
seconds to minutes (`recently_deleted()` in fs/ext4/ialloc.c: 5 s, 305 s while the inode's table
block is dirty), and every allocation scans past each such inode of its block group from the
start. A stream of short jobs fills the group with them: a `mkdir` or `open(O_CREAT)` then cost
0.3-1 ms of kernel CPU (perf: find_inode_bit -> recently_deleted), more than the job's own `sh`,
and the cost grew with every job run in the last minutes. A directory or file renamed into place
allocates no inode, so the launcher keeps what a finished job leaves, emptied, and renames it into
place for the next one.

Only what nothing else can still reach is reused: a job's directory only once its whole process
group has gone and only if it is as it was made (root holding just `cwd` and `tmp`, both empty
and with the mode they were made with); a run file only if no process has it open (a write lease,
which the kernel grants only then, so a process the job left running cannot write into the next
job's output) and it has no other link. Anything else is removed as before.

Spares are named `.wmgr-spare.<launcher pid>.<n>` next to what they replace (in the job
directory base, in the run directory), which recovery's scan of the run directory ignores; a
launcher that has had nothing running for a moment (launcher.IDLE_SECONDS), and one that exits,
removes its spares. A run's stdout, stderr and status file are renamed into place just before its
spawn (the status file blank, which reads as "not ended" as its absence did): a
launcher killed in between leaves the files of a run that never started, which recovery takes
for a lost run, as it takes one whose launcher died before reporting it started.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import stat
from typing import Any, Optional

# Enough for the jobs ending between two starts of a busy launcher; beyond it things are removed.
DIR_LIMIT = 64
FILE_LIMIT = 192


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Spares:
    """Pools of spares, each kept in the directory it serves under a spare's name."""

    def __init__(self, limit: int) -> None:
        self._spares: dict[Any, list[str]] = {}
        self._names = itertools.count()
        self._prefix = f".wmgr-spare.{os.getpid()}."
        self._limit = limit

    def _stash(self, path: str, directory: str, pool: list[str]) -> bool:
        """Rename `path` to a spare's name in `directory` and add it to `pool`; False if it could
        not be renamed."""
        spare = os.path.join(directory, f"{self._prefix}{next(self._names)}")
        try:
            os.rename(path, spare)
        except OSError:
            return False
        pool.append(spare)
        return True


class SpareDirs(_Spares):
    """Finished jobs' directories (a root holding empty `cwd` and `tmp`), by job directory base."""

    def __init__(self, limit: int = DIR_LIMIT) -> None:
        super().__init__(limit)
        self._mode = 0o777 & ~_umask()  # what os.mkdir made them with
        self._uid = os.getuid()

    def take(self, base: str) -> Optional[str]:
        """A spare made in `base`, for make_job_dirs to rename into place; None if there is none."""
        pool = self._spares.get(base)
        return pool.pop() if pool else None

    def keep(self, base: str, root: str, cwd: str, tmp: str) -> bool:
        """Keep a finished job's directory as a spare if it is as it was made; False: it was not
        kept (the caller removes it). The caller has checked that the job's processes are gone."""
        pool = self._spares.setdefault(base, [])
        if len(pool) >= self._limit or not self._as_made(root, cwd, tmp):
            return False
        return self._stash(root, base, pool)

    def _as_made(self, root: str, cwd: str, tmp: str) -> bool:
        if os.path.dirname(cwd) != root or os.path.dirname(tmp) != root:
            return False
        try:
            for path in (root, cwd, tmp):
                info = os.lstat(path)
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != self._uid or (
                        stat.S_IMODE(info.st_mode) != self._mode):
                    return False
            with os.scandir(root) as entries:
                if sorted(entry.name for entry in entries) != sorted((os.path.basename(cwd), os.path.basename(tmp))):
                    return False
            for path in (cwd, tmp):
                with os.scandir(path) as entries:
                    if next(entries, None) is not None:
                        return False
        except OSError:
            return False
        return True

    def clear(self) -> None:
        for pool in self._spares.values():
            while pool:
                shutil.rmtree(pool.pop(), ignore_errors=True)


# A run's status file holds one fixed-width record (runner.WRAPPER writes it in place, without
# truncating); blank, it says the run has not ended. A spare status file is blanked, not emptied:
# freeing its block (with the root filesystem's `discard`, a synchronous discard) and allocating
# one again at the next write cost more than the job's own shell did.
STATUS_SUFFIX = ".rc"
STATUS_WIDTH = 24
STATUS_BLANK = b" " * (STATUS_WIDTH - 1) + b"\n"


class SpareFiles(_Spares):
    """Finished runs' files (emptied; a status file blanked), by directory and kind: the next
    runs' stdout, stderr and status file are renamed from them, so the child's open(O_CREAT)
    finds a file and makes no inode. Status files and output files are kept apart."""

    def __init__(self, limit: int = FILE_LIMIT) -> None:
        super().__init__(limit)

    def place(self, path: str) -> bool:
        """Put an (empty) spare of path's directory at `path`, replacing what is there; False:
        there was none."""
        pool = self._spares.get((os.path.dirname(path), path.endswith(STATUS_SUFFIX)))
        while pool:
            try:
                os.rename(pool.pop(), path)
            except OSError:
                continue  # a spare removed by someone else: try the next
            # A rename keeps the spare's old times; recovery takes the earliest of a run's files'
            # as its start when the start was never stored (RunFiles.created).
            os.utime(path)
            return True
        return False

    def remove(self, paths: list[str]) -> list[tuple[str, OSError]]:
        """Remove these run files, keeping as spares those nothing else can reach; the errors of
        those that could not be removed (a file already gone is not one)."""
        failed = []
        for path in paths:
            if self._keep(path):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                failed.append((path, e))
        return failed

    def _keep(self, path: str) -> bool:
        directory = os.path.dirname(path)
        status = path.endswith(STATUS_SUFFIX)
        pool = self._spares.setdefault((directory, status), [])
        if len(pool) >= self._limit:
            return False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                return False
            # Granted only if no other descriptor has the file open: nothing the job left running
            # can still write into it.
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
            try:
                if status and info.st_size == STATUS_WIDTH:
                    os.pwrite(fd, STATUS_BLANK, 0)
                elif info.st_size:
                    os.ftruncate(fd, 0)
            finally:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            return False
        finally:
            os.close(fd)
        return self._stash(path, directory, pool)

    def clear(self) -> None:
        for pool in self._spares.values():
            while pool:
                try:
                    os.unlink(pool.pop())
                except OSError:
                    pass
