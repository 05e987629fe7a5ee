"""The pyfuse3 Operations: a thin translation layer over :mod:`als.store.fs.namespace` and layers.

This and :mod:`als.store.daemon` are the only modules that import pyfuse3. Every handler that
does any work goes through :func:`_guard`, the single error boundary: pyfuse3 only catches
``FUSEError``, and any other exception would end the daemon and leave a dead mount under every
running container. (The handlers that only refuse a change are :func:`_read_only`, which raises
nothing else.)
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, FUSEError, InodeT

from als.digest import is_digest
from als.errors import AlsError
from als.formats import EntryType
from als.overlay import OPAQUE_VALUE
from als.store.config import StoreConfig
from als.store.fs.journal import Journal, JournalState
from als.store.fs.kernelcache import ListingNotices, kernel_has_no_opendir
from als.store.fs.layerlink import link_layer_id
from als.store.fs.namespace import (
    Instance,
    Namespace,
    NodeKind,
    StoreNode,
    is_layer_inode,
    is_whiteout_entry,
    resolve_child,
    split_inode,
)
from als.store.fs.protocol import (
    ANN_LAYER_DIGEST,
    ANN_REFERENCE,
    info_json,
    parse_annotation_segment,
    parse_ref_segment,
    parse_rootfs_name,
)
from als.store.fs.restore import Restorer
from als.store.fs.underlay import Underlay
from als.store.layer import Layer
from als.store.manager import LayerManager

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_TYPE_BITS = {
    EntryType.REG: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}
# Attributes of layer entries kept ready (they never change); the table is emptied when full
# (a cheap bound: about 300 bytes an attribute). Listings are cached by the Namespace.
_ATTR_CACHE = 50_000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def _guard(
    fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """Translate every failure into a FUSE errno; log what is not a plain FUSEError."""

    name = fn.__name__

    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.requests[name] += 1
        if self.restorer is not None and self.restorer.pending:
            await self.restorer.wait(name, *args[:2])  # a takeover: the predecessor's first
        try:
            return await fn(self, *args, **kwargs)
        except FUSEError:
            raise
        except AlsError as exc:
            log.debug("%s%r: %s", fn.__name__, args, exc)
            raise FUSEError(exc.errno) from None
        except trio.TooSlowError:
            log.error("%s%r: timed out", fn.__name__, args)
            raise FUSEError(errno.EIO) from None
        except Exception:
            self.internal_errors += 1
            log.exception("internal error in %s%r", fn.__name__, args)
            raise FUSEError(errno.EIO) from None

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    return wrapper


async def _read_only(self: pyfuse3.Operations, /, *args: Any, **kwargs: Any) -> NoReturn:
    """Refuse a change to the filesystem: EROFS."""
    raise FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # O_TRUNC comes as a setattr (refused), not as an open flag the store may never see (read
    # by the pyfuse3 of scripts/build-pyfuse3; zero-message open needs it).
    disable_atomic_o_trunc = True
    # Symlink targets kept by the kernel (same pyfuse3): a layer's never change, and a native
    # layer's diff link is a new inode whenever its target could differ.
    enable_cache_symlinks = True

    def __init__(
        self,
        cfg: StoreConfig,
        manager: LayerManager,
        underlay: Underlay | None = None,
        *,
        journal: Journal | None = None,
        on_init: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.manager = manager
        self.underlay = underlay
        self._published: set[tuple[str, str]] = set()
        self.ns = Namespace(journal)
        self._on_init = on_init
        #: After a takeover: what brings back the nodes a previous server handed the kernel.
        self.restorer: Restorer | None = None
        self.internal_errors = 0
        #: FUSE requests answered, by operation (the status document's ``fuse_requests``).
        self.requests: collections.Counter[str] = collections.Counter()
        self._attrs: dict[int, tuple[Instance, EntryAttributes]] = {}
        self._opaque_xattrs = cfg.opaque_xattrs
        # A name a layer lacks: inode 0 tells the kernel to remember the miss (a negative
        # dentry) for layer_ttl, so a program probing paths (an interpreter's import path, a
        # loader's library path) asks once per name, not on every start.
        self._negative = EntryAttributes()
        self._negative.st_ino = InodeT(0)
        self._negative.entry_timeout = cfg.layer_ttl
        manager.native.listeners.append(self.native_changed)
        # Zero-message open (config zero_message_open): the first open and opendir answer
        # ENOSYS; from then on the kernel opens without asking and keeps pages and listings
        # (FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR). Only with a pyfuse3 that hands read and readdir
        # the inode when there is no handle (scripts/build-pyfuse3).
        self.zero_open = (
            cfg.zero_message_open
            and bool(getattr(pyfuse3, "ZERO_MESSAGE_OPEN", False))
            and kernel_has_no_opendir(os.uname().release)
        )
        self._owner = (os.geteuid(), os.getegid())
        self._warned_no_inode = False
        if self.zero_open:
            notices = ListingNotices(
                manager.scheduler,
                lambda inode: pyfuse3.invalidate_inode(InodeT(inode), attr_only=False),
            )
            self.ns.on_listing_change = notices.changed

    def init(self) -> None:
        # Called by libfuse while it handles FUSE_INIT, before it replies (see
        # als.store.fs.handoff for why a takeover happens right here).
        if self._on_init is not None:
            self._on_init()

    # -- takeover ---------------------------------------------------------------------------------

    def begin_restore(self, state: JournalState) -> Restorer:
        """Restore the journal's directories now, and hold the requests that concern its
        layers until the returned :class:`Restorer` has run (``await restorer.run()``)."""
        self.restorer = Restorer(self.ns, state, self.manager.lookup)
        return self.restorer

    # -- attributes -----------------------------------------------------------------------------

    def _store_attr(self, node: StoreNode) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = InodeT(node.inode)
        a.entry_timeout = self.cfg.store_ttl
        a.attr_timeout = self.cfg.store_ttl
        if node.kind == NodeKind.NATIVE:
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_nlink = 1
            a.st_size = len(self._native_target(node))
        elif node.kind.is_file:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            if node.kind == NodeKind.INFO:
                assert node.layer is not None
                a.st_size = len(info_json(node.layer.info, node.digest))
            else:
                assert node.layer is not None
                a.st_size = node.layer.info.blob_size
        elif node.kind == NodeKind.ROOT and self.zero_open:
            # Under zero-message open the kernel opens files for writing without asking; the
            # store refuses every write, but a shared writable mapping would change the cached
            # pages others read. So only the store's owner (podman's root) may enter the pool.
            a.st_mode = stat.S_IFDIR | 0o700
            a.st_nlink = 2
            a.st_uid, a.st_gid = self._owner
        else:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = node.mtime_ns
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        return a

    @staticmethod
    def _native_target(node: StoreNode) -> bytes:
        tree = node.layer.native if node.layer is not None else None
        return os.fsencode(tree) if tree is not None else b""

    def _layer_attr(self, inst: Instance, entry_id: int) -> EntryAttributes:
        index = inst.layer.index
        e = index.entry(entry_id)
        a = EntryAttributes()
        a.st_ino = InodeT(inst.inode(entry_id))
        a.entry_timeout = self.cfg.layer_ttl
        a.attr_timeout = self.cfg.layer_ttl
        a.st_blksize = 4096
        if is_whiteout_entry(index, entry_id):
            # overlayfs whiteout: a character device 0/0, owned as in the tar (as a normal
            # pull unpacks it).
            a.st_mode = stat.S_IFCHR
            a.st_nlink = 1
            a.st_rdev = 0
            a.st_uid = e.uid
            a.st_gid = e.gid
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = e.mtime_ns
            return a
        a.st_mode = _TYPE_BITS[e.type] | (e.mode & 0o7777)
        a.st_nlink = e.nlink
        a.st_uid = e.uid
        a.st_gid = e.gid
        if e.type == EntryType.REG:
            a.st_size = e.size
        elif e.type == EntryType.SYMLINK:
            a.st_size = len(e.link.encode("utf-8", "surrogateescape"))
        elif e.type == EntryType.DIR:
            a.st_size = 4096
        if e.type in (EntryType.CHAR, EntryType.BLOCK):
            a.st_rdev = os.makedev(e.devmajor, e.devminor)
        a.st_blocks = (a.st_size + 511) // 512
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = e.mtime_ns
        return a

    def _instance(self, inode: int) -> tuple[Instance, int]:
        number, entry_id = split_inode(inode)
        inst = self.ns.instances.get(number)
        if inst is None or not 0 <= entry_id < len(inst.layer.index):
            raise FUSEError(errno.ENOENT)
        return inst, entry_id

    def _node(self, inode: int) -> StoreNode:
        node = self.ns.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _attr(self, inode: int) -> EntryAttributes:
        if is_layer_inode(inode):
            inst, entry_id = self._instance(inode)
            # Layer entries never change: their attributes are built once (checked against the
            # instance, whose number a later instance may reuse).
            hit = self._attrs.get(inode)
            if hit is not None and hit[0] is inst:
                return hit[1]
            attr = self._layer_attr(inst, entry_id)
            if len(self._attrs) >= _ATTR_CACHE:
                self._attrs.clear()
            self._attrs[inode] = (inst, attr)
            return attr
        return self._store_attr(self._node(inode))

    @_guard
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> EntryAttributes:
        return self._attr(inode)

    # -- lookup ---------------------------------------------------------------------------------

    def _counted(self, attr: EntryAttributes) -> EntryAttributes:
        """Count one kernel lookup of the returned inode."""
        inode = int(attr.st_ino)
        if inode == 0:
            return attr  # a negative entry: nothing for the kernel to forget
        if is_layer_inode(inode):
            self.ns.instances[split_inode(inode)[0]].lookups += 1
        else:
            self.ns.nodes[inode].lookups += 1
        return attr

    @_guard
    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> EntryAttributes:
        if name == b".":
            return self._counted(self._attr(parent_inode))
        if is_layer_inode(parent_inode):
            inst, dir_id = self._instance(parent_inode)
            index = inst.layer.index
            if name == b"..":
                return self._counted(self._layer_attr(inst, index.entry(dir_id).parent))
            if index.entry(dir_id).type != EntryType.DIR:
                raise FUSEError(errno.ENOTDIR)
            found = resolve_child(index, dir_id, name.decode("utf-8", "surrogateescape"))
            if found is None:
                return self._negative

            cid, _ = found
            target = index.entry(cid).target
            return self._counted(self._layer_attr(inst, target if target >= 0 else cid))
        parent = self._node(parent_inode)
        if name == b"..":
            return self._counted(self._attr(parent.parent))
        if parent.kind == NodeKind.LAYERDIR and name == b"diff":
            return self._counted(self._diff(parent))
        inode = parent.children.get(name)
        if inode is not None and inode in self.ns.nodes:
            return self._counted(self._store_attr(self.ns.nodes[inode]))
        if inode is None and name in parent.instances:
            inst = parent.instances[name]
            if inst.number in self.ns.instances:
                return self._counted(self._layer_attr(inst, 0))
        return self._counted(await self._lookup_new(parent, name))

    async def _lookup_new(self, parent: StoreNode, name: bytes) -> EntryAttributes:
        ns = self.ns
        if parent.kind == NodeKind.ROOT:
            ref = parse_ref_segment(name)
            if ref is not None:
                return self._store_attr(ns.add_node(parent, name, NodeKind.REF, ref=ref))
            ann = parse_annotation_segment(name)
            if ann is not None:
                node = ns.add_node(parent, name, NodeKind.ANN, annotations=(ann,))
                return self._store_attr(node)
            raise FUSEError(errno.ENOENT)
        if parent.kind == NodeKind.REF:
            digest = name.decode("ascii", "replace")
            if not is_digest(digest):
                raise FUSEError(errno.ENOENT)
            layer = await self.manager.lookup(parent.ref, digest)
            node = ns.add_node(
                parent, name, NodeKind.LAYERDIR, ref=parent.ref, digest=digest, layer=layer
            )
            ns.new_instance(layer, node, b"diff")
            return self._store_attr(node)
        if parent.kind == NodeKind.LAYERDIR:
            assert parent.layer is not None
            if name in (b"info", b"blob"):
                node = ns.add_node(
                    parent,
                    name,
                    NodeKind(name.decode()),
                    ref=parent.ref,
                    digest=parent.digest,
                    layer=parent.layer,
                )
                return self._store_attr(node)
            raise FUSEError(errno.ENOENT)  # includes "use": it never exists
        if parent.kind == NodeKind.ANN:
            layer_id = parse_rootfs_name(name)
            if layer_id is not None:
                return await self._lookup_rootfs(parent, name, layer_id)
            ann = parse_annotation_segment(name)
            if ann is not None:
                anns = (*(a for a in parent.annotations if a[0] != ann[0]), ann)
                return self._store_attr(ns.add_node(parent, name, NodeKind.ANN, annotations=anns))
        raise FUSEError(errno.ENOENT)

    def _diff(self, parent: StoreNode) -> EntryAttributes:
        """A layer dir's ``diff``: a symlink to the unpacked tree once the layer is native (new
        overlay mounts then read the local filesystem), else the layer's tree served here."""
        layer = parent.layer
        assert layer is not None
        ns = self.ns
        old = ns.nodes.get(parent.children.get(b"diff", 0))
        if layer.native is not None:
            self._publish(parent)
            if old is None or old.kind != NodeKind.NATIVE:
                old = ns.add_node(
                    parent,
                    b"diff",
                    NodeKind.NATIVE,
                    ref=parent.ref,
                    digest=parent.digest,
                    layer=layer,
                )
            return self._store_attr(old)
        if old is not None:
            del parent.children[b"diff"]  # the tree went away: serve the layer again
            ns.listing_changed(parent)
        inst = parent.instances.get(b"diff")
        if inst is None or inst.number not in ns.instances:
            inst = ns.new_instance(layer, parent, b"diff")
        attr = self._layer_attr(inst, 0)
        # The name may soon lead to a symlink instead (an invalidation racing this reply could
        # be lost): the kernel keeps it briefly, the tree's own entries for layer_ttl.
        attr.entry_timeout = self.cfg.store_ttl
        return attr

    def native_changed(self, layer: Layer) -> None:
        """A layer's tree appeared or went away: the kernel must ask for its ``diff`` again,
        and the underlay follows."""
        for node in list(self.ns.nodes.values()):
            if node.kind == NodeKind.LAYERDIR and node.layer is layer:
                pyfuse3.invalidate_entry_async(InodeT(node.inode), b"diff", ignore_enoent=True)
                self.ns.listing_changed(node)  # diff is listed as a symlink, or a directory
                if layer.native is not None:
                    self._publish(node)
        if layer.native is None and self.underlay is not None:
            self._published = {k for k in self._published if k[1] not in _digests(layer)}
            ready = {os.fsdecode(t.tree) for t in self.manager.native.trees.values()}
            self.manager.scheduler.spawn(lambda: self._underlay_call(self._reconcile, ready))

    def _publish(self, node: StoreNode) -> None:
        """Write the underlay entries of a native layer's pool path (once, in a disk thread)."""
        layer, underlay, disk = node.layer, self.underlay, self.manager.disk
        key = (node.ref, node.digest)
        if layer is None or layer.native is None or underlay is None or disk is None:
            return
        if key in self._published:
            return
        self._published.add(key)
        tree, info = layer.native, info_json(layer.info, node.digest)
        blob = disk.blob_file(layer.digest.partition(":")[2])

        def publish() -> None:
            if underlay.publish(node.ref, node.digest, tree, info, blob):
                log.info("underlay-publish ref=%s digest=%s", node.ref, node.digest)

        self.manager.scheduler.spawn(lambda: self._underlay_call(publish))

    def _reconcile(self, ready: set[str]) -> None:
        assert self.underlay is not None
        removed = self.underlay.reconcile(ready)
        if removed:
            log.info("underlay-withdraw paths=%d", removed)

    async def _underlay_call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            await self.manager.scheduler.disk_call(lambda: fn(*args))
        except OSError as exc:
            log.warning("underlay: %s", exc)

    async def _lookup_rootfs(
        self, parent: StoreNode, name: bytes, layer_id: str
    ) -> EntryAttributes:
        anns = dict(parent.annotations)
        ref, digest = anns.get(ANN_REFERENCE), anns.get(ANN_LAYER_DIGEST)
        if not ref or not digest or not is_digest(digest):
            log.info("rootfs lookup without reference and layerdigest annotations: ENOENT")
            raise FUSEError(errno.ENOENT)
        layer = await self.manager.lookup(ref, digest)
        inst = parent.instances.get(name)
        if inst is None or inst.number not in self.ns.instances:
            inst = self.ns.new_instance(layer, parent, name)
        target = self.cfg.pool.joinpath(*self.ns.names_of(parent), name.decode())
        await trio.to_thread.run_sync(link_layer_id, self.cfg.root, layer_id, target)
        return self._layer_attr(inst, 0)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # forget must never raise (not even FUSEError).
        self.requests["forget"] += 1
        for inode, n in inode_list:
            try:
                self.ns.forget(int(inode), n)
            except Exception:
                self.internal_errors += 1
                log.exception("internal error in forget(%d, %d)", inode, n)

    # -- directories ----------------------------------------------------------------------------

    # Directory handles carry no state: the handle is the directory's inode and every readdir
    # recomputes its entries (a layer's listing is cached and never changes; a store directory
    # lists its live children ordered by inode, so the offsets stay valid while it changes).
    # A client holding thousands of open directories costs the daemon nothing.

    def _handle_inode(self, fh: FileHandleT) -> int:
        """The inode a handle stands for (handles are inodes). Handle 0 comes only from a
        kernel that opened without asking, through a pyfuse3 that does not pass the inode
        instead: a server without the patch took over from one with it."""
        if fh == 0:
            if not self._warned_no_inode:
                self._warned_no_inode = True
                log.error(
                    "the kernel opens files without asking (zero-message open, set by an "
                    "earlier server of this mount) but this pyfuse3 passes no inode: reads "
                    "fail until als-mount is restarted (not taken over), or the pyfuse3 of "
                    "scripts/build-pyfuse3 is installed"
                )
            raise FUSEError(errno.EIO)
        return int(fh)

    @_guard
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        if self.zero_open:
            raise FUSEError(errno.ENOSYS)  # the kernel opens directories by itself from now on
        if is_layer_inode(inode):
            inst, dir_id = self._instance(inode)
            if inst.layer.index.entry(dir_id).type != EntryType.DIR:
                raise FUSEError(errno.ENOTDIR)
        elif self._node(inode).kind.is_file or self._node(inode).kind == NodeKind.NATIVE:
            raise FUSEError(errno.ENOTDIR)
        return FileHandleT(inode)

    def _layer_entries(
        self, inst: Instance, dir_id: int, start: int
    ) -> list[tuple[bytes, int, int]]:
        """``(name, inode, next offset)`` of a layer directory from offset ``start``."""
        lst = self.ns.listing(inst, dir_id)
        return [
            (name, inst.inode(rid), i + 1)
            for i, ((name, _), rid) in enumerate(
                zip(lst.entries[start:], lst.resolved[start:], strict=True), start
            )
        ]

    def _store_entries(self, node: StoreNode, start: int) -> list[tuple[bytes, int, int]]:
        """``(name, inode, next offset)`` of a store directory: the offset is the inode."""
        native = node.kind == NodeKind.LAYERDIR and node.layer is not None and node.layer.native
        if native and b"diff" not in node.children:
            self._diff(node)  # its symlink, before the kernel asked for it by name
        live = [
            (i, n)
            for n, i in node.children.items()
            if i in self.ns.nodes and (native or self.ns.nodes[i].kind != NodeKind.NATIVE)
        ]
        live += [
            (inst.root_inode, n)
            for n, inst in node.instances.items()
            if inst.number in self.ns.instances and not (native and n == b"diff")
        ]
        return [
            (name, inode, inode)
            for inode, name in sorted(live)
            if inode > start and self._has_content(inode)
        ]

    def _layer_dir_nodes(self, node: StoreNode) -> None:
        """A layer directory lists ``diff``, ``info`` and ``blob`` whether or not they were
        looked up (never ``use``)."""
        ns = self.ns
        layer = node.layer
        assert layer is not None
        inst = node.instances.get(b"diff")
        if inst is None or inst.number not in ns.instances:
            ns.new_instance(layer, node, b"diff")
        for name in (b"info", b"blob"):
            child = node.children.get(name)
            if child is None or child not in ns.nodes:
                kind = NodeKind(name.decode())
                ns.add_node(node, name, kind, ref=node.ref, digest=node.digest, layer=layer)

    def _has_content(self, inode: int) -> bool:
        """Whether a store entry leads to something the store serves.

        Reference and annotation directories exist for any well-formed name that is looked up
        (the kernel needs them before the layer below is asked for); listings show only those
        with a resolved layer below them, so names that lead nowhere never appear in the pool.
        """
        if is_layer_inode(inode):
            return True
        stack = [self.ns.nodes[inode]]
        while stack:
            node = stack.pop()
            if node.kind not in (NodeKind.REF, NodeKind.ANN):
                return True
            if any(inst.number in self.ns.instances for inst in node.instances.values()):
                return True
            stack.extend(self.ns.nodes[i] for i in node.children.values() if i in self.ns.nodes)
        return False

    @_guard
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode = self._handle_inode(fh)
        if is_layer_inode(inode):
            inst, dir_id = self._instance(inode)
            entries = self._layer_entries(inst, dir_id, start_id)
        else:
            node = self._node(inode)
            if node.kind == NodeKind.LAYERDIR:
                self._layer_dir_nodes(node)
            entries = self._store_entries(node, start_id)
        for name, child, next_id in entries:
            attr = self._attr(child)
            if not pyfuse3.readdir_reply(token, name, attr, next_id):
                break
            self._counted(attr)

    @_guard
    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    # -- files ----------------------------------------------------------------------------------

    @_guard
    async def open(self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext) -> FileInfo:
        if self.zero_open:
            # The kernel opens files by itself from now on; writes still get EROFS (write,
            # setattr), and the access profile is learned from reads.
            raise FUSEError(errno.ENOSYS)
        if flags & _WRITE_FLAGS:
            raise FUSEError(errno.EROFS)
        if is_layer_inode(inode):
            inst, entry_id = self._instance(inode)
            e = inst.layer.index.entry(entry_id)
            if e.type == EntryType.DIR:
                raise FUSEError(errno.EISDIR)
            if e.type != EntryType.REG:
                raise FUSEError(errno.EACCES)
            inst.layer.note_open(entry_id)
            # The file handle is the inode: reads need no per-open state.
            return FileInfo(fh=FileHandleT(inode), keep_cache=True)
        node = self._node(inode)
        if not node.kind.is_file:
            raise FUSEError(errno.EISDIR)
        return FileInfo(fh=FileHandleT(inode), keep_cache=node.kind == NodeKind.BLOB)

    @_guard
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        inode = self._handle_inode(fh)
        if is_layer_inode(inode):
            inst, entry_id = self._instance(inode)
            if off == 0 and self.zero_open:
                inst.layer.note_open(entry_id)
            start = time.monotonic()
            data = await inst.layer.read(entry_id, off, size)
            if self.manager.metrics is not None:
                self.manager.metrics.observe_read(time.monotonic() - start)
            return data
        node = self._node(inode)
        layer = node.layer
        assert layer is not None
        if node.kind == NodeKind.INFO:
            return info_json(layer.info, node.digest)[off : off + size]
        return await layer.read_blob(off, size)

    @_guard
    async def release(self, fh: FileHandleT) -> None:
        return None

    @_guard
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        if not is_layer_inode(inode):
            node = self._node(inode)
            target = self._native_target(node) if node.kind == NodeKind.NATIVE else b""
            if not target:
                raise FUSEError(errno.EINVAL if node.kind != NodeKind.NATIVE else errno.ENOENT)
            return target
        inst, entry_id = self._instance(inode)
        e = inst.layer.index.entry(entry_id)
        if e.type != EntryType.SYMLINK:
            raise FUSEError(errno.EINVAL)
        return e.link.encode("utf-8", "surrogateescape")

    # -- xattrs ---------------------------------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if not is_layer_inode(inode):
            self._node(inode)
            return {}
        inst, entry_id = self._instance(inode)
        index = inst.layer.index
        if is_whiteout_entry(index, entry_id):
            return {}
        e = index.entry(entry_id)
        out = {k.encode("utf-8", "surrogateescape"): v for k, v in e.xattrs.items()}
        if e.type == EntryType.DIR and self.ns.listing(inst, entry_id).opaque:
            for name in self._opaque_xattrs:
                out[name.encode()] = OPAQUE_VALUE
        return out

    @_guard
    async def getxattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(inode).get(name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @_guard
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self._xattrs(inode))

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # -- the protocol's notifications, and refusals of every other change ------------------------

    @_guard
    async def create(
        self,
        parent_inode: InodeT,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[FileInfo, EntryAttributes]:
        if not is_layer_inode(parent_inode):
            node = self._node(parent_inode)
            if node.kind == NodeKind.LAYERDIR and name == b"use":
                self.manager.use(node.ref, node.digest)
                raise FUSEError(errno.ENOENT)  # what a notification-aware store answers
        raise FUSEError(errno.EROFS)

    @_guard
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not is_layer_inode(parent_inode):
            parent = self._node(parent_inode)
            child = self.ns.nodes.get(parent.children.get(name, 0))
            if (
                parent.kind == NodeKind.REF
                and child is not None
                and child.kind == NodeKind.LAYERDIR
            ):
                self.manager.release(child.ref, child.digest)
                raise FUSEError(errno.ENOENT)
            if parent.kind == NodeKind.REF and is_digest(name.decode("ascii", "replace")):
                # Released by a podman that looked the layer up before a restart of the store.
                self.manager.release(parent.ref, name.decode())
                raise FUSEError(errno.ENOENT)
        raise FUSEError(errno.EROFS)

    @_guard
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: Any,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> EntryAttributes:
        self._attr(inode)
        raise FUSEError(errno.EROFS)

    # Every other change: a read-only store refuses it. One handler serves them all (it only
    # raises FUSEError, which _guard would pass through unchanged), and mypy checks it against
    # each pyfuse3.Operations signature it overrides.
    mkdir = mknod = unlink = symlink = rename = link = write = setxattr = removexattr = _read_only


def _digests(layer: Layer) -> set[str]:
    return {layer.digest, layer.info.toc_digest}
