"""Lookups without FUSE (als.store.resolver through LayerManager): single-flight, negative
cache, fail-fast lookups."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from als.errors import NotFound
from als.store import resolver
from tests.support.fakesource import FakeSource
from tests.support.layers import BuiltLayer, make_layer
from tests.unit.store.helpers import REF, big_and_small_layer, manager


@pytest.fixture
def layer() -> BuiltLayer:
    return big_and_small_layer()


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


async def test_failed_lookups_remembered_are_bounded(layer: BuiltLayer) -> None:
    """A client asking for endless unknown names cannot grow the store's memory."""
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src, negative_ttl=60)
    n = resolver._MAX_NEGATIVE + 50
    for i in range(n):
        with pytest.raises(NotFound):
            await m.lookup(REF, f"sha256:{i:064x}")
    assert len(m.resolver.negative) == resolver._MAX_NEGATIVE
    # the newest answers are the ones kept
    resolves = src.resolves
    with pytest.raises(NotFound):
        await m.lookup(REF, f"sha256:{n - 1:064x}")
    assert src.resolves == resolves


async def test_moved_tag_fetches_the_manifest_again_before_refusing(layer: BuiltLayer) -> None:
    """A tag that moved to an image sharing no layer with the cached manifest: the new layers
    are served (the manifest is fetched again), not refused for the manifest's lifetime."""
    other = make_layer({"b/new": b"new image"}, "zstd-chunked")
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src, manifest_ttl=3600)
    assert (await m.lookup(REF, layer.toc_digest)).digest == layer.digest
    assert src.resolves == 1
    src.add_image(REF, [other])  # the tag moves
    for digest in (other.toc_digest, other.digest):  # both podman dialects
        got = await m.lookup(REF, digest)
        assert got.digest == other.digest
    assert src.resolves == 2  # once for the moved tag; the second lookup uses the new manifest
    # A digest in neither image is refused after one more look at the registry, and that
    # answer is remembered.
    with pytest.raises(NotFound, match="is not a layer of"):
        await m.lookup(REF, "sha256:" + "1" * 64)
    assert src.resolves == 3
    with pytest.raises(NotFound, match="is not a layer of"):
        await m.lookup(REF, "sha256:" + "1" * 64)
    assert src.resolves == 3


async def test_moved_tag_concurrent_lookups_fetch_the_manifest_once(layer: BuiltLayer) -> None:
    others = [make_layer({f"b/{i}": b"x" * i}, "estargz") for i in range(1, 6)]
    src = FakeSource()
    src.add_image(REF, [layer])
    m = manager(src, manifest_ttl=3600)
    await m.lookup(REF, layer.digest)
    src.add_image(REF, others)
    got: list[str] = []

    async def look(digest: str) -> None:
        got.append((await m.lookup(REF, digest)).digest)

    async with trio.open_nursery() as n:
        for o in others:
            n.start_soon(look, o.toc_digest)
    assert sorted(got) == sorted(o.digest for o in others)
    assert src.resolves == 2
