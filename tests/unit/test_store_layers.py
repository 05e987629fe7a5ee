"""LayerManager and Layer without FUSE: single-flight, negative cache, fail-fast lookups."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from als.errors import NotFound
from als.ranges import merge as merge_ranges
from als.store.config import StoreConfig
from als.store.layers import LayerManager
from tests.support.fakesource import FakeSource
from tests.support.layers import BuiltLayer, make_layer

REF = "registry.test/x:1"
BIG = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def layer() -> BuiltLayer:
    return make_layer({"a/big": BIG, "a/small": b"small"}, "estargz", chunk_size=256 * 1024)


def manager(src: Any, **kw: Any) -> LayerManager:
    return LayerManager(src, StoreConfig(**kw))


async def test_concurrent_reads_fetch_each_chunk_once(layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src)
    lay = await m.lookup(REF, layer.digest)
    big = lay.index.lookup("a/big")
    assert big is not None
    before = src.requests
    results: list[bytes] = []

    async def read() -> None:
        results.append(await lay.read(big, 300_000, 4096))

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(read)
    assert results == [BIG[300_000:304_096]] * 20
    assert src.requests - before == 1
    assert await lay.read(big, 0, len(BIG) + 10) == BIG
    assert await lay.read(big, len(BIG), 10) == b""


async def test_concurrent_lookups_resolve_once(layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src)
    got = []

    async def look() -> None:
        got.append(await m.lookup(REF, layer.digest))

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(look)
    assert len({id(x) for x in got}) == 1
    assert src.resolves == 1
    # the same layer by its TOC digest (podman 5.1+) is the same object
    assert await m.lookup(REF, layer.toc_digest) is got[0]


async def test_failed_lookup_is_remembered(layer: BuiltLayer) -> None:
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src, negative_ttl=60)
    with pytest.raises(NotFound, match="not a layer"):
        await m.lookup(REF, "sha256:" + "0" * 64)
    resolves = src.resolves
    with pytest.raises(NotFound):
        await m.lookup(REF, "sha256:" + "0" * 64)
    assert src.resolves == resolves


class SlowSource(FakeSource):
    def resolve(self, ref: Any, **kw: Any) -> Any:
        time.sleep(2)
        return super().resolve(ref, **kw)


async def test_lookup_fails_fast_when_the_registry_hangs(layer: BuiltLayer) -> None:
    src = SlowSource()
    src.add_image(REF, [layer])
    m = manager(src, lookup_timeout=0.3)
    t = trio.current_time()
    with pytest.raises(NotFound, match="timed out"):
        await m.lookup(REF, layer.digest)
    assert trio.current_time() - t < 1.5


async def test_use_and_release_counts() -> None:
    m = manager(FakeSource())
    assert m.use(REF, "d") == 1
    assert m.use(REF, "d") == 2
    assert m.release(REF, "d") == 1
    assert m.release(REF, "d") == 0
    assert m.release(REF, "d") == 0  # never negative (a release after a restart)


def test_merge_ranges_with_a_gap() -> None:
    assert merge_ranges([(10, 20), (0, 5), (25, 30)], 5) == [(0, 30)]
    assert merge_ranges([(0, 5), (100, 110)], 10) == [(0, 5), (100, 110)]
    assert merge_ranges([(0, 50), (10, 20)], 0) == [(0, 50)]
    assert merge_ranges([], 10) == []


async def test_failed_lookups_remembered_are_bounded(layer: BuiltLayer) -> None:
    """A client asking for endless unknown names cannot grow the store's memory."""
    from als.store import layers as layers_mod

    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src, negative_ttl=60)
    n = layers_mod._MAX_NEGATIVE + 50
    for i in range(n):
        with pytest.raises(NotFound):
            await m.lookup(REF, f"sha256:{i:064x}")
    assert len(m._negative) == layers_mod._MAX_NEGATIVE
    # the newest answers are the ones kept
    resolves = src.resolves
    with pytest.raises(NotFound):
        await m.lookup(REF, f"sha256:{n - 1:064x}")
    assert src.resolves == resolves


def test_daemon_passes_the_realm_policy_to_the_client(tmp_path: Any) -> None:
    from als.store.daemon import make_source

    cfg = StoreConfig(root=tmp_path, auth_realm_hosts="reg.example=auth.example")
    client: Any = make_source(cfg)
    assert client.realm_policy.allows("reg.example", "auth.example")
    default: Any = make_source(StoreConfig(root=tmp_path))
    assert not default.realm_policy.allows("reg.example", "auth.example")
