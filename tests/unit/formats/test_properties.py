"""Property-based tests: whatever the input, the readers either produce a consistent index or
raise an AlsError subclass, in bounded time."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from als.errors import AlsError
from als.extract import extract_index
from als.formats import EntryType, LayerIndex, load_index, read_file
from tests.unit.conftest import (
    GO_BLOBS,
    CountingReader,
    go_blob,
    sha256,
    simple_layer,
    wrap_estargz,
    wrap_zstd,
)

SETTINGS = settings(
    max_examples=int(os.environ.get("ALS_HYPOTHESIS_EXAMPLES", "150")),
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_components = st.sampled_from(["a", "b", "c", "..", ".", "", "é", "x\x00", ".wh.a", "landmark"])
_names = st.lists(_components, min_size=0, max_size=5).map("/".join) | st.sampled_from(
    ["./", "/", ".", "stargz.index.json", ".prefetch.landmark", "/a/../b", "a//b/"]
)
_ints = st.sampled_from(
    [0, 1, 2, 5, 100, 511, 512, 4096, -1, 1 << 32, 1 << 41, 10**30]
) | st.integers(-10, 5000)
_types = st.sampled_from(
    ["reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk", "bogus", None, 3]
)
_values: st.SearchStrategy[Any] = st.one_of(
    _ints,
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.sampled_from(
        [
            "sha256:" + "0" * 64,
            "2020-09-13T12:26:40Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T00:00:00Z",
        ]
    ),
)
_entry = st.fixed_dictionaries(
    {"name": _names, "type": _types},
    optional={
        "size": _ints,
        "offset": _ints,
        "chunkOffset": _ints,
        "chunkSize": _ints,
        "innerOffset": _ints,
        "mode": _ints,
        "uid": _ints,
        "linkName": _names,
        "digest": _values,
        "chunkDigest": _values,
        "chunkType": st.sampled_from(["zeros", "", "x"]),
        "modtime": _values,
        "xattrs": st.dictionaries(
            st.sampled_from(["user.a", "", "x"]), st.sampled_from(["YQ==", "!"])
        ),
        "devMajor": _ints,
        "userName": _values,
    },
)
# Mostly well-formed entries: explores tree building (implied dirs, overrides, hardlinks...).
_clean_names = st.lists(st.sampled_from(["a", "b", "c", "é", ".wh.a"]), min_size=1, max_size=3).map(
    "/".join
)
_plausible = st.fixed_dictionaries(
    {
        "name": st.one_of(_clean_names, _clean_names.map(lambda n: n + "/")),
        "type": st.sampled_from(["reg", "dir", "symlink", "hardlink", "fifo", "char", "block"]),
        "mode": st.sampled_from([0o644, 0o755, 0o4755, 0o40755, 0]),
        "uid": st.sampled_from([0, 1000]),
        "linkName": _clean_names,
        "modtime": st.sampled_from(["2020-09-13T12:26:40Z", "2021-01-01T00:00:00.5+01:00"]),
    },
    optional={"devMajor": st.integers(0, 300), "xattrs": st.just({"user.k": "dg=="})},
)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


def check_invariants(ix: LayerIndex, read: CountingReader) -> None:
    n = len(ix)
    assert ix.entry(0).path == ""
    for i in range(n):
        e = ix.entry(i)
        parts = e.path.split("/") if e.path else []
        assert all(p not in ("", ".", "..") and "\x00" not in p for p in parts)
        assert i == 0 or e.parent < i
        assert ix.lookup(e.path) == i
        assert ix.type(e.parent) == EntryType.DIR
        if e.type == EntryType.HARDLINK:
            assert 0 < e.target < i and ix.type(e.target) != EntryType.HARDLINK
        if e.type == EntryType.DIR:
            kids = list(ix.children(i))
            names = [ix.entry(k).name.encode() for k in kids]
            assert names == sorted(names)
        if e.type in (EntryType.REG, EntryType.HARDLINK):
            pos = 0
            for c in ix.chunks(i):
                assert c.uoffset == pos and c.size > 0
                assert 0 <= c.coffset < c.cend <= ix.toc_offset
                pos += c.size
            assert pos == ix.size(i)
            if ix.size(i) <= 4096:
                with contextlib.suppress(AlsError):  # corrupt data: only AlsError allowed
                    read_file(ix, i, read)


def _try(blob: bytes, **kw: Any) -> None:
    r = CountingReader(blob)
    try:
        ix = load_index(r, len(blob), **kw)
    except AlsError:
        return
    check_invariants(ix, r)


@SETTINGS
@given(st.lists(_entry, max_size=12), st.booleans())
def test_random_structured_tocs(entries: list[dict[str, Any]], zstd: bool) -> None:
    region, _ = simple_layer({"x": b"hello", "y": bytes(600)}, zstd=zstd)
    toc = {"version": 1, "entries": entries}
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    _try(blob)


@SETTINGS
@given(st.lists(_plausible, max_size=15), st.booleans())
def test_plausible_tocs(entries: list[dict[str, Any]], zstd: bool) -> None:
    region, toc = simple_layer({"x": b"hello", "y": bytes(600)}, zstd=zstd)
    toc["entries"] += entries
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    _try(blob)


@SETTINGS
@given(_json)
def test_random_json_documents(doc: Any) -> None:
    region, _ = simple_layer({"x": b"hello"})
    _try(wrap_estargz(region, json.dumps(doc).encode()))


@SETTINGS
@given(st.binary(max_size=2000))
def test_random_bytes(blob: bytes) -> None:
    _try(blob)
    _try(blob + b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x1a\x00SG\x16\x00" + b"%016x" % 0 + b"STARGZ")


@SETTINGS
@given(
    st.sampled_from(GO_BLOBS),
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, 64),
)
def test_mutated_go_blobs(name: str, flips: list[tuple[int, int]], cut: int) -> None:
    blob = bytearray(go_blob(name))
    for at, x in flips:
        blob[at % len(blob)] ^= x
    _try(bytes(blob))
    _try(bytes(blob[: len(blob) - cut]))


@SETTINGS
@given(st.binary(min_size=1, max_size=300), st.integers(1, 64), st.booleans())
def test_valid_layers_roundtrip(data: bytes, chunk: int, zstd: bool) -> None:
    files = {"d/f": data, "e": data[::-1]}
    region, toc = simple_layer(files, zstd=zstd, chunk=chunk)
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob), expected_toc_digest=None)
    for path, content in files.items():
        i = ix.lookup(path)
        assert i is not None
        assert read_file(ix, i, r) == content
        assert ix.entry(i).digest == sha256(content)
    check_invariants(ix, r)


@settings(
    max_examples=int(os.environ.get("ALS_HYPOTHESIS_EXAMPLES", "60")),
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(st.one_of(_entry, _plausible, _plausible), max_size=12),
    st.sampled_from(["overlay", "aufs"]),
)
def test_random_tocs_extract_inside_dest_only(entries: list[dict[str, Any]], wh: str) -> None:
    region, toc = simple_layer({"x": b"hello", "y/z": bytes(600)})
    toc["entries"] += entries
    blob = wrap_estargz(region, toc)
    r = CountingReader(blob)
    try:
        ix = load_index(r, len(blob))
    except AlsError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        dest = base / "dest"
        with contextlib.suppress(AlsError):  # only AlsError may come out
            extract_index(ix, r, dest, whiteouts=wh)
        # nothing but DEST was created next to it
        assert sorted(p.name for p in base.iterdir()) == ["dest"]
        for dirpath, _dirs, _files in os.walk(dest):
            os.chmod(dirpath, 0o700)  # let TemporaryDirectory clean up read-only dirs
