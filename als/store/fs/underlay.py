"""The pool's underlay: links beneath the FUSE mount that keep native layers reachable.

containers/storage stats ``POOL/<base64 ref>/<digest>/{diff,info,blob}`` whenever it creates
a container or mounts a layer, and its overlay lowerdir chain ends at that ``diff``. For a
native layer (one unpacked into the cache, :mod:`als.store.native`) the same paths are also
written into the pool directory itself, underneath the mount, through a descriptor opened
before mounting:

    <base64 ref>/<digest>/diff   symlink to the unpacked tree
    <base64 ref>/<digest>/info   the info document for that digest's dialect
    <base64 ref>/<digest>/blob   symlink to the complete blob in the cache

While als-mount serves, the mount hides them. When it is gone and its mount removed, podman
finds native layers there and keeps creating and starting containers from them; every other
layer is missing, so its lookup fails at once and podman pulls it normally. The links follow
what is native: written when a layer becomes native (or is looked up once it is), removed when
its tree is evicted, and checked at start against the trees that are ready.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

from als.digest import is_digest
from als.store.fs.protocol import b64encode_segment, parse_ref_segment

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILES = ("diff", "info", "blob")


class Underlay:
    """Link maintenance in the pool directory beneath the mount (blocking: run in a thread)."""

    def __init__(self, dir_fd: int) -> None:
        self._fd = dir_fd  # the pool directory, opened before the FUSE mount covered it

    @classmethod
    def open(cls, pool: Path) -> Underlay:
        """Open the pool directory (before mounting over it)."""
        return cls(os.open(pool, _DIR_FLAGS))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- writing --------------------------------------------------------------------------------

    def publish(self, ref: str, digest: str, tree: Path, info: bytes, blob: Path) -> bool:
        """Write the three entries of ``ref``/``digest``; False if the names cannot be used."""
        segment = b64encode_segment(ref)
        if "/" in segment or not is_digest(digest):
            return False  # a reference whose base64 has a slash is not one path segment
        ref_fd = self._mkdir_open(self._fd, segment)
        try:
            layer_fd = self._mkdir_open(ref_fd, digest)
            try:
                self._replace_symlink(layer_fd, "diff", os.fsdecode(tree))
                self._replace_file(layer_fd, "info", info)
                self._replace_symlink(layer_fd, "blob", os.fsdecode(blob))
            finally:
                os.close(layer_fd)
        finally:
            os.close(ref_fd)
        return True

    def withdraw(self, ref_segment: str, digest: str) -> None:
        """Remove ``<ref_segment>/<digest>`` and its entries (and the ref dir once empty)."""
        try:
            ref_fd = os.open(ref_segment, _DIR_FLAGS, dir_fd=self._fd)
        except OSError:
            return
        try:
            try:
                layer_fd = os.open(digest, _DIR_FLAGS, dir_fd=ref_fd)
            except OSError:
                return
            try:
                for name in [*_FILES, "use"]:
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        os.unlink(name, dir_fd=layer_fd)
            finally:
                os.close(layer_fd)
            with contextlib.suppress(OSError):
                os.rmdir(digest, dir_fd=ref_fd)
        finally:
            os.close(ref_fd)
        with contextlib.suppress(OSError):
            os.rmdir(ref_segment, dir_fd=self._fd)

    def withdraw_tree(self, tree: Path) -> int:
        """Remove every path whose ``diff`` links to ``tree``; how many were removed."""
        target = os.fsdecode(tree)
        gone = [(seg, dig) for seg, dig, link in self.entries() if link == target]
        for seg, dig in gone:
            self.withdraw(seg, dig)
        return len(gone)

    def reconcile(self, ready: set[str]) -> int:
        """Remove what does not lead to a ready tree (or is not ours); how many were removed."""
        removed = 0
        for seg, dig, link in self.entries():
            if link is None or link not in ready:
                self.withdraw(seg, dig)
                removed += 1
        for seg in self._names(self._fd):
            if parse_ref_segment(seg.encode()) is None:
                log.warning("underlay: leaving unknown entry %r in the pool directory alone", seg)
        return removed

    def entries(self) -> list[tuple[str, str, str | None]]:
        """``(ref segment, digest, diff link target or None)`` of what is written."""
        out: list[tuple[str, str, str | None]] = []
        for seg in self._names(self._fd):
            if parse_ref_segment(seg.encode()) is None:
                continue
            try:
                ref_fd = os.open(seg, _DIR_FLAGS, dir_fd=self._fd)
            except OSError:
                continue
            try:
                for dig in self._names(ref_fd):
                    if not is_digest(dig):
                        continue
                    try:
                        link: str | None = os.readlink(f"{dig}/diff", dir_fd=ref_fd)
                    except OSError:
                        link = None
                    out.append((seg, dig, link))
            finally:
                os.close(ref_fd)
        return out

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _names(dir_fd: int) -> list[str]:
        fd = os.dup(dir_fd)
        try:
            with os.scandir(fd) as it:
                return [e.name for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []
        finally:
            os.close(fd)

    @staticmethod
    def _mkdir_open(dir_fd: int, name: str) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, f"underlay: {name} is not a directory")
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    @staticmethod
    def _replace_symlink(dir_fd: int, name: str, target: str) -> None:
        with contextlib.suppress(OSError):
            if os.readlink(name, dir_fd=dir_fd) == target:
                return
        tmp = f".{name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        os.symlink(target, tmp, dir_fd=dir_fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    @staticmethod
    def _replace_file(dir_fd: int, name: str, data: bytes) -> None:
        tmp = f".{name}.{os.getpid()}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
            dir_fd=dir_fd,
        )  # fmt: skip
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
