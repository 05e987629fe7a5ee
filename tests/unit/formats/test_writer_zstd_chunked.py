"""zstd:chunked writer: framing, TOC, footers, annotations, chunking, tar-split."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
from typing import Any

import pytest
import zstandard

from als.formats.tarsplit import assemble_tar, scan_tar
from als.formats.writer import (
    LEGACY_MANIFEST_CHECKSUM,
    LEGACY_MANIFEST_POSITION,
    MANIFEST_CHECKSUM,
    MANIFEST_POSITION,
    TARSPLIT_POSITION,
    build_zstd_chunked,
    rollsum_chunks,
    zstd_chunked,
)
from tests.support.layers import go_made
from tests.support.tarspec import FileSpec, tar_from_spec

ZSTD_MAGIC = bytes.fromhex("28b52ffd")
SKIPPABLE = bytes.fromhex("502a4d18")


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def zstd_dc(blob: bytes) -> bytes:
    return subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True).stdout


def frames(blob: bytes, end: int) -> list[tuple[int, int, bytes]]:
    """(offset, compressed length, content) of every zstd frame in blob[:end]."""
    out = []
    pos = 0
    while pos < end:
        assert blob[pos : pos + 4] == ZSTD_MAGIC, f"no zstd frame at {pos}"
        d = zstandard.ZstdDecompressor().decompressobj()
        content = d.decompress(blob[pos:end])
        n = end - pos - len(d.unused_data)
        out.append((pos, n, content))
        pos += n
    return out


def toc_of(blob: bytes, annotations: dict[str, str], legacy: bool) -> tuple[dict[str, Any], int]:
    """Decode the TOC through the manifest-position annotation; return (toc, data end)."""
    key = LEGACY_MANIFEST_POSITION if legacy else MANIFEST_POSITION
    off, clen, ulen, typ = map(int, annotations[key].split(":"))
    assert typ == 1 and blob[off - 8 : off - 4] == SKIPPABLE
    assert struct.unpack("<I", blob[off - 4 : off])[0] == clen
    compressed = blob[off : off + clen]
    assert sha(compressed) == annotations[LEGACY_MANIFEST_CHECKSUM if legacy else MANIFEST_CHECKSUM]
    raw = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=ulen)
    assert len(raw) == ulen
    assert b"\n" not in raw and b": " not in raw  # compact JSON
    return json.loads(raw), off - 8


@pytest.fixture(scope="module")
def in_tar() -> bytes:
    return go_made("in.tar")


def test_143_toc_matches_go_made_sample_except_offsets(in_tar: bytes) -> None:
    go_blob = go_made("zchunked.bin")
    go_off, go_clen, _, _ = struct.unpack("<4Q", go_blob[-40:-8])
    go_toc = json.loads(zstandard.ZstdDecompressor().decompress(go_blob[go_off : go_off + go_clen]))
    layer = build_zstd_chunked(in_tar, layout="1.43")
    toc, _ = toc_of(layer.blob, layer.annotations, legacy=True)

    def strip(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in ("offset", "endOffset")} for e in entries]

    assert strip(toc["entries"]) == strip(go_toc["entries"])
    assert [list(e) for e in toc["entries"]] == [list(e) for e in go_toc["entries"]]
    assert set(toc) == set(go_toc) == {"version", "entries"}
    # the frame layout is the Go sample's too: same uncompressed frame sizes
    ours = [len(f[2]) for f in frames(layer.blob, toc_of(layer.blob, layer.annotations, True)[1])]
    theirs = [len(f[2]) for f in frames(go_blob, go_off - 8)]
    assert ours == theirs == [1024, 6, 2042, 3000, 3000, 4000, 3824]


def test_143_footer_and_annotations(in_tar: bytes) -> None:
    layer = build_zstd_chunked(in_tar, layout="1.43")
    blob = layer.blob
    assert blob[-48:-40] == SKIPPABLE + struct.pack("<I", 40)
    off, clen, ulen, typ = struct.unpack("<4Q", blob[-40:-8])
    assert blob[-8:] == b"GnUlInUx" and typ == 1
    assert layer.annotations == {
        LEGACY_MANIFEST_CHECKSUM: sha(blob[off : off + clen]),
        LEGACY_MANIFEST_POSITION: f"{off}:{clen}:{ulen}:1",
    }
    assert off + clen == len(blob) - 48
    assert layer.toc_digest == sha(blob[off : off + clen])
    assert layer.format == "zstd-chunked"
    assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    toc, _ = toc_of(blob, layer.annotations, legacy=True)
    for e in toc["entries"]:
        if e["type"] != "chunk":
            assert {"modtime", "accesstime", "changetime"} <= set(e)
            assert e["accesstime"] == e["changetime"] == "0001-01-01T00:00:00Z"
    assert "tarSplitDigest" not in toc


def test_current_layout_footer_tarsplit_and_annotations(in_tar: bytes) -> None:
    layer = build_zstd_chunked(in_tar)
    blob = layer.blob
    assert blob[-72:-64] == SKIPPABLE + struct.pack("<I", 64)
    off, clen, ulen, typ, ts_off, ts_clen, ts_ulen = struct.unpack("<7Q", blob[-64:-8])
    assert blob[-8:] == b"GNUlInUx" and typ == 1
    assert ts_off == off + clen + 8 and ts_off + ts_clen == len(blob) - 72
    assert blob[ts_off - 8 : ts_off] == SKIPPABLE + struct.pack("<I", ts_clen)
    assert layer.annotations == {
        MANIFEST_CHECKSUM: sha(blob[off : off + clen]),
        MANIFEST_POSITION: f"{off}:{clen}:{ulen}:1",
        TARSPLIT_POSITION: f"{ts_off}:{ts_clen}:{ts_ulen}",
    }
    toc, _ = toc_of(blob, layer.annotations, legacy=False)
    ts_compressed = blob[ts_off : ts_off + ts_clen]
    assert toc["tarSplitDigest"] == sha(ts_compressed)
    assert list(toc) == ["version", "entries", "tarSplitDigest"]
    tarsplit = zstandard.ZstdDecompressor().decompress(ts_compressed, max_output_size=ts_ulen)
    assert len(tarsplit) == ts_ulen
    # zero times are omitted in the current layout
    for e in toc["entries"]:
        assert "accesstime" not in e and "changetime" not in e
    # tar-split + file contents reassemble the input exactly
    scan = scan_tar(in_tar)
    contents = {m.name: in_tar[m.data_start : m.data_end] for m in scan.members}
    assert assemble_tar(tarsplit, lambda name, raw: contents[name]) == in_tar
    lines = [json.loads(x) for x in tarsplit.splitlines()]
    assert [x["position"] for x in lines] == list(range(len(lines)))
    small = next(x for x in lines if x.get("name") == "dir/small.txt")
    assert small == {"type": 1, "name": "dir/small.txt", "size": 6, "payload": "YUw+7uLYEAA=",
                     "position": small["position"]}  # fmt: skip


@pytest.mark.parametrize("layout", ["current", "1.43"])
def test_decompressed_data_is_the_input_tar_byte_for_byte(in_tar: bytes, layout: Any) -> None:
    trailing = in_tar + bytes(3072) + b"junk after the archive"
    for tar in (in_tar, trailing):
        layer = build_zstd_chunked(tar, layout=layout)
        assert zstd_dc(layer.blob) == tar
        assert layer.diff_id == sha(tar)


def test_chunks_frames_and_fields() -> None:
    rnd = random.Random(7)
    big = rnd.randbytes(300_000) + bytes(5000) + rnd.randbytes(200_000)
    tar = tar_from_spec({"big": big, "small": b"abc", "empty": b"", "zeros": bytes(4096)})
    layer = build_zstd_chunked(tar)
    toc, data_end = toc_of(layer.blob, layer.annotations, legacy=False)
    fr = frames(layer.blob, data_end)
    starts = {f[0]: f for f in fr}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in toc["entries"]:
        by_name.setdefault(e["name"], []).append(e)
    big_entries = by_name["big"]
    assert big_entries[0]["type"] == "reg" and len(big_entries) > 3
    assert all(e["type"] == "chunk" for e in big_entries[1:])
    assert big_entries[0]["digest"] == sha(big)
    pos = 0
    for e in big_entries:
        assert e.get("chunkOffset", 0) == pos
        frame = starts[e["offset"]]
        assert frame[2] == big[pos : pos + e["chunkSize"]]  # one frame per chunk
        assert e["chunkDigest"] == sha(frame[2])
        assert (e.get("chunkType") == "zeros") == (frame[2] == bytes(len(frame[2])))
        pos += e["chunkSize"]
    assert pos == len(big)
    zero_chunks = [e for e in big_entries if e.get("chunkType") == "zeros"]
    assert [z["chunkSize"] for z in zero_chunks] == [5000]
    last = big_entries[-1]
    assert big_entries[0]["endOffset"] == last["offset"] + starts[last["offset"]][1]
    # single-chunk file: no chunk fields at all; empty file: no digest, no offset
    (small,) = by_name["small"]
    assert small["digest"] == sha(b"abc") and starts[small["offset"]][2] == b"abc"
    assert not {"chunkSize", "chunkOffset", "chunkDigest", "chunkType"} & set(small)
    assert small["endOffset"] == small["offset"] + starts[small["offset"]][1]
    (empty,) = by_name["empty"]
    assert not {"digest", "offset", "endOffset"} & set(empty)
    (zeros,) = by_name["zeros"]
    assert "chunkType" not in zeros and starts[zeros["offset"]][2] == bytes(4096)


def test_fixed_chunking() -> None:
    data = random.Random(1).randbytes(10_000)
    layer = build_zstd_chunked(tar_from_spec({"f": data}), chunking="fixed", chunk_size=4096)
    toc, _ = toc_of(layer.blob, layer.annotations, legacy=False)
    f = [e for e in toc["entries"] if e["name"] == "f"]
    assert [e["chunkSize"] for e in f] == [4096, 4096, 1808]
    assert zstd_dc(layer.blob) == tar_from_spec({"f": data})


def reference_rollsum_chunks(data: bytes) -> list[tuple[int, int, bool]]:
    """A direct transcription of the c/storage algorithm (uint32 bup rollsum with an explicit
    window; holes of >= 1024 zeros are rolled in without split checks)."""
    window = [0] * 64
    wofs = 0
    s1, s2 = 64 * 31, 64 * 63 * 31
    mask32 = 0xFFFFFFFF

    def roll(ch: int) -> None:
        nonlocal wofs, s1, s2
        drop = window[wofs]
        s1 = (s1 + ch - drop) & mask32
        s2 = (s2 + s1 - 64 * (drop + 31)) & mask32
        window[wofs] = ch
        wofs = (wofs + 1) % 64

    out = []
    start = 0
    i = 0
    n = len(data)
    while i < n:
        if data[i] == 0:
            j = i
            while j < n and data[j] == 0:
                j += 1
            if j - i >= 1024:
                if i > start:
                    out.append((start, i, False))
                for _ in range(j - i):
                    roll(0)
                out.append((i, j, True))
                start = i = j
                continue
        roll(data[i])
        i += 1
        if s2 & 0xFFFF == 0xFFFF:
            out.append((start, i, False))
            start = i
    if start < n:
        out.append((start, n, False))
    return out


def test_rollsum_matches_a_direct_transcription(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(3)
    data = (
        rnd.randbytes(150_000) + bytes(1023) + rnd.randbytes(70_000) + bytes(1024)
        + bytes([1]) + bytes(2000) + rnd.randbytes(90_000) + bytes(3000)
    )  # fmt: skip
    got = rollsum_chunks(data)
    assert got == reference_rollsum_chunks(data)
    assert sum(b - a for a, b, _ in got) == len(data)
    assert [b - a for a, b, z in got if z] == [1024, 2000, 3000]
    assert len([c for c in got if not c[2]]) > 3  # content-defined splits happened
    # the block-wise computation gives the same splits whatever the block size
    monkeypatch.setattr(zstd_chunked, "_ROLL_BLOCK", 4099)
    assert rollsum_chunks(data) == got
    no_holes = rollsum_chunks(data, zero_runs=False)
    assert not any(z for _, _, z in no_holes)
    assert sum(b - a for a, b, _ in no_holes) == len(data)


def test_rollsum_boundaries_are_content_defined() -> None:
    data = random.Random(5).randbytes(600_000)
    base = rollsum_chunks(data)
    assert rollsum_chunks(data) == base  # deterministic
    assert len(base) >= 4
    shifted = rollsum_chunks(data[:100] + b"!" + data[100:])
    # the checksum only sees the last 64 bytes: once past the insertion point plus one window,
    # every boundary is back, shifted by exactly the inserted byte
    base_ends = {b for _, b, _ in base}
    shifted_ends = {b - 1 for _, b, _ in shifted}
    assert {b for b in base_ends if b > 100 + 64} == {b for b in shifted_ends if b > 100 + 64}
    assert len(base_ends) >= 4


def test_special_entries_and_times() -> None:
    tar = tar_from_spec(
        {
            "d/": FileSpec(type="dir", mode=0o700, uid=5, gid=6),
            "d/fifo": FileSpec(type="fifo"),
            "d/blk": FileSpec(type="block", devmajor=8, devminor=1),
            "d/t": FileSpec(content=b"x", mtime_ns=1_600_000_000_123_456_789, pax={"atime": "5"}),
        }
    )
    layer = build_zstd_chunked(tar)
    toc, _ = toc_of(layer.blob, layer.annotations, legacy=False)
    e = {x["name"]: x for x in toc["entries"]}
    assert e["d/"]["mode"] == 0o700 and (e["d/"]["uid"], e["d/"]["gid"]) == (5, 6)
    assert e["d/fifo"]["type"] == "fifo"
    assert (e["d/blk"]["devMajor"], e["d/blk"]["devMinor"]) == (8, 1)
    assert e["d/t"]["modtime"] == "2020-09-13T12:26:40.123456789Z"
    assert e["d/t"]["accesstime"] == "1970-01-01T00:00:05Z"
