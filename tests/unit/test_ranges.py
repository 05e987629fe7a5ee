"""als.ranges: the one set of byte-range arithmetic (store cache records and registry requests)."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from als.ranges import Region, coalesce, covers, merge, subtract

SETTINGS = settings(
    max_examples=int(os.environ.get("ALS_HYPOTHESIS_EXAMPLES", "150")), deadline=None
)


def points(ranges: list[tuple[int, int]]) -> set[int]:
    return {i for s, e in ranges for i in range(s, e)}


_ranges = st.lists(
    st.tuples(st.integers(0, 120), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=12,
)


@SETTINGS
@given(_ranges)
def test_merge_ranges_is_sorted_disjoint_and_keeps_every_point(rs: list[tuple[int, int]]) -> None:
    out = merge(rs)
    assert all(s < e for s, e in out)
    # Sorted, and neither overlapping nor touching (touching ranges are merged).
    assert all(a[1] < b[0] for a, b in itertools.pairwise(out))
    assert points(out) == points(rs)
    assert merge(out) == out


@SETTINGS
@given(_ranges, st.integers(0, 150), st.integers(0, 60))
def test_subtract_ranges_complements_present_exactly(
    rs: list[tuple[int, int]], start: int, length: int
) -> None:
    whole = (start, start + length)
    missing = subtract(whole, rs)
    whole_pts = set(range(*whole))
    assert points(missing) == whole_pts - points(rs)
    # missing and present never overlap, and together they cover the whole exactly
    assert not points(missing) & points(rs)
    assert points(missing) | (points(rs) & whole_pts) == whole_pts
    assert merge(missing) == missing
    assert all(start <= s < e <= start + length for s, e in missing)


@SETTINGS
@given(_ranges, st.integers(0, 170), st.integers(1, 50))
def test_covers_matches_point_containment(rs: list[tuple[int, int]], a: int, n: int) -> None:
    merged = merge(rs)
    assert covers(merged, a, a + n) == (set(range(a, a + n)) <= points(rs))


def test_range_helpers_examples() -> None:
    assert merge([(5, 10), (0, 5), (3, 3), (20, 30), (25, 26)]) == [(0, 10), (20, 30)]
    assert subtract((0, 100), [(10, 20), (15, 30), (90, 200)]) == [(0, 10), (30, 90)]
    assert subtract((0, 10), []) == [(0, 10)]
    assert subtract((0, 10), [(0, 10)]) == []
    assert covers([(0, 10)], 0, 10)
    assert not covers([(0, 5), (6, 10)], 4, 7)


def test_merge_with_a_gap_and_a_size_cap() -> None:
    assert merge([(0, 10), (15, 20)], gap=5) == [(0, 20)]
    assert merge([(0, 10), (16, 20)], gap=5) == [(0, 10), (16, 20)]
    # the cap stops a gap merge, never a merge of overlapping spans
    assert merge([(0, 10), (15, 20)], gap=5, max_size=19) == [(0, 10), (15, 20)]
    assert merge([(0, 10), (5, 30)], gap=0, max_size=5) == [(0, 30)]


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=10),
    st.integers(0, 20),
)
def test_coalesce_regions_cover_every_range_and_are_disjoint(
    rs: list[tuple[int, int]], gap: int
) -> None:
    out = coalesce(rs, max_gap=gap)
    assert all(isinstance(r, Region) and r.length > 0 for r in out)
    assert all(a.end + gap < b.start for a, b in itertools.pairwise(out))
    for off, n in rs:
        if n:
            assert any(r.start <= off and off + n <= r.end for r in out)
    assert Region(5, 10).header_spec() == "5-9"
