"""als.store.cache.ingest: partial downloads and their ranges records, on the real filesystem."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from als.store.cache import DiskCache
from tests.unit.store.cache.helpers import dg

LOGGER = "als.store.cache"


# -- ingest -----------------------------------------------------------------------------------

_TRY_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
    sys.exit(0)
    """
)


def _other_process_locks(lock: Path) -> bool:
    r = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock)], check=False, timeout=30)
    assert r.returncode in (0, 3), r
    return r.returncode == 0


def test_ingest_lock_is_exclusive(cache: DiskCache) -> None:
    blob = os.urandom(100)
    first = cache.ingest(dg(blob), len(blob))
    assert not first.owned
    assert first.acquire()
    assert first.owned
    second = cache.ingest(dg(blob), len(blob))
    assert not second.acquire()
    assert not second.owned
    assert not second.write(0, blob[:10])
    assert not _other_process_locks(first.dir / "lock")
    first.close()
    assert not first.owned
    assert _other_process_locks(first.dir / "lock")
    assert second.acquire()
    second.close()


def test_ingest_record_is_throttled_and_flushed_at_close(cache: DiskCache) -> None:
    blob = os.urandom(100)
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert ing.write(0, blob[:10])  # the first write records at once
    assert json.loads(ing.ranges_path.read_bytes()) == [[0, 10]]
    assert ing.write(50, blob[50:60])  # within a second: recorded later
    assert json.loads(ing.ranges_path.read_bytes()) == [[0, 10]]
    ing.close()
    assert json.loads(ing.ranges_path.read_bytes()) == [[0, 10], [50, 60]]


def test_ingest_write_read_missing(cache: DiskCache) -> None:
    blob = os.urandom(100)
    ing = cache.ingest(dg(blob), len(blob))
    assert not ing.write(0, blob[:10])  # not acquired: nothing written
    assert ing.acquire()
    assert ing.missing() == [(0, 100)]
    assert ing.write(10, blob[10:30])
    assert ing.write(60, blob[60:70])
    assert ing.ranges == [(10, 30), (60, 70)]
    assert ing.present() == 30
    assert ing.missing() == [(0, 10), (30, 60), (70, 100)]
    assert not ing.complete()
    assert ing.read(10, 20) == blob[10:30]
    assert ing.read(15, 5) == blob[15:20]
    assert ing.read(5, 10) is None  # starts before a recorded range
    assert ing.read(25, 10) is None  # runs past one
    assert ing.read(0, 100) is None
    assert ing.read(40, 5) is None  # hole in the sparse file
    # out of bounds or empty writes are refused and change nothing
    assert not ing.write(95, blob[:10])
    assert not ing.write(-1, b"x")
    assert not ing.write(0, b"")
    assert ing.ranges == [(10, 30), (60, 70)]
    assert ing.write(30, blob[30:60])
    assert ing.ranges == [(10, 70)]
    # the record follows at most once a second, or when asked
    ing.flush()
    assert json.loads(ing.ranges_path.read_bytes()) == [[10, 70]]
    assert cache.total == 60
    # A reader that does not own the download sees the same ranges.
    reader = cache.ingest(dg(blob), len(blob))
    reader.reload()
    assert reader.ranges == [(10, 70)]
    assert reader.read(20, 30) == blob[20:50]
    ing.close()


def test_ingest_forget_and_restart(cache: DiskCache) -> None:
    blob = os.urandom(100)
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert ing.write(0, blob[:50])
    assert ing.write(80, blob[80:])
    ing.forget(10, 20)
    assert ing.ranges == [(0, 10), (20, 50), (80, 100)]
    assert ing.read(10, 5) is None
    assert ing.read(0, 10) == blob[:10]
    ing.forget(40, 90)
    assert ing.ranges == [(0, 10), (20, 40), (90, 100)]
    ing.close()
    # "restart": a new object over the same directory keeps what was recorded
    again = cache.ingest(dg(blob), len(blob))
    assert again.acquire()
    assert again.ranges == [(0, 10), (20, 40), (90, 100)]
    assert again.read(20, 20) == blob[20:40]
    assert again.missing() == [(10, 20), (40, 90)]
    assert again.write(10, blob[10:20])
    assert again.write(40, blob[40:90])
    assert again.complete()
    assert again.finish(dg(blob))


def test_ingest_record_beyond_data_is_trimmed(cache: DiskCache) -> None:
    blob = os.urandom(100)
    ing = cache.ingest(dg(blob), len(blob))
    ing.dir.mkdir(parents=True)
    ing.data_path.write_bytes(blob[:40])
    ing.ranges_path.write_text(json.dumps([[0, 100], [150, 300]]))
    assert ing.acquire()
    assert ing.ranges == [(0, 40)]
    assert ing.read(0, 40) == blob[:40]
    assert ing.read(30, 20) is None
    ing.close()
    # and a record beyond the blob's size is trimmed to it
    big = cache.ingest(dg(blob), 30)
    big.reload()
    assert big.ranges == [(0, 30)]


@pytest.mark.parametrize("content", [b"not json", b'{"a": 1}', b"[[1, 2, 3]]", b"7", b'[["x", 2]]'])
def test_corrupt_ranges_record_is_ignored_with_warning(
    cache: DiskCache, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    blob = os.urandom(100)
    ing = cache.ingest(dg(blob), len(blob))
    ing.dir.mkdir(parents=True)
    ing.data_path.write_bytes(blob)
    ing.ranges_path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ing.acquire()
    assert ing.ranges == []
    assert ing.read(0, 10) is None
    assert any(
        "cache-corrupt" in r.getMessage() and ing.hex in r.getMessage() for r in caplog.records
    )
    ing.close()


def test_ingest_finish_moves_verified_blob(cache: DiskCache) -> None:
    blob = os.urandom(10_000)
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert not ing.finish(dg(blob))  # incomplete: refused
    for off in (7000, 0, 3000, 9000, 5000, 1000):  # out of order, overlapping
        assert ing.write(off, blob[off : off + 2000])
    assert ing.complete()
    assert ing.finish(dg(blob))
    assert (cache.dir / "blobs" / "sha256" / dg(blob)[7:]).read_bytes() == blob
    assert not ing.dir.exists()
    assert not ing.owned
    assert cache.has_blob(dg(blob))
    assert cache.read_blob(dg(blob), 100, 50) == blob[100:150]
    assert cache.read_blob(dg(blob), 9990, 50) is None  # short read
    assert cache.total == len(blob)
    t = cache.total
    cache.rescan()
    assert cache.total == t


def test_ingest_finish_with_wrong_byte_discards(
    cache: DiskCache, caplog: pytest.LogCaptureFixture
) -> None:
    blob = os.urandom(5000)
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    bad = bytearray(blob)
    bad[4321] ^= 0x80
    assert ing.write(0, bytes(bad))
    assert ing.complete()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert not ing.finish(dg(blob))
    assert any("cache-corrupt" in r.getMessage() for r in caplog.records)
    assert not cache.has_blob(dg(blob))
    assert ing.ranges == []
    assert ing.missing() == [(0, len(blob))]
    assert ing.read(0, 10) is None
    assert ing.owned  # still ours: the download starts over
    assert cache.total == 0
    restarted = cache.ingest(dg(blob), len(blob))
    restarted.reload()
    assert restarted.ranges == []
    # starting over with the right bytes succeeds
    assert ing.write(0, blob)
    assert ing.finish(dg(blob))
    assert (cache.blob_file(dg(blob)[7:])).read_bytes() == blob


def test_data_without_record_is_not_present(cache: DiskCache) -> None:
    blob = os.urandom(100)
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert ing.write(0, blob[:20])
    # a crash between writing the data and recording it
    fd = os.open(ing.data_path, os.O_RDWR)
    try:
        os.pwrite(fd, blob[20:100], 20)
    finally:
        os.close(fd)
    ing.close()
    again = cache.ingest(dg(blob), len(blob))
    assert again.acquire()
    assert again.ranges == [(0, 20)]
    assert again.read(20, 10) is None
    assert again.missing() == [(20, 100)]
    assert not again.finish(dg(blob))
    again.close()


def test_read_while_the_download_is_moved_to_blobs(cache: DiskCache) -> None:
    """A reader holding the download finds its bytes in blobs/ once finish() moved them (the
    store marks the layer complete only after finish returns)."""
    blob = os.urandom(4096)
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert ing.write(0, blob)
    ranges = list(ing.ranges)
    assert ing.finish(dg(blob))
    ing.ranges = ranges  # the view of a reader that looked before finish()
    assert ing.read(100, 200) == blob[100:300]
    cache.discard_blob(dg(blob), "test")
    assert ing.read(100, 200) is None
