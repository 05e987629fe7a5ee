"""Read-ahead: a reader walking a blob in order gets the next bytes fetched before it asks.

Misses (foreground fetches from the registry) that continue the previous one look like a
reader walking the blob in order (tar, cp -r, a large file read through); then the next
window is fetched, in windows that double up to ``readahead_kb``. A random access resets that.

What is read ahead waits for its reader in the memory cache, so a window holds at most half
of the memory cache in decoded bytes: a larger one would push its own first chunks out before
the reader gets there, and they would be decoded again from disk (or fetched again).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from als.errors import AlsError
from als.store.chunks import READAHEAD, ChunkLoader, Item
from als.store.context import StoreContext

if TYPE_CHECKING:
    from als.formats import LayerIndex
    from als.store.layer import Layer

log = logging.getLogger(__name__)

_SEQUENTIAL_GAP = 256 << 10  # a miss this close after the previous one looks sequential
_READAHEAD_FIRST = 512 << 10  # the first read-ahead window (it doubles up to readahead_kb)

#: The files by the blob offset of their first chunk: (first chunk offsets, file ids).
FileOrder = tuple[list[int], list[int]]


@dataclass
class ReadAheadState:
    """One layer's read-ahead: the window last asked for, [lo, next), whether a read-ahead
    task is running, and the files in blob order (built once)."""

    lo: int = -1
    next: int = -1
    running: bool = False
    window: int = 0
    last_miss_end: int = -1
    order: FileOrder | None = None


class ReadAhead:
    def __init__(self, ctx: StoreContext, loader: ChunkLoader) -> None:
        self._ctx = ctx
        self._loader = loader

    def after_miss(self, layer: Layer, start: int, end: int) -> None:
        """A reader had to fetch blob bytes [start, end). If that continues the previous miss,
        read ahead; a random access resets the window."""
        ra = layer.ra
        prev = ra.last_miss_end
        ra.last_miss_end = end
        if prev >= 0 and 0 <= start - prev <= _SEQUENTIAL_GAP:
            self._readahead_from(layer, end)
        else:
            ra.window = 0

    def after_read(self, layer: Layer, cend: int) -> None:
        """A reader got bytes ending at blob offset ``cend``: keep the read-ahead going while it
        reads inside the last window (the next window starts when half of it is behind)."""
        ra = layer.ra
        lo, nxt = ra.lo, ra.next
        if ra.window and lo <= cend <= nxt and nxt - cend < ra.window // 2:
            self._readahead_from(layer, nxt)

    def _readahead_from(self, layer: Layer, start: int) -> None:
        ra = layer.ra
        limit = self._ctx.cfg.readahead_kb * 1024
        if limit <= 0 or layer.complete or ra.running or start >= layer.info.blob_size:
            return
        window = ra.window = min(max(2 * ra.window, _READAHEAD_FIRST), limit)
        ra.running = True
        ra.lo, ra.next = start, start + window
        self._ctx.scheduler.spawn(partial(self._readahead, layer, start, start + window))

    async def _readahead(self, layer: Layer, start: int, end: int) -> None:
        ra = layer.ra
        try:
            items, ra.order, stop = await self._ctx.scheduler.cpu_call(
                partial(self._items_between, layer, ra.order, start, end)
            )
            if stop < end and ra.lo == start:
                # Cut to what the memory cache can hold: the next window starts there.
                ra.next = stop
                ra.window = max(stop - start, 1)
            if items:
                await self._loader.get(layer, items, READAHEAD)
        except AlsError as exc:
            log.debug("readahead-failed layer=%s bytes=%d-%d: %s", layer.digest, start, end, exc)
        finally:
            ra.running = False

    def _items_between(
        self, layer: Layer, order: FileOrder | None, start: int, end: int
    ) -> tuple[list[Item], FileOrder, int]:
        """The chunks stored in blob bytes [start, end), skipping what the memory cache has and
        files verified as a whole that do not fit (their chunks only come all together); the
        file order (built here the first time); and where the window really ends: before
        ``end`` if its chunks would fill more than half of the memory cache (the first file's
        chunks are always taken). Runs in a cpu thread."""
        index = layer.index
        if order is None:
            order = _file_order(index)
        firsts, fids = order
        memory = self._ctx.memory
        budget = memory.max_bytes // 2
        held = 0
        items: list[Item] = []
        k = max(bisect_right(firsts, start) - 1, 0)
        while k < len(fids) and firsts[k] < end:
            fid = fids[k]
            k += 1
            chunks = index.chunks(fid)
            if index.whole_file_verify(fid):
                if chunks[0].coffset < start or chunks[-1].cend > end:
                    continue
                size = sum(c.size for c in chunks)
                if items and held + size > budget:
                    return items, order, max(chunks[0].coffset, start + 1)
                items.extend((fid, c) for c in chunks)
                held += size
                continue
            for c in chunks:
                if c.coffset >= end:
                    break
                if c.coffset >= start and not c.zeros and layer.key(c) not in memory:
                    if items and held + c.size > budget:
                        return items, order, max(c.coffset, start + 1)
                    items.append((fid, c))
                    held += c.size
        return items, order, end


def _file_order(index: LayerIndex) -> FileOrder:
    fids = index.files_in_order()
    return [index.chunks(f)[0].coffset for f in fids], fids
