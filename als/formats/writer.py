"""Layer writers: eStargz (gzip and zstd), containers/storage zstd:chunked, plain gzip/zstd.

Pure functions, bytes in and bytes out. They exist for tests (every reader test builds its blobs
here) and for users (``als convert``). The layouts follow the reference notes on the formats:

* eStargz (stargz-snapshotter): a new gzip member (zstd frame) before every payload chunk, the
  tar headers of the following entries in the member of the preceding payload, landmark files,
  the TOC as a tar entry ``stargz.index.json`` in its own member followed by the tar EOF, and the
  51-byte footer (47 bytes for legacy stargz). With zstd, the TOC JSON goes compressed into a
  zstd skippable frame, followed by a 40-byte footer payload (stargz-snapshotter's
  "zstdchunked" variant).
* zstd:chunked (containers/storage): the input tar is kept byte for byte (its DiffID does not
  change); every chunk of every payload is one zstd frame, headers and padding sit in frames of
  their own; then the compact JSON TOC, the tar-split data (current layout only) and the footer,
  each in a skippable frame.

Input headers are never re-serialised: the writers copy the raw header blocks of the input tar
(see ``tarsplit.scan_tar``). Only the TOC entry and the landmark files get headers written here.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import zstandard

from als.digest import sha256_of
from als.errors import FormatError
from als.formats.tarsplit import BLOCK, TarMember, TarScan, build_tarsplit, go_json, scan_tar
from als.oci import (
    ANN_LEGACY_MANIFEST_CHECKSUM,
    ANN_LEGACY_MANIFEST_POSITION,
    ANN_MANIFEST_CHECKSUM,
    ANN_MANIFEST_POSITION,
    ANN_TARSPLIT_POSITION,
    ANN_TOC_DIGEST,
    ANN_UNCOMPRESSED_SIZE,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
)

__all__ = [
    "ESTARGZ_UNCOMPRESSED_SIZE",
    "GZIP_MEDIA_TYPE",
    "LEGACY_MANIFEST_CHECKSUM",
    "LEGACY_MANIFEST_POSITION",
    "MANIFEST_CHECKSUM",
    "MANIFEST_POSITION",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TARSPLIT_POSITION",
    "TOC_DIGEST",
    "TOC_TAR_NAME",
    "ZSTD_MEDIA_TYPE",
    "BuiltLayer",
    "build_estargz",
    "build_gzip",
    "build_zstd",
    "build_zstd_chunked",
    "rollsum_chunks",
]

MiB = 1 << 20

GZIP_MEDIA_TYPE = OCI_LAYER_GZIP
ZSTD_MEDIA_TYPE = OCI_LAYER_ZSTD

# The annotation keys the writers set, under the names the writer API has always used.
TOC_DIGEST = ANN_TOC_DIGEST
ESTARGZ_UNCOMPRESSED_SIZE = ANN_UNCOMPRESSED_SIZE
MANIFEST_CHECKSUM = ANN_MANIFEST_CHECKSUM
MANIFEST_POSITION = ANN_MANIFEST_POSITION
TARSPLIT_POSITION = ANN_TARSPLIT_POSITION
LEGACY_MANIFEST_CHECKSUM = ANN_LEGACY_MANIFEST_CHECKSUM
LEGACY_MANIFEST_POSITION = ANN_LEGACY_MANIFEST_POSITION

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_LANDMARK_CONTENT = b"\x0f"

_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
_MAGIC_OLD = b"GnUlInUx"  # 40-byte footer (containers/storage <= 1.46, stargz-snapshotter)
_MAGIC_NEW = b"GNUlInUx"  # 64-byte footer (containers/storage >= 1.50)
_HOLE_THRESHOLD = 1024
_ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class BuiltLayer:
    """A layer blob plus everything a registry manifest/image config needs to reference it."""

    blob: bytes
    digest: str  # "sha256:..." of blob
    size: int  # len(blob)
    diff_id: str  # sha256 of the fully decompressed stream (image config rootfs.diff_ids)
    toc_digest: str  # eStargz: sha256 of the TOC JSON; zstd:chunked: of the compressed TOC; or ""
    annotations: dict[str, str]  # what the manifest's layer descriptor carries for this format
    media_type: str
    format: str  # estargz, stargz-legacy, estargz-zstd, zstd-chunked, gzip, zstd


def _layer(
    blob: bytes, diff_id: str, toc_digest: str, annotations: dict[str, str], media: str, fmt: str
) -> BuiltLayer:
    return BuiltLayer(
        blob=blob,
        digest=sha256_of(blob),
        size=len(blob),
        diff_id=diff_id,
        toc_digest=toc_digest,
        annotations=annotations,
        media_type=media,
        format=fmt,
    )


# --- compression units ---------------------------------------------------------------------


def _gzip_member(data: bytes, level: int) -> bytes:
    """One gzip member with the header Go's compress/gzip writes (MTIME 0, OS 255)."""
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    co = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = co.compress(data) + co.flush()
    return (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00"
        + bytes([xfl, 0xFF])
        + body
        + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    )


class _Framer:
    """Accumulates uncompressed bytes and emits them as one gzip member / zstd frame per unit."""

    def __init__(self, kind: Literal["gzip", "zstd"], level: int) -> None:
        self.kind = kind
        self.level = level
        self.blob = bytearray()
        self.pending = bytearray()
        self.diff = hashlib.sha256()
        self.usize = 0
        self._zc = (
            zstandard.ZstdCompressor(level=level, write_checksum=True) if kind == "zstd" else None
        )

    def write(self, data: bytes | memoryview) -> None:
        self.pending += data
        self.diff.update(data)
        self.usize += len(data)

    def close(self) -> int:
        """Close the current unit (if it holds anything); return the blob offset after it."""
        if self.pending:
            if self._zc is not None:
                self.blob += self._zc.compress(bytes(self.pending))
            else:
                self.blob += _gzip_member(bytes(self.pending), self.level)
            self.pending.clear()
        return len(self.blob)

    @property
    def pos(self) -> int:
        """Blob offset where the next unit starts (only meaningful right after close())."""
        return len(self.blob)


def _skippable(payload: bytes) -> bytes:
    return _SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


# --- tar header writing (TOC entry, landmarks; tests/support/tarspec.py) ---------------------


def _octal(value: int, width: int) -> bytes:
    s = format(value, "o").encode()
    if len(s) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte octal field")
    return s.rjust(width - 1, b"0") + b"\0"


def _ustar_header(
    name: bytes,
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 0,
    linkname: bytes = b"",
    uname: bytes = b"",
    gname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    prefix: bytes = b"",
) -> bytes:
    """A POSIX ustar header block as Go's archive/tar writes it (all fields must fit)."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157 : 157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[265 : 265 + len(uname)] = uname
    h[297 : 297 + len(gname)] = gname
    h[329:337] = _octal(devmajor, 8)
    h[337:345] = _octal(devminor, 8)
    h[345 : 345 + len(prefix)] = prefix
    h[148:156] = _octal(sum(h), 7) + b" "
    return bytes(h)


def _pad(n: int) -> bytes:
    return bytes(-n % BLOCK)


# --- times ---------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _rfc3339(seconds: int, nanos: int = 0) -> str:
    try:
        t = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise FormatError(f"timestamp {seconds} is out of range") from None
    s = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.year < 1000:
        s = f"{t.year:04d}" + s[s.index("-") :]
    if nanos:
        s += "." + f"{nanos:09d}".rstrip("0")
    return s + "Z"


def _estargz_modtime(ns: int) -> str:
    """Go estargz formatModtime: omitted for Unix 0, else UTC rounded to the second."""
    if ns // 1_000_000_000 == 0:
        return ""
    secs = (
        (ns + 500_000_000) // 1_000_000_000 if ns >= 0 else -((-ns + 500_000_000) // 1_000_000_000)
    )
    return _rfc3339(secs)


def _nano_time(ns: int) -> str:
    """Go time.Time JSON (RFC3339Nano), in UTC."""
    return _rfc3339(ns // 1_000_000_000, ns % 1_000_000_000)


# --- helpers shared by the TOC writers -------------------------------------------------------


def clean_name(name: str) -> str:
    """stargz-snapshotter's cleanEntryName: path.Clean("/"+name) without the leading slash."""
    parts: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return "/".join(parts)


def _omit_empty(
    d: Mapping[str, object], keep: Iterable[str] = ("name", "type")
) -> dict[str, object]:
    keep = set(keep)
    return {k: v for k, v in d.items() if k in keep or v not in (0, "", None, {})}


def _xattrs_b64(x: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(x[k]).decode("ascii") for k in sorted(x)}


# --- eStargz ---------------------------------------------------------------------------------


@dataclass
class _EsEntry:
    member: TarMember | None  # None for a landmark
    name: str
    header: bytes
    payload: bytes


def _landmark(name: str) -> _EsEntry:
    hdr = _ustar_header(name.encode(), size=len(_LANDMARK_CONTENT))
    return _EsEntry(None, name, hdr, _LANDMARK_CONTENT)


def _sort_entries(tar: bytes, scan: TarScan, prioritized: Sequence[str] | None) -> list[_EsEntry]:
    """Dedup (last occurrence wins, at its own position), drop TOC/landmarks, apply priorities."""
    by_name: dict[str, _EsEntry] = {}
    for m in scan.members:
        name = clean_name(m.name)
        if name in (TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            continue
        by_name.pop(name, None)
        by_name[name] = _EsEntry(
            m, name, tar[m.start : m.data_start], tar[m.data_start : m.data_end]
        )
    if not prioritized:
        return [_landmark(NO_PREFETCH_LANDMARK), *by_name.values()]

    first: dict[str, _EsEntry] = {}

    def move(name: str, depth: int = 0) -> None:
        if depth > 256:
            raise FormatError(f"prioritized file {name!r}: hardlink chain too long")
        if name in first:
            return
        if name:
            parent = name.rpartition("/")[0]
            move(parent, depth + 1)
        e = by_name.get(name)
        if e is None:
            return
        if e.member is not None and e.member.type == "hardlink":
            move(clean_name(e.member.linkname), depth + 1)
        if name in by_name:
            first[name] = by_name.pop(name)

    for p in prioritized:
        move(clean_name(p))
    return [*first.values(), _landmark(PREFETCH_LANDMARK), *by_name.values()]


def _estargz_toc_entry(
    e: _EsEntry, unames: dict[int, str], gnames: dict[int, str]
) -> dict[str, object]:
    m = e.member
    if m is None:  # landmark
        return {"name": e.name, "type": "reg", "size": len(e.payload)}

    def if_changed(names: dict[int, str], ident: int, name: str) -> str:
        if not name or names.get(ident) == name:
            return ""
        names[ident] = name
        return name

    return {
        "name": m.name,
        "type": m.type,
        "size": m.size if m.type == "reg" else 0,
        "modtime": _estargz_modtime(m.mtime_ns),
        "linkName": m.linkname if m.type in ("symlink", "hardlink") else "",
        "mode": m.mode,
        "uid": m.uid,
        "gid": m.gid,
        "userName": if_changed(unames, m.uid, m.uname),
        "groupName": if_changed(gnames, m.gid, m.gname),
        "offset": 0,
        "innerOffset": 0,
        "devMajor": m.devmajor if m.type in ("char", "block") else 0,
        "devMinor": m.devminor if m.type in ("char", "block") else 0,
        "xattrs": _xattrs_b64(m.xattrs),
    }


def _finish_estargz_entry(d: dict[str, object]) -> dict[str, object]:
    order = (
        "name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName",
        "groupName", "offset", "innerOffset", "devMajor", "devMinor", "xattrs", "digest",
        "chunkOffset", "chunkSize", "chunkDigest",
    )  # fmt: skip
    return _omit_empty({k: d[k] for k in order if k in d})


def build_estargz(
    tar: bytes,
    *,
    compression: Literal["gzip", "zstd"] = "gzip",
    chunk_size: int = 4 * MiB,
    prioritized: Sequence[str] | None = None,
    min_chunk_size: int = 0,
    legacy_footer: bool = False,
    level: int = 6,
) -> BuiltLayer:
    """Convert an uncompressed tar into eStargz (gzip) or stargz-snapshotter's zstd variant.

    ``prioritized``: paths moved to the front (with their parent directories and hardlink
    targets), followed by ``.prefetch.landmark``; without it ``.no.prefetch.landmark`` comes
    first. ``min_chunk_size`` > 0: a file's first payload chunk stays in the current member
    (recorded with ``innerOffset``) while that member holds fewer than ``min_chunk_size``
    uncompressed bytes. ``legacy_footer``: the 47-byte stargz (CRFS) footer (gzip only).
    Duplicate paths keep only their last occurrence; input ``stargz.index.json`` and landmark
    entries are dropped.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if legacy_footer and compression != "gzip":
        raise ValueError("the legacy stargz footer exists for gzip only")
    scan = scan_tar(tar)
    entries = _sort_entries(tar, scan, prioritized)
    fr = _Framer(compression, level)
    toc: list[dict[str, object]] = []
    unames: dict[int, str] = {}
    gnames: dict[int, str] = {}
    member_start_usize = 0  # uncompressed offset at which the currently open unit started
    for e in entries:
        d = _estargz_toc_entry(e, unames, gnames)
        fr.write(e.header)
        size = len(e.payload)
        if d["type"] != "reg":
            toc.append(_finish_estargz_entry(d))
            continue
        d["digest"] = sha256_of(e.payload)
        written = 0
        while written < size:
            cs = min(chunk_size, size - written)
            share = (
                written == 0
                and min_chunk_size > 0
                and e.member is not None
                and fr.usize - member_start_usize < min_chunk_size
            )
            if share:
                d["offset"] = fr.pos
                d["innerOffset"] = fr.usize - member_start_usize
            else:
                d["offset"] = fr.close()
                member_start_usize = fr.usize
            chunk = e.payload[written : written + cs]
            if size - written >= chunk_size:  # as stargz-snapshotter: not on a short last chunk
                d["chunkSize"] = cs
            d["chunkOffset"] = written
            d["chunkDigest"] = sha256_of(chunk)
            fr.write(chunk)
            toc.append(_finish_estargz_entry(d))
            written += cs
            d = {"name": e.member.name if e.member is not None else e.name, "type": "chunk"}
        if size == 0:
            toc.append(_finish_estargz_entry(d))
        fr.write(_pad(size))
    toc_offset = fr.close()
    toc_json = go_json({"version": 1, "entries": toc}, indent="\t")
    toc_digest = sha256_of(toc_json)

    if compression == "gzip":
        fr.write(_ustar_header(TOC_TAR_NAME.encode(), size=len(toc_json)))
        fr.write(toc_json)
        fr.write(_pad(len(toc_json)) + bytes(2 * BLOCK))
        fr.close()
        if legacy_footer:
            footer = (
                b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00"
                + b"%016x" % toc_offset
                + b"STARGZ\x01\x00\x00\xff\xff"
                + bytes(8)
            )
        else:
            footer = (
                b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x1a\x00SG\x16\x00"
                + b"%016x" % toc_offset
                + b"STARGZ\x01\x00\x00\xff\xff"
                + bytes(8)
            )
        blob = bytes(fr.blob) + footer
        annotations = {TOC_DIGEST: toc_digest, ESTARGZ_UNCOMPRESSED_SIZE: str(fr.usize)}
        fmt = "stargz-legacy" if legacy_footer else "estargz"
        return _layer(
            blob, "sha256:" + fr.diff.hexdigest(), toc_digest, annotations, GZIP_MEDIA_TYPE, fmt
        )

    compressed = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(toc_json)
    manifest_off = len(fr.blob) + 8
    footer_payload = (
        struct.pack("<4Q", manifest_off, len(compressed), len(toc_json), 1) + _MAGIC_OLD
    )
    blob = bytes(fr.blob) + _skippable(compressed) + _skippable(footer_payload)
    annotations = {
        TOC_DIGEST: toc_digest,
        LEGACY_MANIFEST_CHECKSUM: sha256_of(compressed),
        LEGACY_MANIFEST_POSITION: f"{manifest_off}:{len(compressed)}:{len(toc_json)}:1",
        ESTARGZ_UNCOMPRESSED_SIZE: str(fr.usize),
    }
    return _layer(
        blob, "sha256:" + fr.diff.hexdigest(), toc_digest, annotations, ZSTD_MEDIA_TYPE,
        "estargz-zstd",
    )  # fmt: skip


# --- zstd:chunked ----------------------------------------------------------------------------

_ROLL_WINDOW = 64
_ROLL_CHAR_OFFSET = 31
_ROLL_S2_INIT = _ROLL_WINDOW * (_ROLL_WINDOW - 1) * _ROLL_CHAR_OFFSET
_ZERO_RUN = re.compile(rb"\x00{%d,}" % _HOLE_THRESHOLD)


def _holes(data: bytes) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _ZERO_RUN.finditer(data)]


_ROLL_BLOCK = 1 << 22  # bytes per big-integer pass (bounds the memory used)
_LANE = 3  # bytes per lane: a window sum is at most 255 * 2080 < 2**24


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
        return _nano_time(ns)

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
        "xattrs": _xattrs_b64(m.xattrs),
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
    fr = _Framer("zstd", level)
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
                entries.append(_omit_empty(main))
                for rec in recs[1:]:
                    chunk = {"type": "chunk", "name": m.name, **rec}
                    entries.append(_omit_empty(chunk))
                continue
        entries.append(_omit_empty(main))
    fr.write(tar[pos:])
    fr.close()
    diff_id = "sha256:" + fr.diff.hexdigest()
    data_end = len(fr.blob)
    manifest_off = data_end + 8
    zc = zstandard.ZstdCompressor(level=level, write_checksum=True)

    if layout == "1.43":
        toc_json = go_json({"version": 1, "entries": entries})
        compressed = zc.compress(toc_json)
        footer = struct.pack("<4Q", manifest_off, len(compressed), len(toc_json), 1) + _MAGIC_OLD
        blob = bytes(fr.blob) + _skippable(compressed) + _skippable(footer)
        checksum = sha256_of(compressed)
        annotations = {
            LEGACY_MANIFEST_CHECKSUM: checksum,
            LEGACY_MANIFEST_POSITION: f"{manifest_off}:{len(compressed)}:{len(toc_json)}:1",
        }
        return _layer(blob, diff_id, checksum, annotations, ZSTD_MEDIA_TYPE, "zstd-chunked")

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
        + _MAGIC_NEW
    )
    blob = bytes(fr.blob) + _skippable(compressed) + _skippable(ts_compressed) + _skippable(footer)
    checksum = sha256_of(compressed)
    annotations = {
        MANIFEST_CHECKSUM: checksum,
        MANIFEST_POSITION: f"{manifest_off}:{len(compressed)}:{len(toc_json)}:1",
        TARSPLIT_POSITION: f"{ts_off}:{len(ts_compressed)}:{len(tarsplit)}",
    }
    return _layer(blob, diff_id, checksum, annotations, ZSTD_MEDIA_TYPE, "zstd-chunked")


# --- plain variants (negative tests) ----------------------------------------------------------


def build_gzip(tar: bytes, *, level: int = 6) -> BuiltLayer:
    """The tar as one ordinary gzip member: a valid layer that is not lazily pullable."""
    return _layer(_gzip_member(tar, level), sha256_of(tar), "", {}, GZIP_MEDIA_TYPE, "gzip")


def build_zstd(tar: bytes, *, level: int = 3) -> BuiltLayer:
    """The tar as one ordinary zstd frame: a valid layer that is not lazily pullable."""
    blob = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(tar)
    return _layer(blob, sha256_of(tar), "", {}, ZSTD_MEDIA_TYPE, "zstd")
