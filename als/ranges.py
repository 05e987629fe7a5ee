"""Byte-range arithmetic, defined once for the store and the registry client.

A *span* is a half-open ``(start, end)`` pair; a *range* in the client API is an
``(offset, length)`` pair; a ``Region`` is a span as a value (what an HTTP ``Range`` names).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True, order=True, slots=True)
class Region:
    """A half-open byte interval ``[start, end)`` of a blob."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def header_spec(self) -> str:
        """The interval as one ``first-last`` item of an HTTP ``Range`` header."""
        return f"{self.start}-{self.end - 1}"


def merge(spans: Iterable[Span], gap: int = 0, max_size: int | None = None) -> list[Span]:
    """Sorted, merged spans; empty spans dropped.

    Spans that overlap or touch always become one. Spans at most ``gap`` bytes apart are merged
    too (fetching the gap costs less than another request), unless the merged span would grow
    beyond ``max_size`` bytes.
    """
    out: list[Span] = []
    for s, e in sorted(r for r in spans if r[1] > r[0]):
        if out:
            ls, le = out[-1]
            if s <= le or (s - le <= gap and (max_size is None or max(le, e) - ls <= max_size)):
                if e > le:
                    out[-1] = (ls, e)
                continue
        out.append((s, e))
    return out


def subtract(whole: Span, present: Iterable[Span]) -> list[Span]:
    """The parts of ``whole`` not covered by ``present``."""
    missing: list[Span] = []
    pos, end = whole
    for s, e in merge(present):
        if e <= pos:
            continue
        if s >= end:
            break
        if s > pos:
            missing.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        missing.append((pos, end))
    return missing


def covers(merged: Iterable[Span], start: int, end: int) -> bool:
    """True if one of the (merged) spans contains ``[start, end)``."""
    return any(s <= start and end <= e for s, e in merged)


def coalesce(
    ranges: Iterable[tuple[int, int]], *, max_gap: int = 0, max_size: int | None = None
) -> list[Region]:
    """``merge`` for ``(offset, length)`` ranges, as Regions."""
    spans = merge(((off, off + n) for off, n in ranges), max_gap, max_size)
    return [Region(s, e) for s, e in spans]
