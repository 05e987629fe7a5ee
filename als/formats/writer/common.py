"""What the layer writers share: the built layer, compression units, tar headers, times, TOC
helpers, and the two plain (not lazily pullable) formats.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import zstandard

from als.digest import sha256_of
from als.errors import FormatError
from als.formats.detect import SKIPPABLE_MAGIC
from als.formats.tarsplit import BLOCK
from als.oci import OCI_LAYER_GZIP, OCI_LAYER_ZSTD

MiB = 1 << 20


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


def built_layer(
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


def gzip_member(data: bytes, level: int) -> bytes:
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


class Framer:
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
                self.blob += gzip_member(bytes(self.pending), self.level)
            self.pending.clear()
        return len(self.blob)

    @property
    def pos(self) -> int:
        """Blob offset where the next unit starts (only meaningful right after close())."""
        return len(self.blob)


def skippable(payload: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


# --- tar headers (TOC entry, landmarks; the test suite's tar builder) ------------------------


def _octal(value: int, width: int) -> bytes:
    s = format(value, "o").encode()
    if len(s) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte octal field")
    return s.rjust(width - 1, b"0") + b"\0"


def ustar_header(
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


def pad(n: int) -> bytes:
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


def estargz_modtime(ns: int) -> str:
    """Go estargz formatModtime: omitted for Unix 0, else UTC rounded to the second."""
    if ns // 1_000_000_000 == 0:
        return ""
    secs = (
        (ns + 500_000_000) // 1_000_000_000 if ns >= 0 else -((-ns + 500_000_000) // 1_000_000_000)
    )
    return _rfc3339(secs)


def nano_time(ns: int) -> str:
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


def omit_empty(
    d: Mapping[str, object], keep: Iterable[str] = ("name", "type")
) -> dict[str, object]:
    keep = set(keep)
    return {k: v for k, v in d.items() if k in keep or v not in (0, "", None, {})}


def xattrs_b64(x: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(x[k]).decode("ascii") for k in sorted(x)}


# --- plain variants (negative tests) ----------------------------------------------------------


def build_gzip(tar: bytes, *, level: int = 6) -> BuiltLayer:
    """The tar as one ordinary gzip member: a valid layer that is not lazily pullable."""
    return built_layer(gzip_member(tar, level), sha256_of(tar), "", {}, OCI_LAYER_GZIP, "gzip")


def build_zstd(tar: bytes, *, level: int = 3) -> BuiltLayer:
    """The tar as one ordinary zstd frame: a valid layer that is not lazily pullable."""
    blob = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(tar)
    return built_layer(blob, sha256_of(tar), "", {}, OCI_LAYER_ZSTD, "zstd")
