"""The store's cache through LayerManager: dedup, restarts, prefetch, background fetch, eviction.

The registry is the in-process fake (it counts requests and bytes, and can be switched off);
the cache is a real directory. A "restart" is a new LayerManager over the same directory.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard

from als.errors import AlsError, VerifyError
from als.store import chunks as chunk_loader
from als.store.config import StoreConfig
from als.store.fs.protocol import info_json
from als.store.layer import Layer
from als.store.manager import LayerManager
from tests.support.fakesource import FakeSource
from tests.support.layers import LAZY_FORMATS, BuiltLayer, make_layer, noise

REF = "registry.test/app:1"
REF2 = "registry.test/other:2"


FILES = {f"usr/lib/f{i:02d}": noise(f"f{i}", 20_000 + 3_000 * i) for i in range(20)}
FILES["usr/lib/big"] = noise("big", 700_000)


def decompressed(blob: bytes) -> bytes:
    """The whole uncompressed stream of a gzip or zstd blob (every member or frame)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
    return reader.read()


@asynccontextmanager
async def running(src: FakeSource, root: Path, **kw: Any) -> AsyncIterator[LayerManager]:
    kw.setdefault("background_fetch", False)
    m = LayerManager(src, StoreConfig(root=root, **kw))
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        yield m
        await m.flush()  # as the daemon does before it stops
        nursery.cancel_scope.cancel()
    m.close()


async def read_all(layer: Layer, path: str) -> bytes:
    i = layer.index.lookup(path)
    assert i is not None, path
    return await layer.read(i, 0, layer.index.size(i) + 1)


async def wait_for(cond: Callable[[], bool], limit: float = 20.0) -> None:
    """Poll state the store changes in its own tasks (it has no event for each of them)."""
    with trio.fail_after(limit):
        while not cond():  # noqa: ASYNC110 - polling another component's state
            await trio.sleep(0.02)


@pytest.fixture
def layer() -> BuiltLayer:
    return make_layer(FILES, "estargz", chunk_size=64 * 1024)


async def test_second_reference_fetches_nothing(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    src.add_image(REF2, [layer])
    async with running(src, tmp_path) as m:
        a = await m.lookup(REF, layer.digest)
        assert await read_all(a, "usr/lib/big") == FILES["usr/lib/big"]
        sent = src.bytes_sent
        b = await m.lookup(REF2, layer.toc_digest)
        assert b is a
        assert sorted(b.refs) == [REF, REF2]
        assert await read_all(b, "usr/lib/big") == FILES["usr/lib/big"]
        assert src.bytes_sent == sent  # no TOC read, no content read
    # After a restart, the other reference reads from the disk cache.
    src.fail_all = True
    async with running(src, tmp_path) as m:
        b = await m.lookup(REF2, layer.digest)
        assert await read_all(b, "usr/lib/big") == FILES["usr/lib/big"]
    assert src.bytes_sent == sent


async def test_same_file_in_two_layers_is_fetched_once(tmp_path: Path) -> None:
    shared = noise("shared", 300_000)
    one = make_layer({"a/shared": shared, "a/one": b"one"}, "estargz", chunk_size=64 * 1024)
    two = make_layer({"b/shared": shared, "b/two": b"two!"}, "estargz", chunk_size=64 * 1024)
    assert one.digest != two.digest
    src = FakeSource()
    src.add_image(REF, [one, two])
    async with running(src, tmp_path) as m:
        l1 = await m.lookup(REF, one.digest)
        assert await read_all(l1, "a/shared") == shared
        await m.flush()  # the first layer's download holds the compressed bytes
        l2 = await m.lookup(REF, two.digest)
        requests = src.requests
        # The second layer's copy is decoded from the first layer's download (no request),
        # and no decompressed copy of it was written to the chunk store.
        assert await read_all(l2, "b/shared") == shared
        assert src.requests == requests
        assert m.disk is not None
        assert not list((m.disk.dir / "chunks").rglob("*")) or all(
            p.is_dir() for p in (m.disk.dir / "chunks").rglob("*")
        )
    # After a restart the map of where chunks are is gone: the other layer's copy is fetched
    # once more, and verified like any other.
    src.fail_fetches = 0
    async with running(src, tmp_path) as m:
        l2 = await m.lookup(REF, two.digest)
        assert await read_all(l2, "b/shared") == shared


async def test_a_chunk_is_never_taken_from_another_digest_with_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where chunks are is keyed by 64 bits of their digest; a home under the same key must
    # still be the same digest. Here every digest has the same key.
    monkeypatch.setattr(chunk_loader, "_home_key", lambda digest: 0)
    x, y = noise("x", 64 * 1024), noise("y", 64 * 1024)
    one = make_layer({"a/x": x}, "estargz", chunk_size=64 * 1024)
    two = make_layer({"b/y": y}, "estargz", chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [one, two])
    async with running(src, tmp_path) as m:
        l1 = await m.lookup(REF, one.digest)
        assert await read_all(l1, "a/x") == x
        await m.flush()
        l2 = await m.lookup(REF, two.digest)
        requests = src.requests
        assert await read_all(l2, "b/y") == y  # not a/x's chunk, decoded from the home
        assert src.requests == requests + 1


async def test_restart_needs_no_registry_and_ignores_moved_tags(
    tmp_path: Path, layer: BuiltLayer
) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        assert await read_all(lay, "usr/lib/f03") == FILES["usr/lib/f03"]
        m.use(REF, layer.digest)
    # The tag moves to another image; the registry then goes away entirely.
    src.add_image(REF, [make_layer({"x": b"new"}, "estargz")])
    src.fail_all = True
    resolves = src.resolves
    async with running(src, tmp_path) as m:
        assert m.uses == {(REF, layer.digest): 1}
        await wait_for(lambda: layer.digest in m.layers)  # restored at start-up
        lay = await m.lookup(REF, layer.digest)
        assert lay.info.diff_id == layer.diff_id
        assert await m.lookup(REF, layer.toc_digest) is lay
        assert await read_all(lay, "usr/lib/f03") == FILES["usr/lib/f03"]
        with pytest.raises(AlsError):  # never read, registry down: EIO, not wrong data
            await read_all(lay, "usr/lib/f04")
        assert m.release(REF, layer.digest) == 0
    assert src.resolves == resolves
    async with running(src, tmp_path) as m:
        assert m.uses == {}


@pytest.mark.parametrize("fmt", LAZY_FORMATS)
async def test_background_fetch_completes_the_layer(tmp_path: Path, fmt: str) -> None:
    built = make_layer(FILES, fmt, chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [built])
    async with running(
        src, tmp_path, background_fetch=True, background_delay=0, background_range_kb=128
    ) as m:
        lay = await m.lookup(REF, built.digest)
        sent = src.bytes_sent
        await wait_for(lambda: lay.complete)
        blob_file = tmp_path / "cache" / "blobs" / "sha256" / built.digest.partition(":")[2]
        assert blob_file.read_bytes() == built.blob
        assert not (tmp_path / "cache" / "ingest" / built.digest.partition(":")[2]).exists()
        assert lay.status(0)["cached_percent"] == 100.0
        # every byte fetched once
        assert src.bytes_sent - sent <= len(built.blob)
        src.fail_all = True
        for path, data in FILES.items():
            assert await read_all(lay, path) == data
    async with running(src, tmp_path) as m:  # offline after a restart as well
        lay = await m.lookup(REF, built.digest)
        assert lay.complete
        assert await read_all(lay, "usr/lib/big") == FILES["usr/lib/big"]


async def test_background_fetch_waits_for_readers(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path, background_fetch=True, background_delay=0) as m:
        async with m.foreground():  # a reader is waiting for the registry
            lay = await m.lookup(REF, layer.digest)
            await wait_for(lambda: lay.background == "paused")
            requests = src.requests
            await trio.sleep(0.2)
            assert src.requests == requests
        await wait_for(lambda: lay.complete)


async def test_background_fetch_survives_registry_errors(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(
        src, tmp_path, background_fetch=True, background_delay=0, background_range_kb=64
    ) as m:
        lay = await m.lookup(REF, layer.digest)
        src.fail_fetches = 1
        await wait_for(lambda: lay.complete, limit=30)
        assert lay.last_error is None
        assert lay.status(0)["background"] == "done"


async def test_partial_download_resumes_after_restart(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        for i in range(0, 20, 2):
            assert await read_all(lay, f"usr/lib/f{i:02d}") == FILES[f"usr/lib/f{i:02d}"]
        await wait_for(lambda: lay.cached_bytes() > 0)
        partial = lay.cached_bytes()
    sent = src.bytes_sent
    async with running(src, tmp_path, background_fetch=True, background_delay=0) as m:
        lay = await m.lookup(REF, layer.digest)
        assert lay.cached_bytes() >= partial
        await wait_for(lambda: lay.complete)
    # the resumed download skipped what the reads had already brought in
    assert src.bytes_sent - sent <= len(layer.blob) - partial + 64 * 1024


async def test_corrupt_local_bytes_are_refetched(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        assert await read_all(lay, "usr/lib/f05") == FILES["usr/lib/f05"]
    # The layer's own download holds the bytes (chunk files are written only without one; the
    # chunk store's own checks are in test_cache.py): corrupt whatever is local.
    chunk_files = [p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file()]
    for p in chunk_files:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    # the downloaded compressed ranges too: nothing local may be trusted
    ingest = tmp_path / "cache" / "ingest" / layer.digest.partition(":")[2] / "data"
    raw = bytearray(ingest.read_bytes())
    for i in range(0, len(raw), 997):
        raw[i] ^= 0x55
    ingest.write_bytes(bytes(raw))
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        requests = src.requests
        assert await read_all(lay, "usr/lib/f05") == FILES["usr/lib/f05"]
        assert src.requests > requests
        assert m.disk is not None and m.disk.corrupt >= 1


async def test_corrupt_complete_blob_is_discarded(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path, background_fetch=True, background_delay=0) as m:
        lay = await m.lookup(REF, layer.digest)
        await wait_for(lambda: lay.complete)
    blob_file = tmp_path / "cache" / "blobs" / "sha256" / layer.digest.partition(":")[2]
    data = bytearray(blob_file.read_bytes())
    for i in range(0, len(data) - 1000, 501):
        data[i] ^= 0xFF
    blob_file.write_bytes(bytes(data))
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        assert lay.complete
        assert await read_all(lay, "usr/lib/f07") == FILES["usr/lib/f07"]
        assert not lay.complete
        assert not blob_file.exists()


async def test_eviction_under_a_small_limit_keeps_reads_correct(
    tmp_path: Path, layer: BuiltLayer
) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path, memory_cache_mb=0) as m:
        assert m.disk is not None
        m.disk.limit = 300_000
        lay = await m.lookup(REF, layer.digest)
        for _round in range(2):
            for path, data in FILES.items():
                assert await read_all(lay, path) == data
        # Read-ahead and cache writes the reads started may still land: let them finish and
        # evict, then count what is on disk afresh.
        for _ in range(100):
            await m.scheduler.writes_done()
            await m.evict()
            m.disk.rescan()
            if m.disk.total <= 300_000:
                break
            await trio.sleep(0.05)
        assert m.disk.total <= 300_000


async def test_eviction_spares_layers_in_use(tmp_path: Path) -> None:
    used = make_layer({"u/file": noise("u", 200_000)}, "estargz", chunk_size=64 * 1024)
    idle = make_layer({"i/file": noise("i", 200_000)}, "estargz", chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [used, idle])
    async with running(src, tmp_path, memory_cache_mb=0) as m:
        assert m.disk is not None
        lu = await m.lookup(REF, used.digest)
        m.use(REF, used.digest)
        assert await read_all(lu, "u/file")
        li = await m.lookup(REF, idle.digest)
        assert await read_all(li, "i/file")
        await trio.sleep(0.1)
        m.disk.limit = 250_000
        await m.evict()
        requests = src.requests
        assert await read_all(lu, "u/file") == noise("u", 200_000)
        assert src.requests == requests  # the used layer's chunks survived
        assert m.disk.total <= 250_000


async def test_prefetch_fetches_the_landmark_region(tmp_path: Path) -> None:
    prio = ["usr/lib/f01", "usr/lib/f02", "usr/lib/big"]
    built = make_layer(FILES, "estargz", chunk_size=64 * 1024, prioritized=prio)
    src = FakeSource()
    src.add_image(REF, [built])
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, built.digest)
        requests = src.requests
        await wait_for(lambda: in_memory(m, lay, prio))
        assert src.requests - requests <= 2  # one large range (two at most)
        requests = src.requests
        for p in prio:
            assert await read_all(lay, p) == FILES[p]
        assert src.requests == requests


async def test_prefetch_beyond_the_memory_cache_goes_to_the_download(tmp_path: Path) -> None:
    """A landmark region larger than half the memory cache: its start is prefetched decoded,
    the rest only downloaded (decoded when read, once); reading it all fetches nothing more."""
    prio = [*sorted(FILES)]
    built = make_layer(FILES, "estargz", chunk_size=64 * 1024, prioritized=prio)
    src = FakeSource()
    src.add_image(REF, [built])
    async with running(src, tmp_path, memory_cache_mb=1, readahead_kb=0) as m:
        lay = await m.lookup(REF, built.digest)
        spans = [(c.coffset, c.cend) for p in prio for c in chunks(lay, p)]

        def downloaded() -> bool:
            held = list(lay.ingest.ranges) if lay.ingest is not None else []
            return all(any(s <= a and b <= e for s, e in held) for a, b in spans)

        await wait_for(downloaded)
        assert not in_memory(m, lay, prio[-3:])  # the tail was not decoded ahead
        requests = src.requests
        for p in prio:
            assert await read_all(lay, p) == FILES[p]
        assert src.requests == requests


def in_memory(m: LayerManager, lay: Layer, paths: list[str]) -> bool:
    return all(c.digest in m.memory._data for p in paths for c in chunks(lay, p))


def chunks(lay: Layer, path: str) -> list[Any]:
    i = lay.index.lookup(path)
    assert i is not None
    return list(lay.index.chunks(i))


async def test_learned_profile_prefetches_on_the_next_resolve(tmp_path: Path) -> None:
    built = make_layer(FILES, "zstd-chunked", chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [built])
    opened = ["usr/lib/f11", "usr/lib/f12"]
    async with running(src, tmp_path, profile_window=0.2) as m:
        lay = await m.lookup(REF, built.digest)
        for p in opened:
            i = lay.index.lookup(p)
            assert i is not None
            lay.note_open(i)
            await read_all(lay, p)
        profile = tmp_path / "cache" / "layers" / built.digest.partition(":")[2] / "profile.json"
        await wait_for(profile.exists)
    # Forget the content (as if evicted), keep the layer record and its profile.
    for f in (tmp_path / "cache" / "chunks").rglob("*"):
        if f.is_file():
            f.unlink()
    ingest = tmp_path / "cache" / "ingest" / built.digest.partition(":")[2]
    for f in ingest.iterdir():
        f.unlink()
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, built.digest)
        await wait_for(lambda: in_memory(m, lay, opened))
        requests = src.requests
        for p in opened:
            assert await read_all(lay, p) == FILES[p]
        assert src.requests == requests
        assert not in_memory(m, lay, ["usr/lib/f13"])


async def test_concurrent_readers_share_one_disk_load(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        assert await read_all(lay, "usr/lib/big") == FILES["usr/lib/big"]
    src.fail_all = True
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        results: list[bytes] = []

        async def reader(off: int) -> None:
            i = lay.index.lookup("usr/lib/big")
            assert i is not None
            results.append(await lay.read(i, off, 100_000))

        async with trio.open_nursery() as n:
            for k in range(30):
                n.start_soon(reader, (k * 37_000) % 600_000)
        big = FILES["usr/lib/big"]
        assert sorted(results) == sorted(big[(k * 37_000) % 600_000 :][:100_000] for k in range(30))
        assert m.disk is not None and m.disk.corrupt == 0


async def test_status_reports_layers_and_cache(tmp_path: Path, layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path) as m:
        lay = await m.lookup(REF, layer.digest)
        m.use(REF, layer.digest)
        await read_all(lay, "usr/lib/big")
        await wait_for(lambda: lay.cached_bytes() > 0)
        st = m.status()
        assert st["pid"] == os.getpid()
        assert st["cache"]["dir"] == str(tmp_path / "cache")
        assert st["cache"]["bytes"] > 0
        (row,) = st["layers"]
        assert row["digest"] == layer.digest
        assert row["refs"] == [REF]
        assert row["uses"] == 1
        assert row["size"] == len(layer.blob)
        assert 0 < row["cached_bytes"] < row["size"]
        assert row["cached_percent"] == round(100 * row["cached_bytes"] / row["size"], 1)
        assert row["background"] == "off"


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: the cache fills it at once."""
    small = tmp_path / "small"
    small.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False, capture_output=True)


async def test_full_disk_reads_carry_on_and_say_so_once(
    tmp_path: Path, full_disk: Path, layer: BuiltLayer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="als")
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path, cache_dir=str(full_disk / "cache"), memory_cache_mb=1) as m:
        lay = await m.lookup(REF, layer.digest)
        for _round in range(2):
            for path, data in FILES.items():
                assert await read_all(lay, path) == data
        await m.flush()
        assert m.status()["cache"]["degraded"]
    assert caplog.text.count("cache-degraded") == 1


@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
async def test_bytes_corrupted_once_are_fetched_again(tmp_path: Path, fmt: str) -> None:
    """A registry (or network) that corrupts one answer costs a second fetch, not an EIO."""
    layer = make_layer(FILES, fmt, chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path, prefetch=False) as m:
        lay = await m.lookup(REF, layer.digest)
        src.corrupt_next = 1
        requests = src.requests
        assert await read_all(lay, "usr/lib/f05") == FILES["usr/lib/f05"]
        assert src.requests == requests + 2
        assert lay.read_errors == 0


async def test_bytes_that_never_verify_are_eio_and_never_kept(
    tmp_path: Path, layer: BuiltLayer
) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path, prefetch=False) as m:
        lay = await m.lookup(REF, layer.digest)
        await m.flush()
        assert lay.ingest is not None
        before = lay.ingest.present()  # what the lookup fetched (the TOC)
        src.corrupt = True
        requests = src.requests
        with pytest.raises(VerifyError, match="failed verification 3 times"):
            await read_all(lay, "usr/lib/f05")
        assert src.requests == requests + 3
        await m.flush()
        assert lay.ingest.present() == before  # nothing of it reached the download
        src.corrupt = False
        assert await read_all(lay, "usr/lib/f05") == FILES["usr/lib/f05"]


@pytest.mark.parametrize("fmt", ["zstd-chunked", "estargz", "estargz-zstd"])
async def test_info_diff_size_is_the_tar_size(tmp_path: Path, fmt: str) -> None:
    """Both dialects of `info` carry the layer's tar size: zstd:chunked from its tar-split (read
    with the TOC, in the same request), eStargz from its annotation; a restart rebuilds it from
    the cache record without the registry."""
    spec = {**FILES, "usr/share/" + "n" * 140: b"long name"}
    built = make_layer(spec, fmt)
    want = len(decompressed(built.blob))  # what a normal pull counts
    src = FakeSource()
    src.add_image(REF, [built])
    async with running(src, tmp_path) as m:
        layer = await m.lookup(REF, built.toc_digest)
        assert src.requests == 1
        for path in (built.toc_digest, built.digest):
            assert json.loads(info_json(layer.info, path))["diff-size"] == want
    src.fail_all = True
    async with running(src, tmp_path) as m:
        layer = await m.lookup(REF, built.toc_digest)
        assert json.loads(info_json(layer.info, built.toc_digest))["diff-size"] == want


class RangeLog(FakeSource):
    """Remembers every byte range it sends, per blob."""

    sent: list[tuple[str, int, int]]

    def fetch_ranges(
        self, ref: Any, digest: str, ranges: Any, *, deadline: float | None = None
    ) -> list[bytes]:
        got = super().fetch_ranges(ref, digest, ranges, deadline=deadline)
        self.sent = [*getattr(self, "sent", []), *((digest, o, o + n) for o, n in ranges)]
        return got

    def twice(self) -> int:
        """Bytes sent more than once."""
        seen: dict[str, list[tuple[int, int]]] = {}
        dup = 0
        for digest, s, e in self.sent:
            for ps, pe in seen.setdefault(digest, []):
                dup += max(0, min(e, pe) - max(s, ps))
            seen[digest].append((s, e))
        return dup


async def read_blob_file(layer: Layer) -> bytes:
    """The `blob` file read through, as podman save or push reads it (128 KiB reads)."""
    parts = []
    for off in range(0, layer.info.blob_size, 128 * 1024):
        parts.append(await layer.read_blob(off, 128 * 1024))
    return b"".join(parts)


@pytest.mark.parametrize("fmt", ["estargz", "estargz-zstd", "zstd-chunked"])
@pytest.mark.parametrize("background", [False, True])
async def test_every_byte_is_fetched_once(tmp_path: Path, fmt: str, background: bool) -> None:
    """The TOC read, the landmark prefetch, file reads, the background download and reads of
    the `blob` file (podman save) never fetch a byte twice: the blob costs its size, once."""
    built = make_layer(FILES, fmt, chunk_size=64 * 1024, prioritized=["usr/lib/f01"])
    src = RangeLog()
    src.add_image(REF, [built])
    async with running(src, tmp_path, background_fetch=background, background_delay=0) as m:
        layer = await m.lookup(REF, built.toc_digest)
        assert await read_all(layer, "usr/lib/f03") == FILES["usr/lib/f03"]
        assert await read_all(layer, "usr/lib/big") == FILES["usr/lib/big"]
        if background:
            await wait_for(lambda: layer.complete)
        else:
            await wait_for(lambda: src.requests >= 3)  # the landmark prefetch has run
            await m.flush()
        assert await read_blob_file(layer) == built.blob
        await m.flush()
        assert await read_blob_file(layer) == built.blob  # a second save reads the cache
        assert src.twice() == 0, src.sent
        assert src.bytes_sent == len(built.blob)


async def test_reading_whole_files_leaves_no_chunk_in_memory(tmp_path: Path) -> None:
    """Sequential readers (tar, cat, an interpreter reading its modules) leave the memory
    cache empty: the kernel keeps those pages. A file read in part keeps its chunk."""
    data = noise("whole", 300_000)
    layer = make_layer({"f": data, "g": noise("part", 100_000)}, "estargz", chunk_size=64 << 10)
    src = FakeSource()
    src.add_image(REF, [layer])
    async with running(src, tmp_path, readahead_kb=0, prefetch=False) as m:
        lay = await m.lookup(REF, layer.digest)
        f, g = lay.index.lookup("f"), lay.index.lookup("g")
        assert f is not None and g is not None
        for off in range(0, len(data), 128 << 10):  # the kernel's 128 KiB reads
            assert await lay.read(f, off, 128 << 10) == data[off : off + (128 << 10)]
        await m.scheduler.writes_done()
        m.memory.drop_consumed()  # what the next read, put or trim does once written
        assert all(lay.key(c) not in m.memory for c in lay.index.chunks(f))
        assert await lay.read(g, 0, 4096) == noise("part", 100_000)[:4096]
        assert m.memory.bytes > 0
        requests = src.requests
        assert await lay.read(f, 0, len(data)) == data  # from the disk cache, decoded again
        assert src.requests == requests
