"""als.store.memory: malloc_trim after bursts of chunk traffic; the memory cache's hook."""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable

import pytest
import trio
import trio.testing

from als.store import memory
from als.store.memcache import ChunkCache
from als.store.memory import MemoryTrimmer, malloc_trim
from tests.support.fakesource import FakeSource
from tests.support.layers import make_layer, noise
from tests.unit.store.helpers import REF, manager


class CountingTrim:
    """A trim function that counts its calls and the threads they ran in."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[int] = set()

    def __call__(self) -> None:
        self.calls += 1
        self.threads.add(threading.get_ident())


async def inline(fn: Callable[[], object]) -> object:
    """Run ``fn`` on the trio thread (tests on trio's virtual clock need no real threads)."""
    return fn()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_releases_free_heap_pages() -> None:
    bufs = [bytearray(20_000) for _ in range(2000)]  # heap, below the mmap threshold
    del bufs[::2]  # 20 MB of holes between live buffers: free() keeps them
    assert malloc_trim() is True
    assert len(bufs) == 1000


def test_malloc_trim_is_a_no_op_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_libc_malloc_trim", lambda: None)  # not glibc
    assert malloc_trim() is False


def test_the_memory_cache_reports_every_chunk_it_is_offered() -> None:
    seen: list[int] = []
    cache = ChunkCache(100, seen.append)
    assert cache.put("a", b"x" * 60)
    assert cache.put("b", b"y" * 60)  # evicts "a"
    assert not cache.put("c", b"z" * 500)  # larger than the cache: not kept, still counted
    assert seen == [60, 60, 500]
    assert "a" not in cache and cache.bytes == 60


async def trims_after(t: MemoryTrimmer, n: int) -> float:
    """Seconds until ``t`` has trimmed ``n`` times."""
    start = trio.current_time()
    with trio.fail_after(60):
        while t.trims < n:  # noqa: ASYNC110 - polled: the trims may run in worker threads
            await trio.sleep(0.01)
    return trio.current_time() - start


async def test_the_trim_runs_in_a_worker_thread() -> None:
    trim = CountingTrim()
    t = MemoryTrimmer(trim, every=100, quiet=60)
    async with trio.open_nursery() as n:
        await n.start(t.run)
        t.note(100)
        await trims_after(t, 1)
        n.cancel_scope.cancel()
    assert trim.calls == 1
    assert threading.get_ident() not in trim.threads


async def test_a_burst_below_the_threshold_is_trimmed_once_it_is_quiet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trim = CountingTrim()
    t = MemoryTrimmer(trim, every=1000, quiet=0.5, in_thread=inline)
    async with trio.open_nursery() as n:
        await n.start(t.run)
        for _ in range(10):
            t.note(10)
            await trio.sleep(0.1)  # still reading: no trim yet
        assert trim.calls == 0
        assert 0.3 <= await trims_after(t, 1) <= 0.6
        assert trim.calls == 1
        assert t.pending == 0
        await trio.sleep(10)  # nothing noted since: no more trims
        assert trim.calls == 1
        n.cancel_scope.cancel()


async def test_heavy_traffic_is_trimmed_without_waiting_for_quiet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trim = CountingTrim()
    t = MemoryTrimmer(trim, every=100, quiet=5.0, in_thread=inline)
    async with trio.open_nursery() as n:
        await n.start(t.run)
        for k in range(1, 4):
            t.note(60)
            t.note(60)  # over ``every``: trimmed at once, never 5 s of quiet in between
            assert await trims_after(t, k) < 1.0
            await trio.sleep(0.5)
        assert trim.calls == 3
        n.cancel_scope.cancel()


async def test_the_manager_counts_chunk_traffic_for_its_trimmer() -> None:
    data = noise("trim", 1 << 20)
    layer = make_layer({"f": data}, "estargz", chunk_size=256 * 1024)
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src)
    lay = await m.lookup(REF, layer.digest)
    f = lay.index.lookup("f")
    assert f is not None
    assert await lay.read(f, 0, len(data)) == data
    assert m.trimmer.pending == len(data)  # four different chunks, each noted once
    assert await lay.read(f, 0, len(data)) == data
    assert m.trimmer.pending == len(data)  # memory cache hits are no traffic


async def test_the_memory_cache_is_emptied_when_reads_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A burst keeps its chunks while it goes on; after ``idle`` quiet seconds the cache is
    emptied and trimmed (a store at rest holds no decoded chunks); new reads fill it again."""
    trim = CountingTrim()
    cache = ChunkCache(1 << 20)
    t = MemoryTrimmer(trim, every=1 << 30, release=cache.clear, idle=10.0, in_thread=inline)
    cache.on_put = t.note
    async with trio.open_nursery() as n:
        await n.start(t.run)
        cache.put("a", b"x" * 1000)
        await trio.sleep(5)  # the end of the burst: trimmed, chunks kept
        assert (trim.calls, t.releases, cache.bytes) == (1, 0, 1000)
        cache.put("b", b"y" * 1000)  # still reading 5 s later: kept
        await trio.sleep(9)
        assert (t.releases, cache.bytes) == (0, 2000)
        await trio.sleep(2)  # 10 s without a read
        assert (t.releases, cache.bytes) == (1, 0)
        assert trim.calls == 3
        await trio.sleep(60)  # at rest: nothing more to do
        assert (t.releases, trim.calls) == (1, 3)
        cache.put("c", b"z" * 1000)
        await trio.sleep(1)
        assert cache.bytes == 1000 and trim.calls == 4
        n.cancel_scope.cancel()


def test_a_chunk_leaves_memory_once_readers_had_all_of_it() -> None:
    writing = [True]
    cache = ChunkCache(10_000, settled=lambda: not writing[0])
    cache.put("a", b"a" * 1000)
    cache.put("b", b"b" * 1000)
    cache.served("a", 600)
    cache.served("a", 400)  # every byte handed out: the page cache has it
    assert "a" in cache  # but its cache write is still on its way
    cache.put("c", b"c" * 1000)
    assert "a" in cache and cache.drop_consumed() == 0
    writing[0] = False  # the writes landed
    cache.put("d", b"d" * 1000)
    assert "a" not in cache and cache.bytes == 3000 and cache.consumed == 1
    cache.served("a", 1000)  # not cached: nothing to do
    cache.served("b", 1000)  # consumed, nothing being written: dropped at once
    assert "b" not in cache and cache.bytes == 2000
    writing[0] = True
    cache.served("c", 1000)
    assert cache.get("c") is not None  # wanted again: no longer consumed
    writing[0] = False
    assert cache.drop_consumed() == 0 and "c" in cache
    cache.served("c", 999)
    assert "c" in cache
    cache.put("e", b"e" * 8500)  # evicts c and d, and forgets what of c was served
    cache.put("c", b"c" * 300)
    cache.served("c", 299)
    assert "c" in cache
