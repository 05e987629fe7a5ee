"""als.store.native: unpacking a complete layer, what a restart finds, and eviction's rules."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from als.errors import AlsError
from als.formats import LayerIndex, load_index
from als.formats.writer import BuiltLayer
from als.store.cache import DiskCache
from als.store.native import READY, TREE, NativeTree, scan, unpack
from tests.support.layers import make_layer, noise
from tests.support.tarspec import FileSpec

SPEC: dict[str, bytes | str | FileSpec] = {
    "a/b/c.txt": b"hello",
    "a/link": FileSpec("symlink", link="/etc/passwd"),
    "a/.wh.old": b"",
    "d/.wh..wh..opq": b"",
    "d/x": noise("x", 70_000),
}


def cached(tmp_path: Path, layer: BuiltLayer) -> DiskCache:
    """A cache holding ``layer``'s complete blob."""
    disk = DiskCache(tmp_path / "cache", 0)
    disk.open()
    disk.blob_file(layer.digest[7:]).write_bytes(layer.blob)
    return disk


def index_of(layer: BuiltLayer) -> LayerIndex:
    def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [layer.blob[o : o + n] for o, n in ranges]

    return load_index(read, len(layer.blob), annotations=layer.annotations)


def test_unpack_writes_the_tree_then_the_marker(tmp_path: Path) -> None:
    layer = make_layer(SPEC, "zstd-chunked")
    disk = cached(tmp_path, layer)
    index = index_of(layer)
    tree = unpack(disk, index, layer.digest, ("user.overlay.opaque",))
    assert tree.path == disk.dir / "native" / layer.digest[7:]
    root = tree.tree
    assert (root / "a/b/c.txt").read_bytes() == b"hello"
    assert os.readlink(root / "a/link") == "/etc/passwd"  # kept verbatim, never followed
    assert os.stat(root / "a/old", follow_symlinks=False).st_rdev == 0
    assert os.getxattr(root / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "d")
    assert NativeTree.read(tree.path) == tree
    assert tree.size >= 70_000 and tree.entries == len(list(index.iter_ids())) - 1
    assert scan(disk) == {layer.digest: tree}


def test_a_blob_that_does_not_verify_leaves_nothing(tmp_path: Path) -> None:
    layer = make_layer(SPEC, "estargz")
    disk = cached(tmp_path, layer)
    index = index_of(layer)
    bad = bytearray(layer.blob)
    at = layer.blob.index(noise("x", 70_000)[30_000:30_016])  # stored as is: incompressible
    bad[at] ^= 0xFF
    disk.blob_file(layer.digest[7:]).write_bytes(bytes(bad))
    with pytest.raises(AlsError):
        unpack(disk, index, layer.digest, ("trusted.overlay.opaque",))
    assert os.listdir(disk.dir / "native") == []


def test_restart_removes_what_is_not_ready(tmp_path: Path) -> None:
    layer = make_layer(SPEC, "estargz")
    disk = cached(tmp_path, layer)
    tree = unpack(disk, index_of(layer), layer.digest, ("trusted.overlay.opaque",))
    base = disk.dir / "native"
    # A kill while unpacking: a partial dir of a dead process, and one without its marker.
    (base / f"{'1' * 64}.partial.999999999.1" / TREE).mkdir(parents=True)
    (base / ("2" * 64) / TREE).mkdir(parents=True)
    # A marker that names another blob is not trusted either.
    other = base / ("3" * 64)
    (other / TREE).mkdir(parents=True)
    (other / READY).write_bytes((tree.path / READY).read_bytes())
    assert scan(disk) == {layer.digest: tree}
    assert sorted(os.listdir(base)) == [layer.digest[7:]]


def test_eviction_never_removes_the_tree_of_a_used_layer(tmp_path: Path) -> None:
    used = make_layer({"u": b"u" * 50_000}, "estargz")
    idle = make_layer({"i": b"i" * 50_000}, "estargz")
    disk = cached(tmp_path, used)
    disk.blob_file(idle.digest[7:]).write_bytes(idle.blob)
    for layer in (used, idle):
        t = unpack(disk, index_of(layer), layer.digest, ("trusted.overlay.opaque",))
        disk.account(f"native/{layer.digest[7:]}", t.size, layer.digest[7:])
    disk.rescan()
    assert {k for k in disk._units if k.startswith("native/")} == {
        f"native/{used.digest[7:]}",
        f"native/{idle.digest[7:]}",
    }
    disk.limit = 1
    report = disk.evict({used.digest[7:]}, set())
    assert report.native_removed == [idle.digest[7:]]
    assert (disk.dir / "native" / used.digest[7:] / TREE / "u").exists()
    assert not (disk.dir / "native" / idle.digest[7:]).exists()
    # Its blob (protected, but not a tree) may go in the last pass; the tree never does.
    assert f"native/{used.digest[7:]}" in disk._units
