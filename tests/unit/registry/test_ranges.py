"""als.registry.ranges: coalescing, Content-Range and multipart/byteranges bodies."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from als.registry.ranges import (
    RangeParseError,
    Region,
    coalesce,
    collect_regions,
    extract,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    partial_content_parts,
)


@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 500)), max_size=40),
    st.integers(0, 2000),
)
def test_coalesce_covers_everything(ranges: list[tuple[int, int]], gap: int) -> None:
    regions = coalesce(ranges, max_gap=gap)
    for a, b in itertools.pairwise(regions):
        assert b.start - a.end > gap  # merged whatever was close enough
    for off, n in ranges:
        if n:
            assert any(r.start <= off and off + n <= r.end for r in regions)
    covered = sum(r.length for r in regions)
    assert covered <= sum(n for _, n in ranges) + gap * max(0, len(ranges) - 1)


def test_coalesce_max_size() -> None:
    regions = coalesce([(0, 100), (150, 100), (300, 100)], max_gap=100, max_size=260)
    assert [(r.start, r.end) for r in regions] == [(0, 250), (300, 400)]


def _multipart(parts: list[tuple[int, bytes]], total: int, boundary: str = "XyZ") -> bytes:
    out = b""
    for start, data in parts:
        out += (
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{start + len(data) - 1}/{total}\r\n\r\n"
        ).encode() + data
    return out + f"\r\n--{boundary}--\r\n".encode()


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6))
def test_multipart_roundtrip(datas: list[bytes]) -> None:
    parts = []
    pos = 0
    for d in datas:
        parts.append((pos, d))
        pos += len(d) + 7
    # Data that contains the boundary string must not confuse the parser.
    body = _multipart(parts, pos, boundary="--XyZ")
    assert parse_multipart_byteranges(body, "--XyZ") == parts


def test_multipart_truncated_and_garbage() -> None:
    body = _multipart([(0, b"a" * 100), (200, b"b" * 50)], 1000)
    for cut in (10, 60, 150, len(body) - 8):
        with pytest.raises(RangeParseError) as info:
            parse_multipart_byteranges(body[:cut], "XyZ")
        assert info.value.truncated
    with pytest.raises(RangeParseError):
        parse_multipart_byteranges(body.replace(b"Content-Range", b"X-Range"), "XyZ")
    assert extract([(0, b"abcdef")], 2, 3) == b"cde"
    assert extract([(0, b"abcdef")], 4, 3) is None


def test_content_range_and_boundary() -> None:
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range("bytes 5-5/*") == (5, 6, None)
    for bad in ("bytes 9-0/10", "items 0-1/2", ""):
        with pytest.raises(RangeParseError):
            parse_content_range(bad)
    assert multipart_boundary('multipart/byteranges; boundary="a b"') == "a b"
    assert multipart_boundary("multipart/byteranges; boundary=abc") == "abc"
    assert multipart_boundary("application/octet-stream") is None


def test_partial_content_parts_single_and_multipart() -> None:
    assert partial_content_parts(b"abc", "application/octet-stream", "bytes 10-12/100") == [
        (10, b"abc")
    ]
    with pytest.raises(RangeParseError, match="got 2 bytes for Content-Range 10-12") as err:
        partial_content_parts(b"ab", "", "bytes 10-12/100")
    assert err.value.truncated
    body = b"--B\r\nContent-Range: bytes 0-1/9\r\n\r\nxy\r\n--B--\r\n"
    assert partial_content_parts(body, "multipart/byteranges; boundary=B", "") == [(0, b"xy")]


def test_collect_regions_across_chunks() -> None:
    blob = bytes(range(100))
    regions = [Region(5, 12), Region(30, 70)]
    bufs = [bytearray(), bytearray()]
    for off in range(0, 100, 16):
        collect_regions(regions, bufs, off, blob[off : off + 16])
    assert [bytes(b) for b in bufs] == [blob[5:12], blob[30:70]]
