"""What the kernel keeps of the pool, and telling it when that changed.

Under zero-message open (the first ``open``/``opendir`` answered ENOSYS) the kernel opens files
and directories without asking the store and keeps their pages and listings. Layer contents
never change; the store's own directories do, as images are looked up, and each change must
drop the listing the kernel holds.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from als.store.scheduler import Scheduler

log = logging.getLogger(__name__)


def kernel_has_no_opendir(release: str) -> bool:
    """Whether a kernel of this release takes ENOSYS from opendir as "open directories
    without asking" (FUSE_NO_OPENDIR_SUPPORT, Linux 5.1); older ones fail the opendir."""
    parts = release.split(".", 2)
    try:
        major, minor = int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (5, 1)


class ListingNotices:
    """Drops the kernel's listing of store directories that changed: soon, several at once,
    from a worker thread, and never from inside the request that changed them (its reply goes
    first). ``invalidate(inode)`` is the FUSE layer's notification; OSError ENOENT (an inode
    the kernel does not know) is fine."""

    def __init__(self, scheduler: Scheduler, invalidate: Callable[[int], None]) -> None:
        self._scheduler = scheduler
        self._invalidate = invalidate
        self._stale: set[int] = set()
        self.sent = 0

    def changed(self, inode: int) -> None:
        if not self._stale:
            self._scheduler.spawn(self._flush)
        self._stale.add(inode)

    async def _flush(self) -> None:
        await trio.lowlevel.checkpoint()
        inodes, self._stale = self._stale, set()

        def notify() -> None:
            for inode in sorted(inodes):
                try:
                    self._invalidate(inode)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.debug("listing invalidation of inode %d: %s", inode, exc)
            self.sent += len(inodes)

        await self._scheduler.disk_call(notify)
