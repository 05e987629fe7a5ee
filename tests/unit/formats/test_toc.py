"""TOC field parsing: RFC 3339 times."""

from __future__ import annotations

import pytest

from als.formats.toc import parse_time_ns


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2020-09-13T12:26:40Z", 1_600_000_000 * 10**9),
        ("2020-09-13T14:26:40.5+02:00", 1_600_000_000 * 10**9 + 500_000_000),
        ("2020-09-13T12:26:40.123456789123Z", 1_600_000_000_123_456_789),
        ("0001-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59Z", -(10**9)),
    ],
)
def test_time_parsing(text: str, ns: int) -> None:
    assert parse_time_ns(text) == ns


@pytest.mark.parametrize(
    "bad",
    ["", "2020-13-01T00:00:00Z", "2020-09-13 12:26", "x" * 50, "9999-01-01T00:00:00Z",
     "1000-01-01T00:00:00Z"],
)  # fmt: skip
def test_time_parsing_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="time"):
        parse_time_ns(bad)
