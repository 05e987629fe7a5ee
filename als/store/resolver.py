"""Lookups: (reference, digest) to a served :class:`Layer`, once, with fail-fast answers.

A layer is found in memory, in the disk cache's layer records (its index rebuilt from the
recorded TOC bytes, no registry needed), or through the registry (the image's manifest, then
the layer's TOC). Concurrent lookups of one path share one resolution; failures are remembered
for ``negative_ttl`` and manifests for ``manifest_ttl``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from als.errors import AlsError, NotFound, NotLazy
from als.formats import LayerAnnotations, LayerIndex, load_index, tar_size
from als.oci import ANN_UNCOMPRESSED_SIZE, toc_digest_of
from als.registry.types import LayerDescriptor
from als.store.cache import Ingest, LayerRecord
from als.store.layer import Layer, LayerServices
from als.store.ports import LayerInfo, ResolvedImageLike

log = logging.getLogger(__name__)

_MAX_NEGATIVE = 4096  # failed lookups remembered for negative_ttl

TocPieces = list[tuple[int, bytes]]  # (blob offset, bytes) the TOC was parsed from
ReadRanges = Callable[[Sequence[tuple[int, int]]], list[bytes]]


class _ReplayMiss(Exception):
    """The recorded TOC bytes do not hold a range the parser asked for."""


def _recording(read: ReadRanges, pieces: TocPieces) -> ReadRanges:
    def rec(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        got = read(ranges)
        pieces.extend((off, data) for (off, _), data in zip(ranges, got, strict=True))
        return got

    return rec


def _reading_ahead(read: ReadRanges, ahead: tuple[int, int] | None) -> ReadRanges:
    """``read``, with the range ``ahead`` (offset, length) asked for in the first request too,
    so that a later read inside it needs no request of its own."""
    kept: list[tuple[int, bytes]] = []

    def rd(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        nonlocal ahead
        if kept and all(
            kept[0][0] <= off and off + n <= kept[0][0] + len(kept[0][1]) for off, n in ranges
        ):
            base, data = kept[0]
            return [data[off - base : off - base + n] for off, n in ranges]
        if ahead is None or ahead in ranges:
            return read(ranges)
        got = read([*ranges, ahead])
        kept.append((ahead[0], got[-1]))
        ahead = None
        return got[:-1]

    return rd


def _tar_size(read: ReadRanges, index: LayerIndex) -> int | None:
    """The layer's tar size from its tar-split; None without one (or, replaying an older
    cache record, without its bytes)."""
    try:
        return tar_size(read, index)
    except _ReplayMiss:
        return None


def _replaying(pieces: TocPieces) -> ReadRanges:
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
class _Negative:
    expires: float
    reason: str


@dataclass(frozen=True)
class _Manifest:
    """A resolved image as cached: when its fetch started, until when it is used, the image."""

    fetched: float
    expires: float
    image: ResolvedImageLike


def _layer_of(image: ResolvedImageLike, digest: str) -> LayerDescriptor | None:
    """The layer whose blob digest or TOC digest is ``digest`` (the two podman dialects)."""
    for d in image.layers:
        if d.digest == digest or toc_digest_of(d.annotations) == digest:
            return d
    return None


class Resolver:
    """The layers in memory, and how a lookup finds or makes one."""

    def __init__(
        self, services: LayerServices, warm_up: Callable[[Layer], Awaitable[None]]
    ) -> None:
        self._services = services
        self._ctx = services.ctx
        self._warm_up = warm_up  # started for each new layer
        self.layers: dict[str, Layer] = {}  # by blob digest
        self.by_path: dict[tuple[str, str], str] = {}  # (ref, path digest) -> blob digest
        self.records: dict[str, str] = {}  # blob or TOC digest -> blob digest, on disk
        self._images: dict[str, _Manifest] = {}
        self._fetching: dict[str, trio.Event] = {}  # manifests being fetched, by reference
        self.negative: dict[tuple[str, str], _Negative] = {}
        self._resolving: dict[tuple[str, str], trio.Event] = {}

    async def lookup(self, ref: str, digest: str) -> Layer:
        """Layer ``digest`` (blob or TOC digest) of image ``ref``; NotFound if unservable."""
        cfg = self._ctx.cfg
        key = (ref, digest)
        for _ in range(3):
            blob = self.by_path.get(key)
            if blob is not None and blob in self.layers:
                return self.layers[blob]
            neg = self.negative.get(key)
            if neg is not None:
                if neg.expires > time.monotonic():
                    raise NotFound(neg.reason)
                del self.negative[key]
            ev = self._resolving.get(key)
            if ev is None:
                break
            await ev.wait()
        ev = trio.Event()
        self._resolving[key] = ev
        start = time.monotonic()
        try:
            with trio.fail_after(cfg.lookup_timeout):
                layer, source = await self._resolve(ref, digest)
        except trio.TooSlowError:
            reason = f"timed out after {cfg.lookup_timeout:g}s"
            self._refuse(key, reason)
            raise NotFound(reason) from None
        except AlsError as exc:
            self._refuse(key, str(exc))
            raise NotFound(str(exc)) from exc
        finally:
            del self._resolving[key]
            ev.set()
        self.by_path[key] = layer.digest
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
        neg = self.negative
        neg.pop(key, None)
        neg[key] = _Negative(now + self._ctx.cfg.negative_ttl, reason)
        # Bounded: a client looking up endless unknown names must not grow the store. Expired
        # answers go first, then the oldest ones (insertion order).
        if len(neg) > _MAX_NEGATIVE:
            for k in [k for k, v in neg.items() if v.expires <= now]:
                del neg[k]
            while len(neg) > _MAX_NEGATIVE:
                del neg[next(iter(neg))]

    async def _image(self, ref: str, *, stale: _Manifest | None = None) -> _Manifest:
        """The image at ``ref``: cached for ``manifest_ttl``, or fetched (once for concurrent
        lookups). ``stale``: a cached manifest not to use again (another one, or a fetch in
        flight, will do)."""
        ctx = self._ctx
        while True:
            hit = self._images.get(ref)
            if hit is not None and hit is not stale and hit.expires > time.monotonic():
                return hit
            ev = self._fetching.get(ref)
            if ev is None:
                break
            await ev.wait()  # another lookup is fetching it; then look again
        ev = trio.Event()
        self._fetching[ref] = ev
        try:
            started = time.monotonic()
            deadline = started + ctx.cfg.lookup_timeout

            def resolve() -> ResolvedImageLike:
                return ctx.source.resolve(ref, platform=ctx.cfg.platform, deadline=deadline)

            image = await ctx.scheduler.net_call(resolve)
            entry = _Manifest(started, time.monotonic() + ctx.cfg.manifest_ttl, image)
            self._images[ref] = entry
        finally:
            del self._fetching[ref]
            ev.set()
        return entry

    async def _resolve(self, ref: str, digest: str) -> tuple[Layer, str]:
        """The layer, and where it came from: memory, cache, or registry."""
        # Known, and known to belong to this reference: no registry needed (not even for a
        # tag that has moved since: the layer is identified by its digest).
        # (A lookup by blob digest needs the DiffID too, which the TOC dialect never asked for.)
        blob = self.records.get(digest)
        for known in self.layers.values():
            by_path = digest in (known.digest, known.info.toc_digest) and ref in known.refs
            if by_path and (digest != known.digest or known.info.diff_id):
                return known, "memory"
        if blob is not None and self._ctx.disk is not None:
            cached = await self._from_record(blob, ref, require_ref=True)
            if cached is not None and (digest != cached.digest or cached.info.diff_id):
                return cached, "cache"
        # Otherwise the registry says whether this reference has the layer.
        asked = time.monotonic()
        manifest = await self._image(ref)
        desc = _layer_of(manifest.image, digest)
        if desc is None and manifest.fetched < asked:
            # A cached manifest may be out of date (the tag moved to another image since):
            # ask the registry again before refusing the layer.
            manifest = await self._image(ref, stale=manifest)
            desc = _layer_of(manifest.image, digest)
        if desc is None:
            raise NotFound(f"{digest} is not a layer of {ref}")
        toc_digest = toc_digest_of(desc.annotations)
        if toc_digest is None:
            raise NotLazy("unknown", f"layer {desc.digest} of {ref} has no TOC annotation")
        if digest == desc.digest and not desc.diff_id:
            raise NotFound(f"image {ref} has no DiffID for layer {desc.digest}")
        existing = self.layers.get(desc.digest)
        source = "memory"
        if existing is None and self._ctx.disk is not None and desc.digest in self.records:
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
        disk = self._ctx.disk
        if disk is not None:
            rec = _record_of(layer)
            await self._ctx.scheduler.disk_call(lambda: disk.save_layer(rec, None))

    async def _from_record(self, blob: str, ref: str, *, require_ref: bool) -> Layer | None:
        disk = self._ctx.disk
        scheduler = self._ctx.scheduler
        assert disk is not None
        found = await scheduler.disk_call(lambda: disk.load_layer(blob))
        if found is None:
            return None
        rec, pieces = found
        if require_ref and ref not in rec.refs:
            return None
        existing = self.layers.get(rec.blob_digest)
        if existing is not None:
            await self._add_ref(existing, ref)
            return existing

        def load() -> tuple[LayerIndex, int | None]:
            index = load_index(
                _replaying(pieces),
                rec.blob_size,
                annotations=rec.annotations,
                expected_toc_digest=rec.toc_digest,
                layer=f"{ref}@{rec.blob_digest}",
            )
            return index, _tar_size(_replaying(pieces), index)

        try:
            index, tar_bytes = await scheduler.cpu_call(load)
        except (_ReplayMiss, AlsError) as exc:
            log.warning("cache-corrupt layer=%s: cannot rebuild its index (%s)", blob, exc)
            return None
        if ref not in rec.refs:
            rec.refs.append(ref)
            await scheduler.disk_call(lambda: disk.save_layer(rec, None))
        return await self._install(rec, index, tar_bytes, pieces=None)

    async def _from_registry(self, ref: str, desc: LayerDescriptor, toc_digest: str) -> Layer:
        ctx = self._ctx
        deadline = time.monotonic() + ctx.cfg.lookup_timeout
        blob_digest, annotations, size = desc.digest, dict(desc.annotations), desc.size
        pieces: TocPieces = []

        def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            return ctx.source.fetch_ranges(ref, blob_digest, ranges, deadline=deadline)

        # A zstd:chunked tar-split whose place the annotations give is fetched with the TOC.
        ts = LayerAnnotations.parse(annotations).tarsplit_position
        ahead = (ts[0], ts[1]) if ts is not None and ts[1] > 0 and ts[0] + ts[1] <= size else None

        def load() -> tuple[LayerIndex, int | None]:
            rd = _recording(_reading_ahead(read, ahead), pieces)
            index = load_index(
                rd,
                size,
                annotations=annotations,
                expected_toc_digest=toc_digest,
                layer=f"{ref}@{blob_digest}",
            )
            return index, _tar_size(rd, index)

        index, tar_bytes = await ctx.scheduler.net_call(load)
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
        return await self._install(rec, index, tar_bytes, pieces=pieces)

    async def _install(
        self,
        rec: LayerRecord,
        index: LayerIndex,
        tar_bytes: int | None,
        pieces: TocPieces | None,
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
            # eStargz states it in an annotation; zstd:chunked has its tar-split.
            uncompressed_size=int(usize_text) if usize_text.isdigit() else tar_bytes,
        )
        layer = Layer(
            info=info,
            index=index,
            ref=rec.refs[0],
            services=self._services,
            format=index.format,
            refs=list(rec.refs),
            annotations=dict(rec.annotations),
        )
        disk = self._ctx.disk
        if disk is not None:

            def prepare() -> tuple[bool, Ingest | None]:
                """(the blob is complete on disk, our download of it otherwise)"""
                if pieces is not None:
                    disk.save_layer(rec, pieces)
                if disk.has_blob(rec.blob_digest):
                    return True, None
                ingest = disk.ingest(rec.blob_digest, rec.blob_size)
                try:
                    if not ingest.acquire():
                        ingest.reload()
                except OSError as exc:
                    log.warning("cache: cannot open the download of %s: %s", rec.blob_digest, exc)
                    return False, None
                if ingest.owned and pieces:  # the TOC's bytes are blob bytes too: keep them
                    for off, data in pieces:
                        ingest.write(off, data)
                return False, ingest

            layer.complete, layer.ingest = await self._ctx.scheduler.disk_call(prepare)
            self.records[rec.blob_digest] = rec.blob_digest
            self.records[rec.toc_digest] = rec.blob_digest
        self.layers[rec.blob_digest] = layer
        # Prefetch and download what is missing; a complete layer goes native.
        self._ctx.scheduler.spawn(lambda: self._warm_up(layer))
        return layer


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
