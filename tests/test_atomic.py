"""selfsup/core/atomic.py: the one way selfsup writes a file that a reader or a resumed run may read."""

import os
import stat

import pytest

from selfsup.core.atomic import write_atomic, write_bytes_atomic, write_text_atomic


def test_writes_and_replaces_leaving_no_temporary(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    write_text_atomic(path, "one")
    write_bytes_atomic(path, b"two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.bin"
    write_bytes_atomic(path, b"old")

    def half_written(temporary):
        temporary.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_written)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    write_text_atomic(tmp_path / "x", "data")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "x", "data")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
