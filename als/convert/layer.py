"""One layer: decompress (bounded), rebuild in a lazily pullable format, verify by reading back.

Pure functions over bytes. The writers are :mod:`als.formats.writer`'s; the read-back check
uses the readers the store uses (:func:`als.formats.load_index`, :func:`als.formats.iter_file`)
and decompresses the whole blob once more to check the DiffID the writer reported.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Literal

from isal import isal_zlib

from als.errors import ConfigError, FormatError, VerifyError
from als.formats import EntryType, iter_file, load_index
from als.formats.model import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME
from als.formats.tarsplit import scan_tar
from als.formats.writer import (
    BuiltLayer,
    build_estargz,
    build_gzip,
    build_zstd,
    build_zstd_chunked,
)
from als.formats.writer.common import clean_name, pad, ustar_header
from als.oci import CONVERT_FORMATS, LAZY_FORMATS, format_of_descriptor

DEFAULT_ESTARGZ_CHUNK = 4 << 20
DEFAULT_MAX_TAR = 8 << 30
_LANDMARK_CONTENT = b"\x0f"


def read_tar(data: bytes, *, name: str = "input", limit: int = DEFAULT_MAX_TAR) -> bytes:
    """The uncompressed tar: gzip (every member) and zstd (every frame) input is sniffed and
    decompressed; at most ``limit`` bytes come out (a bigger layer is refused)."""
    if data[:3] == b"\x1f\x8b\x08":
        return _gunzip(data, name, limit)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        out = bytearray()
        try:
            with zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data), read_across_frames=True
            ) as r:
                while piece := r.read(1 << 20):
                    out += piece
                    if len(out) > limit:
                        raise FormatError(f"{name}: decompresses to more than {limit} bytes")
        except zstandard.ZstdError as exc:
            raise FormatError(f"{name}: invalid zstd data: {exc}") from None
        return bytes(out)
    if len(data) > limit:
        raise FormatError(f"{name}: more than {limit} bytes")
    return data


_WINDOW = 1 << 20  # input handed to the inflater at once: what it leaves over is copied


def _gunzip(data: bytes, name: str, limit: int) -> bytes:
    """Every gzip member of ``data``, decompressed (ISA-L inflate), at most ``limit`` bytes.

    An eStargz blob is thousands of members. The input goes in windows: the inflater copies
    the input it did not use when a member ends, which over the whole blob at once would be
    quadratic.
    """
    out = bytearray()
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        if bytes(view[pos : pos + 2]) != b"\x1f\x8b":
            if out:
                break  # trailing garbage after the last member is ignored, as gzip does
            raise FormatError(f"{name}: invalid gzip data: no gzip header")
        d = isal_zlib.decompressobj(31)
        try:
            while not d.eof:
                if pos >= end:
                    raise FormatError(f"{name}: invalid gzip data: truncated")
                chunk = view[pos : pos + _WINDOW]
                pos += len(chunk)
                while True:
                    out += d.decompress(chunk, max(1, limit + 1 - len(out)))
                    if len(out) > limit:
                        raise FormatError(f"{name}: decompresses to more than {limit} bytes")
                    if d.eof or not d.unconsumed_tail:
                        break
                    chunk = memoryview(d.unconsumed_tail)
        except isal_zlib.error as exc:  # type: ignore[misc]  # isal ships no type stubs
            raise FormatError(f"{name}: invalid gzip data: {exc}") from None
        pos -= len(d.unused_data)  # the start of the next member
    return bytes(out)


def drop_format_members(tar: bytes) -> bytes:
    """The tar without the eStargz TOC and landmark entries at its root (what an eStargz
    blob decompresses to besides the layer's own files)."""
    scan = scan_tar(tar)
    ends = [m.start for m in scan.members[1:]] + [scan.eof_start]
    hidden = (TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)
    drop = [
        (m.start, end)
        for m, end in zip(scan.members, ends, strict=True)
        if clean_name(m.name) in hidden
    ]
    if not drop:
        return tar
    out = bytearray()
    pos = 0
    for start, end in drop:
        out += tar[pos:start]
        pos = end
    out += tar[pos:]
    return bytes(out)


def reorder_tar(tar: bytes, prioritized: Sequence[str], *, landmark: bool = True) -> bytes:
    """The tar with the members of ``prioritized`` (and their parent directories and hardlink
    targets) first, in that order, then ``.prefetch.landmark`` (when ``landmark``), then the
    rest in their order. Names that occur more than once keep their place (moving one
    occurrence would change which wins)."""
    scan = scan_tar(tar)
    ends = [m.start for m in scan.members[1:]] + [scan.eof_start]
    pieces: dict[str, bytes] = {}
    order: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {}
    links: dict[str, str] = {}
    for m, end in zip(scan.members, ends, strict=True):
        name = clean_name(m.name)
        counts[name] = counts.get(name, 0) + 1
        order.append((name, tar[m.start : end]))
        if m.type == "hardlink":
            links[name] = clean_name(m.linkname)
    for name, raw in order:
        if counts[name] == 1 and name not in (TOC_NAME, PREFETCH_LANDMARK):
            pieces[name] = raw
    first: dict[str, bytes] = {}

    def move(name: str, depth: int = 0) -> None:
        if depth > 256 or name in first or not name:
            return
        move(name.rpartition("/")[0], depth + 1)
        if name in links:
            move(links[name], depth + 1)
        if name in pieces:
            first[name] = pieces[name]

    for p in prioritized:
        move(clean_name(p))
    out = bytearray().join(first.values())
    if landmark and first:
        out += ustar_header(PREFETCH_LANDMARK.encode(), size=1, mode=0o644)
        out += _LANDMARK_CONTENT + pad(1)
    for name, raw in order:
        if name not in first and name != PREFETCH_LANDMARK:
            out += raw
    out += tar[scan.eof_start :]
    return bytes(out)


def build(
    tar: bytes,
    fmt: str,
    *,
    chunk_size: int | None = None,
    prioritized: Sequence[str] = (),
) -> BuiltLayer:
    """Build ``fmt`` (one of CONVERT_FORMATS) from an uncompressed tar.

    ``prioritized``: eStargz puts those files first, then its prefetch landmark; zstd:chunked
    reorders the tar the same way (with a ``.prefetch.landmark`` member the store reads as its
    prefetch hint)."""
    if chunk_size is not None and chunk_size <= 0:
        raise ConfigError(f"--chunk-size must be positive, not {chunk_size}")
    if prioritized and fmt not in ("estargz", "estargz-zstd", "zstd-chunked", "zstd-chunked-1.43"):
        raise ConfigError(f"prioritized files need a lazily pullable format, not {fmt}")
    if fmt in ("estargz", "estargz-zstd"):
        return build_estargz(
            tar,
            compression="zstd" if fmt == "estargz-zstd" else "gzip",
            prioritized=list(prioritized) or None,
            chunk_size=chunk_size or DEFAULT_ESTARGZ_CHUNK,
        )
    if fmt in ("zstd-chunked", "zstd-chunked-1.43"):
        layout: Literal["current", "1.43"] = "1.43" if fmt == "zstd-chunked-1.43" else "current"
        if prioritized:
            tar = reorder_tar(tar, prioritized)
        if chunk_size:
            return build_zstd_chunked(tar, layout=layout, chunking="fixed", chunk_size=chunk_size)
        return build_zstd_chunked(tar, layout=layout)
    if fmt == "gzip":
        return build_gzip(tar)
    if fmt == "zstd":
        return build_zstd(tar)
    raise ConfigError(f"unknown format {fmt!r}; choose from {', '.join(CONVERT_FORMATS)}")


def in_format(media_type: str, annotations: dict[str, str], fmt: str) -> bool:
    """Whether a layer descriptor already declares format ``fmt``."""
    declared = format_of_descriptor(media_type, annotations)
    return declared == fmt or (fmt == "zstd-chunked-1.43" and declared == "zstd-chunked")


def verify(
    blob: bytes, annotations: dict[str, str], *, toc_digest: str, diff_id: str, layer: str
) -> int:
    """Read ``blob`` back with als's readers: the TOC against its annotations and
    ``toc_digest``, every chunk of every file against its digest, and the whole decompressed
    stream against ``diff_id``. Returns the number of files checked; raises VerifyError."""

    def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [blob[off : off + n] for off, n in ranges]

    try:
        index = load_index(read, len(blob), annotations=annotations, layer=layer)
        if index.format not in LAZY_FORMATS or index.toc_digest != toc_digest:
            raise VerifyError(
                f"layer {layer}: read back as {index.format} with TOC digest "
                f"{index.toc_digest}, expected {toc_digest}"
            )
        files = 0
        for i in index.iter_ids():
            if index.type(i) == EntryType.REG and index.size(i):
                for _piece in iter_file(index, i, read):
                    pass
                files += 1
        h = hashlib.sha256(read_tar(blob, name=layer, limit=1 << 62))
    except (FormatError, VerifyError) as exc:
        raise VerifyError(f"converted layer {layer} does not verify: {exc}") from None
    if "sha256:" + h.hexdigest() != diff_id:
        raise VerifyError(f"converted layer {layer}: decompressed stream is not {diff_id}")
    return files
