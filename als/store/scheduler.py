"""Where the engine's work runs, and with which priority.

Blocking work runs in worker threads behind four named limiters: ``net`` (registry calls for
reads and lookups), ``background`` (whole-blob downloads), ``cpu`` (inflate, hashing) and
``disk`` (the on-disk cache). The engine's own tasks (read-ahead, prefetch, cache writes,
eviction) run in the manager's nursery once it runs. While a reader waits for the registry
(``foreground()``), background downloads pause (``busy``, ``wait_idle()``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

T = TypeVar("T")


class Scheduler:
    """The named thread limiters, foreground priority, and the engine's own tasks."""

    def __init__(self, net: int, cpu: int, disk: int = 4, background: int = 2) -> None:
        self.net = trio.CapacityLimiter(net)
        self.cpu = trio.CapacityLimiter(cpu)
        self.disk = trio.CapacityLimiter(disk)
        self.background = trio.CapacityLimiter(max(background, 1))
        self.nursery: trio.Nursery | None = None  # set while the manager runs
        #: Called after each cache write spawned here (the manager's eviction trigger).
        self.on_write: Callable[[], None] = lambda: None
        self._busy = 0
        self._idle = trio.Event()
        self._idle.set()
        self._writes = 0  # cache writes scheduled and not finished
        self._written = trio.Event()
        self._written.set()

    # -- worker threads -------------------------------------------------------------------------

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

    # -- foreground priority --------------------------------------------------------------------

    @asynccontextmanager
    async def foreground(self) -> AsyncIterator[None]:
        """While a reader waits for the registry, background downloads pause."""
        if self._busy == 0:
            self._idle = trio.Event()
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    @property
    def busy(self) -> bool:
        return self._busy > 0

    async def wait_idle(self) -> None:
        while self._busy:
            await self._idle.wait()

    # -- the engine's own tasks -----------------------------------------------------------------

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the manager's nursery; dropped if the manager does not run."""
        if self.nursery is not None:
            self.nursery.start_soon(fn)

    def spawn_disk_write(self, fn: Callable[[], None]) -> None:
        """Run the cache write ``fn`` in a disk thread, counted until it is done."""

        async def write() -> None:
            try:
                await self.disk_call(fn)
            finally:
                self._writes -= 1
                if not self._writes:
                    self._written.set()
            self.on_write()

        if self.nursery is not None:
            if not self._writes:
                self._written = trio.Event()
            self._writes += 1
            self.nursery.start_soon(write)

    def writes_pending(self) -> bool:
        """Whether cache writes scheduled with :meth:`spawn_disk_write` are still running."""
        return self._writes > 0

    async def writes_done(self) -> None:
        """Wait until the cache writes scheduled so far are done."""
        await self._written.wait()
