"""Prefetch: fetch what readers will want first, before they ask.

A new layer's first readers teach it an access profile (the files opened in the first
``profile_window`` seconds), saved in the disk cache. When a layer is installed, the files of
its profile are fetched first, then those of the landmark region its format marks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from als.errors import AlsError
from als.formats import EntryType
from als.store.chunks import PREFETCH, ChunkLoader, Item
from als.store.context import StoreContext

if TYPE_CHECKING:
    from als.store.layer import Layer

log = logging.getLogger(__name__)

# Compressed bytes per prefetch step, and steps in flight at once: small steps hand readers
# the first files of the region early (a reader waits for the step holding its chunk, not for
# the whole region), and two at once overlap one step's download with another's decoding.
_PREFETCH_BATCH = 1 << 20
_PREFETCH_STEPS = 2
_MAX_PROFILE = 100_000  # files recorded in one profile


@dataclass
class ProfileState:
    """One layer's access profile: whether it has one, and the files opened while learning."""

    learned: bool = False
    opened: dict[str, None] | None = None


class Prefetcher:
    def __init__(self, ctx: StoreContext, loader: ChunkLoader) -> None:
        self._ctx = ctx
        self._loader = loader

    def note_open(self, layer: Layer, entry_id: int) -> None:
        """A reader opened a file: record it while the layer's access profile is being learned."""
        ctx = self._ctx
        profile = layer.profile
        if profile.learned or ctx.disk is None or ctx.cfg.profile_window <= 0:
            return
        if profile.opened is None:
            profile.opened = {}
            ctx.scheduler.spawn(lambda: self._save_profile_later(layer))
        if len(profile.opened) < _MAX_PROFILE:
            profile.opened.setdefault(layer.index.path(layer.index.resolved(entry_id)), None)

    async def _save_profile_later(self, layer: Layer) -> None:
        ctx = self._ctx
        profile = layer.profile
        await trio.sleep(ctx.cfg.profile_window)
        files = list(profile.opened or {})
        profile.learned = True
        profile.opened = None
        if files and ctx.disk is not None:
            disk = ctx.disk
            await ctx.scheduler.disk_call(lambda: disk.save_profile(layer.digest, files))
            log.info("profile-saved layer=%s files=%d", layer.digest, len(files))

    async def prefetch(self, layer: Layer) -> None:
        """Fetch the files of the learned profile, then those of the landmark region."""
        ctx = self._ctx
        if layer.complete or not ctx.cfg.prefetch:
            return
        index = layer.index
        profile: list[str] = []
        if ctx.disk is not None:
            disk = ctx.disk
            profile = await ctx.scheduler.disk_call(lambda: disk.load_profile(layer.digest))
            layer.profile.learned = bool(profile)

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

        files = await ctx.scheduler.cpu_call(plan)
        if not files:
            return
        start = time.monotonic()
        fetched0 = layer.fetched_bytes
        batches: list[list[Item]] = [[]]
        size = 0
        for fid in files:
            for c in index.chunks(fid):
                batches[-1].append((fid, c))
                size += c.cend - c.coffset
            if size >= _PREFETCH_BATCH:
                batches.append([])
                size = 0
        failed: list[AlsError] = []
        steps = trio.Semaphore(_PREFETCH_STEPS)
        # Decoded, the region may not fit the memory cache: prefetching it all decoded would
        # push its first files out before readers ask for them, and they would be decoded
        # twice. Beyond half the cache, the compressed bytes only go to the layer's download.
        budget = ctx.cfg.memory_cache_mb * (1 << 20) // 2
        decoded = 0
        loader = self._loader

        async def step(batch: list[Item], decode: bool) -> None:
            try:
                if decode:
                    await loader.get(layer, batch, PREFETCH)
                else:
                    await loader.fetch_raw(layer, batch, PREFETCH)
            except AlsError as exc:
                failed.append(exc)
            finally:
                steps.release()

        async with trio.open_nursery() as nursery:
            for batch in batches:
                if not batch:
                    continue
                decode = decoded < budget
                if not decode and not loader.can_keep_raw(layer):
                    break  # nowhere to keep more: readers fetch the rest themselves
                await steps.acquire()
                if failed:
                    steps.release()
                    break
                decoded += sum(c.size for _, c in batch) if decode else 0
                nursery.start_soon(step, batch, decode)
        if failed:
            log.warning("prefetch-failed layer=%s: %s", layer.digest, failed[0])
            return
        log.info(
            "prefetch-done layer=%s files=%d profile=%d fetched=%d ms=%d",
            layer.digest,
            len(files),
            len(profile),
            layer.fetched_bytes - fetched0,
            (time.monotonic() - start) * 1000,
        )
