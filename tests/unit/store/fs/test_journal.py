"""The namespace journal: what a server records is what the next one restores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from als.store.fs.journal import Journal, compact, read_all, replay
from als.store.fs.namespace import PINNED, ROOT_INODE, Namespace, NodeKind, layer_key
from als.store.fs.protocol import ANN_LAYER_DIGEST, ANN_REFERENCE

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.fixture
def fd() -> Iterator[int]:
    n = os.memfd_create("journal-test")
    yield n
    os.close(n)


def layer() -> Any:
    return cast(Any, SimpleNamespace(instances=0))


def build(ns: Namespace) -> tuple[Any, Any]:
    root = ns.nodes[ROOT_INODE]
    l1, l2 = layer(), layer()
    ref = ns.add_node(root, b"cmVm", NodeKind.REF, ref="ref")
    ldir = ns.add_node(ref, D1.encode(), NodeKind.LAYERDIR, ref="ref", digest=D1, layer=l1)
    ns.new_instance(l1, ldir, b"diff")
    ns.add_node(ldir, b"info", NodeKind.INFO, ref="ref", digest=D1, layer=l1)
    anns = ((ANN_REFERENCE, "ref"), (ANN_LAYER_DIGEST, D2))
    ann = ns.add_node(root, b"YW5u", NodeKind.ANN, annotations=anns)
    ns.new_instance(l2, ann, b"rootfs.abc")
    return l1, l2


def test_a_new_server_restores_the_same_inodes(fd: int) -> None:
    old = Namespace(Journal(fd))
    l1, l2 = build(old)
    state = Journal(fd).load()
    assert {layer_key(n) for n in state.nodes.values()} == {None, ("ref", D1), ("ref", D2)}

    new = Namespace(Journal(fd))
    l1b, l2b = layer(), layer()
    assert new.restore(state, {("ref", D1): l1b, ("ref", D2): l2b}) == (4, 2)
    for inode, node in old.nodes.items():
        got = new.nodes[inode]
        assert (got.kind, got.parent, got.name, got.ref, got.digest, got.annotations) == (
            node.kind,
            node.parent,
            node.name,
            node.ref,
            node.digest,
            node.annotations,
        )
        assert got.children == node.children
        assert {k: i.number for k, i in got.instances.items()} == {
            k: i.number for k, i in node.instances.items()
        }
        assert got.lookups == PINNED
    assert {n: i.layer for n, i in new.instances.items()} == {1: l1b, 2: l2b}
    assert (l1b.instances, l2b.instances) == (1, 1)
    # New numbers continue after the journal's: nothing the kernel holds is reused.
    ref = new.nodes[2]
    assert new.add_node(ref, D2.encode(), NodeKind.LAYERDIR).inode == max(old.nodes) + 1
    assert new.new_instance(l1b, ref, b"x").number == 3
    assert (l1, l2) != (l1b, l2b)


def test_drops_are_replayed_and_compaction_keeps_the_live_records(fd: int) -> None:
    ns = Namespace(Journal(fd))
    build(ns)
    info = next(n for n in ns.nodes.values() if n.kind == NodeKind.INFO)
    ns.forget(info.inode, 0)  # never looked up by the kernel: dropped at once
    assert info.inode not in replay(read_all(fd)).nodes
    before = len(read_all(fd))
    state = compact(fd)
    assert len(read_all(fd)) < before
    assert replay(read_all(fd)).nodes.keys() == state.nodes.keys()
    assert info.inode not in state.nodes


def test_a_torn_last_line_is_ignored_and_cut(fd: int) -> None:
    ns = Namespace(Journal(fd))
    build(ns)
    whole = read_all(fd)
    # A cut record (one pwrite per record makes this unlikely, but a journal must never trust
    # its tail).
    os.pwrite(fd, b'{"n": 99, "k": "ref"', len(whole))
    j = Journal(fd)
    state = j.load()
    assert state.torn and 99 not in state.nodes
    assert read_all(fd) == whole
    assert j.offset == len(whole)


def test_garbage_lines_and_unknown_kinds_are_skipped(fd: int) -> None:
    os.write(fd, b'not json\n[1,2]\n{"n": 5, "k": "nonsense", "p": 1, "name": "x"}\n'
             b'{"n": "bad"}\n{"i": 3, "o": 77, "name": "diff"}\n')  # fmt: skip
    state = Journal(fd).load()
    ns = Namespace()
    # The unknown kind is not restored; the instance's owner does not exist.
    assert ns.restore(state, {}) == (0, 0)
    assert list(ns.nodes) == [ROOT_INODE]


def test_a_layer_that_cannot_be_restored_leaves_its_subtree_out(fd: int) -> None:
    build(Namespace(Journal(fd)))
    state = Journal(fd).load()
    ns = Namespace()
    nodes, instances = ns.restore(state, {("ref", D2): layer()})
    # ref dir and ann dir restored; the D1 layer dir, its info and its tree are not
    assert (nodes, instances) == (2, 1)
    assert {n.kind for n in ns.nodes.values()} == {NodeKind.ROOT, NodeKind.REF, NodeKind.ANN}
