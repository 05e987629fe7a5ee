"""Time budget and hypothesis settings shared by the fuzz tests, and the mutation strategies.

``ALS_FUZZ_SECONDS`` (default 24) is the budget of *all* fuzz tests together; each test gets its
share and stops generating work when it is spent. ``ALS_FUZZ_DEADLINE_MS`` (default 5000) is the
per-example deadline: an example that takes longer is a finding (a hang).
"""

from __future__ import annotations

import functools
import os
import random
import struct
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

F = TypeVar("F", bound=Callable[..., Any])

TOTAL_SECONDS = float(os.environ.get("ALS_FUZZ_SECONDS", "24"))
DEADLINE_MS = int(os.environ.get("ALS_FUZZ_DEADLINE_MS", "5000"))
# How many budgeted fuzz tests share TOTAL_SECONDS (tests/fuzz/test_fuzz_*.py).
BUDGETED_TESTS = 24
SHARE = TOTAL_SECONDS / BUDGETED_TESTS
# Examples are cheap; this only caps generation after the time budget is spent.
MAX_EXAMPLES = max(50, int(SHARE * 400))


def fuzz_settings() -> settings:
    return settings(
        max_examples=MAX_EXAMPLES,
        deadline=timedelta(milliseconds=DEADLINE_MS),
        suppress_health_check=list(HealthCheck),
        derandomize=False,
        print_blob=True,
    )


def budgeted(fn: F) -> F:
    """Make a hypothesis test body return at once after its share of the time budget.

    The first example starts the clock; later examples past the share do nothing, so a test
    costs about SHARE seconds plus the (cheap) generation of its remaining examples.
    """
    start: list[float] = []
    failed: list[bool] = []  # once an example failed, keep running (hypothesis shrinks it)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if not start:
            start.append(now)
        elif now - start[0] > SHARE and not failed:
            return None
        try:
            return fn(*args, **kwargs)
        except BaseException:
            failed.append(True)
            raise

    return wrapper  # type: ignore[return-value]


_INTERESTING = [
    0, 1, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
    1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
]  # fmt: skip


def random_bytes(max_size: int) -> st.SearchStrategy[bytes]:
    """Random byte strings: small ones from hypothesis (shrinkable), big ones expanded from a
    seed (generating 64 KiB through hypothesis costs far more than parsing it)."""
    big = st.builds(
        lambda seed, n: random.Random(seed).randbytes(n),
        st.integers(0, 1 << 32),
        st.integers(512, max_size),
    )
    return st.binary(max_size=512) | big


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], max_ops: int = 6) -> bytes:
    """A seed with a few byte-level mutations (flips, interesting integers, insertions,
    deletions, duplications, truncation): what a coverage-less fuzzer does."""
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.integers(0, 7))
        n = len(data)
        at = draw(st.integers(0, max(n - 1, 0)))
        if op == 0 and n:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and n:
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("0"), ord("9"), ord("{")]))
        elif op == 2 and n >= 8:
            v = draw(st.sampled_from(_INTERESTING))
            at = min(at, n - 8)
            data[at : at + 8] = struct.pack("<Q", v)
        elif op == 3:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == 4 and n:
            end = min(n, at + draw(st.integers(1, 64)))
            del data[at:end]
        elif op == 5 and n:
            end = min(n, at + draw(st.integers(1, 256)))
            data[at:at] = data[at:end]
        elif op == 6 and n:
            del data[draw(st.integers(0, n)) :]
        elif op == 7 and n >= 16:
            # an interesting decimal/hex number where the formats keep text numbers
            v = draw(st.sampled_from(_INTERESTING))
            text = draw(st.sampled_from([b"%d" % v, b"%016x" % v, b"-%d" % v]))
            data[at : at + len(text)] = text
    return bytes(data)
