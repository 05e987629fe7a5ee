"""Loading chunks: the read pipeline of every layer.

A chunk a reader needs is looked for, in order: in memory, in the disk cache by its digest
(shared by every layer and image), in the local compressed blob (complete, or the ranges of a
download in progress), and last in the registry. Whatever comes from the registry is verified
before use (bytes that fail are fetched again, a few times), then kept at every level. One
fetch per chunk is in flight at a time: other readers of it wait for that fetch.

Layer state is changed on the trio side only; the functions run in worker threads return
what they found.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from als.errors import AlsError, FormatError, RegistryError, VerifyError
from als.formats import Chunk, decode_chunk, verify_file
from als.ranges import Span
from als.ranges import merge as merge_spans
from als.ranges import subtract as subtract_spans
from als.store.context import StoreContext

if TYPE_CHECKING:
    from als.store.layer import Layer

log = logging.getLogger(__name__)

Item = tuple[int, Chunk]  # (file id, chunk)
# Where a chunk's compressed bytes are: the layer (held weakly) whose download holds them, and
# the chunk's place in that layer's index (file id, number among the file's chunks).
Home = tuple["weakref.ref[Layer]", int, int]

#: What a fetch is for; also the label of the fetch metrics.
FOREGROUND, READAHEAD, PREFETCH = "foreground", "readahead", "prefetch"

_PREFETCH_GAP = 1 << 20  # prefetch reads through gaps this small: fewer, larger requests
_VERIFY_ATTEMPTS = 3  # fetches of bytes that fail verification before a read gets EIO
_MAX_HOMES = 200_000  # chunk digests remembered in ChunkLoader.homes (about 30 MB at most)


def _home_key(digest: str) -> int:
    """The key of ``ChunkLoader.homes``: the first 64 bits of a chunk digest ("sha256:hex"),
    a third of the memory of the digest string. A home found by it is checked against the
    whole digest before it is used."""
    return int(digest[7:23], 16)


class _Flight:
    """One chunk being loaded by some task: its waiters get the bytes (None if it failed)."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None


class ChunkLoader:
    """Gets the decoded, verified chunks of any layer (one loader serves the whole store)."""

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        #: Told of each foreground fetch from the registry: (layer, blob start, blob end).
        self.on_miss: Callable[[Layer, int, int], None] = lambda layer, start, end: None
        self.inflight: dict[str, _Flight] = {}
        # Chunks whose compressed bytes are in a layer's own download, by chunk digest: another
        # layer with the same content decodes them from there instead of fetching them (and the
        # cache keeps one copy). Bounded; the layers are held weakly.
        self.homes: OrderedDict[int, Home] = OrderedDict()

    async def get(self, layer: Layer, items: Sequence[Item], kind: str) -> dict[str, bytes]:
        """The decoded, verified content of ``items``, by key; one fetch per chunk at a time."""
        memory = self._ctx.memory
        got: dict[str, bytes] = {}
        for _attempt in range(3):
            todo: dict[str, Item] = {}
            waits: list[tuple[str, _Flight]] = []
            for fid, c in items:
                k = layer.key(c)
                if k in got or k in todo:
                    continue
                data = memory.get(k)
                if data is not None:
                    got[k] = data
                elif (flight := self.inflight.get(k)) is not None:
                    waits.append((k, flight))
                else:
                    todo[k] = (fid, c)
            if todo:
                got.update(await self._load(layer, list(todo.values()), kind))
            for k, flight in waits:
                await flight.done.wait()
                # The fetch hands its bytes to its waiters: the memory cache may already have
                # dropped them (a cache smaller than what readers of one big file share).
                if flight.data is not None:
                    got[k] = flight.data
            if all(layer.key(c) in got for _, c in items):
                return got
            if not waits:
                break
            # An awaited fetch failed: try again, fetching what is missing ourselves.
        # Waited for other tasks' fetches, which kept failing: the caller gets EIO; the next read
        # retries.
        raise RegistryError(
            f"layer {layer.digest}: content not available (an earlier fetch failed)"
        )

    async def _load(self, layer: Layer, items: list[Item], kind: str) -> dict[str, bytes]:
        index = layer.index
        # A file verified as a whole needs all its chunks, from one source.
        whole = {fid for fid in {f for f, _ in items} if index.whole_file_verify(fid)}
        if whole:
            seen = {layer.key(c) for _, c in items}
            for fid in whole:
                for c in index.chunks(fid):
                    if layer.key(c) not in seen:
                        items.append((fid, c))
                        seen.add(layer.key(c))
        flights = {layer.key(c): _Flight() for _, c in items}
        for k, flight in flights.items():
            self.inflight.setdefault(k, flight)
        try:
            out = await self._load_in_flight(layer, items, whole, kind)
            for k, flight in flights.items():
                flight.data = out.get(k)
            return out
        except AlsError as exc:
            layer.read_errors += kind == FOREGROUND
            layer.last_error = str(exc)
            paths = sorted({index.path(fid) for fid, _ in items})
            shown = ", ".join(paths[:3]) + (f" (+{len(paths) - 3})" if len(paths) > 3 else "")
            log.error(
                "read-failed layer=%s kind=%s path=%s error=%s", layer.digest, kind, shown, exc
            )
            raise
        finally:
            for k, flight in flights.items():
                if self.inflight.get(k) is flight:
                    del self.inflight[k]
                flight.done.set()

    async def _load_in_flight(
        self, layer: Layer, items: list[Item], whole: set[int], kind: str
    ) -> dict[str, bytes]:
        """Load ``items``, which this task has marked in flight: disk, local, registry."""
        ctx = self._ctx
        out: dict[str, bytes] = {}
        cache = ctx.disk
        piece = layer.bg_piece
        if piece is not None and _overlaps(items, piece):
            await piece[2].wait()
        # 1. The disk cache (by chunk digest) and the local compressed bytes.
        local: dict[str, bytes] = {}
        if cache is not None and self._maybe_local(layer, items, whole):
            gone: list[Layer] = []

            def from_disk() -> tuple[dict[str, bytes], dict[str, bytes]]:
                found: dict[str, bytes] = {}
                raws: dict[str, bytes] = {}
                for fid, c in items:
                    if c.zeros:
                        continue
                    k = layer.key(c)
                    if c.digest is not None and fid not in whole:
                        data = None
                        if cache.has_chunk(c.digest):
                            data = cache.get_chunk(c.digest)
                        elif (home := self.homes.get(_home_key(c.digest))) is not None:
                            data = self._from_home(layer, c.digest, home, gone)
                        if data is not None and len(data) == c.size:
                            found[k] = data
                            continue
                    raw = self._read_local(layer, c.coffset, c.cend, gone)
                    if raw is not None:
                        raws[k] = raw
                return found, raws

            found, local = await ctx.scheduler.disk_call(from_disk)
            out.update(found)
            _mark_gone(gone)
        pending = [(fid, c) for fid, c in items if layer.key(c) not in out]
        # Whole-file-verified files use local bytes only if all their chunks are local.
        whole_local = set()
        for fid in whole:
            if any(f == fid and not c.zeros and layer.key(c) not in local for f, c in pending):
                for f, c in pending:
                    if f == fid:
                        local.pop(layer.key(c), None)
            else:
                whole_local.add(fid)
        # 2. Decode what is local; bytes that fail go back to the registry list.
        if local:
            from_local = [
                (f, c)
                for f, c in pending
                if layer.key(c) in local or (c.zeros and (f not in whole or f in whole_local))
            ]
            decoded, bad = await self.decode(layer, from_local, local, whole)
            out.update(decoded)
            if bad:
                discarded = await ctx.scheduler.disk_call(lambda: self._forget_local(layer, bad))
                if discarded:
                    layer.complete = False
            pending = [(fid, c) for fid, c in items if layer.key(c) not in out]
        # 3. The registry: unless a background piece holding some of these bytes started
        # meanwhile; then they are looked for locally again once it is written.
        fetched_spans: list[tuple[int, bytes]] = []
        later = layer.bg_piece
        if pending and later is not None and later is not piece and _overlaps(pending, later):
            out.update(await self._load_in_flight(layer, pending, whole, kind))
            pending = []
        if pending:
            # Background downloads stay paused until what was fetched here is on its way to
            # the download (step 4), so that they never fetch those bytes again.
            async with ctx.scheduler.foreground():
                fetched_spans = await self._fetch_verified(layer, pending, whole, kind, out)
                self._keep(layer, pending, whole, out, fetched_spans)
        for k, data in out.items():
            ctx.memory.put(k, data)
        return out

    def _keep(
        self,
        layer: Layer,
        pending: list[Item],
        whole: set[int],
        out: dict[str, bytes],
        fetched_spans: list[tuple[int, bytes]],
    ) -> None:
        """4. Keep what is new on disk (after the reader has its bytes): the compressed bytes go
        to our own download, and its chunks are then found through self.homes; decompressed
        chunk files are written only when there is no download of ours to hold them."""
        ctx = self._ctx
        if ctx.disk is not None:
            own = self.can_keep_raw(layer)
            fresh = [
                (fid, c)
                for fid, c in pending
                if c.digest is not None and not c.zeros and fid not in whole
            ]
            to_store: list[tuple[str, bytes]] = []
            if own:
                me = weakref.ref(layer)
                homes = self.homes
                index = layer.index
                for fid, c in fresh:
                    assert c.digest is not None
                    key = _home_key(c.digest)
                    homes[key] = (me, fid, index.chunk_at(fid, c.uoffset))
                    homes.move_to_end(key)
                while len(homes) > _MAX_HOMES:
                    homes.popitem(last=False)
            else:
                to_store = [(c.digest, out[layer.key(c)]) for _, c in fresh if c.digest]
            if to_store or fetched_spans:
                ctx.scheduler.spawn_disk_write(lambda: self._store(layer, to_store, fetched_spans))

    async def _fetch_verified(
        self, layer: Layer, pending: list[Item], whole: set[int], kind: str, out: dict[str, bytes]
    ) -> list[tuple[int, bytes]]:
        """Fetch ``pending`` from the registry into ``out``, verified. Bytes that fail
        verification (a registry or network that corrupted them) are fetched again, up to
        _VERIFY_ATTEMPTS times within the read timeout; they are never kept. Returns the
        fetched spans that hold only verified chunks (for the download)."""
        index = layer.index
        deadline = time.monotonic() + self._ctx.cfg.read_timeout
        spans_ok: list[tuple[int, bytes]] = []
        todo = pending
        for attempt in range(1, _VERIFY_ATTEMPTS + 1):
            # Downloaded bytes are used on the first attempt only: a retry fetches everything.
            raw, spans = await self._fetch(layer, todo, kind, use_local=attempt == 1)
            decoded, bad = await self.decode(layer, todo, raw, whole)
            # A file verified as a whole is fetched again as a whole.
            bad_files = {fid for fid, _ in bad if fid in whole}
            if bad_files:
                for fid in bad_files:
                    for c in index.chunks(fid):
                        decoded.pop(layer.key(c), None)
                bad = [(fid, c) for fid, c in todo if layer.key(c) not in decoded]
            out.update(decoded)
            ranges = [(c.coffset, c.cend) for _, c in bad if not c.zeros]
            spans_ok += [
                (s, d) for s, d in spans if not any(b < s + len(d) and e > s for b, e in ranges)
            ]
            if not bad:
                return spans_ok
            fid, c = bad[0]
            what = f"layer {layer.digest}: {index.path(fid)}: chunk at {c.coffset}"
            if attempt == _VERIFY_ATTEMPTS or time.monotonic() >= deadline:
                raise VerifyError(
                    f"{what} failed verification {attempt} times; the registry keeps sending "
                    "bytes that do not match the layer's TOC"
                )
            log.warning(
                "refetch layer=%s kind=%s chunks=%d attempt=%d: %s failed verification",
                layer.digest,
                kind,
                len(bad),
                attempt,
                what,
            )
            todo = bad
        return spans_ok  # not reached

    def _maybe_local(self, layer: Layer, items: list[Item], whole: set[int]) -> bool:
        """Cheap check (no I/O): might the disk hold any of ``items``?"""
        disk = self._ctx.disk
        if layer.complete:
            return True
        ingest = layer.ingest
        if ingest is not None and ingest.ranges:
            return True
        return disk is not None and any(
            c.digest is not None
            and fid not in whole
            and (disk.has_chunk(c.digest) or _home_key(c.digest) in self.homes)
            for fid, c in items
        )

    def _from_home(self, reader: Layer, digest: str, home: Home, gone: list[Layer]) -> bytes | None:
        """The chunk ``digest``, decoded (and verified) from another layer's download.
        Runs in a disk thread."""
        layer = home[0]()
        if layer is None or layer is reader:
            return None
        c = layer.index.chunks(home[1])[home[2]]
        if c.digest != digest:
            return None  # another digest with the same first 64 bits
        raw = self._read_local(layer, c.coffset, c.cend, gone)
        if raw is None:
            return None
        try:
            return decode_chunk(layer.index, c, raw)
        except (FormatError, VerifyError) as exc:
            log.warning("cache-corrupt layer=%s: %s; fetching again", layer.digest, exc)
            return None

    async def read_local(self, layer: Layer, start: int, end: int) -> bytes | None:
        """Blob bytes [start, end) if they are on disk, else None."""
        gone: list[Layer] = []
        data = await self._ctx.scheduler.disk_call(
            lambda: self._read_local(layer, start, end, gone)
        )
        _mark_gone(gone)
        return data

    def _read_local(self, layer: Layer, start: int, end: int, gone: list[Layer]) -> bytes | None:
        """Runs in a disk thread. A complete blob found evicted is added to ``gone`` (and read
        as incomplete from then on); the caller marks it so on the trio side."""
        disk = self._ctx.disk
        if layer.complete and disk is not None and not any(g is layer for g in gone):
            data = disk.read_blob(layer.digest, start, end - start)
            if data is None and not disk.has_blob(layer.digest):
                gone.append(layer)
            return data
        if layer.ingest is not None:
            return layer.ingest.read(start, end - start)
        return None

    def _forget_local(self, layer: Layer, bad: list[Item]) -> bool:
        """Drop local bytes that failed verification (in a disk thread); True if that was the
        complete blob (the caller marks the layer incomplete)."""
        disk = self._ctx.disk
        if layer.complete and disk is not None:
            disk.discard_blob(layer.digest, "a chunk read from it failed verification")
            return True
        if layer.ingest is not None:
            if disk is not None:
                disk.corrupt += 1
            for _, c in bad:
                log.warning(
                    "cache-corrupt layer=%s: downloaded bytes %d-%d failed verification; "
                    "fetching them again",
                    layer.digest,
                    c.coffset,
                    c.cend,
                )
                layer.ingest.forget(c.coffset, c.cend)
        return False

    def _store(
        self, layer: Layer, chunks: list[tuple[str, bytes]], spans: list[tuple[int, bytes]]
    ) -> None:
        disk = self._ctx.disk
        assert disk is not None
        for digest, data in chunks:
            if not disk.put_chunk(digest, data):
                break
        if layer.ingest is not None and layer.ingest.owned and not layer.complete:
            for off, data in spans:
                layer.ingest.write(off, data)

    async def _fetch(
        self, layer: Layer, pending: list[Item], kind: str, *, use_local: bool
    ) -> tuple[dict[str, bytes], list[tuple[int, bytes]]]:
        """The compressed bytes of ``pending``'s chunks, by key, and the spans fetched. Chunks
        close together are fetched in one span; the parts of a span already in the layer's
        download (``use_local``) are read from there instead of fetched again."""
        ctx = self._ctx
        cfg = ctx.cfg
        need = [c for _, c in pending if not c.zeros]
        gap = _PREFETCH_GAP if kind in (PREFETCH, READAHEAD) else cfg.coalesce_gap
        spans = merge_spans([(c.coffset, c.cend) for c in need], gap)
        if not spans:
            return {}, []
        local: list[tuple[int, bytes]] = []
        if use_local:
            local = await self.blob_parts(layer, spans)
        holes = [
            h for span in spans for h in subtract_spans(span, [(s, s + len(d)) for s, d in local])
        ]
        fetched = await self._fetch_spans(layer, holes, kind)
        if kind == FOREGROUND:
            self.on_miss(layer, spans[0][0], spans[-1][1])
        whole = [(s, _assemble(s, e, [*local, *fetched])) for s, e in spans]
        raw: dict[str, bytes] = {}
        for c in need:
            for s, data in whole:
                if s <= c.coffset and c.cend <= s + len(data):
                    raw[layer.key(c)] = data[c.coffset - s : c.cend - s]
                    break
        return raw, fetched

    async def _fetch_spans(
        self, layer: Layer, spans: Sequence[Span], kind: str | None, *, foreground: bool = True
    ) -> list[tuple[int, bytes]]:
        """Blob byte ranges ``spans`` from the registry, as (offset, bytes): on the ``net``
        limiter, within the read timeout, inside :meth:`Scheduler.foreground` (background
        downloads pause) unless told otherwise; counted for the layer, the store and, given
        a ``kind``, the metrics."""
        ctx = self._ctx
        deadline = time.monotonic() + ctx.cfg.read_timeout
        ranges = [(s, e - s) for s, e in spans]
        ref, digest, source = layer.ref, layer.digest, ctx.source

        def fetch() -> list[bytes]:
            return source.fetch_ranges(ref, digest, ranges, deadline=deadline)

        start = time.monotonic()
        blobs: list[bytes] = []
        if ranges:
            async with ctx.scheduler.foreground() if foreground else contextlib.nullcontext():
                with trio.fail_after(ctx.cfg.read_timeout + 5):
                    blobs = await ctx.scheduler.net_call(fetch)
        n = sum(len(b) for b in blobs)
        layer.fetched_bytes += n
        ctx.fetched(n, kind, time.monotonic() - start)
        return [(s, data) for (s, _), data in zip(spans, blobs, strict=True)]

    def can_keep_raw(self, layer: Layer) -> bool:
        """Whether compressed bytes fetched for ``layer`` have a download of ours to go to."""
        ingest = layer.ingest
        return (
            self._ctx.disk is not None
            and ingest is not None
            and ingest.owned
            and not layer.complete
        )

    async def fetch_raw(self, layer: Layer, items: Sequence[Item], kind: str) -> int:
        """Fetch the compressed bytes of ``items`` into the layer's download, without decoding
        them: each chunk is decoded and verified when it is first read (like any byte of the
        download). For prefetching more than the memory cache can hold decoded. Skips what the
        download holds or another task is fetching; returns the bytes fetched (0 when the layer
        has no download of ours: see :meth:`can_keep_raw`)."""
        if not self.can_keep_raw(layer):
            return 0
        ctx = self._ctx
        need = [c for _, c in items if not c.zeros and layer.key(c) not in self.inflight]
        present = list(layer.ingest.ranges) if layer.ingest is not None else []
        holes = [
            h
            for span in merge_spans([(c.coffset, c.cend) for c in need], _PREFETCH_GAP)
            for h in subtract_spans(span, present)
        ]
        if not holes:
            return 0
        fetched = await self._fetch_spans(layer, holes, kind, foreground=False)
        ctx.scheduler.spawn_disk_write(lambda: self._store(layer, [], fetched))
        return sum(len(d) for _, d in fetched)

    async def blob_parts(self, layer: Layer, spans: Sequence[Span]) -> list[tuple[int, bytes]]:
        """The parts of ``spans`` present in the layer's download, as (offset, bytes)."""
        ingest = layer.ingest
        if ingest is None or layer.complete or not ingest.ranges:
            return []
        present = list(ingest.ranges)

        def read() -> list[tuple[int, bytes]]:
            out: list[tuple[int, bytes]] = []
            for s, e in spans:
                for ps, pe in present:
                    lo, hi = max(s, ps), min(e, pe)
                    if lo < hi and (data := ingest.read(lo, hi - lo)) is not None:
                        out.append((lo, data))
            return out

        return await self._ctx.scheduler.disk_call(read)

    async def fetch_blob(self, layer: Layer, start: int, end: int) -> bytes:
        """Blob bytes [start, end) for the ``blob`` file: what the download holds, the rest
        fetched (and kept in the download, so that no byte is fetched twice)."""
        ctx = self._ctx
        local = await self.blob_parts(layer, [(start, end)])
        holes = subtract_spans((start, end), [(s, s + len(d)) for s, d in local])
        fetched = await self._fetch_spans(layer, holes, None)
        if fetched and ctx.disk is not None:
            ctx.scheduler.spawn_disk_write(lambda: self._store(layer, [], fetched))
        return _assemble(start, end, [*local, *fetched])

    async def decode(
        self, layer: Layer, items: list[Item], raw: dict[str, bytes], whole: set[int]
    ) -> tuple[dict[str, bytes], list[Item]]:
        """Decode and verify; returns the good chunks by key, and the items that failed."""
        index = layer.index
        digest = layer.digest
        key = layer.key

        def work() -> tuple[dict[str, bytes], list[Item]]:
            good: dict[str, bytes] = {}
            bad: list[Item] = []
            for fid, c in items:
                k = key(c)
                try:
                    good[k] = decode_chunk(index, c, raw.get(k, b""), path=index.path(fid))
                except (FormatError, VerifyError) as exc:
                    log.warning("verify-failed layer=%s: %s", digest, exc)
                    bad.append((fid, c))
            for fid in whole:
                chunks = list(index.chunks(fid))
                if not all(key(c) in good for c in chunks) or not any(f == fid for f, _ in items):
                    continue
                try:
                    verify_file(index, fid, b"".join(good[key(c)] for c in chunks))
                except VerifyError as exc:
                    log.warning("verify-failed layer=%s: %s", digest, exc)
                    for c in chunks:
                        good.pop(key(c), None)
                        bad.append((fid, c))
            return good, bad

        return await self._ctx.scheduler.cpu_call(work)


def _assemble(start: int, end: int, parts: Sequence[tuple[int, bytes]]) -> bytes:
    """Bytes [start, end) from (offset, bytes) parts that cover it."""
    buf = bytearray(end - start)
    for off, data in parts:
        lo, hi = max(off, start), min(off + len(data), end)
        if lo < hi:
            buf[lo - start : hi - start] = data[lo - off : hi - off]
    return bytes(buf)


def _overlaps(items: Sequence[Item], piece: tuple[int, int, trio.Event]) -> bool:
    return any(c.coffset < piece[1] and c.cend > piece[0] for _, c in items if not c.zeros)


def _mark_gone(gone: list[Layer]) -> None:
    for layer in gone:
        layer.complete = False  # evicted: reads go to the registry again
