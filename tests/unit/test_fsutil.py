"""als.fsutil: atomic writes and directory removal, on the real filesystem."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from als.fsutil import remove_dir, write_atomic


def test_write_atomic_beside_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    write_atomic(dest, b"new" * 1000)
    assert dest.read_bytes() == b"new" * 1000
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_write_atomic_through_a_given_tmp(tmp_path: Path) -> None:
    dest, tmp = tmp_path / "out", tmp_path / "t"
    write_atomic(dest, b"data", tmp=tmp)
    assert dest.read_bytes() == b"data"
    assert not tmp.exists()


def test_write_atomic_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out"
    dest.write_bytes(b"old")

    def failing_write(fd: int, buf: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", failing_write)
    for tmp in (None, tmp_path / "t"):
        with pytest.raises(OSError):
            write_atomic(dest, b"new", tmp=tmp)
        assert dest.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_remove_dir(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_bytes(b"a")
    (d / "b").write_bytes(b"b")
    remove_dir(d)
    assert not d.exists()
    remove_dir(d)  # already gone: no error
