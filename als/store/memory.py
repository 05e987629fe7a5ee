"""Giving freed memory back to the system after bursts of chunk traffic.

Every chunk a reader gets passes through buffers of a few KiB to a few hundred KiB: the
compressed bytes, their slices, the decoded chunk (kept for a while by the memory cache, then
dropped). Those below the allocator's mmap threshold come from the heap, and glibc's ``free``
returns heap pages to the system only from the top of the heap: after reading a large layer
the daemon kept about 30 MB of free pages between live objects. ``malloc_trim(0)`` releases
every free page of every arena (``madvise(MADV_DONTNEED)``), at the price of page faults when
the memory is used again, so :class:`MemoryTrimmer` calls it once per few MiB of chunk traffic
and once when a burst of reads is over, in a worker thread.

Where ``malloc_trim`` is missing (not glibc) nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from als.libc import function

log = logging.getLogger(__name__)

#: Chunk bytes passed through memory between two trims while reads go on.
TRIM_EVERY = 1 << 20
#: A burst of reads is over after this many seconds without chunk traffic.
TRIM_QUIET = 0.2


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None where the C library has none."""
    fn = function("malloc_trim")
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


def malloc_trim() -> bool:
    """Release the allocator's free pages to the system (glibc ``malloc_trim(0)``); True if
    memory was released, False if nothing was or the C library has no ``malloc_trim``."""
    fn = _libc_malloc_trim()
    return fn is not None and bool(fn(0))


class MemoryTrimmer:
    """Calls ``trim`` (default :func:`malloc_trim`) in a worker thread (``in_thread``) after
    every ``every`` bytes of chunk traffic (``note``) and after ``quiet`` seconds without any.

    ``note`` is called on the trio side (it is cheap: a counter and an event); :meth:`run`
    does the trimming while the store runs.
    """

    def __init__(
        self,
        trim: Callable[[], object] = malloc_trim,
        *,
        every: int = TRIM_EVERY,
        quiet: float = TRIM_QUIET,
        release: Callable[[], object] | None = None,
        idle: float = 0.0,
        shrink: Callable[[], object] | None = None,
        in_thread: Callable[[Callable[[], object]], Awaitable[object]] = trio.to_thread.run_sync,
    ) -> None:
        self._trim = trim
        self._in_thread = in_thread
        self.every = every
        self.quiet = quiet
        # After ``idle`` seconds without chunk traffic (0: never), ``release`` (empty the
        # memory cache) and trim: a store at rest holds no decoded chunks.
        self._release = release
        self.idle = idle
        # Before each trim: give back what is no longer needed (the memory cache's consumed
        # chunks), so that the trim can return those pages too.
        self._shrink = shrink
        self.releases = 0
        self.pending = 0  # bytes noted since the last trim
        self.trims = 0
        self.seconds = 0.0  # spent trimming, in all
        self._noted = trio.Event()
        self._full = trio.Event()

    def note(self, nbytes: int) -> None:
        """``nbytes`` of chunk data went through memory (decoded, cached or dropped)."""
        self.pending += nbytes
        self._noted.set()
        if self.pending >= self.every:
            self._full.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Trim after each ``every`` bytes noted and at the end of each burst, and release
        after ``idle`` quiet seconds, until cancelled."""
        task_status.started()
        while True:
            if self._release is not None and self.idle > 0:
                with trio.move_on_after(self.idle) as waited:
                    await self._noted.wait()
                if waited.cancelled_caught:
                    await self.release_now()
                    await self._noted.wait()
            else:
                await self._noted.wait()
            self._noted = trio.Event()
            with trio.move_on_after(self.quiet):
                await self._full.wait()
            if not self._full.is_set() and self._noted.is_set():
                continue  # still reading, and not much yet: wait for more or for quiet
            await self.trim_now()

    async def release_now(self) -> None:
        """Empty the memory cache (``release``) and trim."""
        if self._release is not None:
            self._release()
            self.releases += 1
            log.debug("memory-release releases=%d", self.releases)
        await self.trim_now()

    async def trim_now(self) -> None:
        """Trim once, in a worker thread."""
        self.pending = 0
        self._full = trio.Event()
        if self._shrink is not None:
            self._shrink()
        start = time.perf_counter()
        await self._in_thread(self._trim)
        took = time.perf_counter() - start
        self.trims += 1
        self.seconds += took
        log.debug("malloc-trim took=%.1fms trims=%d", took * 1000, self.trims)
