"""The memory cache: a bounded LRU of decompressed, verified chunks, by bytes held."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class ChunkCache:
    """A bounded LRU of decompressed, verified chunks in memory, by bytes held.

    ``on_put`` is told the size of every chunk offered to the cache, kept or not (the
    manager's :class:`~als.store.memory.MemoryTrimmer` counts the chunk traffic with it).
    """

    def __init__(self, max_bytes: int, on_put: Callable[[int], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.on_put = on_put
        self.bytes = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        data = self._data.get(key)
        if data is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return data

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def put(self, key: str, data: bytes) -> bool:
        """Keep ``data``; False if it is larger than the whole cache (then it is not kept)."""
        if self.on_put is not None:
            self.on_put(len(data))
        if len(data) > self.max_bytes:
            return False
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._data[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self.bytes -= len(evicted)
        return True

    def clear(self) -> int:
        """Drop every chunk; the bytes that were held."""
        held = self.bytes
        self._data.clear()
        self.bytes = 0
        return held
