"""Background download: the rest of a layer's blob, at low priority, into the disk cache.

Once the whole blob is there (and matches its digest) the layer is served entirely locally.
The download pauses while readers wait for the registry, stays under the cache limit, backs
off on errors, and can be held to a bandwidth.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import trio

from als.errors import AlsError
from als.store.cache import Ingest
from als.store.context import StoreContext
from als.store.eviction import Evictor

if TYPE_CHECKING:
    from als.store.layer import Layer

log = logging.getLogger(__name__)

_BACKGROUND_RETRY_MAX = 60.0


class BackgroundState(enum.StrEnum):
    """Where a layer's background download is (``background`` in the status document)."""

    OFF = "off"  # not started, not wanted, or stopped
    WAITING = "waiting"  # for its start delay, or to retry after an error
    PAUSED = "paused"  # while readers wait for the registry
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # the downloaded blob did not match its digest


#: States in which the blob is still filling up.
IN_PROGRESS = frozenset({BackgroundState.RUNNING, BackgroundState.PAUSED, BackgroundState.WAITING})


class BackgroundFetcher:
    def __init__(self, ctx: StoreContext, evictor: Evictor) -> None:
        self._ctx = ctx
        self._evictor = evictor

    async def run(self, layer: Layer) -> None:
        """Download the rest of the blob at low priority; then it is served entirely locally."""
        ctx = self._ctx
        cfg = ctx.cfg
        ingest = layer.ingest
        if layer.complete or ingest is None or ctx.disk is None or not cfg.background_fetch:
            return
        if not ingest.owned:
            layer.background = BackgroundState.OFF
            log.info("background-skip layer=%s: another process downloads it", layer.digest)
            return
        disk = ctx.disk
        if disk.limit and layer.info.blob_size > disk.limit // 2:
            layer.background = BackgroundState.OFF
            log.warning(
                "background-skip layer=%s: %d bytes is more than half the cache limit",
                layer.digest,
                layer.info.blob_size,
            )
            return
        with trio.CancelScope() as scope:
            layer.bg_scope = scope
            layer.background = BackgroundState.WAITING
            await trio.sleep(cfg.background_delay)
            await self._loop(layer, ingest)

    @staticmethod
    def stop(layer: Layer) -> None:
        if layer.bg_scope is not None:
            layer.bg_scope.cancel()

    async def _loop(self, layer: Layer, ingest: Ingest) -> None:
        ctx = self._ctx
        cfg = ctx.cfg
        scheduler = ctx.scheduler
        disk = ctx.disk
        assert disk is not None
        piece = max(cfg.background_range_kb, 64) * 1024
        failures = 0
        start = time.monotonic()
        fetched0 = layer.fetched_bytes
        digest, source = layer.digest, ctx.source
        while True:
            await scheduler.writes_done()  # ranges readers fetched are recorded before we look
            missing = ingest.missing()
            if not missing:
                break
            if scheduler.busy:
                layer.background = BackgroundState.PAUSED
                await scheduler.wait_idle()
                continue  # what readers fetched meanwhile is not fetched again
            s, e = missing[0]
            e = min(e, s + piece)
            if disk.limit and disk.total + (e - s) > disk.limit:
                await self._evictor.evict()
                if disk.total + (e - s) > disk.limit:
                    layer.background = BackgroundState.OFF
                    layer.last_error = "cache limit reached: background fetch stopped"
                    log.warning(
                        "background-stopped layer=%s: the cache limit (%d bytes) is reached",
                        layer.digest,
                        disk.limit,
                    )
                    return
            layer.background = BackgroundState.RUNNING
            deadline = time.monotonic() + cfg.read_timeout
            ref = layer.ref

            def fetch(
                s: int = s, e: int = e, deadline: float = deadline, ref: str = ref
            ) -> list[bytes]:
                return source.fetch_ranges(ref, digest, [(s, e - s)], deadline=deadline)

            t0 = time.monotonic()
            try:
                data = await self._piece(layer, fetch, s, e, ingest)
            except (AlsError, trio.TooSlowError) as exc:
                failures += 1
                delay = min(2.0**failures, _BACKGROUND_RETRY_MAX)
                layer.last_error = f"background fetch: {exc or 'timed out'}"
                layer.background = BackgroundState.WAITING
                log.warning("background-retry layer=%s in=%.0fs error=%s", layer.digest, delay, exc)
                await trio.sleep(delay)
                continue
            failures = 0
            dt = time.monotonic() - t0
            if data is None:
                layer.background = BackgroundState.OFF
                log.warning(
                    "background-stopped layer=%s: the cache cannot be written", layer.digest
                )
                return
            self._evictor.after_write()
            if cfg.background_bandwidth_mb > 0:
                await trio.sleep(max(len(data) / (cfg.background_bandwidth_mb * 1e6) - dt, 0))
        ok = await scheduler.cpu_call(lambda: ingest.finish(layer.digest))
        if ok:
            layer.complete = True
            layer.ingest = None
            layer.background = BackgroundState.DONE
            layer.last_error = None
            log.info(
                "layer-complete layer=%s bytes=%d fetched=%d seconds=%.1f",
                layer.digest,
                layer.info.blob_size,
                layer.fetched_bytes - fetched0,
                time.monotonic() - start,
            )
        else:
            layer.background = BackgroundState.FAILED
            layer.last_error = "the downloaded blob did not match its digest"

    async def _piece(
        self, layer: Layer, fetch: Callable[[], list[bytes]], s: int, e: int, ingest: Ingest
    ) -> bytes | None:
        """Fetch [s, e) and record it; None if the cache cannot be written."""
        ctx = self._ctx
        ev = trio.Event()
        layer.bg_piece = (s, e, ev)
        try:
            t0 = time.monotonic()
            with trio.fail_after(ctx.cfg.read_timeout + 5):
                (data,) = await ctx.scheduler.background_call(fetch)
            layer.fetched_bytes += len(data)
            ctx.fetched(len(data), "background", time.monotonic() - t0)
            written = await ctx.scheduler.disk_call(partial(ingest.write, s, data))
        finally:
            layer.bg_piece = None
            ev.set()
        return data if written else None
