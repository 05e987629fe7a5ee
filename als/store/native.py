"""Native layers: a complete layer unpacked once into the cache, so overlay reads it directly.

When every byte of a layer's blob is in the disk cache and the blob matched its digest, the
layer's tree is unpacked (every file verified again against the TOC as it is written) into

    CACHE/native/<hex>/tree     the files, as containers/storage unpacks a layer for overlay:
                                owners, modes, times, xattrs, hardlinks, devices, whiteouts as
                                0/0 character devices, opaque directories marked by the xattr
                                of the overlay mode in use (config ``opaque_xattr``)
    CACHE/native/<hex>/ready    written last: what the tree is (blob and TOC digest, bytes,
                                entries, opaque xattrs). A tree without it is never served.

A tree is made under ``CACHE/native/<hex>.partial.<pid>.<ns>`` and renamed into place, so a kill
while unpacking leaves nothing that looks ready; the next start removes such leftovers. The
FUSE layer then answers the pool's ``diff`` of the layer with a symlink to the tree (see
:mod:`als.store.fs.operations`). Trees count against the cache limit and are evicted like
other cache data, except that the tree of a layer podman uses is never removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from als.digest import hex_of
from als.errors import AlsError, VerifyError
from als.extract import extract_index
from als.formats import EntryType, LayerIndex
from als.fsutil import pid_alive, remove_tree
from als.libc import function
from als.store.context import StoreContext

if TYPE_CHECKING:
    from als.store.cache import DiskCache
    from als.store.layer import Layer

log = logging.getLogger(__name__)

NATIVE_DIR = "native"
TREE = "tree"
READY = "ready"
_FORMAT = 1


@dataclass(frozen=True)
class NativeTree:
    """A ready tree: where it is and what its ``ready`` marker says."""

    path: Path  # CACHE/native/<hex>
    blob_digest: str
    toc_digest: str
    size: int  # bytes on disk
    entries: int
    opaque_xattrs: tuple[str, ...]

    @property
    def tree(self) -> Path:
        return self.path / TREE

    def marker(self) -> bytes:
        doc = {
            "format": _FORMAT,
            "blob": self.blob_digest,
            "toc": self.toc_digest,
            "bytes": self.size,
            "entries": self.entries,
            "opaque_xattrs": list(self.opaque_xattrs),
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def read(cls, path: Path) -> NativeTree | None:
        """The tree at ``path`` if its marker is there and consistent with its name."""
        try:
            doc: Any = json.loads((path / READY).read_bytes())
            tree = cls(
                path=path,
                blob_digest=str(doc["blob"]),
                toc_digest=str(doc["toc"]),
                size=int(doc["bytes"]),
                entries=int(doc["entries"]),
                opaque_xattrs=tuple(str(x) for x in doc["opaque_xattrs"]),
            )
            if doc["format"] != _FORMAT or hex_of(tree.blob_digest) != path.name:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not (path / TREE).is_dir():
            return None
        return tree


def scan(disk: DiskCache) -> dict[str, NativeTree]:
    """The ready trees of the cache, by blob digest; leftovers of unfinished unpacks removed.

    Runs in a disk thread at start. A directory without a valid marker, or a partial one whose
    process is gone, is removed: nothing half-made is ever served.
    """
    base = disk.dir / NATIVE_DIR
    base.mkdir(exist_ok=True)
    ready: dict[str, NativeTree] = {}
    for entry in os.scandir(base):
        path = Path(entry.path)
        name = entry.name
        if not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if ".partial." in name or ".dead." in name:
            pid = name.split(".")[2] if name.count(".") >= 2 else ""
            # our own pid's leftovers are from a previous life of this pid
            if ".dead." in name or not pid_alive(pid) or pid == str(os.getpid()):
                remove_tree(path)
            continue
        tree = NativeTree.read(path)
        if tree is None:
            log.warning("native-discard dir=%s: no valid ready marker; removing it", name)
            remove_tree(path)
            continue
        ready[tree.blob_digest] = tree
    return ready


def unpack(
    disk: DiskCache, index: LayerIndex, blob_digest: str, opaque_xattrs: Sequence[str]
) -> NativeTree:
    """Unpack a layer whose blob is complete in the cache; runs in a worker thread.

    Every file's bytes are verified against the TOC as they are written (AlsError, and nothing
    left behind, if one fails). Returns the ready tree.
    """
    hexd = hex_of(blob_digest)
    base = disk.dir / NATIVE_DIR
    final = base / hexd
    partial = base / f"{hexd}.partial.{os.getpid()}.{time.time_ns()}"
    base.mkdir(exist_ok=True)
    partial.mkdir(mode=0o700)
    try:
        fd = os.open(disk.blob_file(hexd), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        remove_tree(partial)
        raise AlsError(f"layer {blob_digest}: the cached blob is gone ({exc.strerror})") from None
    try:

        def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            out = []
            for off, n in ranges:
                data = os.pread(fd, n, off)
                if len(data) != n:
                    raise VerifyError(f"layer {blob_digest}: the cached blob is short")
                out.append(data)
            return out

        stats = extract_index(
            index, read, partial / TREE, whiteouts="overlay", opaque_xattrs=opaque_xattrs
        )
        tree = NativeTree(
            path=final,
            blob_digest=blob_digest,
            toc_digest=index.toc_digest,
            size=_disk_usage(partial / TREE),
            entries=stats.entries,
            opaque_xattrs=tuple(opaque_xattrs),
        )
        _sync_fs(partial)  # the files are on disk before the marker that vouches for them
        (partial / READY).write_bytes(tree.marker())
        _sync_fs(partial)
        try:
            os.rename(partial, final)
        except OSError:
            # Another process made it first (a shared cache): use that tree if it is ready.
            remove_tree(partial)
            other = NativeTree.read(final)
            if other is None:
                raise
            return other
        return tree
    except BaseException:
        remove_tree(partial)
        raise
    finally:
        os.close(fd)


def unpacked_size(index: LayerIndex) -> int:
    """About the bytes a layer's tree takes on disk: file sizes in blocks, a block an entry."""
    total = 0
    for i in index.iter_ids():
        if index.type(i) == EntryType.REG:
            total += -(-index.size(i) // 4096) * 4096
        total += 4096 if index.type(i) == EntryType.DIR else 0
    return total


def _sync_fs(path: Path) -> None:
    """syncfs(2) of the filesystem holding ``path`` (sync(2) where libc lacks it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS is not None and _SYNCFS(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _load_syncfs() -> Any | None:
    fn = function("syncfs")
    if fn is not None:
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


def _disk_usage(root: Path) -> int:
    """Bytes a tree occupies (each inode once)."""
    seen: set[int] = set()
    total = 0
    stack = [str(root)]
    while stack:
        for entry in os.scandir(stack.pop()):
            st = entry.stat(follow_symlinks=False)
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total


class NativeLayers:
    """The engine's part that makes complete layers native and tells who needs to know."""

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        self.trees: dict[str, NativeTree] = {}  # by blob digest
        self._making: set[str] = set()
        self._failed: dict[str, str] = {}
        #: Called (on the trio side) with a layer whose tree appeared or went away.
        self.listeners: list[Callable[[Layer], None]] = []

    @property
    def enabled(self) -> bool:
        return self._ctx.cfg.native_layers and os.geteuid() == 0 and self._ctx.disk is not None

    async def open(self) -> None:
        """Find the trees a previous run made (checking their markers)."""
        disk = self._ctx.disk
        if disk is None:
            return
        self.trees = await self._ctx.scheduler.disk_call(lambda: scan(disk))
        if self.trees:
            log.info("native-open trees=%d", len(self.trees))

    async def ensure(self, layer: Layer) -> None:
        """Make ``layer`` native if it is complete: adopt a ready tree, or unpack one."""
        if layer.native is not None or not layer.complete or not self.enabled:
            return
        digest = layer.digest
        opaque = self._ctx.cfg.opaque_xattrs
        tree = self.trees.get(digest)
        if tree is not None and (
            tree.toc_digest != layer.info.toc_digest or tree.opaque_xattrs != opaque
        ):
            # Made for another TOC or another overlay mode: make it again.
            await self._drop(digest)
            tree = None
        if tree is None:
            if digest in self._making or digest in self._failed:
                return
            disk = self._ctx.disk
            assert disk is not None
            need = unpacked_size(layer.index)
            if disk.limit and need > disk.limit // 2:
                # Like a download larger than half the limit: a tree that would crowd out
                # everything else (and, in use, could never be evicted) is not made.
                self._failed[digest] = "too large for the cache limit"
                log.warning(
                    "native-skip layer=%s: about %d bytes unpacked is more than half the cache "
                    "limit (%d bytes)",
                    digest,
                    need,
                    disk.limit,
                )
                return
            tree = await self._unpack(layer, opaque)
            if tree is None:
                return
        self._set(layer, tree)

    async def _unpack(self, layer: Layer, opaque: tuple[str, ...]) -> NativeTree | None:
        ctx = self._ctx
        disk = ctx.disk
        assert disk is not None
        digest = layer.digest
        self._making.add(digest)
        t0 = time.monotonic()
        try:
            index = layer.index
            tree = await ctx.scheduler.background_call(lambda: unpack(disk, index, digest, opaque))
        except (AlsError, OSError) as exc:
            self._failed[digest] = str(exc)
            layer.last_error = f"native: {exc}"
            log.warning("native-failed layer=%s: %s", digest, exc)
            return None
        finally:
            self._making.discard(digest)
        disk.account(f"{NATIVE_DIR}/{hex_of(digest)}", tree.size, hex_of(digest))
        self.trees[digest] = tree
        log.info(
            "layer-native layer=%s entries=%d bytes=%d seconds=%.2f",
            digest,
            tree.entries,
            tree.size,
            time.monotonic() - t0,
        )
        ctx.scheduler.on_write()
        return tree

    def _set(self, layer: Layer, tree: NativeTree | None) -> None:
        layer.native = tree.tree if tree is not None else None
        for listener in list(self.listeners):
            try:
                listener(layer)
            except Exception:
                log.exception("native listener failed for layer %s", layer.digest)

    async def _drop(self, digest: str) -> None:
        tree = self.trees.pop(digest, None)
        disk = self._ctx.disk
        if tree is None or disk is None:
            return
        disk.forget_unit(f"{NATIVE_DIR}/{hex_of(digest)}")
        await self._ctx.scheduler.disk_call(lambda: remove_tree(tree.path))

    def removed(self, layers: dict[str, Layer], hexes: Sequence[str]) -> None:
        """Eviction removed the trees of these layers (hex digests): serve them by FUSE again."""
        for hexd in hexes:
            digest = "sha256:" + hexd
            self.trees.pop(digest, None)
            self._failed.pop(digest, None)
            layer = layers.get(digest)
            if layer is not None and layer.native is not None:
                log.info("native-evicted layer=%s", digest)
                self._set(layer, None)
