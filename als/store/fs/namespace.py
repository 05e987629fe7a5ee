"""The store's namespace as plain objects: store-level nodes and layer tree inodes.

No pyfuse3 here: :mod:`als.store.fs.operations` turns these into FUSE replies. Inode numbers below
2**32 are store-level nodes (allocated); inodes above are computed from a layer *instance*
number and an index entry id: ``(instance << 32) | (entry_id + 1)``, so a layer's tree needs
no per-inode state.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from als.formats import EntryType, LayerIndex
from als.overlay import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    whiteout_name,
    whiteout_target,
)
from als.store.fs.journal import InstanceRecord, Journal, JournalState, Key, NodeRecord
from als.store.fs.protocol import ANN_LAYER_DIGEST, ANN_REFERENCE
from als.store.layer import Layer

ROOT_INODE = 1
INSTANCE_SHIFT = 32
#: The lookup count of what a server restored from the journal: the kernel's counts died with
#: its predecessor, so these are kept for the life of the connection (they are few).
PINNED = 1 << 62


class NodeKind(enum.StrEnum):
    """What a store node is, by the path that leads to it."""

    ROOT = "root"  # the pool directory
    REF = "ref"  # protocol 2: <base64(image ref)>
    ANN = "ann"  # protocol 1: <base64(key=value)>, nested; rootfs.<id> below shows the layer
    LAYERDIR = "layerdir"  # protocol 2: <ref>/<digest>, holding diff, info and blob
    INFO = "info"  # <ref>/<digest>/info, the containers/storage Layer JSON
    BLOB = "blob"  # <ref>/<digest>/blob, the compressed layer blob
    NATIVE = "native"  # <ref>/<digest>/diff of a native layer: a symlink to its unpacked tree

    @property
    def is_file(self) -> bool:
        return self in (NodeKind.INFO, NodeKind.BLOB)


@dataclass(eq=False)
class StoreNode:
    """A node outside any layer tree: root, reference, annotation, layer dir, info, blob."""

    inode: int
    kind: NodeKind
    parent: int
    name: bytes
    ref: str = ""
    digest: str = ""
    annotations: tuple[tuple[str, str], ...] = ()
    layer: Layer | None = None
    # Layer trees shown below this node: b"diff" of a layer dir, b"rootfs.<id>" of an ann node.
    instances: dict[bytes, Instance] = field(default_factory=dict)
    lookups: int = 0
    children: dict[bytes, int] = field(default_factory=dict)
    #: Set when what the directory lists changes (the kernel compares it with the listing it
    #: keeps under zero-message opendir); 0 until then.
    mtime_ns: int = 0


@dataclass(eq=False)
class Instance:
    """One place a layer's tree is shown (``<ref>/<digest>/diff`` or ``rootfs.<id>``)."""

    number: int
    layer: Layer
    owner: int  # inode of the store node that shows it
    lookups: int = 0

    def inode(self, entry_id: int) -> int:
        return (self.number << INSTANCE_SHIFT) | (entry_id + 1)

    @property
    def root_inode(self) -> int:
        return self.inode(0)


def is_layer_inode(inode: int) -> bool:
    """Whether ``inode`` is in a layer tree (above 2**32) rather than a store node."""
    return inode >> INSTANCE_SHIFT != 0


def split_inode(inode: int) -> tuple[int, int]:
    """Layer tree inode -> (instance number, entry id)."""
    return inode >> INSTANCE_SHIFT, (inode & 0xFFFFFFFF) - 1


class Listing:
    """A directory of a layer as overlayfs must see it: whiteouts translated, markers hidden."""

    __slots__ = ("entries", "opaque", "resolved")

    def __init__(self, index: LayerIndex, dir_id: int) -> None:
        out: list[tuple[bytes, int]] = []
        opaque = False
        for cid in index.children(dir_id):
            name = index.entry(cid).name
            if name == OPAQUE_MARKER:
                opaque = True
                continue
            if name.startswith(WHITEOUT_PREFIX):
                hidden = whiteout_target(name)
                if hidden is None or index.child(dir_id, hidden) is not None:
                    continue  # aufs metadata, a whiteout of "." or "..", or shadowed
                name = hidden
            out.append((name.encode("utf-8", "surrogateescape"), cid))
        out.sort()
        self.entries = out
        self.opaque = opaque
        # The inode entry each name shows (a hardlink's target), for readdir's answers.
        self.resolved = [index.resolved(cid) for _, cid in out]


def resolve_child(index: LayerIndex, dir_id: int, name: str) -> tuple[int, bool] | None:
    """Look ``name`` up in a layer directory: (entry id, is_whiteout) or None."""
    if name.startswith(WHITEOUT_PREFIX):
        return None  # whiteout files and the opaque marker are never visible by their own name
    cid = index.child(dir_id, name)
    if cid is not None:
        return cid, False
    wid = index.child(dir_id, whiteout_name(name))
    if wid is not None:
        return wid, True
    return None


def is_whiteout_entry(index: LayerIndex, entry_id: int) -> bool:
    e = index.entry(entry_id)
    return e.type == EntryType.REG and whiteout_target(e.name) is not None and e.size == 0


def layer_key(node: NodeRecord | StoreNode) -> Key | None:
    """What the layer shown at or below a store node is looked up by, if it shows one."""
    if node.kind in (NodeKind.LAYERDIR, NodeKind.INFO, NodeKind.BLOB, NodeKind.NATIVE):
        return (node.ref, node.digest)
    if node.kind == NodeKind.ANN:
        anns = dict(node.annotations)
        ref, digest = anns.get(ANN_REFERENCE), anns.get(ANN_LAYER_DIGEST)
        if ref and digest:
            return (ref, digest)
    return None


class Namespace:
    """Store-level node table and layer instances, with lookup counts.

    With a :class:`Journal`, every node and instance is recorded as it is made (before the
    kernel hears of it) and dropped, so that a server taking over the connection can
    :meth:`restore` them.
    """

    def __init__(self, journal: Journal | None = None) -> None:
        self.nodes: dict[int, StoreNode] = {
            ROOT_INODE: StoreNode(inode=ROOT_INODE, kind=NodeKind.ROOT, parent=ROOT_INODE, name=b"")
        }
        self.nodes[ROOT_INODE].lookups = PINNED  # never forgotten
        self.instances: dict[int, Instance] = {}
        self._next_inode = itertools.count(ROOT_INODE + 1)
        self._next_instance = itertools.count(1)
        self.listings: OrderedDict[tuple[int, int], Listing] = OrderedDict()
        self.journal = journal
        self._numbering_restored = False
        #: Called with the inode of each store directory whose listing just changed.
        self.on_listing_change: Callable[[int], None] | None = None

    def _child_changed(self, parent: StoreNode) -> None:
        # A layer directory always lists diff, info and blob (made when first asked for);
        # only its diff turning into a symlink changes it (the FUSE layer says so itself).
        if parent.kind != NodeKind.LAYERDIR:
            self.listing_changed(parent)

    def listing_changed(self, node: StoreNode) -> None:
        """``node`` lists other entries now; so may its ancestors (a reference directory is
        listed only once a layer below it resolved)."""
        now = time.time_ns()
        seen = 0
        while seen < 64:  # the pool is a few levels deep; the bound guards against a cycle
            node.mtime_ns = now
            if self.on_listing_change is not None:
                self.on_listing_change(node.inode)
            parent = self.nodes.get(node.parent)
            if parent is None or parent is node:
                return
            node = parent
            seen += 1

    def restore(self, state: JournalState, layers: dict[Key, Layer]) -> tuple[int, int]:
        """Rebuild the nodes and instances of a journal, with the layers resolved for them.

        What needs a layer that is missing from ``layers`` is left out (with everything below
        it): the kernel then gets ENOENT for those inodes. Call it again as more layers resolve:
        what is there already stays. Returns (nodes, instances) restored by this call. Restored
        entries are pinned; new inodes and instance numbers continue after the journal's.
        """
        if not self._numbering_restored:
            # Only once: by a later call (as more layers resolve) new entries may exist.
            self._next_inode = itertools.count(max(state.max_inode, ROOT_INODE) + 1)
            self._next_instance = itertools.count(state.max_instance + 1)
            self._numbering_restored = True
        nodes = instances = 0
        for rec in sorted(state.nodes.values(), key=lambda r: r.inode):
            parent = self.nodes.get(rec.parent)
            if parent is None or rec.inode in self.nodes:
                continue
            try:
                kind = NodeKind(rec.kind)
            except ValueError:
                continue
            key = layer_key(rec) if kind != NodeKind.ANN else None
            layer = layers.get(key) if key is not None else None
            if key is not None and layer is None:
                continue
            node = StoreNode(
                inode=rec.inode,
                kind=kind,
                parent=rec.parent,
                name=rec.name,
                ref=rec.ref,
                digest=rec.digest,
                annotations=rec.annotations,
                layer=layer,
                lookups=PINNED,
            )
            self.nodes[rec.inode] = node
            parent.children[rec.name] = rec.inode
            nodes += 1
        for irec in sorted(state.instances.values(), key=lambda r: r.number):
            if irec.number in self.instances:
                continue
            owner = self.nodes.get(irec.owner)
            key = layer_key(owner) if owner is not None else None
            layer = layers.get(key) if key is not None else None
            if owner is None or layer is None:
                continue
            inst = Instance(number=irec.number, layer=layer, owner=owner.inode, lookups=PINNED)
            self.instances[inst.number] = inst
            owner.instances[irec.name] = inst
            layer.instances += 1
            instances += 1
        return nodes, instances

    def add_node(
        self,
        parent: StoreNode,
        name: bytes,
        kind: NodeKind,
        *,
        ref: str = "",
        digest: str = "",
        annotations: tuple[tuple[str, str], ...] = (),
        layer: Layer | None = None,
    ) -> StoreNode:
        inode = next(self._next_inode)
        if inode >= 1 << INSTANCE_SHIFT:  # pragma: no cover - 4 billion store nodes
            raise OverflowError("store inode space exhausted")
        node = StoreNode(
            inode=inode,
            kind=kind,
            parent=parent.inode,
            name=name,
            ref=ref,
            digest=digest,
            annotations=annotations,
            layer=layer,
        )
        if self.journal is not None:
            rec = NodeRecord(inode, kind, parent.inode, name, ref, digest, annotations)
            self.journal.node(rec)
        self.nodes[inode] = node
        parent.children[name] = inode
        self._child_changed(parent)
        return node

    def new_instance(self, layer: Layer, owner: StoreNode, name: bytes) -> Instance:
        """Show ``layer``'s tree as ``name`` below ``owner``."""
        inst = Instance(number=next(self._next_instance), layer=layer, owner=owner.inode)
        if self.journal is not None:
            self.journal.instance(InstanceRecord(inst.number, owner.inode, name))
        self.instances[inst.number] = inst
        owner.instances[name] = inst
        layer.instances += 1
        self._child_changed(owner)
        return inst

    def listing(self, inst: Instance, dir_id: int) -> Listing:
        key = (inst.number, dir_id)
        lst = self.listings.get(key)
        if lst is None:
            lst = Listing(inst.layer.index, dir_id)
            self.listings[key] = lst
            if len(self.listings) > 4096:
                self.listings.popitem(last=False)
        else:
            self.listings.move_to_end(key)
        return lst

    def forget(self, inode: int, n: int) -> None:
        if is_layer_inode(inode):
            inst = self.instances.get(inode >> INSTANCE_SHIFT)
            if inst is not None:
                inst.lookups -= n
                self._maybe_drop_instance(inst)
            return
        node = self.nodes.get(inode)
        if node is None or node.kind == NodeKind.ROOT:
            return
        node.lookups -= n
        if node.lookups <= 0:
            self.drop_node(node)

    def names_of(self, node: StoreNode) -> list[str]:
        """The path segments from the pool directory down to ``node``."""
        parts: list[str] = []
        while node.kind != NodeKind.ROOT:
            parts.append(node.name.decode("ascii"))
            node = self.nodes[node.parent]
        return parts[::-1]

    def drop_node(self, node: StoreNode) -> None:
        if self.nodes.pop(node.inode, None) is not None and self.journal is not None:
            self.journal.drop_node(node.inode)
        parent = self.nodes.get(node.parent)
        if parent is not None and parent.children.get(node.name) == node.inode:
            del parent.children[node.name]
            self._child_changed(parent)
        for inst in node.instances.values():
            self._maybe_drop_instance(inst)

    def _maybe_drop_instance(self, inst: Instance) -> None:
        if inst.lookups > 0 or inst.owner in self.nodes:
            return
        if self.instances.pop(inst.number, None) is not None:
            if self.journal is not None:
                self.journal.drop_instance(inst.number)
            inst.layer.instances -= 1
            for key in [k for k in self.listings if k[0] == inst.number]:
                del self.listings[key]
