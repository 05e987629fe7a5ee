"""Lookup counts and forget: memory is released when the kernel stops using a layer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from als.store.fs.namespace import ROOT_INODE, Namespace, NodeKind, split_inode


def test_forget_releases_nodes_and_instances() -> None:
    ns = Namespace()
    root = ns.nodes[ROOT_INODE]
    layer = cast(Any, SimpleNamespace(instances=0))
    ref = ns.add_node(root, b"cmVm", NodeKind.REF, ref="ref")
    ldir = ns.add_node(ref, b"sha256:x", NodeKind.LAYERDIR, ref="ref", digest="d", layer=layer)
    inst = ns.new_instance(layer, ldir, b"diff")
    assert ldir.instances[b"diff"] is inst
    assert layer.instances == 1
    ref.lookups, ldir.lookups = 1, 2
    inst.lookups = 3  # the kernel knows three inodes of the tree
    assert split_inode(inst.inode(41)) == (inst.number, 41)

    ns.forget(ldir.inode, 2)
    assert ldir.inode not in ns.nodes and b"sha256:x" not in ref.children
    assert inst.number in ns.instances  # still looked up inside the tree
    ns.forget(inst.inode(5), 2)
    ns.forget(inst.inode(0), 1)
    assert inst.number not in ns.instances and layer.instances == 0
    ns.forget(ref.inode, 1)
    assert list(ns.nodes) == [ROOT_INODE]
    ns.forget(ROOT_INODE, 10)  # the root is never forgotten
    ns.forget(12345, 1)  # unknown inodes are ignored
    ns.forget(inst.inode(1), 1)
    assert list(ns.nodes) == [ROOT_INODE]
