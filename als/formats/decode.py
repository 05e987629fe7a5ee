"""Chunk decoding and verification (gzip members / zstd frames -> verified file bytes).

Every decoder here is bounded: it produces at most the number of bytes the caller asked for,
whatever the compressed input claims, so a decompression bomb costs no more than a honest chunk.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import zstandard
from isal import isal_zlib

from als.errors import FormatError, VerifyError
from als.formats.model import Chunk, LayerIndex, ReadRanges

_GZIP_FORMATS = frozenset({"estargz", "stargz-legacy", "gzip"})
_STEP = 1 << 20  # decode in pieces of at most this many bytes
_tls = threading.local()


class DecodeError(Exception):
    """Compressed data is corrupt or ends early (callers turn it into an AlsError)."""


def _zstd() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "zstd", None)
    if d is None:
        d = _tls.zstd = zstandard.ZstdDecompressor()
    return d


def gunzip_pieces(data: bytes | memoryview, limit: int) -> Iterator[bytes]:
    """Inflate concatenated gzip members, yielding at most ``limit`` bytes in total."""
    buf: bytes | memoryview = data
    d = isal_zlib.decompressobj(31)
    remaining = limit
    try:
        while remaining > 0:
            out = d.decompress(buf, min(remaining, _STEP))
            buf = d.unconsumed_tail
            if out:
                remaining -= len(out)
                yield out
            if d.eof:
                buf = d.unused_data
                if not buf:
                    return
                d = isal_zlib.decompressobj(31)
            elif not out and not buf:
                return  # input exhausted mid-member
    except isal_zlib.error as exc:  # type: ignore[misc]  # isal ships no type stubs
        raise DecodeError(f"invalid gzip data: {exc}") from None


def unzstd_pieces(data: bytes | memoryview, limit: int) -> Iterator[bytes]:
    """Decode concatenated zstd frames (skippable frames ignored), at most ``limit`` bytes."""
    remaining = limit
    try:
        with _zstd().stream_reader(data, read_across_frames=True, read_size=_STEP) as r:
            while remaining > 0:
                out = r.read(min(remaining, _STEP))
                if not out:
                    return
                remaining -= len(out)
                yield out
    except zstandard.ZstdError as exc:
        raise DecodeError(f"invalid zstd data: {exc}") from None


def decompress_exact(fmt_is_gzip: bool, data: bytes | memoryview, skip: int, size: int) -> bytes:
    """Skip ``skip`` decoded bytes, then return exactly ``size`` bytes (DecodeError if short)."""
    pieces = (gunzip_pieces if fmt_is_gzip else unzstd_pieces)(data, skip + size)
    out = bytearray()
    for p in pieces:
        if skip:
            if len(p) <= skip:
                skip -= len(p)
                continue
            out += p[skip:]
            skip = 0
        else:
            out += p
    if len(out) != size:
        raise DecodeError(f"compressed data ends after {len(out)} of {size} bytes")
    return bytes(out)


def is_gzip_format(fmt: str) -> bool:
    return fmt in _GZIP_FORMATS


def _where(index: LayerIndex, path: str, layer: str = "") -> str:
    name = index.layer or layer
    prefix = f"layer {name}: " if name else ""
    return f"{prefix}{path or '<file>'}"


def decode_chunk(index: LayerIndex, chunk: Chunk, data: bytes, *, path: str = "") -> bytes:
    if chunk.zeros and not data:
        out = bytes(chunk.size)
    else:
        try:
            out = decompress_exact(
                is_gzip_format(index.format), memoryview(data), chunk.inner, chunk.size
            )
        except DecodeError as exc:
            raise VerifyError(
                f"{_where(index, path)}: chunk at file offset {chunk.uoffset} (blob offset "
                f"{chunk.coffset}): {exc}; expected digest {chunk.digest or 'n/a'}"
            ) from None
    if chunk.digest is not None:
        actual = "sha256:" + hashlib.sha256(out).hexdigest()
        if actual != chunk.digest:
            raise VerifyError(
                f"{_where(index, path)}: chunk at file offset {chunk.uoffset} (blob offset "
                f"{chunk.coffset}) digest mismatch: expected {chunk.digest}, got {actual}"
            )
    return out


def verify_file(index: LayerIndex, entry_id: int, content: bytes) -> None:
    expected = index.digest(entry_id)
    if expected is None:
        return
    actual = "sha256:" + hashlib.sha256(content).hexdigest()
    if actual != expected:
        raise VerifyError(
            f"{_where(index, index.path(entry_id))}: file digest mismatch: "
            f"expected {expected}, got {actual}"
        )


def iter_file(
    index: LayerIndex,
    entry_id: int,
    read: ReadRanges,
    *,
    layer: str = "",
    batch: int = 64 << 20,
) -> Iterator[bytes]:
    """Yield the verified chunks of a file in order, reading blob ranges in batches.

    When the format has no digest for some chunk (``whole_file_verify``), the pieces are only
    checked by the whole-file digest after the last one: callers that must never expose
    unverified bytes either buffer (``read_file``) or discard their output on VerifyError.
    """
    path = index.path(entry_id)
    chunks = list(index.chunks(entry_id))
    expected = index.digest(entry_id)
    h = hashlib.sha256() if expected is not None else None
    k = 0
    while k < len(chunks):
        group: list[Chunk] = []
        total = 0
        while k < len(chunks) and (not group or total < batch):
            c = chunks[k]
            group.append(c)
            if not c.zeros:
                total += c.cend - c.coffset
            k += 1
        ranges = [(c.coffset, c.cend - c.coffset) for c in group if not c.zeros]
        got = read(ranges) if ranges else []
        if len(got) != len(ranges):
            raise FormatError(f"{_where(index, path, layer)}: read returned {len(got)} ranges")
        datas = iter(got)
        for c in group:
            data = b"" if c.zeros else next(datas)
            if not c.zeros and len(data) != c.cend - c.coffset:
                raise FormatError(f"{_where(index, path, layer)}: short read at {c.coffset}")
            piece = decode_chunk(index, c, data, path=path)
            if h is not None:
                h.update(piece)
            yield piece
    if h is not None:
        actual = "sha256:" + h.hexdigest()
        if actual != expected:
            raise VerifyError(
                f"{_where(index, path, layer)}: file digest mismatch: "
                f"expected {expected}, got {actual}"
            )


def read_file(index: LayerIndex, entry_id: int, read: ReadRanges, *, layer: str = "") -> bytes:
    """All bytes of a regular file (or hardlink to one), every chunk and the file verified."""
    return b"".join(list(iter_file(index, entry_id, read, layer=layer)))
