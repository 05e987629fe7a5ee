"""eStargz writer: blob structure against the format notes and the Go-made samples."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import subprocess
import tarfile
import zlib
from typing import Any

import pytest
import zstandard

from als.formats.writer import (
    ESTARGZ_UNCOMPRESSED_SIZE,
    LEGACY_MANIFEST_CHECKSUM,
    LEGACY_MANIFEST_POSITION,
    TOC_DIGEST,
    build_estargz,
)
from tests.support.layers import go_made
from tests.support.tarspec import FileSpec, tar_from_spec

SHA_EMPTY = "sha256:" + hashlib.sha256(b"").hexdigest()


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def gzip_members(blob: bytes, end: int) -> list[tuple[int, int, bytes]]:
    """(offset, compressed length, content) of every gzip member in blob[:end]."""
    out = []
    pos = 0
    while pos < end:
        d = zlib.decompressobj(31)
        content = d.decompress(blob[pos:end])
        assert d.eof, f"truncated gzip member at {pos}"
        n = end - pos - len(d.unused_data)
        out.append((pos, n, content))
        pos += n
    return out


def footer_offset(blob: bytes) -> int:
    f = blob[-51:]
    assert f[:16] == bytes.fromhex("1f8b08040000000000ff1a0053471600")
    assert f[32:] == b"STARGZ" + bytes.fromhex("010000ffff") + bytes(8)
    return int(f[16:32], 16)


def estargz_toc(blob: bytes) -> tuple[bytes, bytes]:
    """(TOC tar header, TOC JSON) of an eStargz/gzip blob."""
    off = footer_offset(blob)
    d = zlib.decompressobj(31)
    tar = d.decompress(blob[off:-51])
    assert d.eof and d.unused_data == b""
    size = int(tar[124:136].rstrip(b"\0 "), 8)
    assert tar[512 + size :].strip(b"\0") == b""
    assert len(tar) == 512 + size + (-size % 512) + 1024  # entry, padding, tar EOF
    return tar[:512], tar[512 : 512 + size]


def without_offsets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in ("offset", "endOffset")} for e in entries]


@pytest.fixture(scope="module")
def in_tar() -> bytes:
    return go_made("in.tar")


@pytest.fixture(scope="module")
def ours(in_tar: bytes) -> Any:
    return build_estargz(in_tar, chunk_size=4096, level=9)


def test_toc_matches_go_made_sample_except_offsets(in_tar: bytes, ours: Any) -> None:
    go_hdr, go_json = estargz_toc(go_made("esgz.bin"))
    hdr, toc_json = estargz_toc(ours.blob)
    go_toc, toc = json.loads(go_json), json.loads(toc_json)
    assert without_offsets(toc["entries"]) == without_offsets(go_toc["entries"])
    assert toc["version"] == 1
    # same keys in the same order, entry by entry (Go struct order, omitempty)
    assert [list(e) for e in toc["entries"]] == [list(e) for e in go_toc["entries"]]
    # tab-indented like Go's json.MarshalIndent, no trailing newline
    assert toc_json.startswith(b'{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": ')
    assert toc_json.endswith(b"\n\t]\n}")
    # the TOC tar header is what Go's tar.Writer writes, apart from size and checksum
    assert hdr[:124] == go_hdr[:124] and hdr[156:] == go_hdr[156:]
    assert int(hdr[124:136].rstrip(b"\0"), 8) == len(toc_json)


def test_annotations_and_digests(in_tar: bytes, ours: Any) -> None:
    _, toc_json = estargz_toc(ours.blob)
    assert ours.toc_digest == sha(toc_json)
    assert ours.annotations == {
        TOC_DIGEST: sha(toc_json),
        ESTARGZ_UNCOMPRESSED_SIZE: str(len(gzip.decompress(ours.blob))),
    }
    assert ours.digest == sha(ours.blob) and ours.size == len(ours.blob)
    assert ours.diff_id == sha(gzip.decompress(ours.blob))
    assert ours.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert ours.format == "estargz"


def test_footer_is_an_empty_gzip_member_pointing_at_the_toc(ours: Any) -> None:
    off = footer_offset(ours.blob)
    assert gzip.decompress(ours.blob[-51:]) == b""
    assert ours.blob[off : off + 3] == b"\x1f\x8b\x08"
    members = gzip_members(ours.blob, len(ours.blob))
    assert members[-1] == (len(ours.blob) - 51, 51, b"")
    assert members[-2][0] == off


def test_every_payload_chunk_starts_a_member(ours: Any) -> None:
    _, toc_json = estargz_toc(ours.blob)
    toc_off = footer_offset(ours.blob)
    members = gzip_members(ours.blob, toc_off)
    starts = {m[0] for m in members}
    stream = b"".join(m[2] for m in members)
    entries = json.loads(toc_json)["entries"]
    last_reg: dict[str, Any] = {}
    data_entries = 0
    for e in entries:
        if e["type"] == "reg":
            last_reg = e
        if "offset" not in e:
            assert e["type"] != "chunk"
            assert e["type"] != "reg" or e.get("size", 0) == 0
            continue
        data_entries += 1
        assert e["offset"] in starts, e
        size = e.get("chunkSize") or last_reg["size"] - e.get("chunkOffset", 0)
        # decode from the member start, across member boundaries
        rest = ours.blob[e["offset"] : toc_off]
        content = b"".join(m[2] for m in gzip_members(rest, len(rest)))[:size]
        assert sha(content) == e["chunkDigest"]
        assert content in stream
    assert data_entries == 5  # landmark, small.txt, big.bin x3


def test_big_file_chunk_fields_as_go(ours: Any) -> None:
    _, toc_json = estargz_toc(ours.blob)
    big = [e for e in json.loads(toc_json)["entries"] if e["name"] == "dir/big.bin"]
    assert [e["type"] for e in big] == ["reg", "chunk", "chunk"]
    assert [e.get("chunkOffset", 0) for e in big] == [0, 4096, 8192]
    assert [e.get("chunkSize") for e in big] == [4096, 4096, None]


def test_chunk_size_exact_multiple_keeps_chunk_size_on_last_chunk() -> None:
    tar = tar_from_spec({"f": bytes(range(256)) * 32})  # 8192 bytes
    layer = build_estargz(tar, chunk_size=4096)
    entries = json.loads(estargz_toc(layer.blob)[1])["entries"]
    f = [e for e in entries if e["name"] == "f"]
    assert [e.get("chunkSize") for e in f] == [4096, 4096]
    single = build_estargz(tar_from_spec({"g": b"x" * 4096}), chunk_size=4096)
    g = [e for e in json.loads(estargz_toc(single.blob)[1])["entries"] if e["name"] == "g"]
    assert len(g) == 1 and g[0]["chunkSize"] == 4096 == g[0]["size"]
    assert g[0]["chunkDigest"] == g[0]["digest"] == sha(b"x" * 4096)


def tar_view(data: bytes) -> list[tuple[Any, ...]]:
    """Every member of a tar as comparable tuples (attributes, PAX records, content)."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isreg() else None
            content = f.read() if f is not None else b""
            attrs = (m.name, m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime, m.size)
            extra = (m.linkname, m.devmajor, m.devminor, dict(m.pax_headers))
            out.append((*attrs, *extra, content))
    return out


def test_gunzip_gives_a_tar_with_the_input_content(in_tar: bytes, ours: Any) -> None:
    out = subprocess.run(["gzip", "-dc"], input=ours.blob, capture_output=True, check=True).stdout
    assert sha(out) == ours.diff_id
    got = tar_view(out)
    assert got[0][0] == ".no.prefetch.landmark" and got[0][-1] == b"\x0f"
    assert got[-1][0] == "stargz.index.json"
    assert got[1:-1] == tar_view(in_tar)


def test_legacy_footer() -> None:
    tar = tar_from_spec({"a": b"hello"})
    layer = build_estargz(tar, legacy_footer=True)
    f = layer.blob[-47:]
    assert f[:12] == bytes.fromhex("1f8b08040000000000ff1600")
    assert f[28:] == b"STARGZ" + bytes.fromhex("010000ffff") + bytes(8)
    off = int(f[12:28], 16)
    assert gzip.decompress(f) == b""
    toc_tar = zlib.decompressobj(31).decompress(layer.blob[off:-47])
    assert toc_tar[:17] == b"stargz.index.json"
    assert layer.format == "stargz-legacy"
    # same data as the 51-byte variant
    modern = build_estargz(tar)
    assert layer.blob[:off] == modern.blob[:off]


def test_prioritized_files_come_first_with_parents_and_link_targets() -> None:
    tar = tar_from_spec(
        {
            "etc/passwd": b"root:x:0:0\n",
            "usr/lib/libc.so": b"\x7fELF" * 100,
            "usr/bin/sh": b"#!" * 50,
            "usr/bin/ln-to-libc": FileSpec(type="hardlink", link="usr/lib/libc.so"),
            "var/log/": b"",
        }
    )
    layer = build_estargz(tar, prioritized=["/usr/bin/ln-to-libc", "missing/file", "etc/passwd"])
    names = [e["name"] for e in json.loads(estargz_toc(layer.blob)[1])["entries"]]
    assert names == [
        "usr/", "usr/bin/", "usr/lib/", "usr/lib/libc.so", "usr/bin/ln-to-libc",
        "etc/", "etc/passwd", ".prefetch.landmark", "usr/bin/sh", "var/", "var/log/",
    ]  # fmt: skip
    entries = json.loads(estargz_toc(layer.blob)[1])["entries"]
    landmark = next(e for e in entries if e["name"] == ".prefetch.landmark")
    prioritized_offsets = [e["offset"] for e in entries[:7] if "offset" in e]
    assert prioritized_offsets and max(prioritized_offsets) < landmark["offset"]
    assert landmark["digest"] == landmark["chunkDigest"] == sha(b"\x0f")
    assert not any(e["name"] == ".no.prefetch.landmark" for e in entries)


def test_input_toc_and_landmarks_are_dropped_and_duplicates_keep_the_last() -> None:
    tar = tar_from_spec({"a": b"first", "stargz.index.json": b"{}", ".prefetch.landmark": b"x"})
    tar = tar[:-1024] + tar_from_spec({"./a": b"second", "b": b"b"}, implied_dirs=False)
    entries = json.loads(estargz_toc(build_estargz(tar).blob)[1])["entries"]
    assert [e["name"] for e in entries] == [".no.prefetch.landmark", "./a", "b"]
    assert entries[1]["digest"] == sha(b"second")


def test_min_chunk_size_puts_small_files_in_one_member() -> None:
    files = {f"d/f{i}": bytes([65 + i]) * (10 + i) for i in range(6)}
    layer = build_estargz(tar_from_spec(files), min_chunk_size=8192)
    toc_off = footer_offset(layer.blob)
    entries = json.loads(estargz_toc(layer.blob)[1])["entries"]
    regs = [e for e in entries if e["type"] == "reg" and e["name"].startswith("d/")]
    assert len({e["offset"] for e in regs}) == 1  # all share the member after the landmark
    assert all(e["innerOffset"] > 0 for e in regs)
    landmark = entries[0]
    assert landmark["name"] == ".no.prefetch.landmark" and "innerOffset" not in landmark
    for e in regs:
        rest = layer.blob[e["offset"] : toc_off]
        stream = b"".join(m[2] for m in gzip_members(rest, len(rest)))
        data = stream[e["innerOffset"] : e["innerOffset"] + e["size"]]
        assert data == files[e["name"]] and sha(data) == e["chunkDigest"]


def test_zstd_variant_matches_go_made_sample(in_tar: bytes) -> None:
    go_blob = go_made("esgz-zstd.bin")
    layer = build_estargz(in_tar, compression="zstd", chunk_size=4096)

    def toc_of(blob: bytes) -> tuple[bytes, tuple[int, ...]]:
        assert blob[-48:-40] == bytes.fromhex("502a4d1828000000")
        assert blob[-8:] == b"GnUlInUx"
        off, clen, ulen, typ = struct.unpack("<4Q", blob[-40:-8])
        assert typ == 1 and blob[off - 8 : off - 4] == bytes.fromhex("502a4d18")
        assert struct.unpack("<I", blob[off - 4 : off])[0] == clen
        assert off + clen == len(blob) - 48
        js = zstandard.ZstdDecompressor().decompress(blob[off : off + clen], max_output_size=ulen)
        assert len(js) == ulen
        return js, (off, clen, ulen)

    go_json, _ = toc_of(go_blob)
    js, (off, clen, ulen) = toc_of(layer.blob)
    go_entries = json.loads(go_json)["entries"]
    entries = json.loads(js)["entries"]
    assert without_offsets(entries) == without_offsets(go_entries)
    assert [list(e) for e in entries] == [list(e) for e in go_entries]
    assert layer.toc_digest == sha(js)
    assert layer.annotations == {
        TOC_DIGEST: sha(js),
        LEGACY_MANIFEST_CHECKSUM: sha(layer.blob[off : off + clen]),
        LEGACY_MANIFEST_POSITION: f"{off}:{clen}:{ulen}:1",
        ESTARGZ_UNCOMPRESSED_SIZE: str(len(zstd_dc(layer.blob))),
    }
    assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    # the decompressed stream has no tar EOF and no TOC entry, like the Go sample
    plain = zstd_dc(layer.blob)
    assert sha(plain) == layer.diff_id
    assert not plain.endswith(bytes(1024))
    assert len(plain) == len(zstd_dc(go_blob))
    names = [m[0] for m in tar_view(plain)]
    assert names[0] == ".no.prefetch.landmark" and "stargz.index.json" not in names
    # every payload chunk starts a zstd frame
    for e in entries:
        if "offset" in e:
            assert layer.blob[e["offset"] : e["offset"] + 4] == bytes.fromhex("28b52ffd")


def zstd_dc(blob: bytes) -> bytes:
    out = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True).stdout
    return out


def test_rejects_unsupported_input() -> None:
    from als.errors import FormatError

    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}
    ) as tf:
        tf.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    with pytest.raises(FormatError, match="global"):
        build_estargz(buf.getvalue())
    with pytest.raises(FormatError, match="truncated"):
        build_estargz(tar_from_spec({"a": b"x" * 1000})[:700])
