"""Read-ahead (als.store.readahead) through LayerManager: a window holds at most half of the
memory cache, so what is read ahead is still in memory when the reader gets there."""

from __future__ import annotations

from pathlib import Path

import trio

from als.store.config import StoreConfig
from als.store.layer import Layer
from als.store.manager import LayerManager
from tests.support.fakesource import FakeSource
from tests.support.layers import make_layer, noise

REF = "registry.test/app:1"
FILE = 64 * 1024


def content(i: int) -> bytes:
    """64 KiB that compress to about 16 KiB (the layer is larger than a lookup reads)."""
    return noise(f"f{i}", 16 * 1024) + bytes(FILE - 16 * 1024)


FILES = {f"f{i:02d}": content(i) for i in range(40)}


async def read(layer: Layer, name: str) -> bytes:
    i = layer.index.lookup(name)
    assert i is not None
    return await layer.read(i, 0, FILE)


async def test_a_window_is_cut_to_half_of_the_memory_cache(tmp_path: Path) -> None:
    layer = make_layer(FILES, "estargz", chunk_size=FILE)
    src = FakeSource()
    src.add_image(REF, [layer])
    cfg = StoreConfig(root=tmp_path, background_fetch=False, prefetch=False, memory_cache_mb=1)
    m = LayerManager(src, cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        lay = await m.lookup(REF, layer.digest)
        # Two misses in blob order: read-ahead starts after the second, with a 512 KiB window
        # of compressed bytes, which holds about 30 files (1.9 MiB decoded).
        assert await read(lay, "f00") == FILES["f00"]
        assert await read(lay, "f01") == FILES["f01"]
        with trio.fail_after(20):
            while lay.ra.running or lay.ra.lo < 0:  # noqa: ASYNC110 - the store's own task
                await trio.sleep(0.01)
        # Cut to 512 KiB decoded (8 files): all of it still in memory next to the two files
        # read, and the next window starts where this one stopped.
        assert m.memory.bytes == 10 * FILE
        f10 = lay.index.lookup("f10")
        assert f10 is not None
        assert lay.ra.next == lay.index.chunks(f10)[0].coffset
        requests, hits = src.requests, m.memory.hits
        for i in range(2, 10):
            assert await read(lay, f"f{i:02d}") == FILES[f"f{i:02d}"]
        assert m.memory.hits - hits == 8
        assert src.requests == requests
        # Reading on keeps read-ahead going: the rest costs a few requests, not one per file.
        for i in range(10, 40):
            assert await read(lay, f"f{i:02d}") == FILES[f"f{i:02d}"]
        assert src.requests - requests <= 15
        nursery.cancel_scope.cancel()
    m.close()
