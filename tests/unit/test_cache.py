"""Tests for the store's on-disk cache (als.store.cache), on the real filesystem.

Everything runs under pytest's ``tmp_path``; the degraded-mode test mounts a tiny tmpfs so that
writes really fail with ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import als.store.cache as cache_mod
from als.store.cache import (
    DiskCache,
    LayerRecord,
)

LOGGER = "als.store.cache"
SETTINGS = settings(
    max_examples=int(os.environ.get("ALS_HYPOTHESIS_EXAMPLES", "150")), deadline=None
)


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tmp_files(c: DiskCache) -> list[str]:
    return sorted(p.name for p in (c.dir / "tmp").iterdir())


@pytest.fixture
def cache(tmp_path: Path) -> DiskCache:
    c = DiskCache(tmp_path / "cache", 0)
    c.open()
    return c


def make_record(blob: bytes, toc: bytes = b"toc", refs: list[str] | None = None) -> LayerRecord:
    return LayerRecord(
        blob_digest=dg(blob),
        blob_size=len(blob),
        diff_id=dg(b"diff" + blob),
        toc_digest=dg(toc),
        media_type="application/vnd.oci.image.layer.v1.tar+zstd",
        format="zstd:chunked",
        annotations={"io.github.containers.zstd-chunked.manifest-position": "1:2:3:1"},
        refs=list(refs or ["example.com/img:1"]),
    )


def test_bad_digests_are_rejected_by_every_entry_point(cache: DiskCache) -> None:
    bad = "sha256:../../../etc"
    for call in (
        lambda: cache.put_chunk(bad, b"x"),
        lambda: cache.get_chunk(bad),
        lambda: cache.has_chunk(bad),
        lambda: cache.has_blob(bad),
        lambda: cache.ingest(bad, 1),
        lambda: cache.load_layer(bad),
        lambda: cache.save_profile(bad, []),
    ):
        with pytest.raises(ValueError):
            call()
    assert not any(cache.dir.parent.glob("etc*"))


# -- chunks -----------------------------------------------------------------------------------


def test_chunk_round_trip(cache: DiskCache) -> None:
    data = os.urandom(3000)
    d = dg(data)
    assert not cache.has_chunk(d)
    assert cache.get_chunk(d) is None
    assert cache.misses == 1
    assert cache.put_chunk(d, data)
    assert cache.has_chunk(d)
    path = cache.dir / "chunks" / "sha256" / d[7:9] / d[7:]
    assert path.read_bytes() == data
    assert cache.get_chunk(d) == data
    assert cache.hits == 1
    assert cache.total == len(data)
    # A second put of the same chunk changes nothing.
    assert cache.put_chunk(d, data)
    assert cache.total == len(data)
    # A fresh cache over the same directory finds it.
    again = DiskCache(cache.dir, 0)
    again.open()
    assert again.has_chunk(d)
    assert again.get_chunk(d) == data
    assert again.total == len(data)
    assert tmp_files(cache) == []


def test_altered_chunk_is_detected_removed_and_unaccounted(
    cache: DiskCache, caplog: pytest.LogCaptureFixture
) -> None:
    keep, bad = os.urandom(500), os.urandom(700)
    assert cache.put_chunk(dg(keep), keep)
    assert cache.put_chunk(dg(bad), bad)
    assert cache.total == 1200
    path = cache.chunk_file(dg(bad)[7:])
    altered = bytearray(bad)
    altered[123] ^= 1
    path.write_bytes(bytes(altered))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get_chunk(dg(bad)) is None
    assert not path.exists()
    assert cache.corrupt == 1
    assert not cache.has_chunk(dg(bad))
    assert cache.total == 500
    assert any(
        "cache-corrupt" in r.getMessage() and dg(bad) in r.getMessage() for r in caplog.records
    )
    assert cache.get_chunk(dg(keep)) == keep
    # Re-fetched data can be stored again.
    assert cache.put_chunk(dg(bad), bad)
    assert cache.get_chunk(dg(bad)) == bad
    assert cache.total == 1200


def test_chunk_removed_by_another_process_is_written_again(cache: DiskCache) -> None:
    data = os.urandom(256)
    d = dg(data)
    assert cache.put_chunk(d, data)
    cache.chunk_file(d[7:]).unlink()  # e.g. evicted by another process sharing the directory
    assert cache.get_chunk(d) is None
    assert not cache.has_chunk(d)
    assert cache.total == 0
    assert cache.put_chunk(d, data)
    assert cache.chunk_file(d[7:]).read_bytes() == data
    assert cache.get_chunk(d) == data
    assert cache.total == len(data)


def test_truncated_chunk_is_detected(cache: DiskCache) -> None:
    data = os.urandom(100)
    assert cache.put_chunk(dg(data), data)
    path = cache.chunk_file(dg(data)[7:])
    path.write_bytes(data[:50])
    assert cache.get_chunk(dg(data)) is None
    assert not path.exists()
    assert cache.corrupt == 1


def test_nothing_is_left_in_tmp_after_writes(cache: DiskCache) -> None:
    for i in range(20):
        data = b"chunk %d" % i
        assert cache.put_chunk(dg(data), data)
    rec = make_record(b"blob")
    assert cache.save_layer(rec, [(0, b"head"), (10, b"tail")])
    assert cache.save_profile(rec.blob_digest, ["a", "b"])
    assert cache.save_uses({("ref", rec.blob_digest): 2})
    blob = b"0123456789" * 10
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    for off in range(0, len(blob), 10):
        assert ing.write(off, blob[off : off + 10])
    assert ing.finish(dg(blob))
    assert tmp_files(cache) == []


def test_write_failing_midway_leaves_no_file(
    cache: DiskCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(64 * 1024)
    d = dg(data)
    real_write = os.write
    calls = []

    def failing_write(fd: int, buf: bytes | memoryview) -> int:
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, buf[: len(buf) // 2])  # a short write, as on a filling disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write)
        assert not cache.put_chunk(d, data)
    assert len(calls) == 2
    assert not cache.chunk_file(d[7:]).exists()
    assert tmp_files(cache) == []
    assert not cache.has_chunk(d)
    assert cache.total == 0
    assert cache.degraded == os.strerror(errno.ENOSPC)


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


# -- layer records ----------------------------------------------------------------------------


def test_layer_record_round_trip(cache: DiskCache) -> None:
    rec = make_record(b"blob one", refs=["a.example/x:1", "b.example/y@sha256:" + "0" * 64])
    pieces = [(0, b"header"), (1000, os.urandom(300)), (5000, b"")]
    assert cache.load_layer(rec.blob_digest) is None
    assert cache.save_layer(rec, pieces)
    found = cache.load_layer(rec.blob_digest)
    assert found is not None
    got, got_pieces = found
    assert got == rec
    assert got_pieces == pieces
    other = make_record(b"blob two")
    other.diff_id = None
    assert cache.save_layer(other, [(7, b"x")])
    assert sorted(r.blob_digest for r in cache.layer_records()) == sorted(
        [rec.blob_digest, other.blob_digest]
    )
    assert {r.blob_digest: r for r in cache.layer_records()}[other.blob_digest] == other
    # survives a restart
    again = DiskCache(cache.dir, 0)
    again.open()
    assert again.load_layer(other.blob_digest) == (other, [(7, b"x")])


def test_layer_records_skips_unreadable(cache: DiskCache) -> None:
    good = make_record(b"good")
    assert cache.save_layer(good, [(0, b"t")])
    (cache.dir / "layers" / ("1" * 64)).mkdir()
    (cache.dir / "layers" / ("1" * 64) / "layer.json").write_text("{broken")
    (cache.dir / "layers" / ("2" * 64)).mkdir()  # no record at all
    bad_digest = make_record(b"bad").to_json()
    bad_digest["toc_digest"] = "sha256:nope"
    (cache.dir / "layers" / ("3" * 64)).mkdir()
    (cache.dir / "layers" / ("3" * 64) / "layer.json").write_text(json.dumps(bad_digest))
    assert [r.blob_digest for r in cache.layer_records()] == [good.blob_digest]


@pytest.mark.parametrize("damage", ["truncate", "no-newline", "bad-head", "negative"])
def test_damaged_toc_is_rejected(
    cache: DiskCache, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    rec = make_record(b"blob")
    assert cache.save_layer(rec, [(0, b"abcdef"), (100, b"ghijkl")])
    toc = cache.dir / "layers" / rec.blob_digest[7:] / "toc"
    raw = toc.read_bytes()
    if damage == "truncate":
        toc.write_bytes(raw[:-1])
    elif damage == "no-newline":
        toc.write_bytes(raw.replace(b"\n", b" "))
    elif damage == "bad-head":
        toc.write_bytes(b"[[0, 6], [100]]\nabcdefghijkl")
    else:
        toc.write_bytes(b"[[0, -1]]\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load_layer(rec.blob_digest) is None
    assert any(
        "cache-corrupt" in r.getMessage() and rec.blob_digest[7:] in r.getMessage()
        for r in caplog.records
    )


def test_record_naming_another_digest_is_rejected(
    cache: DiskCache, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_record(b"layer a"), make_record(b"layer b")
    assert cache.save_layer(b, [(0, b"toc")])
    src = cache.dir / "layers" / b.blob_digest[7:]
    dst = cache.dir / "layers" / a.blob_digest[7:]
    dst.mkdir()
    for name in ("layer.json", "toc"):
        (dst / name).write_bytes((src / name).read_bytes())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load_layer(a.blob_digest) is None
    assert any(
        "cache-corrupt" in r.getMessage() and b.blob_digest in r.getMessage()
        for r in caplog.records
    )
    assert cache.load_layer(b.blob_digest) is not None


def test_record_without_toc_is_absent(cache: DiskCache) -> None:
    rec = make_record(b"blob")
    assert cache.save_layer(rec, None)
    assert cache.load_layer(rec.blob_digest) is None
    assert [r.blob_digest for r in cache.layer_records()] == [rec.blob_digest]


def test_saving_a_record_again_keeps_accounting_exact(cache: DiskCache) -> None:
    rec = make_record(b"blob")
    assert cache.save_layer(rec, [(0, b"x" * 1000)])
    for i in range(5):
        rec.refs.append(f"example.com/img:{i}")
        assert cache.save_layer(rec, None)
        assert cache.save_profile(rec.blob_digest, [f"file{j}" for j in range(i)])
    assert cache.save_layer(rec, [(0, b"y" * 10)])
    counted = cache.total
    cache.rescan()
    assert cache.total == counted
    found = cache.load_layer(rec.blob_digest)
    assert found is not None
    assert found[0].refs == rec.refs


def test_profile_round_trip(cache: DiskCache, caplog: pytest.LogCaptureFixture) -> None:
    d = dg(b"blob")
    assert cache.load_profile(d) == []
    files = ["usr/bin/sh", "etc/passwd", "é/ü"]
    assert cache.save_profile(d, files)
    assert cache.load_profile(d) == files
    path = cache.dir / "layers" / d[7:] / "profile.json"
    path.write_text(json.dumps({"files": ["a", 3, None, "b"]}))
    assert cache.load_profile(d) == ["a", "b"]
    path.write_text("{")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load_profile(d) == []
    assert any("cache-corrupt" in r.getMessage() for r in caplog.records)


def test_uses_round_trip(cache: DiskCache, caplog: pytest.LogCaptureFixture) -> None:
    assert cache.load_uses() == {}
    uses = {("a.example/x:1", dg(b"1")): 2, ("b.example/y:2", dg(b"2")): 1, ("z", dg(b"3")): 0}
    assert cache.save_uses(uses)
    assert cache.load_uses() == {k: n for k, n in uses.items() if n > 0}
    for bad in ("{", '{"a": 1}', "[[1, 2]]", '[["r", "d", "x"]]', "3"):
        (cache.dir / "uses.json").write_text(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert cache.load_uses() == {}
        assert any("cache-corrupt uses.json" in r.getMessage() for r in caplog.records), bad


# -- eviction ---------------------------------------------------------------------------------


def _set_age(path: Path, t: float) -> None:
    for p in [path, *path.iterdir()] if path.is_dir() else [path]:
        os.utime(p, (t, t))


def _chunks(c: DiskCache, n: int, size: int) -> list[str]:
    out = []
    for i in range(n):
        data = ((b"%08d" % i) * (size // 8 + 1))[:size]
        assert c.put_chunk(dg(data), data)
        out.append(dg(data)[7:])
    return out


def _age_all(c: DiskCache, order: list[Path], base: float) -> None:
    """Give ``order`` increasing mtimes (first = least recently used), then recount."""
    for i, p in enumerate(order):
        _set_age(p, base + i * 10)
    c.rescan()


def test_evict_removes_least_recently_used_first(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", 1000)
    c.open()
    hexes = _chunks(c, 12, 100)
    assert c.over_limit()
    order = [hexes[i] for i in (5, 2, 9, 0, 1, 3, 4, 6, 7, 8, 10, 11)]
    _age_all(c, [c.chunk_file(h) for h in order], time.time() - 10_000)
    assert c.total == 1200
    report = c.evict(set(), set())
    assert report.removed == 3
    assert report.freed == 300
    assert report.protected_removed == 0
    assert report.remaining == c.total == 900
    assert c.total <= 0.9 * c.limit
    for h in order[:3]:
        assert not c.chunk_file(h).exists()
        assert not c.has_chunk("sha256:" + h)
    for h in order[3:]:
        assert c.chunk_file(h).exists()
    assert not c.over_limit()
    t = c.total
    c.rescan()
    assert c.total == t


def test_evict_uses_recent_touches(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", 1000)
    c.open()
    hexes = _chunks(c, 12, 100)
    _age_all(c, [c.chunk_file(h) for h in hexes], time.time() - 10_000)
    # reading the two oldest makes them the most recently used
    assert c.get_chunk("sha256:" + hexes[0]) is not None
    assert c.get_chunk("sha256:" + hexes[1]) is not None
    c.evict(set(), set())
    assert c.chunk_file(hexes[0]).exists()
    assert c.chunk_file(hexes[1]).exists()
    assert [h for h in hexes if not c.chunk_file(h).exists()] == hexes[2:5]


def test_evict_spares_protected_items(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", 2000)
    c.open()
    hexes = _chunks(c, 10, 100)
    blobs = []
    for i in range(4):
        blob = bytes([i]) * 300
        ing = c.ingest(dg(blob), len(blob))
        assert ing.acquire()
        assert ing.write(0, blob)
        assert ing.finish(dg(blob))
        blobs.append(dg(blob)[7:])
    recs = [make_record(bytes([i]) * 300) for i in range(4)]
    for r in recs:
        assert c.save_layer(r, [(0, b"t" * 50)])
    layer_dirs = [c.dir / "layers" / r.blob_digest[7:] for r in recs]
    assert c.total > 2000
    # oldest first: blob 0 + its record, chunks 0-4, blob 1, then the rest
    order = [
        c.blob_file(blobs[0]),
        layer_dirs[0],
        *(c.chunk_file(h) for h in hexes[:5]),
        c.blob_file(blobs[1]),
        layer_dirs[1],
        *(c.chunk_file(h) for h in hexes[5:]),
        c.blob_file(blobs[2]),
        layer_dirs[2],
        c.blob_file(blobs[3]),
        layer_dirs[3],
    ]
    _age_all(c, order, time.time() - 10_000)
    before = c.total
    protected_layers = {blobs[0]}
    protected_chunks = set(hexes[:3])
    report = c.evict(protected_layers, protected_chunks)
    assert report.protected_removed == 0
    assert c.total <= 0.9 * c.limit
    assert report.freed == before - c.total
    # protected ones survive
    assert c.blob_file(blobs[0]).exists()
    assert layer_dirs[0].is_dir()
    assert all(c.chunk_file(h).exists() for h in hexes[:3])
    # the oldest unprotected ones went, in LRU order
    unprotected = [p for p in order[2:] if p.name not in protected_chunks]
    gone = [p.exists() for p in unprotected]
    assert gone[: report.removed] == [False] * report.removed
    assert all(gone[report.removed :])
    # accounting still matches the disk
    t = c.total
    c.rescan()
    assert c.total == t


def test_evict_removes_protected_when_it_must(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = DiskCache(tmp_path / "c", 1000)
    c.open()
    hexes = _chunks(c, 15, 100)
    order = [c.chunk_file(h) for h in hexes]
    _age_all(c, order, time.time() - 10_000)
    unprotected = set(hexes[10:12])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        report = c.evict(set(), set(hexes) - unprotected)
    assert c.total == 900
    assert report.removed == 6
    assert report.protected_removed == 4
    assert not any(c.chunk_file(h).exists() for h in unprotected)
    # then the least recently used protected ones
    assert [h for h in hexes if not c.chunk_file(h).exists()] == [*hexes[:4], *hexes[10:12]]
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cache-limit" in m and "4 item" in m for m in msgs)


def test_evict_within_limit_does_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = DiskCache(tmp_path / "c", 10_000)
    c.open()
    hexes = _chunks(c, 5, 100)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        report = c.evict(set(), set())
    assert report.removed == 0
    assert all(c.chunk_file(h).exists() for h in hexes)
    assert not caplog.records
    unlimited = DiskCache(tmp_path / "c", 0)
    unlimited.open()
    assert not unlimited.over_limit()
    assert unlimited.evict(set(), set()).removed == 0


def test_evict_skips_ingest_another_process_writes(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", 1000)
    c.open()
    other = DiskCache(tmp_path / "c", 1000)  # a second process sharing the directory
    busy_blob, idle_blob = os.urandom(300), os.urandom(300)
    busy = other.ingest(dg(busy_blob), len(busy_blob))
    assert busy.acquire()
    assert busy.write(0, busy_blob[:200])
    idle = c.ingest(dg(idle_blob), len(idle_blob))
    assert idle.acquire()
    assert idle.write(0, idle_blob[:200])
    idle.close()
    hexes = _chunks(c, 10, 100)
    _age_all(c, [busy.dir, idle.dir, *(c.chunk_file(h) for h in hexes)], time.time() - 10_000)
    # rescan counts a download's allocated blocks: size the limit so that it can be met
    # without the busy download but not without removing the idle one
    busy_size = c._units[f"ingest/{busy.hex}"].size
    assert busy_size >= 200
    c.limit = int((busy_size + 500) / 0.9) + 1
    assert c.over_limit()
    report = c.evict(set(), set())
    assert busy.dir.is_dir()
    assert busy.owned
    assert busy.read(0, 200) == busy_blob[:200]
    assert not idle.dir.exists()
    assert report.removed >= 1
    assert c.total <= 0.9 * c.limit
    assert f"ingest/{busy.hex}" in c._units
    # the other process's download can still finish
    assert busy.write(200, busy_blob[200:])
    assert busy.finish(dg(busy_blob))


def test_evict_empties_our_own_download_but_keeps_it_open(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", 100)
    c.open()
    blob = os.urandom(300)
    ing = c.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert ing.write(0, blob[:250])
    assert c.over_limit()
    report = c.evict(set(), set())
    assert report.removed == 1
    assert ing.owned
    assert ing.ranges == []
    assert ing.read(0, 10) is None
    assert c.total <= 90
    # it can be filled again and finish
    assert ing.write(0, blob)
    assert ing.finish(dg(blob))
    assert c.blob_file(ing.hex).read_bytes() == blob


def test_rescan_matches_accounting(cache: DiskCache) -> None:
    _chunks(cache, 7, 333)
    blob = os.urandom(4096 * 3)
    ing = cache.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert ing.write(0, blob)
    assert ing.finish(dg(blob))
    rec = make_record(blob)
    assert cache.save_layer(rec, [(0, b"toc" * 100), (9000, b"more")])
    assert cache.save_profile(rec.blob_digest, ["a", "b/c"])
    counted = cache.total
    assert counted > 7 * 333 + len(blob)
    cache.rescan()
    assert cache.total == counted
    other = DiskCache(cache.dir, 0)
    other.open()
    assert other.total == counted


# -- degraded mode on a full disk -------------------------------------------------------------


@pytest.fixture
def small_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "small"
    d.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
            check=False,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False, timeout=30)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _fill(path: Path) -> None:
    with open(path, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xff" * 4096)
            f.flush()
    # the disk is full now (the last, partial buffer may fail again on close)
    assert path.stat().st_size > 0


def test_degraded_mode_on_a_full_disk(
    small_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock()
    fake_time = types.SimpleNamespace(time=time.time, monotonic=clock.monotonic)
    monkeypatch.setattr(cache_mod, "time", fake_time)
    monkeypatch.setattr(cache_mod, "_RETRY_DEGRADED", 30.0)
    c = DiskCache(small_dir / "cache", 0)
    c.open()
    blob = os.urandom(8192)
    ing = c.ingest(dg(blob), len(blob))
    assert ing.acquire()
    filler = small_dir / "filler"
    with contextlib.suppress(OSError):
        _fill(filler)
    chunks = [os.urandom(16 * 1024) for _ in range(20)]
    caplog.set_level(logging.INFO, logger=LOGGER)

    assert not c.put_chunk(dg(chunks[0]), chunks[0])
    assert c.degraded == os.strerror(errno.ENOSPC)
    assert not c.writable()
    assert not c.chunk_file(dg(chunks[0])[7:]).exists()
    assert tmp_files(c) == []
    for i, data in enumerate(chunks):
        clock.now += 31  # every one is a real attempt that fails again
        assert not c.put_chunk(dg(data), data), i
        assert not c.has_chunk(dg(data))
    assert not ing.write(0, blob)
    assert not c.save_layer(make_record(blob), [(0, b"t" * 300_000)])
    assert tmp_files(c) == []
    degraded_lines = [r for r in caplog.records if "cache-degraded" in r.getMessage()]
    assert len(degraded_lines) == 1
    assert degraded_lines[0].levelno == logging.WARNING
    assert c.total == 0

    # Space comes back, but until the retry time writes are skipped without trying.
    filler.unlink()
    clock.now += 29
    assert not c.writable()
    assert not c.put_chunk(dg(chunks[0]), chunks[0])
    assert not c.chunk_file(dg(chunks[0])[7:]).exists()
    assert c.degraded is not None
    assert not any("cache-recovered" in r.getMessage() for r in caplog.records)

    clock.now += 2
    assert c.writable()
    assert c.put_chunk(dg(chunks[0]), chunks[0])
    assert c.degraded is None
    assert c.get_chunk(dg(chunks[0])) == chunks[0]
    recovered = [r for r in caplog.records if "cache-recovered" in r.getMessage()]
    assert len(recovered) == 1
    assert ing.write(0, blob)
    assert ing.finish(dg(blob))
    assert len([r for r in caplog.records if "cache-degraded" in r.getMessage()]) == 1
    assert tmp_files(c) == []


def test_ingest_write_on_full_disk_degrades(
    small_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = DiskCache(small_dir / "cache", 0)
    c.open()
    blob = os.urandom(64 * 1024)
    ing = c.ingest(dg(blob), len(blob))
    assert ing.acquire()
    assert ing.write(0, blob[:4096])
    with contextlib.suppress(OSError):
        _fill(small_dir / "filler")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not ing.write(8192, blob[8192:])
    assert c.degraded is not None
    assert ing.ranges == [(0, 4096)]
    assert any("cache-degraded" in r.getMessage() for r in caplog.records)
    ing.close()
    again = c.ingest(dg(blob), len(blob))
    again.reload()
    assert again.ranges == [(0, 4096)]


# -- open() -----------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, 0)
        pytest.skip("the pid of an ended child was reused already")
    return p.pid


def test_open_cleans_tmp_and_sets_mode(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    (d / "tmp").mkdir(parents=True)
    os.chmod(d, 0o755)  # noqa: S103 - a too-open mode that open() must tighten
    dead = d / "tmp" / f"{_dead_pid()}.1.1"
    dead.write_bytes(b"half a chunk")
    ours = d / "tmp" / f"{os.getpid()}.1.7"
    ours.write_bytes(b"in progress")
    old_ours = d / "tmp" / f"{os.getpid()}.1.8"
    old_ours.write_bytes(b"abandoned")
    two_hours_ago = time.time() - 7200
    os.utime(old_ours, (two_hours_ago, two_hours_ago))
    junk = d / "tmp" / "junk"
    junk.write_bytes(b"?")
    c = DiskCache(d, 0)
    c.open()
    assert sorted(p.name for p in (d / "tmp").iterdir()) == [ours.name]
    assert d.stat().st_mode & 0o777 == 0o700
    for sub in ("blobs/sha256", "ingest", "chunks/sha256", "layers", "tmp"):
        assert (d / sub).is_dir()
    assert c.total == 0


def test_open_keeps_a_live_process_tmp_file(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    (d / "tmp").mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = d / "tmp" / f"{child.pid}.5.5"
        live.write_bytes(b"writing")
        DiskCache(d, 0).open()
        assert live.exists()
    finally:
        child.kill()
        child.wait(timeout=30)
