"""Fixtures of the disk cache tests: every cache lives under pytest's ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import pytest

from als.store.cache import DiskCache


@pytest.fixture
def cache(tmp_path: Path) -> DiskCache:
    c = DiskCache(tmp_path / "cache", 0)
    c.open()
    return c
