"""Keeping the disk cache under its limit: eviction passes, and the trigger after writes.

What must not be evicted (the layers podman uses, and their chunks) is asked of the manager
through the ``protected`` callable, run in a cpu thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from als.store.context import StoreContext

log = logging.getLogger(__name__)

#: (protected layer hex digests, protected chunk hex digests)
Protected = tuple[set[str], set[str]]


class Evictor:
    def __init__(
        self,
        ctx: StoreContext,
        protected: Callable[[], Protected],
        trees_removed: Callable[[list[str]], None] = lambda hexes: None,
    ) -> None:
        self._ctx = ctx
        self._protected = protected
        self._trees_removed = trees_removed
        self._evicting = False

    def after_write(self) -> None:
        """A cache write finished: start an eviction pass if the cache is over its limit."""
        disk = self._ctx.disk
        if disk is not None and disk.over_limit() and not self._evicting:
            self._ctx.scheduler.spawn(self.evict)

    async def evict(self) -> None:
        disk = self._ctx.disk
        if disk is None or not disk.over_limit() or self._evicting:
            return
        scheduler = self._ctx.scheduler
        self._evicting = True
        try:
            # Writes that land while a pass runs can take the cache over the limit again; a
            # pass that frees nothing ends the loop (what is left is protected or busy).
            for _ in range(8):
                protected = await scheduler.cpu_call(self._protected)
                report = await scheduler.disk_call(partial(disk.evict, *protected))
                if report.native_removed:
                    self._trees_removed(report.native_removed)
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
