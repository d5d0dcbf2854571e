"""wmgr.files.write_atomic: whole files, atomically, never through a planted name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wmgr.files import write_atomic, write_private, write_public


def test_writes_the_whole_file_with_its_mode(tmp_path: Path) -> None:
    write_private(tmp_path / "key", b"secret")
    write_public(tmp_path / "cert", b"public")
    assert (tmp_path / "key").read_bytes() == b"secret" and (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cert").stat().st_mode & 0o077 == 0o044 & ~_umask()
    write_private(tmp_path / "key", b"again")
    assert (tmp_path / "key").read_bytes() == b"again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert", "key"]  # no temporary left


def test_never_writes_through_a_symlink_at_the_old_temporary_names(tmp_path: Path) -> None:
    """The temporaries of the old write_private (<name>.tmp) and uploads (<name>.<pid>.tmp) were
    fixed names: a symlink planted there made the daemon write wherever it pointed."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    for name in ("target.tmp", f"target.{os.getpid()}.tmp"):
        (tmp_path / name).symlink_to(victim)
    write_atomic(tmp_path / "target", b"data")
    assert victim.read_bytes() == b"untouched" and (tmp_path / "target").read_bytes() == b"data"
    assert not (tmp_path / "target").is_symlink()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"old")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["target"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_open_atomic_streams_in_pieces_and_replaces_only_at_the_end(tmp_path: Path) -> None:
    from wmgr.files import open_atomic

    target = tmp_path / "upload"
    with open_atomic(target) as f:
        f.write(b"part one, ")
        assert not target.exists()
        f.write(b"part two")
    assert target.read_bytes() == b"part one, part two"
    with pytest.raises(RuntimeError):
        with open_atomic(target) as f:
            f.write(b"half")
            raise RuntimeError("client went away")
    assert target.read_bytes() == b"part one, part two" and [p.name for p in tmp_path.iterdir()] == ["upload"]
