"""Zero-message open: used only where the kernel supports it for directories too, and the
store's changed listings reach the kernel in batches, after the reply."""

from __future__ import annotations

import errno

import pytest
import trio

from als.store.fs.kernelcache import ListingNotices, kernel_has_no_opendir
from als.store.scheduler import Scheduler


@pytest.mark.parametrize(
    ("release", "ok"),
    [
        ("6.18.0-1-amd64", True),
        ("6.1.0-26-cloud-amd64", True),
        ("5.1.0", True),
        ("5.10.0-30-amd64", True),
        ("5.0.21", False),  # ENOSYS from opendir fails the opendir there
        ("4.19.0-27-amd64", False),
        ("3.10.0-1160.el7.x86_64", False),
        ("6", False),
        ("", False),
        ("x.y", False),
        ("5.4rc1", True),
    ],
)
def test_kernel_release(release: str, ok: bool) -> None:
    assert kernel_has_no_opendir(release) is ok


async def test_listing_notices_are_batched_and_survive_unknown_inodes() -> None:
    sent: list[int] = []

    def invalidate(inode: int) -> None:
        if inode == 13:
            raise OSError(errno.ENOENT, "the kernel does not know it")
        sent.append(inode)

    scheduler = Scheduler(net=1, cpu=1)
    async with trio.open_nursery() as nursery:
        scheduler.nursery = nursery
        notices = ListingNotices(scheduler, invalidate)
        for inode in (5, 3, 5, 13, 1):  # one request's changes: one batch, once each
            notices.changed(inode)
        assert sent == []  # never from inside the request that changed them
    assert sent == [1, 3, 5] and notices.sent == 4
