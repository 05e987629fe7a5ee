"""Layers the store serves: resolution (ref + digest -> verified index) and reads.

Everything here is async (trio) and free of pyfuse3; blocking work (HTTP, decompression,
hashing) runs in worker threads behind the named limiters of :class:`Limiters`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from als.errors import AlsError, FormatError, NotFound, NotLazy, RegistryError, VerifyError
from als.formats import Chunk, LayerIndex, decode_chunk, load_index, verify_file
from als.registry.client import LayerDescriptor
from als.store.config import StoreConfig
from als.store.protocol import UNCOMPRESSED_SIZE_ANNOTATION, LayerInfo, toc_digest_of

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class Limiters:
    """The named thread limiters: network calls and CPU work (inflate, hashing)."""

    def __init__(self, net: int, cpu: int) -> None:
        self.net = trio.CapacityLimiter(net)
        self.cpu = trio.CapacityLimiter(cpu)

    async def net_call(self, fn: Callable[[], T]) -> T:
        # abandon_on_cancel: a lookup that runs out of time answers ENOENT at once; the thread
        # finishes (bounded by its own deadline) in the background.
        return await trio.to_thread.run_sync(fn, limiter=self.net, abandon_on_cancel=True)

    async def cpu_call(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.cpu)


# ----------------------------------------------------------------------------------------------


class ChunkCache:
    """A bounded LRU of decompressed, verified chunks, by bytes held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int, int, int]) -> bytes | None:
        data = self._data.get(key)
        if data is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key: tuple[str, int, int, int], data: bytes) -> bool:
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


def coalesce(ranges: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Merge (start, end) ranges that overlap or lie within ``gap`` bytes of each other."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + gap:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


@dataclass
class Layer:
    """One layer blob, shared by every reference and path that reaches it."""

    info: LayerInfo
    index: LayerIndex
    ref: str  # a reference to fetch the blob through
    manager: LayerManager
    format: str = ""
    instances: int = 0
    last_used: float = field(default_factory=time.monotonic)
    fetched_bytes: int = 0
    read_errors: int = 0

    @property
    def digest(self) -> str:
        return self.info.blob_digest

    def _key(self, c: Chunk) -> tuple[str, int, int, int]:
        return (self.digest, c.coffset, c.inner, c.size)

    async def read(self, entry_id: int, off: int, size: int) -> bytes:
        """Bytes [off, off+size) of a regular file, verified; AlsError on failure."""
        self.last_used = time.monotonic()
        index = self.index
        entry = index.entry(entry_id)
        file_id = entry.target if entry.target >= 0 else entry_id
        total = index.entry(file_id).size
        end = min(off + size, total)
        if off >= end:
            return b""
        chunks = index.chunks(file_id)
        if index.whole_file_verify(file_id):
            wanted = list(chunks)
        else:
            wanted = [c for c in chunks if c.uoffset < end and c.uoffset + c.size > off]
        got = await self._get_chunks(file_id, wanted)
        parts: list[bytes] = []
        for c in wanted:
            if c.uoffset >= end or c.uoffset + c.size <= off:
                continue
            data = got[self._key(c)]
            lo = max(off - c.uoffset, 0)
            hi = min(end - c.uoffset, c.size)
            parts.append(data[lo:hi] if (lo, hi) != (0, c.size) else data)
        return b"".join(parts)

    async def _get_chunks(
        self, file_id: int, wanted: Sequence[Chunk]
    ) -> dict[tuple[str, int, int, int], bytes]:
        m = self.manager
        got: dict[tuple[str, int, int, int], bytes] = {}
        for _attempt in range(2):
            missing: list[Chunk] = []
            waits: list[trio.Event] = []
            for c in wanted:
                key = self._key(c)
                if key in got:
                    continue
                data = m.cache.get(key)
                if data is not None:
                    got[key] = data
                elif (ev := m.inflight.get(key)) is not None:
                    waits.append(ev)
                else:
                    missing.append(c)
            if missing:
                await self._fetch(file_id, missing)
                for c in missing:
                    data = m.cache.get(self._key(c)) or m.uncached.pop(self._key(c), None)
                    if data is not None:
                        got[self._key(c)] = data
            for ev in waits:
                await ev.wait()
            if all(self._key(c) in got for c in wanted):
                return got
            if not waits:
                break
        # Waited for another task's fetch, which failed: the caller gets EIO; the next read retries.
        raise RegistryError(f"layer {self.digest}: content not available (an earlier fetch failed)")

    async def _fetch(self, file_id: int, chunks: Sequence[Chunk]) -> None:
        m = self.manager
        keys = [self._key(c) for c in chunks]
        events = {k: trio.Event() for k in keys}
        m.inflight.update(events)
        try:
            await self._fetch_and_decode(file_id, chunks)
        except AlsError as exc:
            self.read_errors += 1
            path = self.index.entry(file_id).path
            log.error("read-failed layer=%s path=%s error=%s", self.digest, path, exc)
            raise
        finally:
            for k, ev in events.items():
                if m.inflight.get(k) is ev:
                    del m.inflight[k]
                ev.set()

    async def _fetch_and_decode(self, file_id: int, chunks: Sequence[Chunk]) -> None:
        m = self.manager
        index = self.index
        path = index.entry(file_id).path
        need = [c for c in chunks if not c.zeros]
        spans = coalesce([(c.coffset, c.cend) for c in need], m.cfg.coalesce_gap)
        blobs: list[bytes] = []
        if spans:
            deadline = time.monotonic() + m.cfg.read_timeout
            ranges = [(s, e - s) for s, e in spans]
            ref, digest = self.ref, self.digest

            def fetch() -> list[bytes]:
                return m.source.fetch_ranges(ref, digest, ranges, deadline=deadline)

            with trio.fail_after(m.cfg.read_timeout + 5):
                blobs = await m.limiters.net_call(fetch)
            self.fetched_bytes += sum(len(b) for b in blobs)
            m.fetched_bytes += sum(len(b) for b in blobs)

        def piece(c: Chunk) -> bytes:
            if c.zeros:
                return b""
            for (s, e), data in zip(spans, blobs, strict=True):
                if s <= c.coffset and c.cend <= e:
                    return data[c.coffset - s : c.cend - s]
            raise FormatError(f"layer {self.digest}: chunk of {path} outside fetched ranges")

        whole = index.whole_file_verify(file_id)

        def decode_all() -> list[bytes]:
            out = [decode_chunk(index, c, piece(c), path=path) for c in chunks]
            if whole:
                verify_file(index, file_id, b"".join(out))
            return out

        try:
            decoded = await m.limiters.cpu_call(decode_all)
        except VerifyError as exc:
            log.error("verify-failed layer=%s path=%s: %s", self.digest, path, exc)
            raise
        for c, data in zip(chunks, decoded, strict=True):
            key = self._key(c)
            if not m.cache.put(key, data):  # larger than the whole cache: hand it over directly
                m.uncached[key] = data

    async def read_blob(self, off: int, size: int) -> bytes:
        """Raw compressed bytes of the blob (the ``blob`` file), fetched on demand."""
        self.last_used = time.monotonic()
        end = min(off + size, self.info.blob_size)
        if off >= end:
            return b""
        m = self.manager
        deadline = time.monotonic() + m.cfg.read_timeout
        ref, digest = self.ref, self.digest

        def fetch() -> list[bytes]:
            return m.source.fetch_ranges(ref, digest, [(off, end - off)], deadline=deadline)

        with trio.fail_after(m.cfg.read_timeout + 5):
            (data,) = await m.limiters.net_call(fetch)
        self.fetched_bytes += len(data)
        return data


@dataclass
class _Negative:
    expires: float
    reason: str


class LayerManager:
    """Resolves (reference, digest) to a served :class:`Layer`, once, with fail-fast lookups."""

    def __init__(self, source: Source, cfg: StoreConfig, limiters: Limiters | None = None) -> None:
        self.source = source
        self.cfg = cfg
        self.limiters = limiters or Limiters(cfg.net_threads, cfg.cpu_threads)
        self.cache = ChunkCache(cfg.memory_cache_mb * 1024 * 1024)
        self.inflight: dict[tuple[str, int, int, int], trio.Event] = {}
        self.uncached: dict[tuple[str, int, int, int], bytes] = {}
        self.layers: dict[str, Layer] = {}  # by blob digest
        self._by_path: dict[tuple[str, str], str] = {}  # (ref, path digest) -> blob digest
        self._images: dict[str, tuple[float, ResolvedImageLike]] = {}
        self._negative: dict[tuple[str, str], _Negative] = {}
        self._resolving: dict[tuple[str, str], trio.Event] = {}
        self.uses: dict[tuple[str, str], int] = {}
        self.fetched_bytes = 0

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
                layer = await self._resolve(ref, digest)
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
            "layer-ready ref=%s digest=%s format=%s lazy=true toc_ms=%d entries=%d",
            ref,
            digest,
            layer.format,
            (time.monotonic() - start) * 1000,
            len(layer.index),
        )
        return layer

    def _refuse(self, key: tuple[str, str], reason: str) -> None:
        log.info("layer-refused ref=%s digest=%s lazy=false reason=%s", key[0], key[1], reason)
        self._negative[key] = _Negative(time.monotonic() + self.cfg.negative_ttl, reason)

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

    async def _resolve(self, ref: str, digest: str) -> Layer:
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
        if existing is not None:
            return existing
        deadline = time.monotonic() + self.cfg.lookup_timeout
        blob_digest, annotations, size = desc.digest, dict(desc.annotations), desc.size

        def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            return self.source.fetch_ranges(ref, blob_digest, ranges, deadline=deadline)

        def load() -> LayerIndex:
            return load_index(
                read,
                size,
                annotations=annotations,
                expected_toc_digest=toc_digest,
                layer=f"{ref}@{blob_digest}",
            )

        index = await self.limiters.net_call(load)
        usize_text = annotations.get(UNCOMPRESSED_SIZE_ANNOTATION, "")
        info = LayerInfo(
            blob_digest=blob_digest,
            blob_size=size,
            diff_id=desc.diff_id,
            toc_digest=index.toc_digest,
            media_type=desc.media_type,
            uncompressed_size=int(usize_text) if usize_text.isdigit() else None,
        )
        layer = Layer(info=info, index=index, ref=ref, manager=self, format=index.format)
        self.layers.setdefault(blob_digest, layer)
        return self.layers[blob_digest]

    # -- use / release (the protocol's notifications) -------------------------------------------

    def use(self, ref: str, digest: str) -> int:
        key = (ref, digest)
        self.uses[key] = self.uses.get(key, 0) + 1
        log.info("layer-use ref=%s digest=%s count=%d", ref, digest, self.uses[key])
        return self.uses[key]

    def release(self, ref: str, digest: str) -> int:
        key = (ref, digest)
        count = max(self.uses.get(key, 0) - 1, 0)
        if count:
            self.uses[key] = count
        else:
            self.uses.pop(key, None)
        log.info("layer-release ref=%s digest=%s count=%d", ref, digest, count)
        return count

    def forget_unused(self, idle: float = 300.0) -> int:
        """Drop layers no path refers to, that podman does not use, idle for ``idle`` seconds."""
        used = {self._by_path.get(k) for k in self.uses}
        now = time.monotonic()
        dropped = 0
        for digest, layer in list(self.layers.items()):
            if layer.instances == 0 and digest not in used and now - layer.last_used > idle:
                del self.layers[digest]
                for k, v in list(self._by_path.items()):
                    if v == digest:
                        del self._by_path[k]
                dropped += 1
        return dropped
