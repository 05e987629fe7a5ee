"""LayerManager without FUSE: podman's use counts."""

from __future__ import annotations

from typing import Any

from als.store.config import StoreConfig
from als.store.manager import LayerManager
from tests.support.fakesource import FakeSource

REF = "registry.test/x:1"


def manager(src: Any, **kw: Any) -> LayerManager:
    return LayerManager(src, StoreConfig(**kw))


async def test_use_and_release_counts() -> None:
    m = manager(FakeSource())
    assert m.use(REF, "d") == 1
    assert m.use(REF, "d") == 2
    assert m.release(REF, "d") == 1
    assert m.release(REF, "d") == 0
    assert m.release(REF, "d") == 0  # never negative (a release after a restart)
