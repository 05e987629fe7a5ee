"""The zstd:chunked writer (containers/storage) and its rolling-checksum chunker.

The input tar is kept byte for byte (its DiffID does not change): every chunk of every payload
is one zstd frame, headers and padding sit in frames of their own; then the compact JSON TOC,
the tar-split data (current layout only) and the footer, each in a skippable frame.
"""

from __future__ import annotations

import re
import struct
from typing import Literal

import zstandard

from als.digest import sha256_of
from als.formats.detect import ZSTD_CHUNKED_MAGIC_NEW, ZSTD_CHUNKED_MAGIC_OLD
from als.formats.tarsplit import TarMember, build_tarsplit, go_json, scan_tar
from als.formats.writer.common import (
    BuiltLayer,
    Framer,
    built_layer,
    nano_time,
    omit_empty,
    skippable,
    xattrs_b64,
)
from als.oci import (
    ANN_LEGACY_MANIFEST_CHECKSUM,
    ANN_LEGACY_MANIFEST_POSITION,
    ANN_MANIFEST_CHECKSUM,
    ANN_MANIFEST_POSITION,
    ANN_TARSPLIT_POSITION,
    OCI_LAYER_ZSTD,
)

_HOLE_THRESHOLD = 1024
_ZERO_TIME = "0001-01-01T00:00:00Z"
_ROLL_WINDOW = 64
_ROLL_CHAR_OFFSET = 31
_ROLL_S2_INIT = _ROLL_WINDOW * (_ROLL_WINDOW - 1) * _ROLL_CHAR_OFFSET
_ZERO_RUN = re.compile(rb"\x00{%d,}" % _HOLE_THRESHOLD)
_ROLL_BLOCK = 1 << 22  # bytes per big-integer pass (bounds the memory used)
_LANE = 3  # bytes per lane: a window sum is at most 255 * 2080 < 2**24


def _holes(data: bytes) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _ZERO_RUN.finditer(data)]


def _rollsum_split_points(data: bytes) -> list[int]:
    """Offsets ``i + 1`` for every byte ``i`` after which the rolling checksum says "split".

    bup rollsum, window 64: after byte i, s2 = S2_INIT + sum((j + 1) * data[i - j], j < 64)
    modulo 2**32 (bytes before the file count as zeros); c/storage splits when the low 16 bits
    of s2 are all ones. The weighted window sums are computed for a whole block at once with
    integer arithmetic: the bytes become 24-bit lanes of one big integer x, and
    x * sum((j + 1) * z**j) with z = 2**24 equals
    (x * (1 - 65 * z**64 + 64 * z**65)) / (z - 1)**2, which needs only shifts, small
    multiplications and two divisions by a one-digit number.
    """
    target = (0xFFFF - _ROLL_S2_INIT) & 0xFFFF
    pattern = re.compile(b"(?=" + re.escape(bytes([target & 0xFF, target >> 8])) + b")")
    bits = 8 * _LANE
    lane_max = (1 << bits) - 1
    out: list[int] = []
    for a in range(0, len(data), _ROLL_BLOCK):
        lo = max(0, a - (_ROLL_WINDOW - 1))  # the window's history
        seg = data[lo : a + _ROLL_BLOCK]
        m = len(seg)
        lanes = bytearray(_LANE * m)
        lanes[0::_LANE] = seg
        x = int.from_bytes(lanes, "little")
        y = x + ((x * 64) << (bits * 65)) - ((x * 65) << (bits * 64))
        sums = y // lane_max // lane_max
        raw = sums.to_bytes(max(_LANE * m, (sums.bit_length() + 7) // 8), "little")
        low16 = bytearray(2 * m)
        low16[0::2] = raw[0 : _LANE * m : _LANE]
        low16[1::2] = raw[1 : _LANE * m : _LANE]
        for hit in pattern.finditer(low16):
            p = hit.start()
            if p % 2 == 0 and lo + p // 2 >= a:
                out.append(lo + p // 2 + 1)
    return out


def rollsum_chunks(
    data: bytes, *, zero_runs: bool = True, fixed: int | None = None
) -> list[tuple[int, int, bool]]:
    """Chunk a file's content as containers/storage does: ``[(start, end, is_zeros), ...]``.

    Runs of >= 1024 zero bytes become chunks of their own (``is_zeros``) when ``zero_runs``;
    data between them is split by the rolling checksum (content defined, the checksum keeps
    rolling over holes, as in c/storage), or into ``fixed``-size pieces when ``fixed`` is set.
    """
    n = len(data)
    holes = _holes(data) if zero_runs else []
    splits = [] if fixed else _rollsum_split_points(data)
    out: list[tuple[int, int, bool]] = []
    k = 0  # index into splits
    pos = 0
    for hs, he in [*holes, (n, n)]:
        if pos < hs:
            if fixed:
                cuts = list(range(pos + fixed, hs, fixed))
            else:
                # split checks happen on data bytes only, never inside a hole
                while k < len(splits) and splits[k] <= pos:
                    k += 1
                cuts = []
                while k < len(splits) and splits[k] <= hs:
                    cuts.append(splits[k])
                    k += 1
            prev = pos
            for c in [*cuts, hs]:
                if c > prev:
                    out.append((prev, c, False))
                    prev = c
        if he > hs:
            out.append((hs, he, True))
        pos = he
    return out


def _chunked_entry(m: TarMember, layout: Literal["current", "1.43"]) -> dict[str, object]:
    def t(ns: int | None) -> str:
        if ns is None:
            return _ZERO_TIME if layout == "1.43" else ""
        return nano_time(ns)

    return {
        "type": m.type,
        "name": m.name,
        "linkName": m.linkname,
        "mode": m.mode,
        "size": m.size if m.type == "reg" else 0,
        "uid": m.uid,
        "gid": m.gid,
        "modtime": t(m.mtime_ns),
        "accesstime": t(m.atime_ns),
        "changetime": t(m.ctime_ns),
        "devMajor": m.devmajor,
        "devMinor": m.devminor,
        "xattrs": xattrs_b64(m.xattrs),
        "digest": "",
        "offset": 0,
        "endOffset": 0,
        "chunkSize": 0,
        "chunkOffset": 0,
        "chunkDigest": "",
        "chunkType": "",
    }


def build_zstd_chunked(
    tar: bytes,
    *,
    layout: Literal["current", "1.43"] = "current",
    chunking: Literal["rollsum", "fixed"] = "rollsum",
    chunk_size: int = 64 * 1024,
    zero_runs: bool = True,
    level: int = 3,
) -> BuiltLayer:
    """Convert a tar into containers/storage zstd:chunked; the tar is kept byte for byte.

    ``layout="current"``: 64-byte footer (magic GNUlInUx), tar-split frame, ``tarSplitDigest``
    in the TOC, ``io.github.containers.*`` annotations, zero times omitted.
    ``layout="1.43"`` (what podman 4.3 writes): 40-byte footer (GnUlInUx), no tar-split,
    ``io.containers.*`` annotations, every entry has modtime/accesstime/changetime (zero times
    as year 1). ``chunking="fixed"`` cuts data at ``chunk_size`` instead of the rolling checksum.
    """
    if chunking == "fixed" and chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    scan = scan_tar(tar)
    fr = Framer("zstd", level)
    entries: list[dict[str, object]] = []
    pos = 0
    for m in scan.members:
        fr.write(tar[pos : m.data_start])
        pos = m.data_start
        main = _chunked_entry(m, layout)
        if m.size:
            data = tar[m.data_start : m.data_end]
            chunks = rollsum_chunks(
                data, zero_runs=zero_runs, fixed=chunk_size if chunking == "fixed" else None
            )
            main["offset"] = fr.close()
            main["digest"] = sha256_of(data)
            recs: list[dict[str, object]] = []
            for a, b, zeros in chunks:
                rec = {
                    "offset": fr.pos,
                    "chunkSize": b - a,
                    "chunkOffset": a,
                    "chunkDigest": sha256_of(data[a:b]),
                    "chunkType": "zeros" if zeros else "",
                }
                fr.write(data[a:b])
                fr.close()
                recs.append(rec)
            main["endOffset"] = fr.pos
            pos = m.data_end
            if len(recs) > 1:
                main.update(recs[0])
                main["chunkOffset"] = 0
                entries.append(omit_empty(main))
                for rec in recs[1:]:
                    chunk = {"type": "chunk", "name": m.name, **rec}
                    entries.append(omit_empty(chunk))
                continue
        entries.append(omit_empty(main))
    fr.write(tar[pos:])
    fr.close()
    diff_id = "sha256:" + fr.diff.hexdigest()
    data_end = len(fr.blob)
    manifest_off = data_end + 8
    zc = zstandard.ZstdCompressor(level=level, write_checksum=True)

    if layout == "1.43":
        toc_json = go_json({"version": 1, "entries": entries})
        compressed = zc.compress(toc_json)
        footer = (
            struct.pack("<4Q", manifest_off, len(compressed), len(toc_json), 1)
            + ZSTD_CHUNKED_MAGIC_OLD
        )
        blob = bytes(fr.blob) + skippable(compressed) + skippable(footer)
        checksum = sha256_of(compressed)
        annotations = {
            ANN_LEGACY_MANIFEST_CHECKSUM: checksum,
            ANN_LEGACY_MANIFEST_POSITION: f"{manifest_off}:{len(compressed)}:{len(toc_json)}:1",
        }
        return built_layer(blob, diff_id, checksum, annotations, OCI_LAYER_ZSTD, "zstd-chunked")

    tarsplit = build_tarsplit(tar, scan)
    ts_compressed = zc.compress(tarsplit)
    toc_json = go_json(
        {"version": 1, "entries": entries, "tarSplitDigest": sha256_of(ts_compressed)}
    )
    compressed = zc.compress(toc_json)
    ts_off = manifest_off + len(compressed) + 8
    footer = (
        struct.pack(
            "<7Q",
            manifest_off,
            len(compressed),
            len(toc_json),
            1,
            ts_off,
            len(ts_compressed),
            len(tarsplit),
        )
        + ZSTD_CHUNKED_MAGIC_NEW
    )
    blob = bytes(fr.blob) + skippable(compressed) + skippable(ts_compressed) + skippable(footer)
    checksum = sha256_of(compressed)
    annotations = {
        ANN_MANIFEST_CHECKSUM: checksum,
        ANN_MANIFEST_POSITION: f"{manifest_off}:{len(compressed)}:{len(toc_json)}:1",
        ANN_TARSPLIT_POSITION: f"{ts_off}:{len(ts_compressed)}:{len(tarsplit)}",
    }
    return built_layer(blob, diff_id, checksum, annotations, OCI_LAYER_ZSTD, "zstd-chunked")
