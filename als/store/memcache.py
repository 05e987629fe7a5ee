"""The memory cache: a bounded LRU of decompressed, verified chunks, by bytes held."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class ChunkCache:
    """A bounded LRU of decompressed, verified chunks in memory, by bytes held.

    ``on_put`` is told the size of every chunk offered to the cache, kept or not (the
    manager's :class:`~als.store.memory.MemoryTrimmer` counts the chunk traffic with it).
    """

    def __init__(
        self,
        max_bytes: int,
        on_put: Callable[[int], None] | None = None,
        *,
        settled: Callable[[], bool] = lambda: True,
    ) -> None:
        self.max_bytes = max_bytes
        self.on_put = on_put
        # Whether the cache writes of what was fetched have landed: until then a consumed
        # chunk stays (a second reference reading it meanwhile must not fetch it again).
        self.settled = settled
        self.bytes = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        # Bytes of a cached chunk handed to readers so far. Once all of it was, the kernel
        # holds it in its page cache (layer files are opened with keep_cache): the chunk is
        # *consumed*, and leaves memory once the cache writes have landed (:meth:`served`).
        self._served: dict[str, int] = {}
        self._consumed: dict[str, None] = {}
        self.hits = 0
        self.misses = 0
        self.consumed = 0  # chunks dropped because readers had all of them

    def get(self, key: str) -> bytes | None:
        data = self._data.get(key)
        if data is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        if key in self._consumed:  # wanted again (another file, another layer)
            del self._consumed[key]
            self._served.pop(key, None)
        return data

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def put(self, key: str, data: bytes) -> bool:
        """Keep ``data``; False if it is larger than the whole cache (then it is not kept)."""
        if self.on_put is not None:
            self.on_put(len(data))
        if len(data) > self.max_bytes:
            return False
        self.drop_consumed()
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
            self._served.pop(key, None)
            self._consumed.pop(key, None)
        self._data[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            evicted_key, evicted = self._data.popitem(last=False)
            self.bytes -= len(evicted)
            self._served.pop(evicted_key, None)
        return True

    def served(self, key: str, nbytes: int) -> None:
        """``nbytes`` of chunk ``key`` went to a reader. When every byte of it has (counted
        over reads, which the kernel does not repeat for pages it keeps), the chunk is
        consumed: dropped as soon as the cache writes have landed (at once, or at a later
        read, :meth:`put` or :meth:`drop_consumed`), and a later miss decodes it again from
        disk. Only for chunks whose bytes the disk cache gets (the caller knows)."""
        if key not in self._data:
            return
        total = self._served.get(key, 0) + nbytes
        self._served[key] = total
        if total >= len(self._data[key]):
            self._consumed[key] = None
        self.drop_consumed()

    def drop_consumed(self) -> int:
        """Drop the consumed chunks if the cache writes have landed; the bytes released."""
        if not self._consumed or not self.settled():
            return 0
        freed = 0
        for key in self._consumed:
            data = self._data.pop(key, None)
            self._served.pop(key, None)
            if data is not None:
                freed += len(data)
                self.consumed += 1
        self._consumed.clear()
        self.bytes -= freed
        return freed

    def clear(self) -> int:
        """Drop every chunk; the bytes that were held."""
        held = self.bytes
        self._data.clear()
        self._served.clear()
        self._consumed.clear()
        self.bytes = 0
        return held
