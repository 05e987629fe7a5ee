"""Unpack a lazily-pullable layer into a directory, verifying every byte.

Safety: every path component is created or opened relative to a directory file descriptor with
``O_NOFOLLOW``; symlinks in the layer (or already in the destination) are never followed, so
nothing is written outside the destination. Names come from a validated :class:`LayerIndex`
(no ``..``, no ``/``, no NUL), which is the second line of defence.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from als.errors import AlsError, VerifyError
from als.formats.decode import iter_file
from als.formats.model import Entry, EntryType, LayerIndex, ReadRanges
from als.overlay import (
    OPAQUE_MARKER,
    OPAQUE_VALUE,
    TRUSTED_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
    whiteout_target,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 64


class ExtractError(AlsError):
    """Writing the tree failed (permissions, disk full, unsupported file type...)."""


@dataclass
class ExtractStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0


class _DirFds:
    """An LRU cache of open directory fds, keyed by entry id; opened with O_NOFOLLOW."""

    def __init__(self, index: LayerIndex, root_fd: int) -> None:
        self._ix = index
        self._root = root_fd
        self._fds: OrderedDict[int, int] = OrderedDict()

    def get(self, dir_id: int) -> int:
        if dir_id == 0:
            return self._root
        fd = self._fds.get(dir_id)
        if fd is not None:
            self._fds.move_to_end(dir_id)
            return fd
        ix = self._ix
        parent_fd = self.get(ix.entry_parent(dir_id))
        fd = os.open(ix.entry_name(dir_id), _DIR_FLAGS, dir_fd=parent_fd)
        self._fds[dir_id] = fd
        while len(self._fds) > _FD_CACHE:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _remove_existing(name: str, dir_fd: int) -> None:
    """Make room for a new entry: unlink a non-directory, rmdir an (empty) directory."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _proc_path(dir_fd: int, name: str) -> str:
    # The magic link pins the directory; the last component is not followed (l*xattr).
    return f"/proc/self/fd/{dir_fd}/{name}"


def extract_index(
    index: LayerIndex,
    read: ReadRanges,
    dest: str | os.PathLike[str],
    *,
    whiteouts: str = "overlay",
    opaque_xattrs: Sequence[str] = (TRUSTED_OPAQUE_XATTR,),
) -> ExtractStats:
    """Write the layer's tree under ``dest`` (created if missing).

    ``whiteouts``: "overlay" (``.wh.X`` -> char device 0/0 named X, ``.wh..wh..opq`` -> each of
    ``opaque_xattrs`` set to ``y`` on the directory: ``trusted.overlay.opaque`` for a rootful
    overlay, ``user.overlay.opaque`` for one mounted with ``userxattr``) or "aufs" (``.wh.*``
    files as in the tar).
    """
    if whiteouts not in ("overlay", "aufs"):
        raise ValueError(f"unknown whiteout format {whiteouts!r}")
    dest_path = Path(dest)
    try:
        dest_path.mkdir(mode=0o755, exist_ok=True)
        root_fd = os.open(dest_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ExtractError(f"cannot open destination {dest_path}: {exc.strerror}") from None
    dirs = _DirFds(index, root_fd)
    try:
        opaque = tuple(opaque_xattrs) if whiteouts == "overlay" else ()
        return _extract(index, read, dirs, root_fd, whiteouts == "overlay", opaque)
    finally:
        dirs.close()
        os.close(root_fd)


def _extract(
    index: LayerIndex,
    read: ReadRanges,
    dirs: _DirFds,
    root_fd: int,
    overlay: bool,
    opaque_xattrs: tuple[str, ...],
) -> ExtractStats:
    stats = ExtractStats()
    as_root = os.geteuid() == 0
    dir_ids: list[int] = []
    opaque: list[int] = []
    path = ""
    try:
        for i in index.iter_ids():
            if i == 0:
                continue
            e = index.entry(i)
            path = e.path
            pfd = dirs.get(e.parent)
            stats.entries += 1
            if overlay and e.name.startswith(WHITEOUT_PREFIX) and e.type != EntryType.DIR:
                stats.whiteouts += 1
                target = whiteout_target(e.name)
                if e.name == OPAQUE_MARKER:
                    opaque.append(e.parent)
                elif target is not None:
                    _remove_existing(target, pfd)
                    os.mknod(target, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
                    if as_root:
                        os.chown(target, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
                # other .wh..wh.* names are aufs metadata, and invalid targets: dropped
                continue
            t = e.type
            if t == EntryType.DIR:
                try:
                    os.mkdir(e.name, 0o700, dir_fd=pfd)
                except FileExistsError:
                    st = os.lstat(e.name, dir_fd=pfd)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(e.name, dir_fd=pfd)
                        os.mkdir(e.name, 0o700, dir_fd=pfd)
                dir_ids.append(i)
                continue
            if t == EntryType.REG:
                _write_file(index, read, i, e.name, pfd, stats)
                fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    _apply_metadata(fd, e, as_root)
                finally:
                    os.close(fd)
                continue
            if t == EntryType.HARDLINK:
                tpfd = dirs.get(index.entry_parent(e.target))
                pfd = dirs.get(e.parent)
                _remove_existing(e.name, pfd)
                os.link(
                    index.entry_name(e.target),
                    e.name,
                    src_dir_fd=tpfd,
                    dst_dir_fd=pfd,
                    follow_symlinks=False,
                )
                continue
            _remove_existing(e.name, pfd)
            if t == EntryType.SYMLINK:
                os.symlink(e.link, e.name, dir_fd=pfd)
            elif t in (EntryType.CHAR, EntryType.BLOCK):
                kind = stat.S_IFCHR if t == EntryType.CHAR else stat.S_IFBLK
                os.mknod(e.name, kind | e.mode, os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
            elif t == EntryType.FIFO:
                os.mkfifo(e.name, e.mode, dir_fd=pfd)
            if as_root:
                os.chown(e.name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
            if t != EntryType.SYMLINK:
                os.chmod(e.name, e.mode, dir_fd=pfd, follow_symlinks=False)
            for k, v in e.xattrs.items():
                os.setxattr(_proc_path(pfd, e.name), k, v, follow_symlinks=False)
            os.utime(e.name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

        # Directories last: modes (a read-only dir must not block its children), owners,
        # xattrs, opaque markers and times (creating children changed their mtimes).
        path = ""
        for d in opaque:
            for name in opaque_xattrs:
                os.setxattr(dirs.get(d), name, OPAQUE_VALUE)
        if index.root_listed:
            dir_ids.append(0)
        for i in reversed(dir_ids):
            e = index.entry(i)
            path = e.path or "."
            fd = dirs.get(i)
            _apply_metadata(fd, e, as_root)
    except OSError as exc:
        what = exc.strerror or str(exc)
        if exc.errno in (errno.EPERM, errno.EACCES) and not as_root:
            what += " (devices, ownership and trusted.* xattrs need root)"
        layer = f"layer {index.layer}: " if index.layer else ""
        raise ExtractError(f"{layer}extracting {path!r}: {what}") from None
    return stats


def _apply_metadata(fd: int, e: Entry, as_root: bool) -> None:
    """Owner (as root), mode, xattrs and mtime of an extracted file or directory, by fd."""
    if as_root:
        os.fchown(fd, e.uid, e.gid)
    os.fchmod(fd, e.mode)
    for k, v in e.xattrs.items():
        os.setxattr(fd, k, v)
    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))


def _write_file(
    index: LayerIndex, read: ReadRanges, i: int, name: str, pfd: int, stats: ExtractStats
) -> None:
    with contextlib.suppress(OSError):
        _remove_existing(name, pfd)  # if this fails, the O_EXCL open below reports it
    fd = os.open(
        name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
        dir_fd=pfd,
    )  # fmt: skip
    try:
        for piece in iter_file(index, i, read):
            view = memoryview(piece)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            stats.bytes += len(piece)
    except VerifyError:
        os.close(fd)
        os.unlink(name, dir_fd=pfd)  # never leave unverified bytes behind
        raise
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    stats.files += 1
