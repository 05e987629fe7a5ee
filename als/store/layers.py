"""Layers the store serves: resolution (ref + digest -> verified index), reads, and the cache.

Everything here is async (trio) and free of pyfuse3; blocking work runs in worker threads
behind the named limiters of :class:`Limiters`: ``net`` (registry calls for reads and
lookups), ``background`` (whole-blob downloads), ``cpu`` (inflate, hashing) and ``disk``
(the on-disk cache).

A chunk a reader needs is looked for, in order: in memory, in the disk cache by its digest
(shared by every layer and image), in the local compressed blob (complete, or the ranges of a
download in progress), and last in the registry. Whatever comes from the registry is verified
before use, then kept at every level.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from als import __version__
from als.errors import AlsError, FormatError, NotFound, NotLazy, RegistryError, VerifyError
from als.formats import Chunk, EntryType, LayerIndex, decode_chunk, load_index, verify_file
from als.oci import ANN_UNCOMPRESSED_SIZE, toc_digest_of
from als.ranges import merge as merge_spans
from als.registry.types import LayerDescriptor
from als.store.cache import DiskCache, Ingest, LayerRecord
from als.store.config import StoreConfig
from als.store.fs.protocol import LayerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

_PREFETCH_BATCH = 8 << 20  # compressed bytes per prefetch step
_PREFETCH_GAP = 1 << 20  # prefetch reads through gaps this small: fewer, larger requests
_BACKGROUND_RETRY_MAX = 60.0
_SEQUENTIAL_GAP = 256 << 10  # a miss this close after the previous one looks sequential
_READAHEAD_FIRST = 512 << 10  # the first read-ahead window (it doubles up to readahead_kb)
_VERIFY_ATTEMPTS = 3  # fetches of bytes that fail verification before a read gets EIO
_MAX_NEGATIVE = 4096  # failed lookups remembered for negative_ttl
_MAX_HOMES = 200_000  # chunk digests remembered in LayerManager.homes (about 40 MB at most)


# ----------------------------------------------------------------------------------------------
# What the store needs from a registry client (als.registry.RegistryClient satisfies it;
# tests use an in-process fake).


class ResolvedImageLike(Protocol):
    @property
    def layers(self) -> Sequence[LayerDescriptor]: ...


class Source(Protocol):
    def resolve(
        self, ref: Any, *, platform: str | None = None, deadline: float | None = None
    ) -> ResolvedImageLike: ...

    def fetch_ranges(
        self,
        ref: Any,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        deadline: float | None = None,
    ) -> list[bytes]: ...


class MetricsSink(Protocol):
    def observe_fetch(self, kind: str, seconds: float, nbytes: int) -> None: ...

    def observe_read(self, seconds: float) -> None: ...


class Limiters:
    """The named thread limiters."""

    def __init__(self, net: int, cpu: int, disk: int = 4, background: int = 2) -> None:
        self.net = trio.CapacityLimiter(net)
        self.cpu = trio.CapacityLimiter(cpu)
        self.disk = trio.CapacityLimiter(disk)
        self.background = trio.CapacityLimiter(max(background, 1))

    async def net_call(self, fn: Callable[[], T]) -> T:
        # abandon_on_cancel: a lookup that runs out of time answers ENOENT at once; the thread
        # finishes (bounded by its own deadline) in the background.
        return await trio.to_thread.run_sync(fn, limiter=self.net, abandon_on_cancel=True)

    async def background_call(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.background, abandon_on_cancel=True)

    async def cpu_call(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.cpu)

    async def disk_call(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.disk)


# ----------------------------------------------------------------------------------------------


class ChunkCache:
    """A bounded LRU of decompressed, verified chunks in memory, by bytes held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        data = self._data.get(key)
        if data is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return data

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def put(self, key: str, data: bytes) -> bool:
        """Keep ``data``; False if it is larger than the whole cache (then it is not kept)."""
        if len(data) > self.max_bytes:
            return False
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._data[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self.bytes -= len(evicted)
        return True


Item = tuple[int, Chunk]  # (file id, chunk)


class _ReplayMiss(Exception):
    """The recorded TOC bytes do not hold a range the parser asked for."""


def _recording(
    read: Callable[[Sequence[tuple[int, int]]], list[bytes]], pieces: list[tuple[int, bytes]]
) -> Callable[[Sequence[tuple[int, int]]], list[bytes]]:
    def rec(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        got = read(ranges)
        pieces.extend((off, data) for (off, _), data in zip(ranges, got, strict=True))
        return got

    return rec


def _replaying(
    pieces: list[tuple[int, bytes]],
) -> Callable[[Sequence[tuple[int, int]]], list[bytes]]:
    def replay(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out: list[bytes] = []
        for off, n in ranges:
            for poff, data in pieces:
                if poff <= off and off + n <= poff + len(data):
                    out.append(data[off - poff : off - poff + n])
                    break
            else:
                raise _ReplayMiss(f"{off}+{n}")
        return out

    return replay


@dataclass
class Layer:
    """One layer blob, shared by every reference and path that reaches it."""

    info: LayerInfo
    index: LayerIndex
    ref: str  # the reference the blob is fetched through
    manager: LayerManager
    format: str = ""
    refs: list[str] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    instances: int = 0
    last_used: float = field(default_factory=time.monotonic)
    fetched_bytes: int = 0
    read_errors: int = 0
    last_error: str | None = None
    ingest: Ingest | None = None
    complete: bool = False
    background: str = "off"
    has_profile: bool = False
    _profile: dict[str, None] | None = None
    _bg_scope: trio.CancelScope | None = None
    # The background range being fetched: readers of bytes inside it wait for it instead of
    # fetching the same bytes again.
    _bg_piece: tuple[int, int, trio.Event] | None = None
    # Read-ahead (see _after_read): the window last asked for, [lo, next), whether a read-ahead
    # task is running, and the files by the blob offset of their first chunk (built once).
    _ra_lo: int = -1
    _ra_next: int = -1
    _ra_running: bool = False
    _ra_window: int = 0
    _last_miss_end: int = -1
    _ra_order: tuple[list[int], list[int]] | None = None

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
        got = await self.get_chunks([(file_id, c) for c in wanted], "foreground")
        if not self.complete:
            ends = [c.cend for c in wanted if not c.zeros]
            if ends:
                self._after_read(max(ends))
        parts: list[bytes] = []
        for c in wanted:
            if c.uoffset >= end or c.uoffset + c.size <= off:
                continue
            data = got[self.key(c)]
            lo = max(off - c.uoffset, 0)
            hi = min(end - c.uoffset, c.size)
            parts.append(data[lo:hi] if (lo, hi) != (0, c.size) else data)
        return b"".join(parts)

    async def get_chunks(self, items: Sequence[Item], kind: str) -> dict[str, bytes]:
        """The decoded, verified content of ``items``, by key; one fetch per chunk at a time."""
        m = self.manager
        got: dict[str, bytes] = {}
        for _attempt in range(3):
            todo: dict[str, Item] = {}
            waits: list[trio.Event] = []
            for fid, c in items:
                k = self.key(c)
                if k in got or k in todo:
                    continue
                data = m.memory.get(k)
                if data is not None:
                    got[k] = data
                elif (ev := m.inflight.get(k)) is not None:
                    waits.append(ev)
                else:
                    todo[k] = (fid, c)
            if todo:
                got.update(await self._load(list(todo.values()), kind))
            for ev in waits:
                await ev.wait()
            if all(self.key(c) in got for _, c in items):
                return got
            if not waits:
                break
        # Waited for another task's fetch, which failed: the caller gets EIO; the next read retries.
        raise RegistryError(f"layer {self.digest}: content not available (an earlier fetch failed)")

    async def _load(self, items: list[Item], kind: str) -> dict[str, bytes]:
        m = self.manager
        index = self.index
        # A file verified as a whole needs all its chunks, from one source.
        whole = {fid for fid in {f for f, _ in items} if index.whole_file_verify(fid)}
        if whole:
            seen = {self.key(c) for _, c in items}
            for fid in whole:
                for c in index.chunks(fid):
                    if self.key(c) not in seen:
                        items.append((fid, c))
                        seen.add(self.key(c))
        events = {self.key(c): trio.Event() for _, c in items}
        for k, ev in events.items():
            m.inflight.setdefault(k, ev)
        try:
            return await self._load_unlocked(items, whole, kind)
        except AlsError as exc:
            self.read_errors += kind == "foreground"
            self.last_error = str(exc)
            paths = sorted({index.path(fid) for fid, _ in items})
            shown = ", ".join(paths[:3]) + (f" (+{len(paths) - 3})" if len(paths) > 3 else "")
            log.error(
                "read-failed layer=%s kind=%s path=%s error=%s", self.digest, kind, shown, exc
            )
            raise
        finally:
            for k, ev in events.items():
                if m.inflight.get(k) is ev:
                    del m.inflight[k]
                ev.set()

    async def _load_unlocked(
        self, items: list[Item], whole: set[int], kind: str
    ) -> dict[str, bytes]:
        m = self.manager
        out: dict[str, bytes] = {}
        cache = m.disk
        piece = self._bg_piece
        if piece is not None and any(
            c.coffset < piece[1] and c.cend > piece[0] for _, c in items if not c.zeros
        ):
            await piece[2].wait()
        # 1. The disk cache (by chunk digest) and the local compressed bytes.
        local: dict[str, bytes] = {}
        if cache is not None and self._maybe_local(items, whole):

            def from_disk() -> None:
                for fid, c in items:
                    if c.zeros:
                        continue
                    k = self.key(c)
                    if c.digest is not None and fid not in whole:
                        data = None
                        if cache.has_chunk(c.digest):
                            data = cache.get_chunk(c.digest)
                        elif (home := m.homes.get(c.digest)) is not None:
                            data = self._from_home(home)
                        if data is not None and len(data) == c.size:
                            out[k] = data
                            continue
                    raw = self._read_local(c.coffset, c.cend)
                    if raw is not None:
                        local[k] = raw

            await m.limiters.disk_call(from_disk)
        pending = [(fid, c) for fid, c in items if self.key(c) not in out]
        # Whole-file-verified files use local bytes only if all their chunks are local.
        whole_local = set()
        for fid in whole:
            if any(f == fid and not c.zeros and self.key(c) not in local for f, c in pending):
                for f, c in pending:
                    if f == fid:
                        local.pop(self.key(c), None)
            else:
                whole_local.add(fid)
        # 2. Decode what is local; bytes that fail go back to the registry list.
        if local:
            from_local = [
                (f, c)
                for f, c in pending
                if self.key(c) in local or (c.zeros and (f not in whole or f in whole_local))
            ]
            decoded, bad = await self._decode(from_local, local, whole)
            out.update(decoded)
            if bad:
                await m.limiters.disk_call(lambda: self._forget_local(bad))
            pending = [(fid, c) for fid, c in items if self.key(c) not in out]
        # 3. The registry.
        fetched_spans: list[tuple[int, bytes]] = []
        if pending:
            fetched_spans = await self._fetch_verified(pending, whole, kind, out)
        for k, data in out.items():
            m.memory.put(k, data)
        # 4. Keep what is new on disk (after the reader has its bytes): the compressed bytes go
        # to our own download, and its chunks are then found through m.homes; decompressed
        # chunk files are written only when there is no download of ours to hold them.
        if cache is not None:
            own = self.ingest is not None and self.ingest.owned and not self.complete
            fresh = [
                (c.digest, c)
                for fid, c in pending
                if c.digest is not None and not c.zeros and fid not in whole
            ]
            to_store: list[tuple[str, bytes]] = []
            if own:
                me = weakref.ref(self)
                homes = m.homes
                for d, c in fresh:
                    homes[d] = (me, c)
                    homes.move_to_end(d)
                while len(homes) > _MAX_HOMES:
                    homes.popitem(last=False)
            else:
                to_store = [(d, out[self.key(c)]) for d, c in fresh]
            if to_store or fetched_spans:
                m.spawn_disk_write(lambda: self._store(to_store, fetched_spans))
        return out

    async def _fetch_verified(
        self, pending: list[Item], whole: set[int], kind: str, out: dict[str, bytes]
    ) -> list[tuple[int, bytes]]:
        """Fetch ``pending`` from the registry into ``out``, verified. Bytes that fail
        verification (a registry or network that corrupted them) are fetched again, up to
        _VERIFY_ATTEMPTS times within the read timeout; they are never kept. Returns the
        fetched spans that hold only verified chunks (for the download)."""
        index = self.index
        deadline = time.monotonic() + self.manager.cfg.read_timeout
        spans_ok: list[tuple[int, bytes]] = []
        todo = pending
        for attempt in range(1, _VERIFY_ATTEMPTS + 1):
            raw, spans = await self._fetch(todo, kind)
            decoded, bad = await self._decode(todo, raw, whole)
            # A file verified as a whole is fetched again as a whole.
            bad_files = {fid for fid, _ in bad if fid in whole}
            if bad_files:
                for fid in bad_files:
                    for c in index.chunks(fid):
                        decoded.pop(self.key(c), None)
                bad = [(fid, c) for fid, c in todo if self.key(c) not in decoded]
            out.update(decoded)
            ranges = [(c.coffset, c.cend) for _, c in bad if not c.zeros]
            spans_ok += [
                (s, d) for s, d in spans if not any(b < s + len(d) and e > s for b, e in ranges)
            ]
            if not bad:
                return spans_ok
            fid, c = bad[0]
            what = f"layer {self.digest}: {index.path(fid)}: chunk at {c.coffset}"
            if attempt == _VERIFY_ATTEMPTS or time.monotonic() >= deadline:
                raise VerifyError(
                    f"{what} failed verification {attempt} times; the registry keeps sending "
                    "bytes that do not match the layer's TOC"
                )
            log.warning(
                "refetch layer=%s kind=%s chunks=%d attempt=%d: %s failed verification",
                self.digest,
                kind,
                len(bad),
                attempt,
                what,
            )
            todo = bad
        return spans_ok  # not reached

    def _maybe_local(self, items: list[Item], whole: set[int]) -> bool:
        """Cheap check (no I/O): might the disk hold any of ``items``?"""
        m = self.manager
        disk = m.disk
        if self.complete:
            return True
        ingest = self.ingest
        if ingest is not None and ingest.ranges:
            return True
        return disk is not None and any(
            c.digest is not None
            and fid not in whole
            and (disk.has_chunk(c.digest) or c.digest in m.homes)
            for fid, c in items
        )

    def _from_home(self, home: tuple[weakref.ref[Layer], Chunk]) -> bytes | None:
        """A chunk with the same digest, decoded (and verified) from another layer's download."""
        layer, c = home[0](), home[1]
        if layer is None or layer is self:
            return None
        raw = layer._read_local(c.coffset, c.cend)
        if raw is None:
            return None
        try:
            return decode_chunk(layer.index, c, raw)
        except (FormatError, VerifyError) as exc:
            log.warning("cache-corrupt layer=%s: %s; fetching again", layer.digest, exc)
            return None

    def _read_local(self, start: int, end: int) -> bytes | None:
        m = self.manager
        if self.complete and m.disk is not None:
            data = m.disk.read_blob(self.digest, start, end - start)
            if data is None and not m.disk.has_blob(self.digest):
                self.complete = False  # evicted: reads go to the registry again
            return data
        if self.ingest is not None:
            return self.ingest.read(start, end - start)
        return None

    def _forget_local(self, bad: list[Item]) -> None:
        m = self.manager
        if self.complete and m.disk is not None:
            m.disk.discard_blob(self.digest, "a chunk read from it failed verification")
            self.complete = False
            return
        if self.ingest is not None:
            if m.disk is not None:
                m.disk.corrupt += 1
            for _, c in bad:
                log.warning(
                    "cache-corrupt layer=%s: downloaded bytes %d-%d failed verification; "
                    "fetching them again",
                    self.digest,
                    c.coffset,
                    c.cend,
                )
                self.ingest.forget(c.coffset, c.cend)

    def _store(self, chunks: list[tuple[str, bytes]], spans: list[tuple[int, bytes]]) -> None:
        m = self.manager
        assert m.disk is not None
        for digest, data in chunks:
            if not m.disk.put_chunk(digest, data):
                break
        if self.ingest is not None and self.ingest.owned and not self.complete:
            for off, data in spans:
                self.ingest.write(off, data)

    async def _fetch(self, pending: list[Item], kind: str) -> tuple[dict[str, bytes], list[Any]]:
        m = self.manager
        need = [c for _, c in pending if not c.zeros]
        gap = _PREFETCH_GAP if kind in ("prefetch", "readahead") else m.cfg.coalesce_gap
        spans = merge_spans([(c.coffset, c.cend) for c in need], gap)
        if not spans:
            return {}, []
        deadline = time.monotonic() + m.cfg.read_timeout
        ranges = [(s, e - s) for s, e in spans]
        ref, digest = self.ref, self.digest

        def fetch() -> list[bytes]:
            return m.source.fetch_ranges(ref, digest, ranges, deadline=deadline)

        start = time.monotonic()
        async with m.foreground():
            with trio.fail_after(m.cfg.read_timeout + 5):
                blobs = await m.limiters.net_call(fetch)
        n = sum(len(b) for b in blobs)
        self.fetched_bytes += n
        m.fetched_bytes += n
        if m.metrics is not None:
            m.metrics.observe_fetch(kind, time.monotonic() - start, n)
        if kind == "foreground":
            self._after_miss(spans[0][0], spans[-1][1])
        raw: dict[str, bytes] = {}
        for c in need:
            for (s, e), data in zip(spans, blobs, strict=True):
                if s <= c.coffset and c.cend <= e:
                    raw[self.key(c)] = data[c.coffset - s : c.cend - s]
                    break
        return raw, [(s, data) for (s, _), data in zip(spans, blobs, strict=True)]

    # -- read-ahead -----------------------------------------------------------------------------

    def _after_miss(self, start: int, end: int) -> None:
        """A reader had to fetch blob bytes [start, end). If that continues the previous miss
        (a reader walking the blob in order: tar, cp -r, a large file read through), read
        ahead, in windows that double up to ``readahead_kb``; a random access resets that."""
        prev = self._last_miss_end
        self._last_miss_end = end
        if prev >= 0 and 0 <= start - prev <= _SEQUENTIAL_GAP:
            self._readahead_from(end)
        else:
            self._ra_window = 0

    def _after_read(self, cend: int) -> None:
        """A reader got bytes ending at blob offset ``cend``: keep the read-ahead going while it
        reads inside the last window (the next window starts when half of it is behind)."""
        lo, nxt = self._ra_lo, self._ra_next
        if self._ra_window and lo <= cend <= nxt and nxt - cend < self._ra_window // 2:
            self._readahead_from(nxt)

    def _readahead_from(self, start: int) -> None:
        m = self.manager
        limit = m.cfg.readahead_kb * 1024
        if limit <= 0 or self.complete or self._ra_running or start >= self.info.blob_size:
            return
        window = self._ra_window = min(max(2 * self._ra_window, _READAHEAD_FIRST), limit)
        self._ra_running = True
        self._ra_lo, self._ra_next = start, start + window
        m.spawn(partial(self._readahead, start, start + window))

    async def _readahead(self, start: int, end: int) -> None:
        m = self.manager
        try:
            items = await m.limiters.cpu_call(partial(self._items_between, start, end))
            if items:
                await self.get_chunks(items, "readahead")
        except AlsError as exc:
            log.debug("readahead-failed layer=%s bytes=%d-%d: %s", self.digest, start, end, exc)
        finally:
            self._ra_running = False

    def _items_between(self, start: int, end: int) -> list[Item]:
        """The chunks stored in blob bytes [start, end), skipping what the memory cache has and
        files verified as a whole that do not fit (their chunks only come all together)."""
        index = self.index
        if self._ra_order is None:
            fids = index.files_in_order()
            firsts = [index.chunks(f)[0].coffset for f in fids]
            self._ra_order = (firsts, fids)
        firsts, fids = self._ra_order
        memory = self.manager.memory
        items: list[Item] = []
        k = max(bisect_right(firsts, start) - 1, 0)
        while k < len(fids) and firsts[k] < end:
            fid = fids[k]
            k += 1
            chunks = index.chunks(fid)
            if index.whole_file_verify(fid):
                if chunks[0].coffset < start or chunks[-1].cend > end:
                    continue
                items.extend((fid, c) for c in chunks)
                continue
            for c in chunks:
                if c.coffset >= end:
                    break
                if c.coffset >= start and not c.zeros and self.key(c) not in memory:
                    items.append((fid, c))
        return items

    async def _decode(
        self, items: list[Item], raw: dict[str, bytes], whole: set[int]
    ) -> tuple[dict[str, bytes], list[Item]]:
        """Decode and verify; returns the good chunks by key, and the items that failed."""
        index = self.index
        layer = self.digest

        def work() -> tuple[dict[str, bytes], list[Item]]:
            good: dict[str, bytes] = {}
            bad: list[Item] = []
            for fid, c in items:
                k = self.key(c)
                try:
                    good[k] = decode_chunk(index, c, raw.get(k, b""), path=index.path(fid))
                except (FormatError, VerifyError) as exc:
                    log.warning("verify-failed layer=%s: %s", layer, exc)
                    bad.append((fid, c))
            for fid in whole:
                chunks = list(index.chunks(fid))
                if not all(self.key(c) in good for c in chunks) or not any(
                    f == fid for f, _ in items
                ):
                    continue
                try:
                    verify_file(index, fid, b"".join(good[self.key(c)] for c in chunks))
                except VerifyError as exc:
                    log.warning("verify-failed layer=%s: %s", layer, exc)
                    for c in chunks:
                        good.pop(self.key(c), None)
                        bad.append((fid, c))
            return good, bad

        return await self.manager.limiters.cpu_call(work)

    async def read_blob(self, off: int, size: int) -> bytes:
        """Raw compressed bytes of the blob (the ``blob`` file): local if present, else fetched."""
        self.last_used = time.monotonic()
        end = min(off + size, self.info.blob_size)
        if off >= end:
            return b""
        m = self.manager
        if m.disk is not None:
            local = await m.limiters.disk_call(lambda: self._read_local(off, end))
            if local is not None:
                return local
        deadline = time.monotonic() + m.cfg.read_timeout
        ref, digest = self.ref, self.digest

        def fetch() -> list[bytes]:
            return m.source.fetch_ranges(ref, digest, [(off, end - off)], deadline=deadline)

        async with m.foreground():
            with trio.fail_after(m.cfg.read_timeout + 5):
                (data,) = await m.limiters.net_call(fetch)
        self.fetched_bytes += len(data)
        m.fetched_bytes += len(data)
        return data

    # -- learned prefetch -----------------------------------------------------------------------

    def note_open(self, entry_id: int) -> None:
        """A reader opened a file: record it while this layer's access profile is being learned."""
        m = self.manager
        if self.has_profile or m.disk is None or m.cfg.profile_window <= 0:
            return
        if self._profile is None:
            self._profile = {}
            m.spawn(self._save_profile_later)
        if len(self._profile) < 100_000:
            self._profile.setdefault(self.index.path(self.index.resolved(entry_id)), None)

    async def _save_profile_later(self) -> None:
        m = self.manager
        await trio.sleep(m.cfg.profile_window)
        files = list(self._profile or {})
        self.has_profile = True
        self._profile = None
        if files and m.disk is not None:
            disk = m.disk
            await m.limiters.disk_call(lambda: disk.save_profile(self.digest, files))
            log.info("profile-saved layer=%s files=%d", self.digest, len(files))

    async def prefetch(self) -> None:
        """Fetch what readers will want first: the learned profile, then the landmark region."""
        m = self.manager
        if self.complete or not m.cfg.prefetch:
            return
        index = self.index
        profile: list[str] = []
        if m.disk is not None:
            disk = m.disk
            profile = await m.limiters.disk_call(lambda: disk.load_profile(self.digest))
            self.has_profile = bool(profile)

        def plan() -> list[int]:
            order: dict[int, None] = {}
            for path in profile:
                i = index.lookup(path)
                if i is not None and index.type(i) in (EntryType.REG, EntryType.HARDLINK):
                    order.setdefault(index.resolved(i), None)
            end = index.prefetch_end
            if end and not index.no_prefetch:
                for i in index.files_in_order(end):
                    order.setdefault(i, None)
            return list(order)

        files = await m.limiters.cpu_call(plan)
        if not files:
            return
        start = time.monotonic()
        fetched0 = self.fetched_bytes
        batch: list[Item] = []
        size = 0
        try:
            for fid in files:
                for c in index.chunks(fid):
                    batch.append((fid, c))
                    size += c.cend - c.coffset
                if size >= _PREFETCH_BATCH:
                    await self.get_chunks(batch, "prefetch")
                    batch, size = [], 0
            if batch:
                await self.get_chunks(batch, "prefetch")
        except AlsError as exc:
            log.warning("prefetch-failed layer=%s: %s", self.digest, exc)
            return
        log.info(
            "prefetch-done layer=%s files=%d profile=%d fetched=%d ms=%d",
            self.digest,
            len(files),
            len(profile),
            self.fetched_bytes - fetched0,
            (time.monotonic() - start) * 1000,
        )

    # -- background fetch -----------------------------------------------------------------------

    async def background_fetch(self) -> None:
        """Download the rest of the blob at low priority; then it is served entirely locally."""
        m = self.manager
        cfg = m.cfg
        ingest = self.ingest
        if self.complete or ingest is None or m.disk is None or not cfg.background_fetch:
            return
        if not ingest.owned:
            self.background = "off"
            log.info("background-skip layer=%s: another process downloads it", self.digest)
            return
        disk = m.disk
        if disk.limit and self.info.blob_size > disk.limit // 2:
            self.background = "off"
            log.warning(
                "background-skip layer=%s: %d bytes is more than half the cache limit",
                self.digest,
                self.info.blob_size,
            )
            return
        with trio.CancelScope() as scope:
            self._bg_scope = scope
            self.background = "waiting"
            await trio.sleep(cfg.background_delay)
            await self._background_loop(ingest)

    async def _background_loop(self, ingest: Ingest) -> None:
        m = self.manager
        cfg = m.cfg
        disk = m.disk
        assert disk is not None
        piece = max(cfg.background_range_kb, 64) * 1024
        failures = 0
        start = time.monotonic()
        fetched0 = self.fetched_bytes
        while True:
            await m.writes_done()  # ranges readers fetched are recorded before we look
            missing = ingest.missing()
            if not missing:
                break
            s, e = missing[0]
            e = min(e, s + piece)
            if m.busy:
                self.background = "paused"
                await m.wait_idle()
            if disk.limit and disk.total + (e - s) > disk.limit:
                await m.evict()
                if disk.total + (e - s) > disk.limit:
                    self.background = "off"
                    self.last_error = "cache limit reached: background fetch stopped"
                    log.warning(
                        "background-stopped layer=%s: the cache limit (%d bytes) is reached",
                        self.digest,
                        disk.limit,
                    )
                    return
            self.background = "running"
            deadline = time.monotonic() + cfg.read_timeout
            ref = self.ref

            def fetch(
                s: int = s, e: int = e, deadline: float = deadline, ref: str = ref
            ) -> list[bytes]:
                return m.source.fetch_ranges(ref, self.digest, [(s, e - s)], deadline=deadline)

            t0 = time.monotonic()
            try:
                data = await self._background_piece(fetch, s, e, ingest)
            except (AlsError, trio.TooSlowError) as exc:
                failures += 1
                delay = min(2.0**failures, _BACKGROUND_RETRY_MAX)
                self.last_error = f"background fetch: {exc or 'timed out'}"
                self.background = "waiting"
                log.warning("background-retry layer=%s in=%.0fs error=%s", self.digest, delay, exc)
                await trio.sleep(delay)
                continue
            failures = 0
            dt = time.monotonic() - t0
            if data is None:
                self.background = "off"
                log.warning("background-stopped layer=%s: the cache cannot be written", self.digest)
                return
            m.after_write()
            if cfg.background_bandwidth_mb > 0:
                await trio.sleep(max(len(data) / (cfg.background_bandwidth_mb * 1e6) - dt, 0))
        ok = await m.limiters.cpu_call(lambda: ingest.finish(self.digest))
        if ok:
            self.complete = True
            self.ingest = None
            self.background = "done"
            self.last_error = None
            log.info(
                "layer-complete layer=%s bytes=%d fetched=%d seconds=%.1f",
                self.digest,
                self.info.blob_size,
                self.fetched_bytes - fetched0,
                time.monotonic() - start,
            )
        else:
            self.background = "failed"
            self.last_error = "the downloaded blob did not match its digest"

    async def _background_piece(
        self, fetch: Callable[[], list[bytes]], s: int, e: int, ingest: Ingest
    ) -> bytes | None:
        """Fetch [s, e) and record it; None if the cache cannot be written."""
        m = self.manager
        ev = trio.Event()
        self._bg_piece = (s, e, ev)
        try:
            t0 = time.monotonic()
            with trio.fail_after(m.cfg.read_timeout + 5):
                (data,) = await m.limiters.background_call(fetch)
            self.fetched_bytes += len(data)
            m.fetched_bytes += len(data)
            if m.metrics is not None:
                m.metrics.observe_fetch("background", time.monotonic() - t0, len(data))
            written = await m.limiters.disk_call(partial(ingest.write, s, data))
        finally:
            self._bg_piece = None
            ev.set()
        return data if written else None

    def stop_background(self) -> None:
        if self._bg_scope is not None:
            self._bg_scope.cancel()

    def status(self, uses: int) -> dict[str, Any]:
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
            "background": "done" if self.complete else self.background,
            "uses": uses,
            "entries": len(self.index),
            "fetched_bytes": self.fetched_bytes,
            "read_errors": self.read_errors,
            "last_error": self.last_error,
        }


@dataclass
class _Negative:
    expires: float
    reason: str


class LayerManager:
    """Resolves (reference, digest) to a served :class:`Layer`, once, with fail-fast lookups."""

    def __init__(
        self,
        source: Source,
        cfg: StoreConfig,
        limiters: Limiters | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.source = source
        self.cfg = cfg
        self.limiters = limiters or Limiters(
            cfg.net_threads, cfg.cpu_threads, cfg.disk_threads, cfg.background_concurrency
        )
        self.metrics = metrics
        self.memory = ChunkCache(cfg.memory_cache_mb * 1024 * 1024)
        self.disk: DiskCache | None = None  # set by open(); without it, memory only
        self.inflight: dict[str, trio.Event] = {}
        # Chunks whose compressed bytes are in a layer's own download, by chunk digest: another
        # layer with the same content decodes them from there instead of fetching them (and the
        # cache keeps one copy). Bounded; the layers are held weakly.
        self.homes: OrderedDict[str, tuple[weakref.ref[Layer], Chunk]] = OrderedDict()
        self.layers: dict[str, Layer] = {}  # by blob digest
        self._by_path: dict[tuple[str, str], str] = {}  # (ref, path digest) -> blob digest
        self._records: dict[str, str] = {}  # blob or TOC digest -> blob digest, on disk
        self._images: dict[str, tuple[float, ResolvedImageLike]] = {}
        self._negative: dict[tuple[str, str], _Negative] = {}
        self._resolving: dict[tuple[str, str], trio.Event] = {}
        self.uses: dict[tuple[str, str], int] = {}
        self.fetched_bytes = 0
        self.started = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._busy = 0
        self._idle = trio.Event()
        self._idle.set()
        self._evicting = False
        self._uses_dirty = trio.Event()
        self._writes = 0  # cache writes scheduled and not finished
        self._written = trio.Event()
        self._written.set()

    # -- life cycle -----------------------------------------------------------------------------

    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.cfg.root / "cache"

    async def open(self) -> None:
        """Open the disk cache: layer records, use counts."""
        disk = DiskCache(self.cache_dir(), self.cfg.cache_limit_mb * 1024 * 1024)

        def load() -> tuple[dict[str, str], dict[tuple[str, str], int]]:
            disk.open()
            records: dict[str, str] = {}
            for rec in disk.layer_records():
                records[rec.blob_digest] = rec.blob_digest
                records[rec.toc_digest] = rec.blob_digest
            return records, disk.load_uses()

        self._records, self.uses = await self.limiters.disk_call(load)
        self.disk = disk
        log.info(
            "cache-open dir=%s bytes=%d limit=%d layers=%d in-use=%d",
            disk.dir,
            disk.total,
            disk.limit,
            len({v for v in self._records.values()}),
            len(self.uses),
        )

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background work: restore layers in use, save use counts, evict, forget idle layers."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.disk is None:
                await self.open()
            for ref, digest in list(self.uses):
                nursery.start_soon(self._restore, ref, digest)
            nursery.start_soon(self._save_uses_loop)
            task_status.started()
            ticks = 0
            while True:
                await trio.sleep(60)
                ticks += 1
                dropped = self.forget_unused()
                if dropped:
                    log.info("released %d idle layer(s)", dropped)
                ingests = [x.ingest for x in self.layers.values() if x.ingest is not None]
                for ingest in ingests:
                    await self.limiters.disk_call(ingest.flush)
                if ticks % 10 == 0 and self.disk is not None:
                    await self.limiters.disk_call(self.disk.rescan)
                await self.evict()

    async def _restore(self, ref: str, digest: str) -> None:
        try:
            await self.lookup(ref, digest)
        except NotFound as exc:
            log.warning("restore-failed ref=%s digest=%s: %s", ref, digest, exc)

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    def spawn_disk_write(self, fn: Callable[[], None]) -> None:
        async def write() -> None:
            try:
                await self.limiters.disk_call(fn)
            finally:
                self._writes -= 1
                if not self._writes:
                    self._written.set()
            self.after_write()

        if self._nursery is not None:
            if not self._writes:
                self._written = trio.Event()
            self._writes += 1
            self._nursery.start_soon(write)

    async def writes_done(self) -> None:
        await self._written.wait()

    def after_write(self) -> None:
        if self.disk is not None and self.disk.over_limit() and not self._evicting:
            self.spawn(self.evict)

    # -- foreground priority --------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def foreground(self) -> _Foreground:
        return _Foreground(self)

    async def wait_idle(self) -> None:
        while self._busy:
            await self._idle.wait()

    # -- eviction -------------------------------------------------------------------------------

    def _uses_by_blob(self) -> dict[str, int]:
        """Podman's use counts, summed per blob digest (a layer has several paths)."""
        counts: dict[str, int] = {}
        for (ref, digest), n in self.uses.items():
            blob = self._by_path.get((ref, digest)) or self._records.get(digest)
            if blob is not None:
                counts[blob] = counts.get(blob, 0) + n
        return counts

    def _protected(self) -> tuple[set[str], set[str]]:
        layers = {blob for blob, n in self._uses_by_blob().items() if n > 0}
        chunks: set[str] = set()
        for blob in layers:
            layer = self.layers.get(blob)
            if layer is not None:
                chunks |= layer.index.chunk_digests()
        return {b.partition(":")[2] for b in layers}, {c.partition(":")[2] for c in chunks}

    async def evict(self) -> None:
        disk = self.disk
        if disk is None or not disk.over_limit() or self._evicting:
            return
        self._evicting = True
        try:
            # Writes that land while a pass runs can take the cache over the limit again; a
            # pass that frees nothing ends the loop (what is left is protected or busy).
            for _ in range(8):
                protected = await self.limiters.cpu_call(self._protected)
                report = await self.limiters.disk_call(partial(disk.evict, *protected))
                log.info(
                    "cache-evict freed=%d items=%d remaining=%d limit=%d",
                    report.freed,
                    report.removed,
                    report.remaining,
                    disk.limit,
                )
                if not report.freed or not disk.over_limit():
                    break
        finally:
            self._evicting = False

    # -- lookups --------------------------------------------------------------------------------

    async def lookup(self, ref: str, digest: str) -> Layer:
        """Layer ``digest`` (blob or TOC digest) of image ``ref``; NotFound if unservable."""
        key = (ref, digest)
        for _ in range(3):
            blob = self._by_path.get(key)
            if blob is not None and blob in self.layers:
                return self.layers[blob]
            neg = self._negative.get(key)
            if neg is not None:
                if neg.expires > time.monotonic():
                    raise NotFound(neg.reason)
                del self._negative[key]
            ev = self._resolving.get(key)
            if ev is None:
                break
            await ev.wait()
        ev = trio.Event()
        self._resolving[key] = ev
        start = time.monotonic()
        try:
            with trio.fail_after(self.cfg.lookup_timeout):
                layer, source = await self._resolve(ref, digest)
        except trio.TooSlowError:
            reason = f"timed out after {self.cfg.lookup_timeout:g}s"
            self._refuse(key, reason)
            raise NotFound(reason) from None
        except AlsError as exc:
            self._refuse(key, str(exc))
            raise NotFound(str(exc)) from exc
        finally:
            del self._resolving[key]
            ev.set()
        self._by_path[key] = layer.digest
        log.info(
            "layer-ready ref=%s digest=%s format=%s lazy=true toc_ms=%d entries=%d from=%s "
            "cached=%d",
            ref,
            digest,
            layer.format,
            (time.monotonic() - start) * 1000,
            len(layer.index),
            source,
            layer.cached_bytes(),
        )
        return layer

    def _refuse(self, key: tuple[str, str], reason: str) -> None:
        log.info("layer-refused ref=%s digest=%s lazy=false reason=%s", key[0], key[1], reason)
        now = time.monotonic()
        neg = self._negative
        neg.pop(key, None)
        neg[key] = _Negative(now + self.cfg.negative_ttl, reason)
        # Bounded: a client looking up endless unknown names must not grow the store. Expired
        # answers go first, then the oldest ones (insertion order).
        if len(neg) > _MAX_NEGATIVE:
            for k in [k for k, v in neg.items() if v.expires <= now]:
                del neg[k]
            while len(neg) > _MAX_NEGATIVE:
                del neg[next(iter(neg))]

    async def _image(self, ref: str) -> ResolvedImageLike:
        hit = self._images.get(ref)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        deadline = now + self.cfg.lookup_timeout

        def resolve() -> ResolvedImageLike:
            return self.source.resolve(ref, platform=self.cfg.platform, deadline=deadline)

        image = await self.limiters.net_call(resolve)
        self._images[ref] = (time.monotonic() + self.cfg.manifest_ttl, image)
        return image

    async def _resolve(self, ref: str, digest: str) -> tuple[Layer, str]:
        """The layer, and where it came from: memory, cache, or registry."""
        # Known, and known to belong to this reference: no registry needed (not even for a
        # tag that has moved since: the layer is identified by its digest).
        # (A lookup by blob digest needs the DiffID too, which the TOC dialect never asked for.)
        blob = self._records.get(digest)
        for known in self.layers.values():
            by_path = digest in (known.digest, known.info.toc_digest) and ref in known.refs
            if by_path and (digest != known.digest or known.info.diff_id):
                return known, "memory"
        if blob is not None and self.disk is not None:
            cached = await self._from_record(blob, ref, require_ref=True)
            if cached is not None and (digest != cached.digest or cached.info.diff_id):
                return cached, "cache"
        # Otherwise the registry says whether this reference has the layer.
        image = await self._image(ref)
        desc: LayerDescriptor | None = None
        for d in image.layers:
            if d.digest == digest or toc_digest_of(d.annotations) == digest:
                desc = d
                break
        if desc is None:
            raise NotFound(f"{digest} is not a layer of {ref}")
        toc_digest = toc_digest_of(desc.annotations)
        if toc_digest is None:
            raise NotLazy("unknown", f"layer {desc.digest} of {ref} has no TOC annotation")
        if digest == desc.digest and not desc.diff_id:
            raise NotFound(f"image {ref} has no DiffID for layer {desc.digest}")
        existing = self.layers.get(desc.digest)
        source = "memory"
        if existing is None and self.disk is not None and desc.digest in self._records:
            existing = await self._from_record(desc.digest, ref, require_ref=False)
            source = "cache"
        if existing is not None and existing.info.toc_digest == toc_digest:
            if desc.diff_id and not existing.info.diff_id:
                existing.info = dataclasses.replace(existing.info, diff_id=desc.diff_id)
                await self._add_ref(existing, ref, force=True)
            await self._add_ref(existing, ref)
            return existing, source
        return await self._from_registry(ref, desc, toc_digest), "registry"

    async def _add_ref(self, layer: Layer, ref: str, *, force: bool = False) -> None:
        """Remember that ``ref`` has this layer (and persist the record if anything changed)."""
        if ref in layer.refs and not force:
            return
        if ref not in layer.refs:
            layer.refs.append(ref)
        if self.disk is not None:
            rec = self._record_of(layer)
            disk = self.disk
            await self.limiters.disk_call(lambda: disk.save_layer(rec, None))

    @staticmethod
    def _record_of(layer: Layer) -> LayerRecord:
        return LayerRecord(
            blob_digest=layer.digest,
            blob_size=layer.info.blob_size,
            diff_id=layer.info.diff_id,
            toc_digest=layer.info.toc_digest,
            media_type=layer.info.media_type,
            format=layer.format,
            annotations=dict(layer.annotations),
            refs=list(layer.refs),
        )

    async def _from_record(self, blob: str, ref: str, *, require_ref: bool) -> Layer | None:
        disk = self.disk
        assert disk is not None
        found = await self.limiters.disk_call(lambda: disk.load_layer(blob))
        if found is None:
            return None
        rec, pieces = found
        if require_ref and ref not in rec.refs:
            return None
        existing = self.layers.get(rec.blob_digest)
        if existing is not None:
            await self._add_ref(existing, ref)
            return existing

        def load() -> LayerIndex:
            return load_index(
                _replaying(pieces),
                rec.blob_size,
                annotations=rec.annotations,
                expected_toc_digest=rec.toc_digest,
                layer=f"{ref}@{rec.blob_digest}",
            )

        try:
            index = await self.limiters.cpu_call(load)
        except (_ReplayMiss, AlsError) as exc:
            log.warning("cache-corrupt layer=%s: cannot rebuild its index (%s)", blob, exc)
            return None
        if ref not in rec.refs:
            rec.refs.append(ref)
            await self.limiters.disk_call(lambda: disk.save_layer(rec, None))
        return await self._install(rec, index, pieces=None)

    async def _from_registry(self, ref: str, desc: LayerDescriptor, toc_digest: str) -> Layer:
        deadline = time.monotonic() + self.cfg.lookup_timeout
        blob_digest, annotations, size = desc.digest, dict(desc.annotations), desc.size
        pieces: list[tuple[int, bytes]] = []

        def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            return self.source.fetch_ranges(ref, blob_digest, ranges, deadline=deadline)

        def load() -> LayerIndex:
            return load_index(
                _recording(read, pieces),
                size,
                annotations=annotations,
                expected_toc_digest=toc_digest,
                layer=f"{ref}@{blob_digest}",
            )

        index = await self.limiters.net_call(load)
        rec = LayerRecord(
            blob_digest=blob_digest,
            blob_size=size,
            diff_id=desc.diff_id,
            toc_digest=index.toc_digest,
            media_type=desc.media_type,
            format=index.format,
            annotations=annotations,
            refs=[ref],
        )
        return await self._install(rec, index, pieces=pieces)

    async def _install(
        self, rec: LayerRecord, index: LayerIndex, pieces: list[tuple[int, bytes]] | None
    ) -> Layer:
        existing = self.layers.get(rec.blob_digest)
        if existing is not None:  # another lookup won the race
            return existing
        usize_text = rec.annotations.get(ANN_UNCOMPRESSED_SIZE, "")
        info = LayerInfo(
            blob_digest=rec.blob_digest,
            blob_size=rec.blob_size,
            diff_id=rec.diff_id,
            toc_digest=index.toc_digest,
            media_type=rec.media_type,
            uncompressed_size=int(usize_text) if usize_text.isdigit() else None,
        )
        layer = Layer(
            info=info,
            index=index,
            ref=rec.refs[0],
            manager=self,
            format=index.format,
            refs=list(rec.refs),
            annotations=dict(rec.annotations),
        )
        disk = self.disk
        if disk is not None:

            def prepare() -> None:
                if pieces is not None:
                    disk.save_layer(rec, pieces)
                if disk.has_blob(rec.blob_digest):
                    layer.complete = True
                    return
                ingest = disk.ingest(rec.blob_digest, rec.blob_size)
                try:
                    if not ingest.acquire():
                        ingest.reload()
                except OSError as exc:
                    log.warning("cache: cannot open the download of %s: %s", rec.blob_digest, exc)
                    return
                layer.ingest = ingest
                if ingest.owned and pieces:  # the TOC's bytes are blob bytes too: keep them
                    for off, data in pieces:
                        ingest.write(off, data)

            await self.limiters.disk_call(prepare)
            self._records[rec.blob_digest] = rec.blob_digest
            self._records[rec.toc_digest] = rec.blob_digest
        self.layers[rec.blob_digest] = layer
        if not layer.complete:
            self.spawn(self._warm_up(layer))
        return layer

    def _warm_up(self, layer: Layer) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await layer.prefetch()
            await layer.background_fetch()

        return run

    # -- use / release (the protocol's notifications) -------------------------------------------

    def use(self, ref: str, digest: str) -> int:
        key = (ref, digest)
        self.uses[key] = self.uses.get(key, 0) + 1
        log.info("layer-use ref=%s digest=%s count=%d", ref, digest, self.uses[key])
        self._uses_dirty.set()
        return self.uses[key]

    def release(self, ref: str, digest: str) -> int:
        key = (ref, digest)
        count = max(self.uses.get(key, 0) - 1, 0)
        if count:
            self.uses[key] = count
        else:
            self.uses.pop(key, None)
        log.info("layer-release ref=%s digest=%s count=%d", ref, digest, count)
        self._uses_dirty.set()
        return count

    async def _save_uses_loop(self) -> None:
        while True:
            await self._uses_dirty.wait()
            self._uses_dirty = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Finish the cache writes under way and write the use counts (before shutdown)."""
        await self._written.wait()
        if self.disk is not None:
            snapshot = dict(self.uses)
            disk = self.disk
            await self.limiters.disk_call(lambda: disk.save_uses(snapshot))

    def close(self) -> None:
        """Release the downloads this manager writes (their locks), e.g. at shutdown."""
        for layer in self.layers.values():
            layer.stop_background()
            if layer.ingest is not None:
                layer.ingest.close()

    def forget_unused(self, idle: float = 300.0) -> int:
        """Drop layers no path refers to, that podman does not use, idle for ``idle`` seconds."""
        used = {self._by_path.get(k) for k in self.uses}
        now = time.monotonic()
        dropped = 0
        for digest, layer in list(self.layers.items()):
            if layer.instances == 0 and digest not in used and now - layer.last_used > idle:
                if layer.background in ("running", "paused", "waiting"):
                    continue  # still downloading: keep it until done
                del self.layers[digest]
                if layer.ingest is not None:
                    layer.ingest.close()
                for k, v in list(self._by_path.items()):
                    if v == digest:
                        del self._by_path[k]
                dropped += 1
        return dropped

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        counts = self._uses_by_blob()
        disk = self.disk
        cache: dict[str, Any] = {
            "dir": str(self.cache_dir()),
            "bytes": 0,
            "limit_bytes": self.cfg.cache_limit_mb * 1024 * 1024,
            "degraded": None,
            "hits": self.memory.hits,
            "misses": self.memory.misses,
        }
        if disk is not None:
            stats = disk.stats()
            cache.update(
                bytes=stats["bytes"],
                degraded=stats["degraded"],
                hits=self.memory.hits + stats["hits"],
                misses=stats["misses"],
            )
        cache["memory_bytes"] = self.memory.bytes
        cache["memory_limit_bytes"] = self.memory.max_bytes
        return {
            "version": __version__,
            "pid": os.getpid(),
            "root": str(self.cfg.root),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "cache": cache,
            "fetched_bytes": self.fetched_bytes,
            "layers": [layer.status(counts.get(d, 0)) for d, layer in sorted(self.layers.items())],
        }


class _Foreground:
    """While a reader waits for the registry, background downloads pause."""

    def __init__(self, m: LayerManager) -> None:
        self.m = m

    async def __aenter__(self) -> None:
        if self.m._busy == 0:
            self.m._idle = trio.Event()
        self.m._busy += 1

    async def __aexit__(self, *exc: object) -> None:
        self.m._busy -= 1
        if self.m._busy == 0:
            self.m._idle.set()
