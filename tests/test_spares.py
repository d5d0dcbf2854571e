"""wmgr.jobs.spares: a finished job's directory and run files are reused only when nothing else can
reach them and they are as they were made; everything else is removed as before."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from wmgr.jobs.launcher import make_job_dirs
from wmgr.jobs.spares import STATUS_BLANK, STATUS_WIDTH, SpareDirs, SpareFiles


def job_dirs(base: Path, name: str) -> tuple[str, str, str, str, str]:
    parent = base / "a" / "b" / "c"
    root = parent / name
    return str(base), str(parent), str(root), str(root / "cwd"), str(root / "tmp")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "wr_cwd"
    path.mkdir(mode=0o700)
    return path


def test_a_finished_jobs_directory_becomes_the_next_ones(base: Path) -> None:
    spares = SpareDirs()
    first = job_dirs(base, "one")
    make_job_dirs(*first)
    inode = os.stat(first[3]).st_ino
    assert spares.keep(first[0], *first[2:])
    assert not os.path.exists(first[2])
    second = job_dirs(base, "two")
    make_job_dirs(*second, spare=spares.take(str(base)))
    assert sorted(os.listdir(second[2])) == ["cwd", "tmp"] and os.listdir(second[3]) == []
    assert os.stat(second[3]).st_ino == inode  # renamed into place: no new inode
    assert spares.take(str(base)) is None  # each spare serves once
    assert sorted(os.listdir(base)) == ["a"] and os.listdir(base / "a/b/c") == ["two"]


def test_a_spare_goes_into_a_parent_not_made_yet(base: Path) -> None:
    spares = SpareDirs()
    first = job_dirs(base, "one")
    make_job_dirs(*first)
    assert spares.keep(first[0], *first[2:])
    parent = base / "d" / "e" / "f"
    root = parent / "new"
    make_job_dirs(str(base), str(parent), str(root), str(root / "cwd"), str(root / "tmp"), spare=spares.take(str(base)))
    assert sorted(os.listdir(root)) == ["cwd", "tmp"]


def test_without_a_spare_or_with_a_vanished_one_the_directories_are_made(base: Path) -> None:
    dirs = job_dirs(base, "one")
    make_job_dirs(*dirs, spare=str(base / ".wmgr-spare.gone"))
    assert sorted(os.listdir(dirs[2])) == ["cwd", "tmp"]


@pytest.mark.parametrize("change", ["file in cwd", "dir in tmp", "file in root", "cwd mode", "cwd symlink"])
def test_a_directory_not_as_it_was_made_is_not_kept(base: Path, change: str) -> None:
    spares = SpareDirs()
    _, _, root, cwd, tmp = dirs = job_dirs(base, "one")
    make_job_dirs(*dirs)
    if change == "file in cwd":
        Path(cwd, "out.txt").write_text("result")
    elif change == "dir in tmp":
        os.mkdir(os.path.join(tmp, "scratch"))
    elif change == "file in root":
        Path(root, "sibling").write_text("x")
    elif change == "cwd mode":
        os.chmod(cwd, 0o700)
    else:
        os.rmdir(cwd)
        os.symlink(tmp, cwd)
    assert not spares.keep(str(base), root, cwd, tmp)
    assert os.path.exists(root)  # left for the caller to remove
    assert spares.take(str(base)) is None


def test_spares_are_bounded_and_cleared(base: Path) -> None:
    spares = SpareDirs(limit=2)
    kept = []
    for name in ("one", "two", "three"):
        dirs = job_dirs(base, name)
        make_job_dirs(*dirs)
        kept.append(spares.keep(str(base), *dirs[2:]))
    assert kept == [True, True, False]
    assert len([n for n in os.listdir(base) if n.startswith(".wmgr-spare.")]) == 2
    spares.clear()
    assert sorted(os.listdir(base)) == ["a"]


def test_run_files_are_emptied_and_reused_for_the_next_runs_output(tmp_path: Path) -> None:
    spares = SpareFiles()
    old = [tmp_path / f"k.1.{ext}" for ext in ("out", "err", "rc")]
    for path in old:
        path.write_text("old contents")
    inodes = {path.stat().st_ino for path in old}
    assert spares.remove([str(p) for p in old]) == []
    assert not any(p.exists() for p in old)
    kept = [p for p in tmp_path.iterdir()]
    assert len(kept) == 3 and all(p.name.startswith(".wmgr-spare.") and p.stat().st_size == 0 for p in kept)
    new_out = tmp_path / "k.2.out"
    spares.place(str(new_out))
    assert new_out.exists() and new_out.stat().st_ino in inodes and new_out.read_text() == ""
    spares.clear()
    assert [p.name for p in tmp_path.iterdir()] == ["k.2.out"]


def test_a_status_file_is_blanked_in_place_and_serves_only_as_a_status_file(tmp_path: Path) -> None:
    """A status record is overwritten with blanks (its block kept: no truncate, no discard); an
    output file is emptied. Neither is ever handed out as the other."""
    spares = SpareFiles()
    status, out = tmp_path / "k.1.rc", tmp_path / "k.1.out"
    status.write_bytes(b"0 4242".ljust(STATUS_WIDTH - 1) + b"\n")
    out.write_text("some output")
    inode = status.stat().st_ino
    assert spares.remove([str(status), str(out)]) == []
    spares.place(str(tmp_path / "k.2.out"))
    assert (tmp_path / "k.2.out").read_bytes() == b""
    spares.place(str(tmp_path / "k.2.rc"))
    placed = tmp_path / "k.2.rc"
    assert placed.stat().st_ino == inode and placed.read_bytes() == STATUS_BLANK
    assert not spares.place(str(tmp_path / "k.3.out"))  # the status spare was the last one


def test_a_run_file_still_open_elsewhere_or_linked_is_removed_not_reused(tmp_path: Path) -> None:
    """A process the job left running may still write to its stdout: that file must never become
    the next job's. So must one with another name (a hard link the job made)."""
    spares = SpareFiles()
    held, linked = tmp_path / "k.1.out", tmp_path / "k.1.err"
    held.write_text("")
    linked.write_text("")
    os.link(linked, tmp_path / "elsewhere")
    with open(held, "a") as out:
        writer = subprocess.Popen(["sleep", "30"], stdout=out)  # only the child has it open now
    try:
        assert spares.remove([str(held), str(linked), str(tmp_path / "k.1.rc")]) == []
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # removed, none kept
    spares.place(str(tmp_path / "k.2.out"))
    assert not (tmp_path / "k.2.out").exists()


def test_no_spare_outside_its_own_directory(tmp_path: Path) -> None:
    spares = SpareFiles()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "k.1.out").write_text("")
    spares.remove([str(tmp_path / "a" / "k.1.out")])
    spares.place(str(tmp_path / "b" / "k.1.out"))
    assert os.listdir(tmp_path / "b") == []


def test_recovery_takes_no_spare_for_a_run(tmp_path: Path) -> None:
    """Spares live in the run directory while a launcher runs: recovery's scan must not see
    them as the files of some job's run."""
    from wmgr.jobs.runner import run_files_in

    spares = SpareFiles()
    for ext in ("out", "err", "rc"):
        (tmp_path / f"k.1.{ext}").write_text("")
    spares.remove([str(tmp_path / f"k.1.{ext}") for ext in ("out", "err", "rc")])
    (tmp_path / "j.2.out").write_text("")
    assert len(list(tmp_path.iterdir())) == 4
    assert run_files_in(tmp_path) == {"j": [2]}
