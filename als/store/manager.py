"""The store engine's front: :class:`LayerManager` builds the engine's parts and runs them.

It opens the disk cache, runs the periodic work (restoring the layers podman uses, saving use
counts, flushing downloads, eviction, forgetting idle layers), keeps podman's use counts, and
answers lookups (through :class:`~als.store.resolver.Resolver`) and ``status()``.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio

from als import __version__
from als.errors import NotFound
from als.store.background import IN_PROGRESS, BackgroundFetcher
from als.store.cache import DiskCache
from als.store.chunks import ChunkLoader
from als.store.config import StoreConfig
from als.store.context import StoreContext
from als.store.eviction import Evictor, Protected
from als.store.layer import Layer, LayerServices
from als.store.memcache import ChunkCache
from als.store.memory import MemoryTrimmer
from als.store.native import NativeLayers
from als.store.ports import MetricsSink, Source
from als.store.prefetch import Prefetcher
from als.store.readahead import ReadAhead
from als.store.resolver import Resolver
from als.store.scheduler import Scheduler
from als.store.status import CacheStatus, StoreStatus

log = logging.getLogger(__name__)


class LayerManager:
    """Resolves (reference, digest) to a served :class:`Layer`, once, with fail-fast lookups."""

    def __init__(
        self,
        source: Source,
        cfg: StoreConfig,
        scheduler: Scheduler | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.cfg = cfg
        self.scheduler = scheduler or Scheduler(
            cfg.net_threads, cfg.cpu_threads, cfg.disk_threads, cfg.background_concurrency
        )
        # Gives the allocator's free pages back after bursts of chunk traffic, and empties the
        # memory cache once reads have stopped for memory_release_s (while run()).
        self.trimmer = MemoryTrimmer(
            release=lambda: self.ctx.memory.clear(),  # noqa: PLW0108 - ctx is made below
            idle=cfg.memory_release_s,
            shrink=lambda: self.ctx.memory.drop_consumed(),  # noqa: PLW0108 - the same
        )
        self.ctx = ctx = StoreContext(
            cfg=cfg,
            source=source,
            scheduler=self.scheduler,
            memory=ChunkCache(
                cfg.memory_cache_mb * 1024 * 1024,
                self.trimmer.note,
                settled=lambda: not self.scheduler.writes_pending(),
            ),
            metrics=metrics,
        )
        self.native = NativeLayers(ctx)
        self.evictor = Evictor(ctx, self._protected, self._trees_removed)
        self._scan_pending = False
        self.scheduler.on_write = self.evictor.after_write
        chunks = ChunkLoader(ctx)
        readahead = ReadAhead(ctx, chunks)
        chunks.on_miss = readahead.after_miss
        services = LayerServices(
            ctx=ctx,
            chunks=chunks,
            readahead=readahead,
            prefetcher=Prefetcher(ctx, chunks),
            background=BackgroundFetcher(ctx, self.evictor),
        )
        self.resolver = Resolver(services, self._warm_up)
        self.layers = self.resolver.layers  # by blob digest
        self.uses: dict[tuple[str, str], int] = {}
        self.started = time.monotonic()
        self._uses_dirty = trio.Event()

    # -- the shared parts, by name --------------------------------------------------------------

    @property
    def disk(self) -> DiskCache | None:
        """The disk cache, once open(); without it, memory only."""
        return self.ctx.disk

    @property
    def memory(self) -> ChunkCache:
        return self.ctx.memory

    @property
    def metrics(self) -> MetricsSink | None:
        return self.ctx.metrics

    @metrics.setter
    def metrics(self, value: MetricsSink | None) -> None:
        self.ctx.metrics = value

    @property
    def fetched_bytes(self) -> int:
        return self.ctx.fetched_bytes

    def foreground(self) -> AbstractAsyncContextManager[None]:
        """While a reader waits for the registry, background downloads pause."""
        return self.scheduler.foreground()

    # -- life cycle -----------------------------------------------------------------------------

    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.cfg.root / "cache"

    async def open(self, *, scan_later: bool = False) -> None:
        """Open the disk cache: layer records, use counts. With ``scan_later`` the walk that
        counts the cache's bytes runs in :meth:`run`, after serving has begun."""
        disk = DiskCache(self.cache_dir(), self.cfg.cache_limit_mb * 1024 * 1024)
        self._scan_pending = scan_later

        def load() -> tuple[dict[str, str], dict[tuple[str, str], int]]:
            disk.open(scan=not scan_later)
            records: dict[str, str] = {}
            for rec in disk.layer_records():
                records[rec.blob_digest] = rec.blob_digest
                records[rec.toc_digest] = rec.blob_digest
            return records, disk.load_uses()

        self.resolver.records, self.uses = await self.scheduler.disk_call(load)
        self.ctx.disk = disk
        await self.native.open()
        log.info(
            "cache-open dir=%s bytes=%s limit=%d layers=%d in-use=%d",
            disk.dir,
            "(counted in the background)" if scan_later else disk.total,
            disk.limit,
            len({v for v in self.resolver.records.values()}),
            len(self.uses),
        )

    async def _scan(self) -> None:
        disk = self.disk
        if disk is None:
            return
        started = trio.current_time()
        await self.scheduler.disk_call(disk.rescan)
        self._scan_pending = False
        log.info(
            "cache-scan bytes=%d limit=%d in %.2fs",
            disk.total,
            disk.limit,
            trio.current_time() - started,
        )
        if disk.over_limit():
            await self.evictor.evict()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background work: restore layers in use, save use counts, evict, forget idle layers."""
        async with trio.open_nursery() as nursery:
            self.scheduler.nursery = nursery
            if self.disk is None:
                await self.open()
            if self._scan_pending:
                nursery.start_soon(self._scan)
            for ref, digest in list(self.uses):
                nursery.start_soon(self._restore, ref, digest)
            nursery.start_soon(self._save_uses_loop)
            nursery.start_soon(self.trimmer.run)
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
                    await self.scheduler.disk_call(ingest.flush)
                if ticks % 10 == 0 and self.disk is not None:
                    await self.scheduler.disk_call(self.disk.rescan)
                await self.evict()

    async def _restore(self, ref: str, digest: str) -> None:
        try:
            await self.lookup(ref, digest)
        except NotFound as exc:
            log.warning("restore-failed ref=%s digest=%s: %s", ref, digest, exc)

    def close(self) -> None:
        """Release the downloads this manager writes (their locks), e.g. at shutdown."""
        for layer in self.layers.values():
            layer.stop_background()
            if layer.ingest is not None:
                layer.ingest.close()

    # -- lookups --------------------------------------------------------------------------------

    async def lookup(self, ref: str, digest: str) -> Layer:
        """Layer ``digest`` (blob or TOC digest) of image ``ref``; NotFound if unservable."""
        return await self.resolver.lookup(ref, digest)

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
        await self.scheduler.writes_done()
        disk = self.disk
        if disk is not None:
            snapshot = dict(self.uses)
            await self.scheduler.disk_call(lambda: disk.save_uses(snapshot))

    def forget_unused(self, idle: float = 300.0) -> int:
        """Drop layers no path refers to, that podman does not use, idle for ``idle`` seconds."""
        by_path = self.resolver.by_path
        used = {by_path.get(k) for k in self.uses}
        now = time.monotonic()
        dropped = 0
        for digest, layer in list(self.layers.items()):
            if layer.instances == 0 and digest not in used and now - layer.last_used > idle:
                if layer.background in IN_PROGRESS:
                    continue  # still downloading: keep it until done
                del self.layers[digest]
                if layer.ingest is not None:
                    layer.ingest.close()
                for k, v in list(by_path.items()):
                    if v == digest:
                        del by_path[k]
                dropped += 1
        return dropped

    async def _warm_up(self, layer: Layer) -> None:
        """A new layer: prefetch what readers will want first, download the rest, go native."""
        if not layer.complete:
            await layer.prefetch()
            await layer.background_fetch()
        await self.native.ensure(layer)

    # -- eviction -------------------------------------------------------------------------------

    def _trees_removed(self, hexes: list[str]) -> None:
        self.native.removed(self.layers, hexes)

    async def evict(self) -> None:
        await self.evictor.evict()

    def _uses_by_blob(self) -> dict[str, int]:
        """Podman's use counts, summed per blob digest (a layer has several paths)."""
        counts: dict[str, int] = {}
        for (ref, digest), n in self.uses.items():
            blob = self.resolver.by_path.get((ref, digest)) or self.resolver.records.get(digest)
            if blob is not None:
                counts[blob] = counts.get(blob, 0) + n
        return counts

    def _protected(self) -> Protected:
        """What eviction must keep: the layers podman uses and their chunks (hex digests)."""
        layers = {blob for blob, n in self._uses_by_blob().items() if n > 0}
        chunks: set[str] = set()
        for blob in layers:
            layer = self.layers.get(blob)
            if layer is not None:
                chunks |= layer.index.chunk_digests()
        return {b.partition(":")[2] for b in layers}, {c.partition(":")[2] for c in chunks}

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> StoreStatus:
        counts = self._uses_by_blob()
        disk = self.disk
        memory = self.memory
        cache: CacheStatus = {
            "dir": str(self.cache_dir()),
            "bytes": 0,
            "limit_bytes": self.cfg.cache_limit_mb * 1024 * 1024,
            "degraded": None,
            "hits": memory.hits,
            "misses": memory.misses,
            "memory_bytes": memory.bytes,
            "memory_limit_bytes": memory.max_bytes,
        }
        if disk is not None:
            stats = disk.stats()
            cache["bytes"] = stats["bytes"]
            cache["degraded"] = stats["degraded"]
            cache["hits"] = memory.hits + stats["hits"]
            cache["misses"] = stats["misses"]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "root": str(self.cfg.root),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "cache": cache,
            "fetched_bytes": self.fetched_bytes,
            "layers": [layer.status(counts.get(d, 0)) for d, layer in sorted(self.layers.items())],
        }
