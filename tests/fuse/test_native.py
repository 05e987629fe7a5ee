"""Native layers through a real FUSE mount: a complete layer's ``diff`` becomes a symlink to a
tree unpacked in the cache, equal to what FUSE showed, reachable beneath the mount when the
store is gone, and served by FUSE again when the tree is evicted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.fakesource import FakeSource
from tests.support.layers import make_layer, noise
from tests.support.mount import ThreadMount, b64, needs_fuse
from tests.support.mount import wait_until as wait
from tests.support.tarspec import FileSpec

pytestmark = [needs_fuse, pytest.mark.fuse]

REF = "registry.test/native/demo:1"
T = 1_700_000_000
# cap_net_bind_service+ep as a v2 vfs_cap_data (what setcap writes)
CAP = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)

SPEC: dict[str, bytes | str | FileSpec] = {
    "etc/": FileSpec("dir", mode=0o755, mtime=T),
    "etc/os-release": FileSpec(content=b"NAME=native\n", mtime=T + 1),
    "usr/bin/tool": FileSpec(content=noise("tool", 300_000), mode=0o4755, uid=0, gid=0),
    "usr/bin/alias": FileSpec("hardlink", link="usr/bin/tool"),
    "usr/lib/libx.so.1": FileSpec(content=noise("lib", 90_000), uid=12, gid=34, mode=0o640),
    "usr/lib/libx.so": FileSpec("symlink", link="libx.so.1"),
    "usr/share/empty": b"",
    # cap_net_bind_service+ep as a v2 vfs_cap_data (what setcap writes)
    "usr/share/cap": FileSpec(
        content=b"c",
        xattrs={"security.capability": struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)},
    ),
    "dev/null": FileSpec("char", devmajor=1, devminor=3, mode=0o666),
    "run/fifo": FileSpec("fifo", mode=0o600),
    "opt/.wh.gone": b"",
    "srv/.wh..wh..opq": b"",
    "srv/new": b"fresh",
    "secret/": FileSpec("dir", mode=0o700, uid=5, gid=5, mtime=T + 7),
    "secret/key": FileSpec(content=b"k", mode=0o400, uid=5, gid=5),
}


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """What podman's overlay sees of a tree: every entry's type, mode, owner, size, time,
    link target, device, xattrs and content digest (symlinks never followed)."""
    out: dict[str, tuple[Any, ...]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(root / rel) if rel else os.listdir(root)):
            path = os.path.join(rel, name)
            full = root / path
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            xattrs = sorted(
                (k, os.getxattr(full, k, follow_symlinks=False))
                for k in os.listxattr(full, follow_symlinks=False)
            )
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            out[path] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else None,
                None if whiteout else st.st_mtime_ns,  # a pull does not set whiteout times
                os.readlink(full) if kind == stat.S_IFLNK else None,
                st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None,
                xattrs,
                hashlib.sha256(full.read_bytes()).hexdigest() if kind == stat.S_IFREG else None,
            )
            if kind == stat.S_IFDIR:
                stack.append(path)
    return out


def native_of(m: ThreadMount, digest: str) -> Path | None:
    layer = m.ops.manager.layers.get(digest)
    return None if layer is None else layer.native


@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_complete_layer_turns_native_equal_to_the_fuse_view(tmp_path: Path, fmt: str) -> None:
    layer = make_layer(SPEC, fmt, chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [layer])
    root = tmp_path / "als"
    # First the FUSE view of the layer, downloaded completely but not made native.
    with ThreadMount(
        root, src, background_fetch=True, background_delay=0, native_layers=False
    ) as m:
        diff = m.layer_dir(REF, layer.digest) / "diff"
        fuse_view = snapshot(diff)
        wait(lambda: m.ops.manager.layers[layer.digest].complete)
        assert native_of(m, layer.digest) is None
    requests = src.requests
    src.fail_all = True
    with ThreadMount(root, src) as m:
        layer_dir = m.layer_dir(REF, layer.digest)
        os.stat(layer_dir)
        wait(lambda: native_of(m, layer.digest) is not None)
        tree = native_of(m, layer.digest)
        assert tree is not None
        assert tree == root / "cache" / "native" / layer.digest[7:] / "tree"
        # The kernel asks again (the old entry was invalidated): diff is now a symlink.
        wait((layer_dir / "diff").is_symlink)
        assert os.readlink(layer_dir / "diff") == str(tree)
        assert "diff" in os.listdir(layer_dir)
        assert stat.S_ISLNK(os.lstat(layer_dir / "diff").st_mode)
        native_view = snapshot(layer_dir / "diff")
        (status,) = m.ops.manager.status()["layers"]
        assert status["native"] is True
    assert src.requests == requests  # made from the cache alone
    assert native_view == fuse_view
    # Hardlinks stay hardlinks; the opaque directory is marked as a rootful pull marks it.
    assert os.stat(tree / "usr/bin/alias").st_ino == os.stat(tree / "usr/bin/tool").st_ino
    assert os.getxattr(tree / "srv", "trusted.overlay.opaque") == b"y"
    assert "user.overlay.opaque" not in os.listxattr(tree / "srv")
    assert not (tree / "srv/.wh..wh..opq").exists()


def test_native_layers_stay_reachable_beneath_the_mount(tmp_path: Path) -> None:
    layer = make_layer(SPEC, "estargz", chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [layer])
    root = tmp_path / "als"
    with ThreadMount(root, src, background_fetch=True, background_delay=0) as m:
        layer_dir = m.layer_dir(REF, layer.digest)
        toc_dir = m.layer_dir(REF, layer.toc_digest)
        info = {d: (d / "info").read_bytes() for d in (layer_dir, toc_dir)}
        wait(lambda: native_of(m, layer.digest) is not None)
        tree = native_of(m, layer.digest)
        wait(lambda: (layer_dir / "diff").is_symlink() and (toc_dir / "diff").is_symlink())
    # Unmounted: the pool directory itself has both dialects' paths, pointing at the tree.
    pool = root / ".pool"
    assert not os.path.ismount(pool)
    for d in (layer_dir, toc_dir):
        assert os.readlink(d / "diff") == str(tree)
        assert (d / "info").read_bytes() == info[d]
        assert (d / "blob").read_bytes() == layer.blob
        assert (d / "diff" / "etc/os-release").read_bytes() == b"NAME=native\n"
    # Other layers are simply absent: podman's lookup fails at once and it pulls normally.
    assert not (pool / b64(REF) / ("sha256:" + "0" * 64)).exists()
    # A restart keeps what is still ready...
    with ThreadMount(root, src) as m:
        assert (m.layer_dir(REF, layer.digest) / "diff" / "etc/os-release").exists()
    assert os.readlink(layer_dir / "diff") == str(tree)
    # ...and withdraws what is not (the tree was removed behind its back).
    assert tree is not None
    shutil.rmtree(tree.parent)
    with ThreadMount(root, src) as m:
        pass
    assert not (pool / b64(REF)).exists()


def test_an_evicted_tree_is_served_by_fuse_again(tmp_path: Path) -> None:
    layer = make_layer(SPEC, "zstd-chunked")
    src = FakeSource()
    src.add_image(REF, [layer])
    root = tmp_path / "als"
    with ThreadMount(root, src, background_fetch=True, background_delay=0) as m:
        layer_dir = m.layer_dir(REF, layer.digest)
        os.stat(layer_dir / "diff")
        wait(lambda: native_of(m, layer.digest) is not None)
        wait((layer_dir / "diff").is_symlink)
        mgr = m.ops.manager
        assert mgr.disk is not None
        # Nothing uses the layer (no `use` notification): a tiny limit evicts its tree.
        mgr.disk.limit = 1
        trio.from_thread.run(mgr.evict, trio_token=m._token)
        wait(lambda: native_of(m, layer.digest) is None)
        wait(lambda: not (layer_dir / "diff").is_symlink(), limit=10)
        assert (layer_dir / "diff" / "srv/new").read_bytes() == b"fresh"
        assert not (root / "cache" / "native" / layer.digest[7:]).exists()
        (status,) = mgr.status()["layers"]
        assert status["native"] is False
    assert not (root / ".pool" / b64(REF)).exists()


def test_a_used_layer_keeps_its_tree_under_any_limit(tmp_path: Path) -> None:
    layer = make_layer(SPEC, "estargz")
    src = FakeSource()
    src.add_image(REF, [layer])
    root = tmp_path / "als"
    with ThreadMount(root, src, background_fetch=True, background_delay=0) as m:
        layer_dir = m.layer_dir(REF, layer.digest)
        with pytest.raises(FileNotFoundError):
            (layer_dir / "use").touch()  # podman's use notification
        wait(lambda: native_of(m, layer.digest) is not None)
        mgr = m.ops.manager
        assert mgr.disk is not None
        mgr.disk.limit = 1
        trio.from_thread.run(mgr.evict, trio_token=m._token)
        tree = native_of(m, layer.digest)
        assert tree is not None and (tree / "srv/new").read_bytes() == b"fresh"
        marker = json.loads((tree.parent / "ready").read_bytes())
        assert marker["blob"] == layer.digest and marker["toc"] == layer.toc_digest


def test_names_a_layer_lacks_are_remembered_by_the_kernel(tmp_path: Path) -> None:
    layer = make_layer(SPEC, "estargz")
    src = FakeSource()
    src.add_image(REF, [layer])
    with ThreadMount(tmp_path / "als", src) as m:
        diff = m.layer_dir(REF, layer.digest) / "diff"
        assert (diff / "etc/os-release").exists() and (diff / "usr/lib").is_dir()
        before = m.ops.requests["lookup"]
        for _ in range(5):
            assert not (diff / "etc/missing.so").exists()
            assert not (diff / "usr/lib/python3.11/nothere.py").exists()
        # One lookup per missing name (etc/missing.so; usr/lib/python3.11 itself is missing,
        # so the walk stops there): the kernel keeps the negative entries for layer_ttl.
        assert m.ops.requests["lookup"] - before == 2


def test_a_tree_larger_than_half_the_cache_limit_is_not_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Zeros: a tiny blob (so it is downloaded) that unpacks to more than half of 1 MiB.
    layer = make_layer({"big/zeros": bytes(900_000), "small": b"s"}, "estargz")
    src = FakeSource()
    src.add_image(REF, [layer])
    caplog.set_level("INFO", logger="als.store.native")
    cfg: dict[str, Any] = {"background_fetch": True, "background_delay": 0, "cache_limit_mb": 1}
    with ThreadMount(tmp_path / "als", src, **cfg) as m:
        diff = m.layer_dir(REF, layer.digest) / "diff"
        assert (diff / "small").read_bytes() == b"s"
        wait(lambda: m.ops.manager.layers[layer.digest].complete)
        wait(lambda: "native-skip" in caplog.text)
        assert native_of(m, layer.digest) is None
        assert not diff.is_symlink() and (diff / "big/zeros").stat().st_size == 900_000
    assert not any((tmp_path / "als" / "cache" / "native").iterdir())
