"""The collaborators every part of the engine shares, in one object handed to each part.

The manager builds one :class:`StoreContext`; the chunk loader, read-ahead, prefetch,
background downloads, eviction and the layers receive it (or the pieces of it they need)
instead of a pointer back to the manager.
"""

from __future__ import annotations

from dataclasses import dataclass

from als.store.cache import DiskCache
from als.store.config import StoreConfig
from als.store.memcache import ChunkCache
from als.store.ports import MetricsSink, Source
from als.store.scheduler import Scheduler


@dataclass(eq=False)
class StoreContext:
    cfg: StoreConfig
    source: Source
    scheduler: Scheduler
    memory: ChunkCache
    disk: DiskCache | None = None  # set by LayerManager.open(); without it, memory only
    metrics: MetricsSink | None = None
    fetched_bytes: int = 0  # from registries, all layers

    def fetched(self, nbytes: int, kind: str | None = None, seconds: float = 0.0) -> None:
        """Count ``nbytes`` fetched from a registry (and tell the metrics, given a ``kind``)."""
        self.fetched_bytes += nbytes
        if kind is not None and self.metrics is not None:
            self.metrics.observe_fetch(kind, seconds, nbytes)
