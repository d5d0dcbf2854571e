"""Uploads (issue 9, items 3 and 5): never written through a planted link, refused cleanly where
the system could not hold them, leaving nothing behind; streamed from the request's spool file."""

from __future__ import annotations

import io
import os
import tempfile

import pytest
import pytest_twisted

from wmgr.errors import InvalidRequest
from wmgr.files import write_private
from wmgr.safefile import write_file
from wmgr.uploads import Uploads


@pytest.fixture
def root(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    return directory


@pytest.fixture
def uploads(tmp_path, root):
    return Uploads(tmp_path / "data" / "uploads", [str(root)])


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(b"precious")
    return path


async def save(uploads, path, data: bytes):
    return await uploads.save(path, io.BytesIO(data))


@pytest_twisted.ensureDeferred
async def test_a_link_planted_at_the_old_temporary_name_is_not_written_through(uploads, root, victim):
    target = root / "result.txt"
    os.symlink(victim, f"{target}.{os.getpid()}.tmp")
    assert await save(uploads, str(target), b"upload") == str(target)
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"upload" and not target.is_symlink()


@pytest_twisted.ensureDeferred
async def test_a_link_planted_at_the_name_itself_is_replaced_not_followed(uploads, root, victim):
    inside = root / "inside"
    inside.write_bytes(b"also precious")
    target = root / "result.txt"
    os.symlink(inside, target)
    await save(uploads, str(target), b"upload")
    assert inside.read_bytes() == b"also precious"
    assert target.read_bytes() == b"upload" and not target.is_symlink()


def test_a_temporary_name_that_exists_is_never_opened(tmp_path, victim, monkeypatch):
    # Whatever random name is drawn, if something is there the open fails instead of following it.
    monkeypatch.setattr("wmgr.safefile.secrets.token_hex", lambda n: "fixed")
    os.symlink(victim, tmp_path / ".wmgr-fixed.tmp")
    with pytest.raises(OSError):
        write_file(str(tmp_path / "out"), b"x")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "out").exists()
    # The daemon's own files (token, keys, certificates) are written the same way.
    monkeypatch.setattr("wmgr.files.secrets.token_hex", lambda n: "fixed")
    os.symlink(victim, tmp_path / ".token.fixed.tmp")
    with pytest.raises(FileExistsError):
        write_private(tmp_path / "token", b"x")
    assert victim.read_bytes() == b"precious"


def test_a_directory_swapped_for_a_link_is_not_followed(tmp_path, root):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / "sub")
    with pytest.raises(InvalidRequest, match="not a directory"):
        write_file(str(root / "sub" / "f"), b"x", make_dirs=True)
    assert list(elsewhere.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_accented_names_work(uploads, root):
    target = root / "été" / "é.txt"
    assert await save(uploads, str(target), b"\xc3\xa9") == str(target)
    assert target.read_bytes() == b"\xc3\xa9"


@pytest_twisted.ensureDeferred
async def test_onto_an_existing_directory_is_refused(uploads, root):
    (root / "d").mkdir()
    (root / "d" / "keep").write_bytes(b"k")
    with pytest.raises(InvalidRequest, match="is a directory"):
        await save(uploads, str(root / "d"), b"x")
    assert (root / "d" / "keep").read_bytes() == b"k"


@pytest_twisted.ensureDeferred
async def test_under_a_regular_file_is_refused_and_leaves_nothing(uploads, root):
    (root / "f").write_bytes(b"f")
    with pytest.raises(InvalidRequest, match="not a directory"):
        await save(uploads, str(root / "f" / "c" / "x"), b"x")
    with pytest.raises(InvalidRequest, match="not a directory"):
        await save(uploads, str(root / "f" / "x"), b"x")
    assert sorted(p.name for p in root.iterdir()) == ["f"]


@pytest.mark.parametrize("make_path", [
    lambda root: str(root / "a" / "b" / ("n" * 256)),
    lambda root: str(root / "a" / "b" / ("é" * 128)),
    lambda root: str(root / "a" / "/".join(["d" * 200] * 21) / "x"),
])
def test_names_and_paths_the_system_cannot_hold_are_refused_and_leave_nothing(uploads, root, make_path):
    with pytest.raises(InvalidRequest, match="bytes|too long"):
        uploads.target(make_path(root))
    with pytest.raises(InvalidRequest):
        write_file(make_path(root), b"x", make_dirs=True)
    assert list(root.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_body_is_copied_from_its_spool_file(uploads, root):
    spool = tempfile.TemporaryFile()
    spool.write(b"y" * (3 << 20))
    stored = await uploads.save(None, spool)
    assert os.path.getsize(stored) == 3 << 20
    assert await uploads.save(str(root / "big"), spool) == str(root / "big")
    assert (root / "big").read_bytes() == b"y" * (3 << 20)


def test_outside_the_roots_is_refused(uploads, tmp_path):
    with pytest.raises(InvalidRequest, match="outside"):
        uploads.target(str(tmp_path / "other" / "x"))
    with pytest.raises(InvalidRequest, match="outside"):
        uploads.target(str(tmp_path / "shared" / ".." / "x"))


def test_directories_made_for_a_write_that_fails_are_removed(root, monkeypatch):
    def fail(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("wmgr.safefile._write_in", fail)
    with pytest.raises(OSError):
        write_file(str(root / "a" / "b" / "c" / "x"), b"x", make_dirs=True)
    assert list(root.iterdir()) == []
