"""als.store.fs.layerlink: protocol 1's ROOT/<layer ID> symlinks, on the real filesystem."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from als.store.fs.layerlink import link_layer_id


def test_link_is_created_kept_and_replaced(tmp_path: Path) -> None:
    a, b = tmp_path / ".pool" / "a", tmp_path / ".pool" / "b"
    link_layer_id(tmp_path, "layer1", a)
    assert os.readlink(tmp_path / "layer1") == str(a)
    before = os.lstat(tmp_path / "layer1").st_ino
    link_layer_id(tmp_path, "layer1", a)  # already right: left as is
    assert os.lstat(tmp_path / "layer1").st_ino == before
    link_layer_id(tmp_path, "layer1", b)
    assert os.readlink(tmp_path / "layer1") == str(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer1"]  # no temporary left


def test_an_existing_file_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "layer1").write_bytes(b"not a link")
    with caplog.at_level(logging.WARNING, logger="als.store.fs.layerlink"):
        link_layer_id(tmp_path, "layer1", tmp_path / "x")
    assert (tmp_path / "layer1").read_bytes() == b"not a link"
    assert any("not a symlink" in r.getMessage() for r in caplog.records)
