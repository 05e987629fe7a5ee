"""Hostile layers served through the real FUSE mount (in-process store, fake registry).

The store shows what the layer says -- symlinks pointing anywhere are symlinks with that target,
never followed by the daemon; setuid files and device nodes keep their modes, made harmless by
the mount's nosuid/nodev -- never touches the host outside its root, and refuses what it cannot
serve safely with a log line and ENOENT (a layer with an unsafe TOC) or EIO (file bytes that do
not match the TOC).
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fakesource import FakeSource, sha256
from tests.support.layers import BuiltLayer, FileSpec, make_layer
from tests.support.mount import ThreadMount, needs_fuse
from tests.unit.conftest import simple_layer, toc_bytes, wrap_estargz

pytestmark = [needs_fuse, pytest.mark.fuse]

REF = "registry.test/hostile/app:1"
ID_BINARY = Path("/usr/bin/id").read_bytes() if Path("/usr/bin/id").is_file() else b""
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"


def _custom_layer(toc: dict[str, Any], region: bytes) -> BuiltLayer:
    """An eStargz blob around an arbitrary TOC, described like a registry would."""
    blob = wrap_estargz(region, toc)
    return BuiltLayer(
        blob=blob,
        digest=sha256(blob),
        size=len(blob),
        diff_id=sha256(b"diff of " + blob),
        toc_digest=sha256(toc_bytes(toc)),
        annotations={TOC_DIGEST: sha256(toc_bytes(toc))},
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        format="estargz",
    )


class OpenRecorder:
    """Every path this process opens (os.open and open()) while active, from any thread."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def __enter__(self) -> OpenRecorder:
        self._os_open, self._open = os.open, builtins.open
        rec = self

        def os_open(path: Any, *a: Any, **k: Any) -> int:
            rec._add(path, k.get("dir_fd"))
            return rec._os_open(path, *a, **k)

        def b_open(file: Any, *a: Any, **k: Any) -> Any:
            rec._add(file, None)
            return rec._open(file, *a, **k)

        os.open, builtins.open = os_open, b_open
        return self

    def _add(self, path: Any, dir_fd: int | None) -> None:
        if isinstance(path, int):
            return  # an fd: nothing new is opened by name
        p = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(p):
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        with self._lock:
            self.paths.append(os.path.abspath(p))

    def __exit__(self, *exc: object) -> None:
        os.open, builtins.open = self._os_open, self._open


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A file outside the store's root that a hostile layer points at."""
    p = tmp_path / "outside" / "canary"
    p.parent.mkdir()
    p.write_bytes(b"do not touch\n")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    st = os.lstat(p)
    yield p
    st2 = os.lstat(p)
    assert p.read_bytes() == b"do not touch\n"
    assert (st2.st_mtime_ns, st2.st_ctime_ns, st2.st_ino) == (
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )
    assert sorted(os.listdir(p.parent)) == ["canary"]


def test_links_devices_and_setuid_are_served_as_the_layer_says(
    tmp_path: Path, canary: Path
) -> None:
    if not ID_BINARY:
        pytest.skip("needs /usr/bin/id")
    spec: dict[str, bytes | str | FileSpec] = {
        "etc/evil": FileSpec(type="symlink", link="/etc/shadow"),
        "up": FileSpec(type="symlink", link="../" * 12 + str(canary).lstrip("/")),
        "abs": FileSpec(type="symlink", link=str(canary)),
        "canary-dir/x": FileSpec(type="symlink", link=str(canary.parent)),
        "/absolute/name": b"absolute names land inside the layer\n",
        # a copy of id(1) owned by 1000/42: honoured set-id bits would make it print
        # euid=1000 / egid=42 (Linux ignores them on scripts, so a real binary)
        "bin/suid": FileSpec(content=ID_BINARY, mode=0o4755, uid=1000),
        "bin/sgid": FileSpec(content=ID_BINARY, mode=0o2755, gid=42),
        "dev/sda": FileSpec(type="block", devmajor=8, devminor=0, mode=0o666),
        "dev/mem": FileSpec(type="char", devmajor=1, devminor=1, mode=0o666),
        "innocent": FileSpec(type="hardlink", link="dev/mem"),
    }
    layer = make_layer(spec, "zstd-chunked")
    src = FakeSource()
    src.add_image(REF, [layer])
    with ThreadMount(tmp_path / "als", src, lookup_timeout=5.0, read_timeout=5.0) as m:
        root = m.layer_dir(REF, layer.digest) / "diff"
        os.stat(root)
        with OpenRecorder() as rec:
            # symlinks: shown with their target, readlink works, nothing is followed
            assert os.readlink(root / "etc/evil") == "/etc/shadow"
            assert os.readlink(root / "abs") == str(canary)
            assert os.readlink(root / "up").endswith(str(canary).lstrip("/"))
            for name in ("etc/evil", "abs", "up", "canary-dir/x"):
                st = os.lstat(root / name)
                assert stat.S_ISLNK(st.st_mode)
                assert st.st_size == len(os.readlink(root / name))
            assert (
                root / "absolute/name"
            ).read_bytes() == b"absolute names land inside the layer\n"
            # setuid/setgid bits and device nodes keep what the layer says...
            assert stat.S_IMODE(os.lstat(root / "bin/suid").st_mode) == 0o4755
            sg = os.lstat(root / "bin/sgid")
            assert stat.S_IMODE(sg.st_mode) == 0o2755 and sg.st_gid == 42
            blk = os.lstat(root / "dev/sda")
            assert stat.S_ISBLK(blk.st_mode) and (os.major(blk.st_rdev), os.minor(blk.st_rdev)) == (
                8,
                0,
            )
            mem, inn = os.lstat(root / "dev/mem"), os.lstat(root / "innocent")
            assert stat.S_ISCHR(inn.st_mode) and inn.st_ino == mem.st_ino and inn.st_nlink == 2
            # ...and are harmless through the mount: it is nosuid and nodev
            for dev in ("dev/sda", "dev/mem", "innocent"):
                with pytest.raises(OSError) as e:
                    os.open(root / dev, os.O_RDONLY)
                assert e.value.errno == errno.EACCES, (dev, e.value)
            opts = (
                subprocess.run(
                    ["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(m.pool)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .split(",")
            )
            assert "nosuid" in opts and "nodev" in opts and "ro" not in opts, opts
            for prog in ("bin/suid", "bin/sgid"):
                out = subprocess.run(
                    [str(root / prog)], capture_output=True, text=True, check=False
                )
                assert out.returncode == 0 and out.stdout.startswith("uid="), out
                assert "euid=" not in out.stdout and "egid=" not in out.stdout, out
        assert m.ops.internal_errors == 0
    # the daemon opened nothing outside its root (the tests' own opens go through the mount)
    assert rec.paths  # the store did open files (its cache), all of them inside its root
    outside = [p for p in rec.paths if not p.startswith(str(tmp_path / "als"))]
    assert outside == [], outside
    assert not any("shadow" in p or "canary" in p for p in rec.paths), rec.paths


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"name": "../escape", "type": "reg"}, "'..'"),
        ({"name": "a/../../escape", "type": "dir"}, "'..'"),
        ({"name": "hl", "type": "hardlink", "linkName": "../../outside/canary"}, "'..'"),
        ({"name": "x\x00y", "type": "reg"}, "NUL"),
        ({"name": "a/one", "type": "reg"}, "duplicate"),
        ({"name": "/".join(["d"] * 300), "type": "dir"}, "deeper than"),
        (
            {
                "name": "c",
                "type": "reg",
                "size": 5,
                "offset": 1 << 40,
                "digest": "sha256:" + "0" * 64,
            },
            "outside the data area",
        ),
    ],
)
def test_unsafe_tocs_are_refused_with_a_log_line(
    tmp_path: Path, canary: Path, caplog: pytest.LogCaptureFixture, bad: dict[str, Any], why: str
) -> None:
    caplog.set_level(logging.INFO)
    region, toc = simple_layer({"a/one": b"one\n"})
    toc["entries"].append(bad)
    layer = _custom_layer(toc, region)
    src = FakeSource()
    src.add_image(REF, [layer])
    with ThreadMount(tmp_path / "als", src, lookup_timeout=5.0, read_timeout=5.0) as m:
        d = m.layer_dir(REF, layer.digest)
        with pytest.raises(OSError) as e:
            os.stat(d / "diff")
        assert e.value.errno == errno.ENOENT
        assert not (d / "info").exists()
        assert m.ops.internal_errors == 0
    refused = [r.getMessage() for r in caplog.records if "layer-refused" in r.getMessage()]
    assert refused and layer.digest in refused[0] and why in refused[0], refused
    assert sorted(os.listdir(tmp_path)) == ["als", "outside"]


def _liar_layer(size: int, digest_of: bytes, chunk_digest: str | None = None) -> BuiltLayer:
    content = b"0123456789ABCDEFGHIJ"  # 20 bytes in the blob
    region, toc = simple_layer({"liar": content, "honest": b"fine\n"}, chunk_digests=False)
    e = toc["entries"][0]
    e.update(size=size, digest=sha256(digest_of))
    if chunk_digest is not None:
        e["chunkDigest"] = chunk_digest
    return _custom_layer(toc, region)


@pytest.mark.parametrize(
    "case",
    ["size-smaller-than-chunk", "size-larger-than-chunk", "file-digest", "chunk-digest"],
)
def test_a_toc_that_lies_gives_eio_and_the_log_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.INFO)
    content = b"0123456789ABCDEFGHIJ"
    layer = {
        "size-smaller-than-chunk": lambda: _liar_layer(10, content),
        "size-larger-than-chunk": lambda: _liar_layer(1000, content + bytes(980)),
        "file-digest": lambda: _liar_layer(20, b"another content of twenty"),
        "chunk-digest": lambda: _liar_layer(20, content, chunk_digest=sha256(b"other")),
    }[case]()
    src = FakeSource()
    src.add_image(REF, [layer])
    with ThreadMount(tmp_path / "als", src, lookup_timeout=5.0, read_timeout=5.0) as m:
        root = m.layer_dir(REF, layer.digest) / "diff"
        st = os.stat(root / "liar")
        assert st.st_size in (10, 20, 1000)  # the size the TOC states
        with pytest.raises(OSError) as e:
            (root / "liar").read_bytes()
        assert e.value.errno == errno.EIO
        assert (root / "honest").read_bytes() == b"fine\n"  # the rest of the layer still works
        assert m.ops.internal_errors == 0
    why = [r.getMessage() for r in caplog.records if "verify-failed" in r.getMessage()]
    assert why, [r.getMessage() for r in caplog.records]
    assert "liar" in why[0] and ("digest mismatch" in why[0] or "ends after" in why[0]), why


def test_a_toc_consistent_with_itself_is_served_as_it_says(tmp_path: Path) -> None:
    # Size and digest agree on the first 10 of 20 compressed bytes: that is the file.
    layer = _liar_layer(10, b"0123456789")
    src = FakeSource()
    src.add_image(REF, [layer])
    with ThreadMount(tmp_path / "als", src, lookup_timeout=5.0, read_timeout=5.0) as m:
        root = m.layer_dir(REF, layer.digest) / "diff"
        assert (root / "liar").read_bytes() == b"0123456789"
