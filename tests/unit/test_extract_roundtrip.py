"""Layers built by ``als.formats.writer`` from a tar: read back and extracted like ``tar -x``."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from als.extract import extract_index
from als.formats import EntryType, load_index, read_file
from tests.support.layers import LAZY_FORMATS, FileSpec, make_layer, make_tar
from tests.unit.conftest import CountingReader
from tests.unit.test_extract import _snapshot, needs_root

LONG = "l" * 120 + "/" + "n" * 140  # needs PAX/GNU long names
SPEC: dict[str, bytes | str | FileSpec] = {
    "etc/os-release": b"ID=test\n",
    "usr/lib/big.so": FileSpec(content=os.urandom(70_000) + bytes(9000) + b"tail" * 3000),
    "usr/lib/link.so": FileSpec(type="hardlink", link="usr/lib/big.so"),
    "usr/lib/sym": FileSpec(type="symlink", link="big.so"),
    "usr/share/café/ünïcødé.txt": b"utf-8 names\n",
    LONG: b"long name",
    "long-link": FileSpec(type="symlink", link="x" * 200),
    "data/xattr": FileSpec(content=b"x", xattrs={"user.bin": b"\x00\xff\x01", "trusted.t": b"t"}),
    "data/nanos": FileSpec(content=b"n", mtime_ns=1_600_000_000_123_456_789),
    "data/empty": b"",
    "data/setuid": FileSpec(content=b"#!", mode=0o4755, uid=1234, gid=5678),
    "dev/fifo": FileSpec(type="fifo", mode=0o600),
    "dev/sda": FileSpec(type="block", devmajor=8, devminor=1, mode=0o660),
    "dev/tty": FileSpec(type="char", devmajor=5, devminor=0, mode=0o666),
    "ro": FileSpec(type="dir", mode=0o555),
    "ro/inside": b"in a read-only dir",
    "wh/.wh.removed": b"",
    "wh/.wh..wh..opq": b"",
    "wh/kept": b"kept",
}


def _tar_x(tar: bytes, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", "-", "-C", str(dest)],
        input=tar,
        check=True,
    )


@pytest.mark.parametrize("fmt", LAZY_FORMATS)
def test_writer_layers_read_back_entry_by_entry(fmt: str) -> None:
    tar = make_tar(SPEC)
    layer = make_layer(tar, fmt, chunk_size=16384)
    r = CountingReader(layer.blob)
    ix = load_index(
        r, layer.size, annotations=layer.annotations, expected_toc_digest=layer.toc_digest
    )
    assert ix.toc_digest == layer.toc_digest
    if "position" in " ".join(layer.annotations):
        assert len(r.calls) == 1  # exactly the TOC, from the annotation
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            i = ix.lookup(m.name)
            assert i is not None, m.name
            e = ix.entry(i)
            assert e.mode == m.mode and e.uid == m.uid and e.gid == m.gid, m.name
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                assert read_file(ix, i, r) == f.read(), m.name
            elif m.islnk():
                assert e.type == EntryType.HARDLINK and e.target == ix.lookup(m.linkname)
            elif m.issym():
                assert e.link == m.linkname
    big = ix.lookup("usr/lib/big.so")
    assert big is not None and len(ix.chunks(big)) > 1
    assert ix.entry(big).nlink == 2


@needs_root
@pytest.mark.parametrize("fmt", LAZY_FORMATS)
def test_writer_layers_extract_like_tar_x(tmp_path: Path, fmt: str) -> None:
    tar = make_tar(SPEC)
    layer = make_layer(tar, fmt, chunk_size=16384)
    _tar_x(tar, tmp_path / "ref")
    r = CountingReader(layer.blob)
    ix = load_index(r, layer.size, annotations=layer.annotations)
    extract_index(ix, r, tmp_path / "out", whiteouts="aufs")
    # eStargz TOCs keep whole seconds only; zstd:chunked keeps nanoseconds.
    want = _snapshot(tmp_path / "ref", skip_mtime=set())
    got = _snapshot(tmp_path / "out", skip_mtime=set())
    if fmt in ("estargz", "estargz-zstd", "stargz-legacy"):
        w, g = want.pop("data/nanos"), got.pop("data/nanos")
        assert g.pop("mtime_ns") == w.pop("mtime_ns") // 10**9 * 10**9
        assert g == w
    assert got == want
    # overlay whiteouts
    extract_index(ix, r, tmp_path / "ov")
    assert sorted(os.listdir(tmp_path / "ov" / "wh")) == ["kept", "removed"]
    assert os.getxattr(tmp_path / "ov" / "wh", "trusted.overlay.opaque") == b"y"
    st = os.lstat(tmp_path / "ov" / "wh" / "removed")
    assert os.major(st.st_rdev) == 0 and os.minor(st.st_rdev) == 0


def test_writer_prefetch_landmark_and_two_reads() -> None:
    spec: dict[str, bytes | str | FileSpec] = {
        f"many/dir{i % 13}/file-with-a-longish-name-{i}": os.urandom(8) for i in range(3000)
    }
    spec["first"] = b"prefetched"
    layer = make_layer(spec, "estargz", prioritized=["first"])
    r = CountingReader(layer.blob)
    ix = load_index(r, layer.size, annotations=layer.annotations)
    assert len(r.calls) == 2  # tail, then the TOC that did not fit in it
    assert ix.prefetch_end is not None and not ix.no_prefetch
    first = ix.lookup("first")
    assert first is not None and ix.chunks(first)[0].cend <= ix.prefetch_end
    assert ix.lookup(".prefetch.landmark") is None
    assert read_file(ix, first, r) == b"prefetched"
