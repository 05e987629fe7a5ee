"""Writer -> reader round trips: every file of every format reads back equal and verified."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from als.errors import FormatError, NotLazy, VerifyError
from als.formats import LayerIndex, ReadRanges, load_index, read_file
from als.formats.tarsplit import assemble_tar, build_tarsplit, scan_tar
from als.formats.toc import TOC_TYPES
from als.formats.writer import BuiltLayer
from tests.support.layers import LAZY_FORMATS, make_layer, make_tar
from tests.support.tarspec import FileSpec

TYPES = TOC_TYPES  # TOC type names -> EntryType


def reader(blob: bytes) -> ReadRanges:
    def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [blob[o : o + n] for o, n in ranges]

    return read


def load(layer: BuiltLayer, *, annotations: bool = True) -> LayerIndex:
    return load_index(
        reader(layer.blob),
        layer.size,
        annotations=layer.annotations if annotations else None,
        layer=layer.digest,
    )


def check_spec(layer: BuiltLayer, spec: dict[str, FileSpec]) -> None:
    for with_annotations in (True, False):
        index = load(layer, annotations=with_annotations)
        assert index.toc_digest == layer.toc_digest
        assert index.blob_size == layer.size
        for path, fs in spec.items():
            i = index.lookup(path)
            assert i is not None, (layer.format, path)
            e = index.entry(i)
            assert e.type == TYPES[fs.type], (layer.format, path)
            if fs.type == "hardlink":
                target = index.lookup(fs.link)
                assert target is not None and e.target == target
                continue
            assert e.mode == (
                fs.mode
                if fs.mode is not None
                else {"dir": 0o755, "symlink": 0o777}.get(fs.type, 0o644)
            )
            assert (e.uid, e.gid) == (fs.uid, fs.gid)
            assert dict(e.xattrs) == dict(fs.xattrs)
            if fs.type == "reg":
                assert e.size == len(fs.content)
                assert read_file(index, i, reader(layer.blob), layer=layer.digest) == fs.content
                if e.digest is not None:
                    assert e.digest == "sha256:" + hashlib.sha256(fs.content).hexdigest()
            if fs.type == "symlink":
                assert e.link == fs.link
            if fs.type in ("char", "block"):
                assert (e.devmajor, e.devminor) == (fs.devmajor, fs.devminor)


FIXED_SPEC: dict[str, FileSpec] = {
    "etc/": FileSpec(type="dir", mode=0o750, uid=3, gid=4),
    "etc/os-release": FileSpec(content=b"ID=test\n", uid=1000, gid=1000, uname="u", gname="g"),
    "bin/busybox": FileSpec(
        content=random.Random(1).randbytes(200_000) + bytes(9000) + b"tail", mode=0o755
    ),
    "bin/sh": FileSpec(type="symlink", link="busybox"),
    "bin/ln": FileSpec(type="hardlink", link="bin/busybox"),
    "dev/null": FileSpec(type="char", devmajor=1, devminor=3, mode=0o666),
    "dev/loop0": FileSpec(type="block", devmajor=7, devminor=0, mode=0o660),
    "run/initctl": FileSpec(type="fifo", mode=0o600),
    "a/.wh.b": FileSpec(),
    "d/.wh..wh..opq": FileSpec(),
    "x/attr": FileSpec(content=b"xattr", xattrs={"user.k": b"v\0\xff", "trusted.t": b""}),
    "empty": FileSpec(),
    "long/" + "p" * 120 + "/" + "q" * 140: FileSpec(content=b"deep"),
    "ünïcode/名前 <&>": FileSpec(content=b"utf8"),
}


@pytest.mark.parametrize("fmt", LAZY_FORMATS)
def test_every_file_of_every_format_reads_back(fmt: str) -> None:
    kwargs = {"chunk_size": 50_000} if fmt in ("estargz", "estargz-zstd", "stargz-legacy") else {}
    layer = make_layer(FIXED_SPEC, fmt, **kwargs)  # type: ignore[arg-type]
    check_spec(layer, FIXED_SPEC)
    index = load(layer)
    busybox = index.lookup("bin/busybox")
    assert busybox is not None and len(index.chunks(busybox)) > 1
    expected_format = {"zstd-chunked-1.43": "zstd-chunked"}.get(fmt, fmt)
    assert index.format == expected_format
    # landmarks and the TOC never show up in the tree
    root_names = {index.entry(c).name for c in index.children(0)}
    assert not root_names & {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


def test_prioritized_landmark_is_reported_by_the_reader() -> None:
    layer = make_layer(FIXED_SPEC, "estargz", prioritized=["etc/os-release"])
    index = load(layer)
    assert index.prefetch_end is not None and not index.no_prefetch
    first = index.lookup("etc/os-release")
    assert first is not None
    assert all(c.cend <= index.prefetch_end for c in index.chunks(first))
    plain = load(make_layer(FIXED_SPEC, "estargz"))
    assert plain.no_prefetch and plain.prefetch_end is None


def test_min_chunk_size_inner_offsets_read_back() -> None:
    spec = {f"s/f{i}": FileSpec(content=bytes([i]) * (i * 7 + 1)) for i in range(30)}
    layer = make_layer(spec, "estargz", min_chunk_size=4096)
    check_spec(layer, spec)
    index = load(layer)
    inner = [c.inner for i in index.iter_ids() for c in index.chunks(i)]
    assert any(inner)


@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_plain_layers_are_not_lazy(fmt: str) -> None:
    layer = make_layer(FIXED_SPEC, fmt)
    assert layer.toc_digest == "" and layer.annotations == {}
    with pytest.raises(NotLazy) as info:
        load(layer)
    assert info.value.format == fmt


@pytest.mark.parametrize("fmt", LAZY_FORMATS)
def test_tampered_payload_is_caught(fmt: str) -> None:
    content = random.Random(2).randbytes(5000)
    layer = make_layer({"f": content}, fmt)
    index = load(layer)
    i = index.lookup("f")
    assert i is not None
    (chunk,) = index.chunks(i)
    # flip one byte of the compressed data: decompression or the digest check must fail
    blob = bytearray(layer.blob)
    blob[chunk.coffset + (chunk.cend - chunk.coffset) // 2] ^= 0x55
    with pytest.raises((FormatError, VerifyError)):
        read_file(index, i, reader(bytes(blob)))
    assert read_file(index, i, reader(layer.blob)) == content


# --- property-based round trips ---------------------------------------------------------------

_name = st.text(alphabet="abcxyz.-_é", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh.") and "/" not in s
)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, FileSpec]:
    paths = draw(
        st.lists(
            st.lists(_name, min_size=1, max_size=3).map("/".join),
            min_size=1,
            max_size=8,
            unique=True,
        )
    )
    # keep paths that are not a prefix directory of another path (those become dirs implicitly)
    spec: dict[str, FileSpec] = {}
    for p in paths:
        if any(q.startswith(p + "/") for q in paths):
            continue
        kind = draw(st.sampled_from(["reg", "reg", "reg", "symlink", "dir", "hardlink"]))
        if kind == "reg":
            pieces = draw(
                st.lists(
                    st.one_of(
                        st.binary(max_size=3000),
                        st.integers(min_value=1000, max_value=5000).map(bytes),
                    ),
                    max_size=4,
                )
            )
            mode = draw(st.sampled_from([0o644, 0o600, 0o755, 0o4755]))
            xattrs = draw(
                st.dictionaries(st.sampled_from(["user.a", "user.b"]), st.binary(max_size=5))
            )
            spec[p] = FileSpec(content=b"".join(pieces), mode=mode, xattrs=xattrs)
        elif kind == "symlink":
            spec[p] = FileSpec(type="symlink", link=draw(_name))
        elif kind == "dir":
            spec[p] = FileSpec(type="dir", mode=draw(st.sampled_from([0o755, 0o700, 0o1777])))
        else:
            targets = [q for q, fs in spec.items() if fs.type == "reg"]
            if targets:
                spec[p] = FileSpec(type="hardlink", link=draw(st.sampled_from(targets)))
    return spec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=specs(),
    fmt=st.sampled_from(LAZY_FORMATS),
    chunk=st.sampled_from([512, 1000, 4096]),
    min_chunk=st.sampled_from([0, 0, 3000]),
)
def test_generated_specs_round_trip(
    spec: dict[str, FileSpec], fmt: str, chunk: int, min_chunk: int
) -> None:
    kwargs: dict[str, Any] = {}
    if fmt in ("estargz", "estargz-zstd", "stargz-legacy"):
        kwargs = {"chunk_size": chunk, "min_chunk_size": min_chunk}
    layer = make_layer(spec, fmt, **kwargs)
    check_spec(layer, spec)
    tar = make_tar(spec)
    if fmt.startswith("zstd-chunked"):
        assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    if fmt == "zstd-chunked":
        scan = scan_tar(tar)
        files = {m.name_raw: tar[m.data_start : m.data_end] for m in scan.members}
        assert assemble_tar(build_tarsplit(tar), lambda _n, raw: files[raw]) == tar
