"""The kernel side of a FUSE connection, without libfuse: open ``/dev/fuse``, mount it, take the
connection's first request (FUSE_INIT), and send the one notification libfuse 3.14 lacks
(FUSE_NOTIFY_RESEND).

This is what lets the connection outlive the process that serves it (issue 15): the supervisor
(:mod:`als.store.supervisor`) mounts and keeps the device descriptor and the INIT request, and
each server it starts is handed both (:mod:`als.store.fs.handoff`). Nothing here imports pyfuse3.

Layouts are from the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.40+ for the resend bits).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from als.libc import function

FUSE_DEVICE = "/dev/fuse"
FUSE_INIT = 26
#: ``struct fuse_in_header``: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: ``struct fuse_init_in`` up to flags2: major, minor, max_readahead, flags, flags2.
INIT_IN = struct.Struct("<IIIII")
#: ``struct fuse_out_header``: len, error (or notify code), unique (0 for a notification).
OUT_HEADER = struct.Struct("<IiQ")
#: INIT flag (in ``flags2``, bit 39 of the 64): the kernel can resend the requests a server read
#: and did not answer, and marks them with :data:`UNIQUE_RESEND` (Linux 6.9+).
FUSE_HAS_RESEND = 1 << 39
FUSE_INIT_EXT = 1 << 30
FUSE_NOTIFY_RESEND = 7
UNIQUE_RESEND = 1 << 63

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2


class DeviceError(OSError):
    """The FUSE device or the mount could not be set up."""


@dataclass(frozen=True)
class InitRequest:
    """The kernel's FUSE_INIT request, kept whole so that any later server can be fed the very
    same negotiation."""

    raw: bytes
    unique: int
    major: int
    minor: int
    flags: int  # 64 bits: flags | flags2 << 32 (when the kernel set FUSE_INIT_EXT)

    @classmethod
    def parse(cls, raw: bytes) -> InitRequest:
        if len(raw) < IN_HEADER.size + 8:
            raise DeviceError(errno.EPROTO, f"short FUSE request ({len(raw)} bytes)")
        length, opcode, unique, *_ = IN_HEADER.unpack_from(raw)
        if opcode != FUSE_INIT or length != len(raw):
            raise DeviceError(errno.EPROTO, f"expected FUSE_INIT, got opcode {opcode}")
        body = raw[IN_HEADER.size :] + bytes(INIT_IN.size)
        major, minor, _readahead, flags, flags2 = INIT_IN.unpack_from(body)
        if flags & FUSE_INIT_EXT:
            flags |= flags2 << 32
        return cls(raw=raw, unique=unique, major=major, minor=minor, flags=flags)

    @property
    def supports_resend(self) -> bool:
        """Whether the kernel resends unanswered requests on FUSE_NOTIFY_RESEND."""
        return bool(self.flags & FUSE_HAS_RESEND)


@dataclass(frozen=True)
class MountOptions:
    """What libfuse would pass to mount(2) for the options als uses."""

    fsname: str = "als"
    subtype: str = "als"
    allow_other: bool = True
    default_permissions: bool = True

    def data(self, fd: int, root_mode: int) -> str:
        opts = [
            f"fd={fd}",
            f"rootmode={stat.S_IFMT(root_mode):o}",
            f"user_id={os.getuid()}",
            f"group_id={os.getgid()}",
        ]
        if self.default_permissions:
            opts.append("default_permissions")
        if self.allow_other:
            opts.append("allow_other")
        return ",".join(opts)


def _libc_call(name: str, *args: Any) -> int:
    """Call the C library's ``name``; the errno on failure (ENOSYS if there is no such call)."""
    fn = function(name)
    if fn is None:
        return errno.ENOSYS
    return 0 if fn(*args) == 0 else ctypes.get_errno()


def open_device() -> int:
    """Open /dev/fuse (close-on-exec; descriptors are handed on explicitly)."""
    try:
        return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(exc.errno, f"cannot open {FUSE_DEVICE}: {exc.strerror}") from None


def mount(fd: int, mountpoint: Path, options: MountOptions) -> None:
    """mount(2) the connection of ``fd`` at ``mountpoint`` (root, or root of a user namespace
    that owns the mount namespace; others need fusermount3, which this does not do)."""
    root_mode = os.stat(mountpoint).st_mode
    err = _libc_call(
        "mount",
        options.fsname.encode(),
        os.fsencode(mountpoint),
        f"fuse.{options.subtype}".encode(),
        ctypes.c_ulong(MS_NOSUID | MS_NODEV),
        options.data(fd, root_mode).encode(),
    )
    if err:
        raise DeviceError(err, f"cannot mount FUSE at {mountpoint}: {os.strerror(err)}")


def unmount(mountpoint: Path) -> None:
    """Detach the mount (what libfuse's unmount does as root); running users keep theirs."""
    err = _libc_call("umount2", os.fsencode(mountpoint), MNT_DETACH)
    if err and err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
        raise DeviceError(err, f"cannot unmount {mountpoint}: {os.strerror(err)}")


def read_init(fd: int, timeout: float) -> InitRequest:
    """Read the connection's first request, which the kernel sends at mount: FUSE_INIT."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise DeviceError(errno.ETIMEDOUT, "the kernel sent no FUSE_INIT after the mount")
    # The kernel refuses reads into buffers smaller than FUSE_MIN_READ_BUFFER (8 KiB).
    return InitRequest.parse(os.read(fd, 1 << 17))


def notify_resend(fd: int) -> bool:
    """Ask the kernel to queue again every request a server read and did not answer.

    True if the kernel took it; False if it does not know the notification (before 6.9), in
    which case such requests stay unanswered until their callers are killed.
    """
    try:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True
