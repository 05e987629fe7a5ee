"""The status document: what ``GET /status`` answers, and what metrics and ``als status`` read.

The manager builds a :class:`StoreStatus` (one :class:`LayerStatus` per layer). Readers of the
document (:mod:`als.store.metrics`, :mod:`als.cli.status`, which gets it as JSON) read it
defensively, so they also accept any mapping. Standard library only: ``als status`` must not
need the store's dependencies.
"""

from __future__ import annotations

from typing import TypedDict


class CacheStatus(TypedDict):
    dir: str
    bytes: int  # on disk
    limit_bytes: int
    degraded: str | None  # why the disk cache is disabled or read-only; None if it is fine
    hits: int  # memory and disk
    misses: int
    memory_bytes: int
    memory_limit_bytes: int


class LayerStatus(TypedDict):
    digest: str  # of the blob
    toc_digest: str
    refs: list[str]
    format: str
    size: int  # compressed blob bytes
    cached_bytes: int
    cached_percent: float
    complete: bool
    native: bool  # unpacked into the cache: overlay mounts made now read it directly
    background: str  # a BackgroundState value (als.store.background)
    uses: int  # podman's use count
    entries: int
    fetched_bytes: int
    read_errors: int
    last_error: str | None


class ServerStatus(TypedDict):
    generation: int  # 1 for the supervisor's first server, +1 per restart or takeover
    supervisor_pid: int


class _DaemonFields(TypedDict, total=False):
    # FUSE requests answered, by operation (added by the daemon, which owns the FUSE layer)
    fuse_requests: dict[str, int]
    # whether the kernel opens files and directories without asking (zero-message open)
    zero_message_open: bool
    # present when a supervisor keeps the FUSE connection (als.store.supervisor)
    server: ServerStatus


class StoreStatus(_DaemonFields):
    version: str
    pid: int
    root: str
    uptime_s: float
    cache: CacheStatus
    fetched_bytes: int  # from registries, all layers
    layers: list[LayerStatus]
