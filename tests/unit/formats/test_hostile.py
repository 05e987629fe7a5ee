"""Hand-made malicious or broken TOCs and footers are rejected with a clear FormatError."""

from __future__ import annotations

import copy
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest

from als.errors import FormatError, NotLazy
from als.formats import EntryType, LayerIndex, load_index, read_file
from tests.unit.conftest import (
    CountingReader,
    gz,
    simple_layer,
    skippable,
    ustar_header,
    wrap_estargz,
    wrap_zstd,
    zst,
)

FILES = {"a/one": b"hello\n", "a/two": b"x" * 5000, "b": b""}


def _load(blob: bytes, **kw: Any) -> LayerIndex:
    return load_index(CountingReader(blob), len(blob), layer="L9", **kw)


def _with(mutate: Callable[[list[Any]], object], *, zstd: bool = False) -> LayerIndex:
    region, toc = simple_layer(FILES, zstd=zstd, chunk=2048)
    toc = copy.deepcopy(toc)
    mutate(toc["entries"])
    if zstd:
        blob, _ = wrap_zstd(region, toc)
    else:
        blob = wrap_estargz(region, toc)
    return _load(blob)


def test_baseline_is_accepted() -> None:
    for zstd in (False, True):
        ix = _with(lambda es: None, zstd=zstd)
        assert ix.lookup("a/two") is not None and ix.lookup("a") is not None
        assert ix.format == ("zstd-chunked" if zstd else "estargz")


def _reg(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "type": "reg", **kw}


HOSTILE: dict[str, tuple[Callable[[list[Any]], object], str]] = {
    "dotdot": (lambda es: es.append(_reg("../etc/passwd")), "'..'"),
    "dotdot-inner": (lambda es: es.append(_reg("a/../../x")), "'..'"),
    "dotdot-abs": (lambda es: es.append(_reg("/../x")), "'..'"),
    "nul": (lambda es: es.append(_reg("a/x\x00y")), "NUL"),
    "duplicate": (lambda es: es.append(_reg("b")), "duplicate"),
    "duplicate-normalised": (lambda es: es.append(_reg("./b")), "duplicate"),
    "duplicate-abs": (lambda es: es.append(_reg("/a/one")), "duplicate"),
    "duplicate-dir": (
        lambda es: es.extend([{"name": "d/", "type": "dir"}, {"name": "d", "type": "dir"}]),
        "duplicate",
    ),
    "duplicate-root": (
        lambda es: es.extend([{"name": "./", "type": "dir"}, {"name": "/", "type": "dir"}]),
        "duplicate",
    ),
    "root-not-dir": (lambda es: es.append(_reg("./")), "root must be a directory"),
    "parent-is-file": (lambda es: es.append(_reg("b/inner")), "not a directory"),
    "dir-over-implied-file": (lambda es: es.append(_reg("a")), "duplicate"),
    "hardlink-missing": (
        lambda es: es.append({"name": "h", "type": "hardlink", "linkName": "nope"}),
        "not an earlier entry",
    ),
    "hardlink-later": (
        lambda es: es.insert(0, {"name": "h", "type": "hardlink", "linkName": "b"}),
        "not an earlier entry",
    ),
    "hardlink-self": (
        lambda es: es.append({"name": "h", "type": "hardlink", "linkName": "h"}),
        "not an earlier entry",
    ),
    "hardlink-cycle": (
        lambda es: es.extend(
            [
                {"name": "h1", "type": "hardlink", "linkName": "h2"},
                {"name": "h2", "type": "hardlink", "linkName": "h1"},
            ]
        ),
        "not an earlier entry",
    ),
    "hardlink-dir": (
        lambda es: es.append({"name": "h", "type": "hardlink", "linkName": "a"}),
        "not an earlier entry",  # implied dirs are not entries of the layer
    ),
    "hardlink-listed-dir": (
        lambda es: es.extend(
            [{"name": "d/", "type": "dir"}, {"name": "h", "type": "hardlink", "linkName": "d"}]
        ),
        "is a directory",
    ),
    "hardlink-dotdot": (
        lambda es: es.append({"name": "h", "type": "hardlink", "linkName": "../b"}),
        "'..'",
    ),
    "symlink-empty": (lambda es: es.append({"name": "s", "type": "symlink"}), "symlink"),
    "unknown-type": (lambda es: es.append({"name": "s", "type": "socket"}), "unknown entry"),
    "type-missing": (lambda es: es.append({"name": "s"}), "unknown entry"),
    "name-not-string": (lambda es: es.append({"name": 7, "type": "reg"}), "name"),
    "entry-not-object": (lambda es: es.append(["reg"]), "not an object"),
    "size-too-big": (lambda es: es.append(_reg("big", size=1 << 41)), "size"),
    "size-negative": (lambda es: es.append(_reg("neg", size=-1)), "size"),
    "size-float": (lambda es: es.append(_reg("f", size=1.5)), "size"),
    "uid-too-big": (lambda es: es.append(_reg("u", uid=1 << 32)), "uid"),
    "mode-string": (lambda es: es.append(_reg("m", mode="0644")), "mode"),
    "bad-digest": (lambda es: es[0].update(digest="sha256:XYZ"), "digest"),
    "upper-digest": (lambda es: es[0].update(digest="sha256:" + "AB" * 32), "digest"),
    "md5-digest": (lambda es: es[0].update(digest="md5:" + "ab" * 16), "digest"),
    "spaced-digest": (lambda es: es[0].update(digest="sha256:" + "ab " * 21 + "a"), "digest"),
    "bad-xattr-b64": (lambda es: es[0].update(xattrs={"user.x": "%%%"}), "base64"),
    "xattr-not-map": (lambda es: es[0].update(xattrs=["user.x"]), "xattrs"),
    "bad-modtime": (lambda es: es[0].update(modtime="yesterday"), "time"),
    "no-offset": (lambda es: es[0].pop("offset"), "offset"),
    "no-digests": (
        lambda es: (es[0].pop("digest"), es[0].pop("chunkDigest")),
        "neither a digest nor chunk digests",
    ),
    "chunk-past-toc": (lambda es: es[0].update(offset=1 << 40), "outside the data area"),
    "chunk-negative": (lambda es: es[0].update(offset=-5), "offset"),
    "chunk-gap": (lambda es: es[2].update(chunkOffset=2049), "gap/overlap"),
    "chunk-overlap": (lambda es: es[2].update(chunkOffset=1000), "gap/overlap"),
    "chunk-too-long": (lambda es: es[3].update(chunkSize=5000), "invalid size"),
    "chunks-short": (lambda es: es.pop(3), "cover"),
    "reg-first-chunkoffset": (lambda es: es[0].update(chunkOffset=3), "chunkOffset 0"),
    "orphan-chunk": (
        lambda es: es.insert(0, {"name": "x", "type": "chunk", "offset": 10}),
        "without a preceding",
    ),
    "chunk-after-dir": (
        lambda es: es.extend(
            [{"name": "d/", "type": "dir"}, {"name": "d", "type": "chunk", "offset": 10}]
        ),
        "without a preceding",
    ),
    "chunk-of-empty-file": (
        lambda es: es.append({"name": "b", "type": "chunk", "offset": 10, "chunkSize": 1}),
        "chunk",
    ),
    "unknown-chunktype": (lambda es: es[0].update(chunkType="holes"), "chunkType"),
    "name-too-long": (lambda es: es.append(_reg("n" * 256)), "longer than 255"),
    "path-too-long": (lambda es: es.append(_reg("/".join(["p" * 200] * 25))), "longer than"),
    "too-deep": (lambda es: es.append(_reg("/".join(["d"] * 300))), "deeper"),
    "invalid-unicode": (lambda es: es.append(_reg("bad\udcff")), "Unicode"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_toc_rejected(case: str) -> None:
    mutate, needle = HOSTILE[case]
    for zstd in (False, True):
        with pytest.raises(FormatError) as ei:
            _with(mutate, zstd=zstd)
        msg = str(ei.value)
        assert needle in msg, msg
        assert "L9" in msg


def test_absolute_paths_are_normalised_not_escaping() -> None:
    ix = _with(
        lambda es: es.extend(
            [_reg("/etc/passwd"), _reg("//x//y/"), {"name": "./", "type": "dir", "mode": 0o700}]
        )
    )
    assert ix.lookup("etc/passwd") is not None
    assert ix.lookup("x/y") is not None
    assert ix.entry(0).mode == 0o700 and ix.root_listed
    for i in ix.iter_ids():
        p = ix.entry(i).path
        assert not p.startswith("/") and ".." not in p.split("/")


@pytest.mark.parametrize("root", ["./", "/", ".", ""])
def test_root_spellings(root: str) -> None:
    ix = _with(lambda es: es.insert(0, {"name": root, "type": "dir", "mode": 0o750, "uid": 5}))
    e = ix.entry(0)
    assert (e.path, e.mode, e.uid) == ("", 0o750, 5)


@pytest.mark.parametrize(
    "doc",
    [
        b"",
        b"{",
        b"[]",
        b'"x"',
        b"null",
        b'{"version": 2, "entries": []}',
        b'{"version": "1", "entries": []}',
        b'{"version": true, "entries": []}',
        b'{"entries": []}',
        b'{"version": 1, "entries": {}}',
        b'{"version": 1, "entries": [1]}',
        b"\xff\xfe\x00",
        b"[" * 100000 + b"]" * 100000,
    ],
)
def test_bad_json_documents(doc: bytes) -> None:
    with pytest.raises(FormatError):
        _load(wrap_estargz(gz(b"\0" * 512), doc))
    blob, _ = wrap_zstd(zst(b"\0" * 512), doc)
    with pytest.raises(FormatError):
        _load(blob)


def test_empty_toc_is_an_empty_layer() -> None:
    ix = _load(wrap_estargz(gz(b"\0" * 512), {"version": 1, "entries": []}))
    assert len(ix) == 1 and list(ix.children(0)) == []


def _estargz_blob() -> bytes:
    region, toc = simple_layer(FILES)
    return wrap_estargz(region, toc)


def test_estargz_footer_pointing_past_the_end() -> None:
    blob = bytearray(_estargz_blob())
    blob[-51 + 16 : -51 + 32] = b"%016x" % (len(blob) + 100)
    with pytest.raises(FormatError, match="outside the blob"):
        _load(bytes(blob))


def test_estargz_footer_pointing_into_the_footer() -> None:
    blob = bytearray(_estargz_blob())
    blob[-51 + 16 : -51 + 32] = b"%016x" % (len(blob) - 51)
    with pytest.raises(FormatError, match="outside the blob"):
        _load(bytes(blob))


def test_estargz_footer_bad_hex() -> None:
    blob = bytearray(_estargz_blob())
    blob[-51 + 16 : -51 + 32] = b"zzzzzzzzzzzzzzzz"
    with pytest.raises(FormatError):
        _load(bytes(blob))


def test_estargz_toc_member_with_wrong_entry_name() -> None:
    region, toc = simple_layer(FILES)
    blob = wrap_estargz(region, toc)
    # re-wrap with another tar entry name
    js = json.dumps(toc).encode()
    member = gz(ustar_header("evil.json", len(js)) + js + bytes((-len(js)) % 512))
    footer = blob[-51:]
    off = len(region)
    footer = footer[:16] + b"%016x" % off + footer[32:]
    with pytest.raises(FormatError, match="first tar entry"):
        _load(region + member + footer)


@pytest.mark.parametrize("footer", [40, 56, 64])
def test_zstd_footer_pointing_past_the_end(footer: int) -> None:
    region, toc = simple_layer(FILES, zstd=True)
    blob = bytearray(wrap_zstd(region, toc, footer=footer)[0])
    struct.pack_into("<Q", blob, len(blob) - footer, len(blob) + 10)
    with pytest.raises(FormatError, match="outside the blob"):
        _load(bytes(blob))


def test_zstd_footer_bad_manifest_type() -> None:
    region, toc = simple_layer(FILES, zstd=True)
    blob = bytearray(wrap_zstd(region, toc)[0])
    struct.pack_into("<Q", blob, len(blob) - 40 + 24, 7)
    with pytest.raises(FormatError, match="manifest type"):
        _load(bytes(blob))


def test_zstd_footer_lies_about_uncompressed_size() -> None:
    region, toc = simple_layer(FILES, zstd=True)
    blob = bytearray(wrap_zstd(region, toc)[0])
    struct.pack_into("<Q", blob, len(blob) - 40 + 16, 10)
    with pytest.raises(FormatError, match="decoded"):
        _load(bytes(blob))


def test_zstd_toc_not_in_skippable_frame() -> None:
    region, toc = simple_layer(FILES, zstd=True)
    blob = bytearray(wrap_zstd(region, toc)[0])
    off = struct.unpack_from("<Q", blob, len(blob) - 40)[0]
    blob[off - 8 : off - 4] = b"XXXX"
    with pytest.raises(FormatError, match="skippable"):
        _load(bytes(blob))


def test_annotation_position_outside_blob() -> None:
    region, toc = simple_layer(FILES, zstd=True)
    blob, ann = wrap_zstd(region, toc)
    ann["io.github.containers.zstd-chunked.manifest-position"] = f"{len(blob)}:100:100:1"
    with pytest.raises(FormatError, match="outside the blob"):
        _load(blob, annotations=ann)
    ann["io.github.containers.zstd-chunked.manifest-position"] = "1:2:3"
    with pytest.raises(FormatError, match="malformed"):
        _load(blob, annotations=ann)


def test_toc_decompression_bomb_is_bounded() -> None:
    # A zstd TOC that inflates to far more than the footer claims: refused, never fully inflated.
    bomb = zst(b" " * (64 << 20))
    blob = zst(b"\0" * 512) + skippable(bomb)
    payload = struct.pack("<4Q", len(zst(b"\0" * 512)) + 8, len(bomb), 1000, 1) + b"GnUlInUx"
    blob += skippable(payload)
    with pytest.raises(FormatError):
        _load(blob)


def test_not_lazy_formats() -> None:
    tarish = bytearray(1024)
    tarish[257:262] = b"ustar"
    cases = {"gzip": gz(b"x" * 100), "zstd": zst(b"x" * 100), "tar": bytes(tarish)}
    for fmt, blob in cases.items():
        with pytest.raises(NotLazy) as ei:
            _load(blob)
        assert ei.value.format == fmt
    with pytest.raises(FormatError, match="unrecognised"):
        _load(b"hello world" * 10)
    with pytest.raises(FormatError):
        _load(b"")


def test_two_reads_when_toc_is_not_in_the_tail() -> None:
    files = {f"d{i % 7}/f{i}": os.urandom(3) for i in range(4000)}
    region, toc = simple_layer(files)
    blob = wrap_estargz(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    assert len(r.calls) == 2
    assert r.calls[0] == [(0, 512), (len(blob) - 65536, 65536)]
    assert ix.regular_files() == 4000
    one = ix.lookup("d3/f3")
    assert one is not None and read_file(ix, one, r) == files["d3/f3"]


def test_one_read_for_big_blob_with_toc_in_tail() -> None:
    files = {"big": os.urandom(200_000), "small": b"s"}
    region, toc = simple_layer(files, chunk=50_000)
    blob = wrap_estargz(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    assert len(r.calls) == 1 and len(blob) > 65536
    big = ix.lookup("big")
    assert big is not None and len(ix.chunks(big)) == 4
    assert read_file(ix, big, r) == files["big"]


def test_legacy_footer_and_entry_types() -> None:
    region, toc = simple_layer({"f": b"data"})
    toc["entries"] += [
        {"name": "dev/", "type": "dir", "mode": 0o40755},
        {"name": "dev/sda", "type": "block", "devMajor": 8, "devMinor": 1, "mode": 0o660},
        {"name": "dev/tty", "type": "char", "devMajor": 5, "devMinor": 0},
        {"name": "p", "type": "fifo", "mode": 0o600},
        {"name": "h1", "type": "hardlink", "linkName": "f"},
        {"name": "h2", "type": "hardlink", "linkName": "./h1"},
        {"name": "abs", "type": "symlink", "linkName": "/etc/../passwd"},
        {"name": "café/ünï", "type": "reg"},
    ]
    ix = _load(wrap_estargz(region, toc, legacy=True))
    assert ix.format == "stargz-legacy"
    f, h1, h2 = (ix.lookup(p) for p in ("f", "h1", "h2"))
    assert f is not None and h1 is not None and h2 is not None
    assert ix.entry(h2).target == f and ix.entry(h1).target == f
    assert ix.entry(f).nlink == 3 and ix.entry(h2).nlink == 3 and ix.entry(h2).size == 4
    dev = ix.lookup("dev")
    assert dev is not None and ix.entry(dev).mode == 0o755
    sda = ix.entry(ix.lookup("dev/sda") or 0)
    assert (sda.type, sda.devmajor, sda.devminor, sda.mode) == (EntryType.BLOCK, 8, 1, 0o660)
    assert ix.entry(ix.lookup("p") or 0).type == EntryType.FIFO
    assert ix.entry(ix.lookup("abs") or 0).link == "/etc/../passwd"  # verbatim, never followed
    assert ix.lookup("café/ünï") is not None
    assert ix.entry(0).nlink == 2 + 2  # root: dev and café


def test_zstd_annotations_on_a_gzip_blob_are_refused() -> None:
    ann = {"io.github.containers.zstd-chunked.manifest-checksum": "sha256:" + "0" * 64}
    with pytest.raises(FormatError, match="zstd:chunked"):
        _load(_estargz_blob(), annotations=ann)
    ann = {"io.github.containers.zstd-chunked.manifest-position": "100:50:60:1"}
    with pytest.raises(FormatError):
        _load(_estargz_blob(), annotations=ann)
