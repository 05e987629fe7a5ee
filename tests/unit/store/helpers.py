"""Helpers shared by the store engine's tests: a manager over a fake registry, and a layer."""

from __future__ import annotations

from typing import Any

from als.store.config import StoreConfig
from als.store.manager import LayerManager
from tests.support.layers import BuiltLayer, make_layer

REF = "registry.test/x:1"
BIG = bytes(range(256)) * 4096  # 1 MiB


def manager(src: Any, **kw: Any) -> LayerManager:
    """A LayerManager over ``src`` with the config options ``kw`` (no disk cache unless opened)."""
    return LayerManager(src, StoreConfig(**kw))


def big_and_small_layer() -> BuiltLayer:
    """An eStargz layer: a 1 MiB file in four 256 KiB chunks, and a small one."""
    return make_layer({"a/big": BIG, "a/small": b"small"}, "estargz", chunk_size=256 * 1024)
