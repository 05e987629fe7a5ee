"""Format detection, footers, and locating/fetching/verifying the TOC of a layer blob.

All functions work on bytes handed to them or on a ``ReadRanges`` callable, never on files or
sockets, so the store, the registry client and the CLI share them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from als.digest import is_digest, sha256_of
from als.errors import FormatError, NotLazy, VerifyError
from als.formats.decode import DecodeError, gunzip_pieces, unzstd_pieces
from als.formats.model import (
    MAX_TOC_JSON,
    TOC_NAME,
    LayerIndex,
    ReadRanges,
)
from als.formats.tarsplit import tarsplit_size
from als.formats.toc import build_index, load_toc_json
from als.oci import (
    ANN_TOC_DIGEST,
    MANIFEST_CHECKSUM_KEYS,
    MANIFEST_POSITION_KEYS,
    TARSPLIT_POSITION_KEYS,
)

TAIL_READ = 64 * 1024
HEAD_READ = 512

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
EXTERNAL_TOC_FOOTER_SIZE = 46
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_CHUNKED_MAGIC_OLD = b"GnUlInUx"
ZSTD_CHUNKED_MAGIC_NEW = b"GNUlInUx"
_MANIFEST_TYPE_CRFS = 1
_MAX_TOC_COMPRESSED = MAX_TOC_JSON + (16 << 20)


@dataclass(frozen=True, slots=True)
class Footer:
    """Where a footer says the TOC is."""

    kind: str  # "estargz", "stargz-legacy", "zstd40", "zstd56", "zstd64"
    size: int  # bytes the footer occupies at the end of the blob
    toc_offset: int  # start of the TOC region (end of file data)
    start: int  # first byte of the compressed TOC
    length: int  # compressed TOC length
    ulength: int | None  # uncompressed TOC length when the footer states it
    tarsplit: tuple[int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class LayerAnnotations:
    toc_digest: str | None = None
    manifest_checksum: str | None = None
    manifest_position: tuple[int, int, int, int] | None = None
    tarsplit_position: tuple[int, int, int] | None = None

    @classmethod
    def parse(cls, ann: Mapping[str, str] | None, layer: str = "") -> LayerAnnotations:
        if not ann:
            return cls()

        def first(keys: tuple[str, ...]) -> str | None:
            for k in keys:
                v = ann.get(k)
                if v is not None:
                    if not isinstance(v, str):
                        raise FormatError(f"layer {layer}: annotation {k} is not a string")
                    return v
            return None

        def nums(key: str, v: str | None, n: int) -> tuple[int, ...] | None:
            if v is None:
                return None
            parts = v.split(":")
            if len(parts) != n or not all(p.isdigit() and p.isascii() for p in parts):
                raise FormatError(f"layer {layer}: annotation {key}={v!r:.80} is malformed")
            return tuple(int(p) for p in parts)

        def dig(key: str, v: str | None) -> str | None:
            if v is None:
                return None
            if not is_digest(v):
                raise FormatError(f"layer {layer}: annotation {key}={v!r:.80} is not a sha256")
            return v

        td = first((ANN_TOC_DIGEST,))  # type-checked like the others (a manifest is JSON)
        mp = nums("manifest-position", first(MANIFEST_POSITION_KEYS), 4)
        tp = nums("tarsplit-position", first(TARSPLIT_POSITION_KEYS), 3)
        return cls(
            toc_digest=dig(ANN_TOC_DIGEST, td),
            manifest_checksum=dig("manifest-checksum", first(MANIFEST_CHECKSUM_KEYS)),
            manifest_position=(mp[0], mp[1], mp[2], mp[3]) if mp else None,
            tarsplit_position=(tp[0], tp[1], tp[2]) if tp else None,
        )


def _hex16(b: bytes) -> int | None:
    if len(b) != 16 or not all(c in b"0123456789abcdefABCDEF" for c in b):
        return None
    return int(b, 16)


def parse_footer(tail: bytes, blob_size: int, *, layer: str = "") -> Footer | None:
    """Recognise a footer at the end of ``tail`` (the last bytes of a blob of ``blob_size``).

    Returns None when no footer is there; raises FormatError when a footer is recognised but
    points outside the blob.
    """
    pre = f"layer {layer}: " if layer else ""
    n = len(tail)
    # eStargz, 51 bytes.
    if n >= ESTARGZ_FOOTER_SIZE:
        f = tail[-ESTARGZ_FOOTER_SIZE:]
        if (
            f[0:4] == b"\x1f\x8b\x08\x04"
            and f[10:16] == b"\x1a\x00SG\x16\x00"
            and f[32:38] == b"STARGZ"
        ):
            off = _hex16(f[16:32])
            end = blob_size - ESTARGZ_FOOTER_SIZE
            if off is None or not 0 <= off < end:
                raise FormatError(f"{pre}eStargz footer: TOC offset {f[16:32]!r} outside the blob")
            return Footer("estargz", ESTARGZ_FOOTER_SIZE, off, off, end - off, None)
    # Legacy stargz (CRFS), 47 bytes.
    if n >= LEGACY_FOOTER_SIZE:
        f = tail[-LEGACY_FOOTER_SIZE:]
        if f[0:4] == b"\x1f\x8b\x08\x04" and f[10:12] == b"\x16\x00" and f[28:34] == b"STARGZ":
            off = _hex16(f[12:28])
            end = blob_size - LEGACY_FOOTER_SIZE
            if off is None or not 0 <= off < end:
                raise FormatError(f"{pre}stargz footer: TOC offset {f[12:28]!r} outside the blob")
            return Footer("stargz-legacy", LEGACY_FOOTER_SIZE, off, off, end - off, None)
    if n >= EXTERNAL_TOC_FOOTER_SIZE:
        f = tail[-EXTERNAL_TOC_FOOTER_SIZE:]
        if f[0:4] == b"\x1f\x8b\x08\x04" and f[12:14] == b"SG" and b"STARGZEXTERNALTOC" in f:
            raise FormatError(f"{pre}eStargz with an external TOC is not supported")
    # zstd:chunked / eStargz-zstd footers in a skippable frame.
    for payload, kind in ((64, "zstd64"), (56, "zstd56"), (40, "zstd40")):
        total = payload + 8
        if n < total:
            continue
        f = tail[-total:]
        if f[0:4] != SKIPPABLE_MAGIC or struct.unpack_from("<I", f, 4)[0] != payload:
            continue
        p = f[8:]
        magic = p[56:64] if payload == 64 else p[32:40]
        if magic not in (ZSTD_CHUNKED_MAGIC_NEW, ZSTD_CHUNKED_MAGIC_OLD):
            continue
        off, clen, ulen, mtype = struct.unpack_from("<4Q", p, 0)
        tarsplit = None
        limit = blob_size - total
        if payload == 64:
            ts = struct.unpack_from("<3Q", p, 32)
            if ts[1]:
                if not (off + clen <= ts[0] and ts[0] + ts[1] <= limit):
                    raise FormatError(f"{pre}zstd:chunked footer: tar-split outside the blob")
                tarsplit = (ts[0], ts[1], ts[2])
        if mtype != _MANIFEST_TYPE_CRFS:
            raise FormatError(f"{pre}zstd:chunked footer: unsupported manifest type {mtype}")
        if not (off >= 8 and clen > 0 and off + clen <= limit):
            raise FormatError(
                f"{pre}zstd:chunked footer: manifest [{off}, +{clen}) outside the blob"
            )
        if ulen > MAX_TOC_JSON:
            raise FormatError(f"{pre}zstd:chunked footer: manifest size {ulen} too large")
        return Footer(kind, total, off - 8, off, clen, ulen, tarsplit)
    return None


def sniff_plain(head: bytes) -> str | None:
    """Non-lazy formats by their first bytes: "gzip", "zstd", "tar", else None."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC or head[:4] == SKIPPABLE_MAGIC:
        return "zstd"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _looks_estargz_zstd(json_bytes: bytes) -> bool:
    """stargz-snapshotter's zstd TOC is MarshalIndent'ed and lists its landmark files."""
    return json_bytes[:2] == b"{\n" or b'.prefetch.landmark"' in json_bytes


def detect_format(head: bytes, tail: bytes, blob_size: int) -> str:
    """Quick sniff from the first and last bytes of a blob. One of FORMATS.

    For a 40-byte zstd footer the two zstd variants are told apart by the TOC when it lies in
    ``tail``; otherwise "zstd-chunked" is returned (``load_index`` decides for sure).
    """
    footer = parse_footer(tail, blob_size)
    if footer is not None:
        if footer.kind in ("estargz", "stargz-legacy"):
            return footer.kind
        if footer.kind == "zstd40":
            rel = footer.start - (blob_size - len(tail))
            if rel >= 0:
                try:
                    js = b"".join(unzstd_pieces(tail[rel : rel + footer.length], 4096))
                except DecodeError:
                    js = b""
                if _looks_estargz_zstd(js):
                    return "estargz-zstd"
        return "zstd-chunked"
    fmt = sniff_plain(head)
    if fmt is None:
        raise FormatError("unrecognised layer blob (not gzip, zstd or tar)")
    return fmt


def _read(read: ReadRanges, ranges: list[tuple[int, int]], layer: str) -> list[bytes]:
    out = read(ranges)
    if len(out) != len(ranges) or any(len(b) != n for b, (_, n) in zip(out, ranges, strict=False)):
        raise FormatError(f"layer {layer}: short read of the blob")
    return out


def _estargz_toc_json(data: bytes, layer: str) -> bytes:
    """The JSON inside the gzip'ed TOC tar of an eStargz blob."""
    try:
        pieces = gunzip_pieces(data, 512 + MAX_TOC_JSON)
        buf = bytearray()
        for p in pieces:
            buf += p
            if len(buf) >= 512:
                break
        hdr = bytes(buf[:512])
        if len(hdr) < 512:
            raise FormatError(f"layer {layer}: eStargz TOC: truncated tar header")
        name = hdr[0:100].split(b"\0", 1)[0]
        if name != TOC_NAME.encode():
            raise FormatError(f"layer {layer}: eStargz TOC: first tar entry is {name!r:.120}")
        field = hdr[124:136].split(b"\0", 1)[0].strip(b" ")
        if not field or not all(c in b"01234567" for c in field):
            raise FormatError(f"layer {layer}: eStargz TOC: bad tar size field")
        size = int(field, 8)
        if size > MAX_TOC_JSON:
            raise FormatError(f"layer {layer}: eStargz TOC: JSON of {size} bytes is too large")
        for p in pieces:
            buf += p
            if len(buf) >= 512 + size:
                break
        if len(buf) < 512 + size:
            raise FormatError(f"layer {layer}: eStargz TOC: truncated")
        return bytes(buf[512 : 512 + size])
    except DecodeError as exc:
        raise FormatError(f"layer {layer}: eStargz TOC: {exc}") from None


def _zstd_toc_json(data: bytes | memoryview, ulen: int | None, layer: str) -> bytes:
    limit = MAX_TOC_JSON if ulen is None else ulen
    try:
        out = b"".join(unzstd_pieces(data, limit + 1))
    except DecodeError as exc:
        raise FormatError(f"layer {layer}: zstd TOC: {exc}") from None
    if ulen is not None and len(out) != ulen:
        raise FormatError(
            f"layer {layer}: zstd TOC: decoded {len(out)} bytes, the blob says {ulen}"
        )
    if len(out) > MAX_TOC_JSON:
        raise FormatError(f"layer {layer}: zstd TOC: larger than {MAX_TOC_JSON} bytes")
    return out


def _check(what: str, expected: str | None, actual: str, layer: str) -> None:
    if expected is not None and expected != actual:
        raise VerifyError(f"layer {layer}: {what} mismatch: expected {expected}, got {actual}")


def load_index(
    read: ReadRanges,
    blob_size: int,
    *,
    annotations: Mapping[str, str] | None = None,
    expected_toc_digest: str | None = None,
    layer: str = "",
) -> LayerIndex:
    """Locate, fetch, verify and parse the TOC of a lazily-pullable blob.

    With a zstd:chunked ``manifest-position`` annotation this costs exactly one read; otherwise
    one read of the blob's head and tail, plus one read of the TOC if the tail did not hold it.
    """
    if blob_size < 0:
        raise FormatError(f"layer {layer}: negative blob size")
    ann = LayerAnnotations.parse(annotations, layer)
    fmt: str
    if ann.manifest_position is not None:
        off, clen, ulen, mtype = ann.manifest_position
        if mtype != _MANIFEST_TYPE_CRFS:
            raise FormatError(f"layer {layer}: unsupported manifest type {mtype}")
        if not (off >= 8 and 0 < clen <= _MAX_TOC_COMPRESSED and off + clen <= blob_size):
            raise FormatError(
                f"layer {layer}: manifest-position {off}:{clen} lies outside the blob "
                f"({blob_size} bytes)"
            )
        if ulen > MAX_TOC_JSON:
            raise FormatError(f"layer {layer}: manifest of {ulen} bytes is too large")
        (region,) = _read(read, [(off - 8, clen + 8)], layer)
        footer = Footer("zstd40", 0, off - 8, off, clen, ulen)
        comp = memoryview(region)[8:]
        _check_skippable(region, clen, layer)
        return _finish_zstd(comp, footer, ann, expected_toc_digest, blob_size, layer)

    if blob_size <= TAIL_READ:
        (whole,) = _read(read, [(0, blob_size)], layer) if blob_size else [b""]
        head, tail = whole[:HEAD_READ], whole
    else:
        head, tail = _read(read, [(0, HEAD_READ), (blob_size - TAIL_READ, TAIL_READ)], layer)
    tail_start = blob_size - len(tail)
    found = parse_footer(tail, blob_size, layer=layer)
    if found is None:
        plain = sniff_plain(head)
        if plain is None:
            raise FormatError(f"layer {layer}: unrecognised layer blob (not gzip, zstd or tar)")
        raise NotLazy(plain, f"layer {layer}: {plain} layer without a TOC: not lazily pullable")
    footer = found
    if footer.length > _MAX_TOC_COMPRESSED:
        raise FormatError(f"layer {layer}: TOC of {footer.length} compressed bytes is too large")
    zstd = footer.kind.startswith("zstd")
    rstart = footer.start - 8 if zstd else footer.start
    rlen = footer.length + (8 if zstd else 0)
    if rstart >= tail_start:
        region = tail[rstart - tail_start : rstart - tail_start + rlen]
    else:
        (region,) = _read(read, [(rstart, rlen)], layer)
    if zstd:
        _check_skippable(region, footer.length, layer)
        return _finish_zstd(
            memoryview(region)[8:], footer, ann, expected_toc_digest, blob_size, layer
        )
    if ann.manifest_checksum is not None:
        raise FormatError(
            f"layer {layer}: the annotations describe a zstd:chunked manifest, but the blob is "
            f"{footer.kind} (gzip)"
        )
    js = _estargz_toc_json(region, layer)
    digest = sha256_of(js)
    fmt = footer.kind
    _check("TOC digest (annotation " + ANN_TOC_DIGEST + ")", ann.toc_digest, digest, layer)
    _check("TOC digest", expected_toc_digest, digest, layer)
    doc = load_toc_json(js, layer=layer)
    index = build_index(
        doc, format=fmt, toc_digest=digest, blob_size=blob_size, toc_offset=footer.toc_offset,
        layer=layer,
    )  # fmt: skip
    index.toc_size = footer.length
    index.toc_json_size = len(js)
    return index


def _check_skippable(region: bytes, clen: int, layer: str) -> None:
    if region[:4] != SKIPPABLE_MAGIC or struct.unpack_from("<I", region, 4)[0] != clen:
        raise FormatError(f"layer {layer}: the TOC is not in a zstd skippable frame")


def _finish_zstd(
    comp: memoryview,
    footer: Footer,
    ann: LayerAnnotations,
    expected_toc_digest: str | None,
    blob_size: int,
    layer: str,
) -> LayerIndex:
    comp_digest = sha256_of(comp)
    _check("manifest checksum (annotation)", ann.manifest_checksum, comp_digest, layer)
    js = _zstd_toc_json(comp, footer.ulength, layer)
    json_digest = sha256_of(js)
    _check("TOC digest (annotation " + ANN_TOC_DIGEST + ")", ann.toc_digest, json_digest, layer)
    if ann.toc_digest is not None:
        sg = True
    elif ann.manifest_checksum is not None:
        sg = False
    else:
        sg = _looks_estargz_zstd(js)
    fmt = "estargz-zstd" if sg else "zstd-chunked"
    digest = json_digest if sg else comp_digest
    _check("TOC digest", expected_toc_digest, digest, layer)
    doc = load_toc_json(js, layer=layer)
    index = build_index(
        doc, format=fmt, toc_digest=digest, blob_size=blob_size, toc_offset=footer.toc_offset,
        layer=layer,
    )  # fmt: skip
    index.toc_size = footer.length + 8
    index.toc_json_size = len(js)
    if not sg:
        index.tarsplit = footer.tarsplit or ann.tarsplit_position
        ts_digest = doc.get("tarSplitDigest")
        index.tarsplit_digest = (
            ts_digest if isinstance(ts_digest, str) and is_digest(ts_digest) else None
        )
    return index


def tar_size(read: ReadRanges, index: LayerIndex) -> int | None:
    """The size of the layer's uncompressed tar from its tar-split (zstd:chunked), verified
    against the digest the TOC states; None when the layer has no tar-split or no digest for
    it. One read of the tar-split's compressed bytes; FormatError if they are bad."""
    if index.tarsplit is None or index.tarsplit_digest is None:
        return None
    layer = index.layer
    off, clen, ulen = index.tarsplit
    if not (0 < clen <= _MAX_TOC_COMPRESSED and off + clen <= index.blob_size):
        raise FormatError(f"layer {layer}: tar-split [{off}, +{clen}) outside the blob")
    if ulen > MAX_TOC_JSON:
        raise FormatError(f"layer {layer}: tar-split of {ulen} bytes is too large")
    (comp,) = _read(read, [(off, clen)], layer)
    _check("tar-split digest", index.tarsplit_digest, sha256_of(comp), layer)
    try:
        data = b"".join(unzstd_pieces(comp, ulen + 1))
    except DecodeError as exc:
        raise FormatError(f"layer {layer}: tar-split: {exc}") from None
    if len(data) != ulen:
        raise FormatError(f"layer {layer}: tar-split: decoded {len(data)} bytes, expected {ulen}")
    return tarsplit_size(data, layer=layer)
