"""Pure helpers for HTTP byte ranges: coalescing, ``Content-Range`` and ``multipart/byteranges``.

Ranges are ``(offset, length)`` pairs as in the client API; regions are half-open ``(start, end)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from als.ranges import Region, coalesce

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
__all__ = [
    "RangeParseError",
    "Region",
    "coalesce",
    "collect_regions",
    "extract",
    "multipart_boundary",
    "parse_content_range",
    "parse_multipart_byteranges",
    "partial_content_parts",
    "range_header",
]

_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


class RangeParseError(ValueError):
    """A range response that does not parse. ``truncated`` means it ended early (retryable)."""

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


def range_header(regions: Sequence[Region]) -> str:
    return "bytes=" + ",".join(r.header_spec() for r in regions)


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """``bytes a-b/total`` -> ``(a, b + 1, total or None)`` (half-open)."""
    m = _CONTENT_RANGE_RE.match(value)
    if not m:
        raise RangeParseError(f"unparseable Content-Range {value[:100]!r}")
    start, last = int(m.group(1)), int(m.group(2))
    if last < start:
        raise RangeParseError(f"inverted Content-Range {value[:100]!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return start, last + 1, total


def collect_regions(
    regions: Sequence[Region], bufs: Sequence[bytearray], offset: int, chunk: bytes
) -> None:
    """Append to each region's buffer the part of ``chunk`` (at blob ``offset``) it covers
    (reading a whole body for a few regions of it)."""
    end = offset + len(chunk)
    for reg, acc in zip(regions, bufs, strict=True):
        lo, hi = max(reg.start, offset), min(reg.end, end)
        if lo < hi:
            acc.extend(chunk[lo - offset : hi - offset])


def partial_content_parts(
    body: bytes, content_type: str, content_range: str
) -> list[tuple[int, bytes]]:
    """The ``(offset, bytes)`` parts of a 206 answer: a ``multipart/byteranges`` body, or one
    range as its ``Content-Range`` says (a body of another length is truncated)."""
    boundary = multipart_boundary(content_type)
    if boundary is not None:
        return parse_multipart_byteranges(body, boundary)
    start, end, _total = parse_content_range(content_range)
    if len(body) != end - start:
        raise RangeParseError(
            f"got {len(body)} bytes for Content-Range {start}-{end - 1}", truncated=True
        )
    return [(start, body)]


def multipart_boundary(content_type: str) -> str | None:
    """The boundary of a ``multipart/byteranges`` Content-Type, or None for any other type."""
    if not content_type.lower().lstrip().startswith("multipart/byteranges"):
        return None
    m = _BOUNDARY_RE.search(content_type)
    if not m:
        raise RangeParseError("multipart/byteranges response without a boundary")
    return m.group(1) or m.group(2)


def parse_multipart_byteranges(body: bytes, boundary: str) -> list[tuple[int, bytes]]:
    """Parse a ``multipart/byteranges`` body into ``(start offset, bytes)`` parts.

    Each part's length comes from its ``Content-Range`` (so boundary-like bytes inside the data
    do not matter). A body that ends inside a part raises ``RangeParseError(truncated=True)``.
    """
    delim = b"--" + boundary.encode("latin-1")
    pos = body.find(delim)
    if pos < 0:
        raise RangeParseError("multipart body has no boundary line", truncated=not body)
    parts: list[tuple[int, bytes]] = []
    while True:
        pos += len(delim)
        if body.startswith(b"--", pos):
            return parts  # closing delimiter
        header_end = body.find(b"\r\n\r\n", pos)
        if header_end < 0:
            raise RangeParseError("multipart body ends inside part headers", truncated=True)
        content_range: str | None = None
        for line in body[pos:header_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                content_range = value.decode("latin-1").strip()
        if content_range is None:
            raise RangeParseError("multipart part without Content-Range")
        start, end, _total = parse_content_range(content_range)
        data_start = header_end + 4
        data_end = data_start + (end - start)
        if data_end > len(body):
            raise RangeParseError(
                f"multipart part {start}-{end - 1} is short: got {len(body) - data_start} of "
                f"{end - start} bytes",
                truncated=True,
            )
        parts.append((start, body[data_start:data_end]))
        nxt = body.find(delim, data_end)
        if nxt < 0:
            if len(body) - data_end < len(delim) + 4:
                raise RangeParseError(
                    "multipart body ends before its closing boundary", truncated=True
                )
            raise RangeParseError("multipart part followed by garbage instead of a boundary")
        if body[data_end:nxt].strip(b"\r\n") != b"":
            raise RangeParseError(
                f"multipart part {start}-{end - 1} is longer than its Content-Range"
            )
        pos = nxt


def extract(parts: Sequence[tuple[int, bytes]], start: int, length: int) -> bytes | None:
    """Bytes ``[start, start+length)`` if one of ``parts`` covers them completely, else None."""
    for p_start, data in parts:
        if p_start <= start and start + length <= p_start + len(data):
            return data[start - p_start : start - p_start + length]
    return None
