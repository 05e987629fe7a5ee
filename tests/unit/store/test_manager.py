"""LayerManager without FUSE: podman's use counts."""

from __future__ import annotations

from tests.support.fakesource import FakeSource
from tests.unit.store.helpers import REF, manager


async def test_use_and_release_counts() -> None:
    m = manager(FakeSource())
    assert m.use(REF, "d") == 1
    assert m.use(REF, "d") == 2
    assert m.release(REF, "d") == 1
    assert m.release(REF, "d") == 0
    assert m.release(REF, "d") == 0  # never negative (a release after a restart)
