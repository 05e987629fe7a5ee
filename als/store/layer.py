"""A layer the store serves: its info and index, reads of its files and of its blob, status.

A :class:`Layer` is shared by every reference and path that reaches it. It holds the layer's
own state; the work is done by the engine's parts it receives in :class:`LayerServices`
(chunk loading, read-ahead, prefetch, background download), which serve every layer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from als.formats import Chunk, LayerIndex
from als.store.background import BackgroundFetcher, BackgroundState
from als.store.cache import Ingest
from als.store.chunks import FOREGROUND, ChunkLoader, Item
from als.store.context import StoreContext
from als.store.ports import LayerInfo
from als.store.prefetch import Prefetcher, ProfileState
from als.store.readahead import ReadAhead, ReadAheadState
from als.store.status import LayerStatus


@dataclass(eq=False)
class LayerServices:
    """The engine's parts a layer works through (one set for the whole store)."""

    ctx: StoreContext
    chunks: ChunkLoader
    readahead: ReadAhead
    prefetcher: Prefetcher
    background: BackgroundFetcher


@dataclass
class Layer:
    """One layer blob, shared by every reference and path that reaches it."""

    info: LayerInfo
    index: LayerIndex
    ref: str  # the reference the blob is fetched through
    services: LayerServices = field(repr=False, compare=False)
    format: str = ""
    refs: list[str] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    instances: int = 0
    last_used: float = field(default_factory=time.monotonic)
    fetched_bytes: int = 0
    read_errors: int = 0
    last_error: str | None = None
    ingest: Ingest | None = None  # our download of the blob, while it is incomplete
    complete: bool = False  # the whole blob is in the disk cache
    background: BackgroundState = BackgroundState.OFF
    profile: ProfileState = field(default_factory=ProfileState)
    bg_scope: trio.CancelScope | None = None
    # The background range being fetched: readers of bytes inside it wait for it instead of
    # fetching the same bytes again.
    bg_piece: tuple[int, int, trio.Event] | None = None
    ra: ReadAheadState = field(default_factory=ReadAheadState)
    # The unpacked tree once the layer is native (als.store.native): overlay reads it directly.
    native: Path | None = None

    @property
    def digest(self) -> str:
        return self.info.blob_digest

    def key(self, c: Chunk) -> str:
        """Memory-cache key: the chunk digest (shared across layers) or its place in the blob."""
        if c.digest is not None:
            return c.digest
        return f"{self.digest}@{c.coffset}+{c.inner}:{c.size}"

    def cached_bytes(self) -> int:
        if self.complete:
            return self.info.blob_size
        return self.ingest.present() if self.ingest is not None else 0

    # -- reads ----------------------------------------------------------------------------------

    async def read(self, entry_id: int, off: int, size: int) -> bytes:
        """Bytes [off, off+size) of a regular file, verified; AlsError on failure."""
        self.last_used = time.monotonic()
        index = self.index
        file_id = index.resolved(entry_id)
        total = index.size(file_id)
        end = min(off + size, total)
        if off >= end:
            return b""
        chunks = index.chunks(file_id)
        if index.whole_file_verify(file_id):
            wanted = list(chunks)
        else:
            wanted = [c for c in chunks if c.uoffset < end and c.uoffset + c.size > off]
        got = await self.get_chunks([(file_id, c) for c in wanted], FOREGROUND)
        if not self.complete:
            ends = [c.cend for c in wanted if not c.zeros]
            if ends:
                self.services.readahead.after_read(self, max(ends))
        parts: list[bytes] = []
        ctx = self.services.ctx
        memory = ctx.memory
        # What a reader had all of leaves memory, if the disk cache holds it: the layer's
        # blob, or its download of ours (which every fetched range goes to).
        local = ctx.disk is not None and (
            self.complete or (self.ingest is not None and self.ingest.owned)
        )
        for c in wanted:
            if c.uoffset >= end or c.uoffset + c.size <= off:
                continue
            key = self.key(c)
            data = got[key]
            lo = max(off - c.uoffset, 0)
            hi = min(end - c.uoffset, c.size)
            parts.append(data[lo:hi] if (lo, hi) != (0, c.size) else data)
            if local:
                memory.served(key, hi - lo)
        return b"".join(parts)

    async def get_chunks(self, items: Sequence[Item], kind: str) -> dict[str, bytes]:
        """The decoded, verified content of ``items``, by key; one fetch per chunk at a time."""
        return await self.services.chunks.get(self, items, kind)

    async def read_blob(self, off: int, size: int) -> bytes:
        """Raw compressed bytes of the blob (the ``blob`` file): local if present, else fetched."""
        self.last_used = time.monotonic()
        end = min(off + size, self.info.blob_size)
        if off >= end:
            return b""
        chunks = self.services.chunks
        if self.services.ctx.disk is not None:
            local = await chunks.read_local(self, off, end)
            if local is not None:
                return local
        return await chunks.fetch_blob(self, off, end)

    # -- prefetch and background download ---------------------------------------------------------

    def note_open(self, entry_id: int) -> None:
        """A reader opened a file: record it while this layer's access profile is being learned."""
        self.services.prefetcher.note_open(self, entry_id)

    async def prefetch(self) -> None:
        """Fetch what readers will want first: the learned profile, then the landmark region."""
        await self.services.prefetcher.prefetch(self)

    async def background_fetch(self) -> None:
        """Download the rest of the blob at low priority; then it is served entirely locally."""
        await self.services.background.run(self)

    def stop_background(self) -> None:
        self.services.background.stop(self)

    # -- status ---------------------------------------------------------------------------------

    def status(self, uses: int) -> LayerStatus:
        cached = self.cached_bytes()
        size = self.info.blob_size
        return {
            "digest": self.digest,
            "toc_digest": self.info.toc_digest,
            "refs": list(self.refs),
            "format": self.format,
            "size": size,
            "cached_bytes": cached,
            "cached_percent": round(100.0 * cached / size, 1) if size else 100.0,
            "complete": self.complete,
            "native": self.native is not None,
            "background": BackgroundState.DONE if self.complete else self.background,
            "uses": uses,
            "entries": len(self.index),
            "fetched_bytes": self.fetched_bytes,
            "read_errors": self.read_errors,
            "last_error": self.last_error,
        }
