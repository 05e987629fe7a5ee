"""The memory cache: a bounded LRU of decompressed, verified chunks, by bytes held."""

from __future__ import annotations

from collections import OrderedDict


class ChunkCache:
    """A bounded LRU of decompressed, verified chunks in memory, by bytes held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
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
