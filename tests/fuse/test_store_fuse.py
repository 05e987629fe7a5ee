"""The store mounted for real (FUSE), driven with ordinary tools, over an in-process source.

These cover both ALS protocols, the unpacked view and fault handling; tests/e2e has the same
store against a real registry and real podman.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.fakesource import FakeSource
from tests.support.layers import BuiltLayer, FileSpec, make_layer
from tests.support.mount import ThreadMount, b64, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse]

REF = "registry.test/app/demo:1"
MTIME_NS = 1_600_000_000_123_456_789
BIG = bytes((i * 7 + i // 251) & 0xFF for i in range(300_000))

LOWER: dict[str, bytes | FileSpec] = {
    "etc/os-release": FileSpec(content=b"NAME=test\n", mtime_ns=MTIME_NS),
    "bin/busybox": FileSpec(content=BIG, mode=0o755),
    "bin/sh": FileSpec(type="symlink", link="busybox"),
    "bin/hl": FileSpec(type="hardlink", link="bin/busybox"),
    "dev/null": FileSpec(type="char", devmajor=1, devminor=3, mode=0o666),
    "run/fifo": FileSpec(type="fifo", mode=0o600),
    "opt/keep/a.txt": b"a",
    "opt/gone.txt": b"gone",
    "data/x.bin": FileSpec(content=b"xattr", xattrs={"user.foo": b"bar\0baz"}, uid=1000, gid=1001),
    "empty": b"",
}
UPPER: dict[str, bytes | FileSpec] = {
    "opt/.wh.gone.txt": b"",
    "opt/keep/.wh..wh..opq": b"",
    "opt/keep/b.txt": b"b",
    "etc/motd": b"hi\n",
}
Image = tuple[FakeSource, list[BuiltLayer]]
FORMATS = ["estargz", "estargz-zstd", "zstd-chunked", "zstd-chunked-1.43"]


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def image(fmt: str) -> Image:
    src = FakeSource()
    layers = [make_layer(LOWER, fmt, chunk_size=64 * 1024), make_layer(UPPER, fmt)]
    src.add_image(REF, layers)
    return src, layers


@pytest.fixture
def mount(tmp_path: Path, image: Image) -> Iterator[ThreadMount]:
    src, _ = image
    with ThreadMount(tmp_path / "als", src, lookup_timeout=5.0, read_timeout=5.0) as m:
        yield m


def _tree(root: Path) -> dict[str, tuple[str, int, int, int, str]]:
    out = subprocess.run(
        ["find", ".", "-printf", r"%P\t%M\t%U\t%G\t%s\t%l\n"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tree = {}
    for line in out.splitlines():
        path, mode, uid, gid, size, link = line.split("\t")
        tree[path] = (mode, int(uid), int(gid), int(size), link)
    return tree


def test_compressed_digest_dialect_serves_the_tree(mount: ThreadMount, image: Image) -> None:
    src, layers = image
    lower = layers[0]
    d = mount.layer_dir(REF, lower.digest)
    # what containers/storage stats, in its order
    assert (d / "diff").is_dir()
    assert (d / "info").is_file()
    assert (d / "blob").is_file()
    info = json.loads((d / "info").read_text())
    assert info["compressed-diff-digest"] == lower.digest
    assert info["compressed-size"] == len(lower.blob)
    assert info["diff-digest"] == lower.diff_id
    assert info["compression"] in (2, 4)
    assert info["diff-size"] >= 0
    root = d / "diff"
    assert (root / "etc/os-release").read_bytes() == b"NAME=test\n"
    assert (root / "bin/busybox").read_bytes() == BIG
    assert os.readlink(root / "bin/sh") == "busybox"
    st_bb, st_hl = os.lstat(root / "bin/busybox"), os.lstat(root / "bin/hl")
    assert st_bb.st_ino == st_hl.st_ino and st_bb.st_nlink == 2
    assert stat.S_IMODE(st_bb.st_mode) == 0o755
    st = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    # eStargz TOCs keep whole seconds; zstd:chunked keeps nanoseconds
    want_ns = MTIME_NS if lower.format.startswith("zstd") else MTIME_NS // 10**9 * 10**9
    assert os.stat(root / "etc/os-release").st_mtime_ns == want_ns
    x = os.lstat(root / "data/x.bin")
    assert (x.st_uid, x.st_gid) == (1000, 1001)
    assert os.getxattr(root / "data/x.bin", "user.foo") == b"bar\0baz"
    assert (root / "empty").read_bytes() == b""
    names = set(os.listdir(root))
    assert not names & {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}
    assert names == {"etc", "bin", "dev", "run", "opt", "data", "empty"}
    # ordinary tools see the same tree
    tree = _tree(root)
    assert tree["bin/busybox"][3] == len(BIG)
    assert tree["bin/sh"][4] == "busybox"
    tar = subprocess.run(["tar", "-cf", "-", "."], cwd=root, capture_output=True, check=True)
    assert (
        hashlib.sha256(BIG).hexdigest()
        in subprocess.run(
            ["sh", "-c", "tar -xOf - ./bin/busybox | sha256sum"],
            input=tar.stdout,
            capture_output=True,
            check=True,
            text=False,
        ).stdout.decode()
    )
    # the blob file is the exact compressed blob
    assert (d / "blob").read_bytes() == lower.blob
    # lazy: opening one small file did not fetch the whole big blob
    assert src.bytes_sent < 3 * len(lower.blob) + len(layers[1].blob) * 3


def test_lazy_read_fetches_only_what_is_read(mount: ThreadMount, image: Image) -> None:
    src, layers = image
    root = mount.layer_dir(REF, layers[0].digest) / "diff"
    os.stat(root)
    before = src.bytes_sent
    assert (root / "etc/os-release").read_bytes() == b"NAME=test\n"
    small = src.bytes_sent - before
    assert small < len(layers[0].blob) / 2, (small, len(layers[0].blob))


def test_whiteouts_and_opaque_dirs(mount: ThreadMount, image: Image) -> None:
    _, layers = image
    root = mount.layer_dir(REF, layers[1].digest) / "diff"
    wh = os.lstat(root / "opt/gone.txt")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert sorted(os.listdir(root / "opt")) == ["gone.txt", "keep"]
    assert os.listdir(root / "opt/keep") == ["b.txt"]
    # As a rootful pull unpacks it (als-mount runs as root here): the trusted xattr only, so a
    # container does not see a user.overlay.opaque that a normally pulled image lacks.
    assert os.getxattr(root / "opt/keep", "trusted.overlay.opaque") == b"y"
    assert "user.overlay.opaque" not in os.listxattr(root / "opt/keep")
    with pytest.raises(OSError) as e:
        os.lstat(root / "opt/.wh.gone.txt")
    assert e.value.errno == errno.ENOENT


def test_toc_digest_dialect(mount: ThreadMount, image: Image) -> None:
    _, layers = image
    lower = layers[0]
    d = mount.layer_dir(REF, lower.toc_digest)
    assert (d / "diff").is_dir() and (d / "blob").is_file()
    info = json.loads((d / "info").read_text())
    assert info["toc-digest"] == lower.toc_digest
    assert info["flags"]["expected-layer-diffid"] == lower.diff_id
    assert "diff-digest" not in info
    assert (d / "diff/bin/busybox").read_bytes() == BIG


def test_use_and_release_answer_enoent_and_count(mount: ThreadMount, image: Image) -> None:
    _, layers = image
    d = mount.layer_dir(REF, layers[0].digest)
    os.stat(d / "diff")
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            open(d / "use", "w+").close()
    key = (REF, layers[0].digest)
    assert mount.ops.manager.uses[key] == 2
    with pytest.raises(FileNotFoundError):
        os.rmdir(d)
    assert mount.ops.manager.uses[key] == 1
    assert not (d / "use").exists()


def test_bad_names_are_enoent(mount: ThreadMount, image: Image) -> None:
    _, layers = image
    bad = [
        mount.pool / "not-base64!",
        mount.pool / "YWJj",  # "abc": not a reference with a registry... still a valid ref dir
        mount.pool / b64(REF) / "sha256:zz",
        mount.pool / b64(REF) / ("sha256:" + "0" * 64),
        mount.pool / b64("registry.test/other:1") / layers[0].digest,
        mount.pool / b64(REF) / layers[0].digest / "nope",
        mount.pool / b64(REF) / layers[0].digest / "use",
        mount.pool / ".als-not-there",
    ]
    for p in bad[:1] + bad[2:]:
        t = time.monotonic()
        assert not p.exists(), p
        assert time.monotonic() - t < 2
    assert os.listdir(mount.pool / b64(REF) / layers[0].digest / "diff")


def test_layer_directory_lists_diff_info_and_blob(mount: ThreadMount, image: Image) -> None:
    """Whether or not info and blob were looked up first (as docs/architecture.md says)."""
    _, layers = image
    for layer in layers:
        d = mount.pool / b64(REF) / layer.digest
        assert sorted(os.listdir(d)) == ["blob", "diff", "info"]
        assert sorted(os.listdir(d)) == ["blob", "diff", "info"]  # the same the second time
        assert os.stat(d / "blob").st_size == len(layer.blob)
        with os.scandir(d) as it:
            kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_file()) for e in it}
        assert kinds == {"diff": (True, False), "info": (False, True), "blob": (False, True)}


def _write_through(path: Path) -> None:
    with open(path, "r+b", buffering=0) as f:
        f.write(b"x")


def test_writes_are_refused(mount: ThreadMount, image: Image) -> None:
    _, layers = image
    d = mount.layer_dir(REF, layers[0].digest)
    root = d / "diff"
    attempts: list[Callable[[], object]] = [
        lambda: _write_through(root / "etc/os-release"),
        lambda: open(root / "new", "wb").close(),
        lambda: os.mkdir(root / "newdir"),
        lambda: os.unlink(root / "etc/os-release"),
        lambda: os.rename(root / "etc/os-release", root / "etc/x"),
        lambda: os.chmod(root / "etc/os-release", 0o700),
        lambda: os.setxattr(root / "etc/os-release", "user.x", b"1"),
        lambda: os.symlink("x", root / "lnk"),
        lambda: os.mkdir(mount.pool / "x"),
        lambda: open(d / "info", "wb").close(),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES), e.value
    assert (root / "etc/os-release").read_bytes() == b"NAME=test\n"


def test_protocol1_annotation_discovery(mount: ThreadMount, image: Image) -> None:
    _, layers = image
    layer_id = "a" * 64
    segs = [
        b64(f"containers/image/target.reference={REF}"),
        b64("io.example/ignored=whatever"),
        b64(f"containers/image/target.layerdigest={layers[0].digest}"),
    ]
    for order in (segs, list(reversed(segs))):
        rootfs = mount.pool.joinpath(*order, f"rootfs.{layer_id}")
        assert (rootfs / "etc/os-release").read_bytes() == b"NAME=test\n"
        link = mount.root / layer_id
        assert link.is_symlink()
        assert (link / "bin/busybox").read_bytes() == BIG
    assert not mount.pool.joinpath(b64("garbage"), f"rootfs.{layer_id}").exists()
    assert not mount.pool.joinpath(segs[1], f"rootfs.{layer_id}").exists()
    assert not mount.pool.joinpath(*segs, "rootfs.../x").exists()


def _forget_local_bytes(mount: ThreadMount, digest: str) -> None:
    """A small blob lies entirely in the bytes read at lookup, which the store keeps: drop
    them, so that file content has to come from the registry."""
    lay = mount.ops.manager.layers[digest]
    if lay.ingest is not None:
        lay.ingest.discard()


def test_read_failure_is_eio_then_recovers(mount: ThreadMount, image: Image) -> None:
    src, layers = image
    root = mount.layer_dir(REF, layers[0].digest) / "diff"
    os.stat(root / "bin/busybox")
    _forget_local_bytes(mount, layers[0].digest)
    src.fail_all = True  # the registry is down: reads fail, the daemon stays up
    with pytest.raises(OSError) as e:
        (root / "bin/busybox").read_bytes()
    assert e.value.errno == errno.EIO
    src.fail_all = False  # back: the next read fetches again
    assert (root / "bin/busybox").read_bytes() == BIG
    assert mount.ops.internal_errors == 0


def test_corrupt_bytes_are_never_served(mount: ThreadMount, image: Image) -> None:
    src, layers = image
    root = mount.layer_dir(REF, layers[0].digest) / "diff"
    os.stat(root / "bin/busybox")
    _forget_local_bytes(mount, layers[0].digest)
    src.corrupt = True
    with pytest.raises(OSError) as e:
        (root / "bin/busybox").read_bytes()
    assert e.value.errno == errno.EIO
    src.corrupt = False
    assert (root / "bin/busybox").read_bytes() == BIG
    assert mount.ops.internal_errors == 0


def test_non_lazy_layer_is_refused_fast(tmp_path: Path) -> None:
    src = FakeSource()
    plain = make_layer({"a": b"x"}, "gzip")
    src.add_image(REF, [plain])
    with ThreadMount(tmp_path / "als", src, lookup_timeout=5.0) as m:
        t = time.monotonic()
        assert not (m.layer_dir(REF, plain.digest) / "diff").exists()
        assert not (m.layer_dir(REF, plain.digest) / "info").exists()
        assert time.monotonic() - t < 1
        assert src.requests == 0  # no TOC annotation: not even a range request
        src.fail_all = True
        other = "registry.test/down:1"
        assert not (m.pool / b64(other) / plain.digest / "diff").exists()
