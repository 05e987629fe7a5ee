"""Tests for the store's on-disk cache (als.store.cache.disk), on the real filesystem.

Everything runs under pytest's ``tmp_path``; the degraded-mode test mounts a tiny tmpfs so that
writes really fail with ENOSPC.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import als.store.cache.disk as disk_mod
import als.store.cache.ingest as ingest_mod
from als.store.cache import DiskCache
from tests.unit.store.cache.helpers import dg, make_record, tmp_files

LOGGER = "als.store.cache"
SETTINGS = settings(
    max_examples=int(os.environ.get("ALS_HYPOTHESIS_EXAMPLES", "150")), deadline=None
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
    monkeypatch.setattr(disk_mod, "time", fake_time)
    monkeypatch.setattr(ingest_mod, "time", fake_time)
    monkeypatch.setattr(disk_mod, "_RETRY_DEGRADED", 30.0)
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


def test_a_deferred_scan_keeps_what_was_written_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarting store opens the cache without walking it and counts it later; units
    written in between are not lost by the walk."""
    first = DiskCache(tmp_path / "c", 0)
    first.open()
    assert first.put_chunk("sha256:" + "a" * 64, b"x" * 1000)
    cache = DiskCache(tmp_path / "c", 0)
    cache.open(scan=False)
    assert cache.total == 0  # not counted yet
    real_files = disk_mod._files

    def files_then_write(d: Path, depth: int) -> Iterator[Path]:
        yield from real_files(d, depth)
        if d.name == "sha256" and d.parent.name == "chunks":
            # a write lands after the walk passed the chunks
            assert cache.put_chunk("sha256:" + "b" * 64, b"y" * 500)

    monkeypatch.setattr(disk_mod, "_files", files_then_write)
    cache.rescan()
    assert cache.total == 1500
