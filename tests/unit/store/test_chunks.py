"""Chunk reads without FUSE (als.store.chunks through Layer.read): single-flight fetches,
and the coalescing of the ranges fetched."""

from __future__ import annotations

import pytest
import trio

from als.ranges import merge as merge_ranges
from tests.support.fakesource import FakeSource
from tests.support.layers import BuiltLayer
from tests.unit.store.helpers import BIG, REF, big_and_small_layer, manager


@pytest.fixture
def layer() -> BuiltLayer:
    return big_and_small_layer()


async def test_concurrent_reads_fetch_each_chunk_once(layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src)
    lay = await m.lookup(REF, layer.digest)
    big = lay.index.lookup("a/big")
    assert big is not None
    before = src.requests
    results: list[bytes] = []

    async def read() -> None:
        results.append(await lay.read(big, 300_000, 4096))

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(read)
    assert results == [BIG[300_000:304_096]] * 20
    assert src.requests - before == 1
    assert await lay.read(big, 0, len(BIG) + 10) == BIG
    assert await lay.read(big, len(BIG), 10) == b""


def test_merge_ranges_with_a_gap() -> None:
    assert merge_ranges([(10, 20), (0, 5), (25, 30)], 5) == [(0, 30)]
    assert merge_ranges([(0, 5), (100, 110)], 10) == [(0, 5), (100, 110)]
    assert merge_ranges([(0, 50), (10, 20)], 0) == [(0, 50)]
    assert merge_ranges([], 10) == []


async def test_waiters_get_the_bytes_even_when_the_memory_cache_cannot_hold_them(
    layer: BuiltLayer,
) -> None:
    """Readers waiting on another reader's fetch take its bytes from the fetch itself: with no
    memory cache (or one smaller than what they share) they neither fetch again nor give up
    (the chaos run once saw EIO here with nothing failed)."""
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src, memory_cache_mb=0, readahead_kb=0, prefetch=False)
    lay = await m.lookup(REF, layer.digest)
    big = lay.index.lookup("a/big")
    assert big is not None
    before = src.requests
    results: list[bytes] = []

    async def read() -> None:
        results.append(await lay.read(big, 0, len(BIG)))

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(read)
    assert results == [BIG] * 8
    assert src.requests - before == 1  # one fetch, shared by all eight
