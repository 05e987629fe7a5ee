"""DiskCache: the cache directory's units, their accounting, LRU eviction and degraded mode.

Every file is written under ``tmp/`` and renamed into place (:func:`als.fsutil.write_atomic`).
A write that fails (a full or read-only disk) puts the cache in degraded mode: it stops writing
for a while and the store fetches without caching. Chunks are hashed on every read.

Partial downloads are :mod:`~als.store.cache.ingest`; the file formats of layer records, TOC
pieces, profiles and use counts are :mod:`~als.store.cache.records`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from als.digest import hex_of
from als.fsutil import pid_alive, remove_dir, remove_tree, write_atomic
from als.store.cache.ingest import Ingest
from als.store.cache.records import (
    LayerRecord,
    TocPieces,
    UseCounts,
    encode_profile,
    encode_uses,
    pack_toc,
    read_profile,
    read_uses,
    unpack_toc,
)

log = logging.getLogger(__name__)

_TOUCH_EVERY = 60.0  # seconds between mtime updates that persist a unit's recency
_RETRY_DEGRADED = 30.0  # seconds before writes are tried again after a failure
_LOW_WATER = 0.9  # eviction frees down to this fraction of the limit


@dataclass
class _Unit:
    """Something eviction can remove: a chunk file, a blob, a download, or a layer record."""

    size: int
    used: float  # wall-clock time of the last use
    layer: str | None  # hex of the layer it belongs to (None for chunks)
    touched: float = 0.0


@dataclass
class EvictReport:
    freed: int = 0
    removed: int = 0
    protected_removed: int = 0
    remaining: int = 0
    native_removed: list[str] = field(default_factory=list)  # hex digests of removed trees


class DiskCache:
    """The cache directory: chunks, blobs, downloads and layer records, with LRU eviction."""

    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.dir = directory
        self.limit = limit_bytes
        self.degraded: str | None = None
        self._retry_at = 0.0
        self._units: dict[str, _Unit] = {}
        self.total = 0
        self._lock = threading.Lock()
        self._seq = 0
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.open_ingests: dict[str, Ingest] = {}  # downloads this process writes
        self._touched: set[str] | None = None  # accounted during a rescan

    # -- set-up ---------------------------------------------------------------------------------

    def open(self, *, scan: bool = True) -> None:
        """Make the layout and clear dead writes; ``scan=False`` leaves counting what is on
        disk to a later :meth:`rescan` (it walks every chunk: seconds for a big cache, which a
        restarting store should not spend before it serves)."""
        for sub in ("blobs/sha256", "ingest", "chunks/sha256", "layers", "native", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        # Files under tmp/ belong to writes that never finished (ours, or a crashed process's).
        cutoff = time.time() - 3600
        for p in (self.dir / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff or not pid_alive(p.name.partition(".")[0]):
                    p.unlink()
        if scan:
            self.rescan()

    def rescan(self) -> None:
        """Recount what is on disk (other processes may share the directory).

        Units this process accounts for while the walk runs are kept when the walk missed them
        (written after it passed their directory)."""
        with self._lock:
            self._touched = set()
        units: dict[str, _Unit] = {}
        for p in _files(self.dir / "chunks" / "sha256", depth=2):
            with contextlib.suppress(OSError):
                st = p.stat()
                units[f"chunks/{p.name}"] = _Unit(st.st_size, st.st_mtime, None, st.st_mtime)
        for p in _files(self.dir / "blobs" / "sha256", depth=1):
            with contextlib.suppress(OSError):
                st = p.stat()
                units[f"blobs/{p.name}"] = _Unit(st.st_size, st.st_mtime, p.name, st.st_mtime)
        for kind in ("ingest", "layers"):
            for d in _dirs(self.dir / kind):
                size, mtime = 0, 0.0
                for p in _files(d, depth=1):
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        size += st.st_blocks * 512 if p.name == "data" else st.st_size
                        mtime = max(mtime, st.st_mtime)
                units[f"{kind}/{d.name}"] = _Unit(size, mtime, d.name, mtime)
        # Unpacked trees (als.store.native): their size is in the marker written last; a tree
        # without one (being made, or left half-made) is not counted.
        for d in _dirs(self.dir / "native"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                st = (d / "ready").stat()
                size = int(json.loads((d / "ready").read_bytes())["bytes"])
                units[f"native/{d.name}"] = _Unit(size, st.st_mtime, d.name, st.st_mtime)
        with self._lock:
            for key in self._touched or ():
                if key not in units and key in self._units:
                    units[key] = self._units[key]
            self._touched = None
            self._units = units
            self.total = sum(u.size for u in units.values())

    # -- bookkeeping ----------------------------------------------------------------------------

    def account(self, key: str, grown: int, layer: str | None) -> None:
        now = time.time()
        with self._lock:
            if self._touched is not None:
                self._touched.add(key)
            u = self._units.get(key)
            if u is None:
                u = self._units[key] = _Unit(0, now, layer, now)
            u.size += grown
            u.used = now
            self.total += grown

    def forget_unit(self, key: str) -> None:
        with self._lock:
            u = self._units.pop(key, None)
            if u is not None:
                self.total -= u.size

    def moved_to_blobs(self, hexd: str, size: int) -> None:
        self.forget_unit(f"ingest/{hexd}")
        self.account(f"blobs/{hexd}", size, hexd)

    def touch(self, key: str, path: Path | None = None) -> None:
        """Note a use of ``key``; persisted (as mtime) at most once a minute."""
        now = time.time()
        with self._lock:
            u = self._units.get(key)
            if u is None:
                return
            u.used = now
            stale = now - u.touched > _TOUCH_EVERY
            if stale:
                u.touched = now
        if stale and path is not None:
            with contextlib.suppress(OSError):
                os.utime(path)

    def over_limit(self) -> bool:
        return self.limit > 0 and self.total > self.limit

    # -- writes and failure ---------------------------------------------------------------------

    def writable(self) -> bool:
        if self.degraded is None:
            return True
        return time.monotonic() >= self._retry_at

    def write_failed(self, exc: OSError) -> None:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if self.degraded is None:
            log.warning(
                "cache-degraded dir=%s: cannot write (%s); fetching without caching until "
                "writes succeed again",
                self.dir,
                reason,
            )
        self.degraded = reason
        self._retry_at = time.monotonic() + _RETRY_DEGRADED

    def _write_ok(self) -> None:
        if self.degraded is not None:
            log.info("cache-recovered dir=%s: writing to the cache again", self.dir)
            self.degraded = None

    def _tmp(self) -> Path:
        with self._lock:
            self._seq += 1
            seq = self._seq
        return self.dir / "tmp" / f"{os.getpid()}.{threading.get_ident()}.{seq}"

    def write_atomic(self, dest: Path, data: bytes) -> None:
        """Write ``dest`` through a temporary file and a rename. Raises OSError."""
        write_atomic(dest, data, tmp=self._tmp())
        self._write_ok()

    def _try_write(self, dest: Path, data: bytes) -> bool:
        if not self.writable():
            return False
        try:
            self.write_atomic(dest, data)
        except FileNotFoundError:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.write_atomic(dest, data)
            except OSError as exc:
                self.write_failed(exc)
                return False
        except OSError as exc:
            self.write_failed(exc)
            return False
        return True

    # -- chunks ---------------------------------------------------------------------------------

    def chunk_file(self, hexd: str) -> Path:
        return self.dir / "chunks" / "sha256" / hexd[:2] / hexd

    def get_chunk(self, digest: str) -> bytes | None:
        """A verified chunk, or None (a file that fails its digest is removed)."""
        hexd = hex_of(digest)
        path = self.chunk_file(hexd)
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.misses += 1
            if isinstance(exc, FileNotFoundError):
                # Removed behind our back (another process evicted it): stop counting it, or
                # put_chunk would believe it is still there and never write it again.
                self.forget_unit(f"chunks/{hexd}")
            return None
        if hashlib.sha256(data).hexdigest() != hexd:
            self.corrupt += 1
            self.misses += 1
            log.warning("cache-corrupt chunk=%s: content does not match; refetching", digest)
            with contextlib.suppress(OSError):
                path.unlink()
            self.forget_unit(f"chunks/{hexd}")
            return None
        self.hits += 1
        self.touch(f"chunks/{hexd}", path)
        return data

    def has_chunk(self, digest: str) -> bool:
        return f"chunks/{hex_of(digest)}" in self._units

    def put_chunk(self, digest: str, data: bytes) -> bool:
        hexd = hex_of(digest)
        key = f"chunks/{hexd}"
        if key in self._units:
            self.touch(key)
            return True
        if not self._try_write(self.chunk_file(hexd), data):
            return False
        self.account(key, len(data), None)
        return True

    # -- blobs ----------------------------------------------------------------------------------

    def blob_file(self, hexd: str) -> Path:
        return self.dir / "blobs" / "sha256" / hexd

    def has_blob(self, digest: str) -> bool:
        return self.blob_file(hex_of(digest)).exists()

    def read_blob(self, digest: str, offset: int, length: int) -> bytes | None:
        hexd = hex_of(digest)
        path = self.blob_file(hexd)
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except OSError:
            return None
        self.touch(f"blobs/{hexd}", path)
        return data if len(data) == length else None

    def discard_blob(self, digest: str, why: str) -> None:
        hexd = hex_of(digest)
        log.warning("cache-corrupt blob=%s: %s; removing it", digest, why)
        self.corrupt += 1
        with contextlib.suppress(OSError):
            self.blob_file(hexd).unlink()
        self.forget_unit(f"blobs/{hexd}")

    def ingest(self, digest: str, size: int) -> Ingest:
        return Ingest(self, hex_of(digest), size)

    # -- layer records --------------------------------------------------------------------------

    def _layer_dir(self, hexd: str) -> Path:
        return self.dir / "layers" / hexd

    def save_layer(self, rec: LayerRecord, toc_pieces: TocPieces | None) -> bool:
        hexd = hex_of(rec.blob_digest)
        d = self._layer_dir(hexd)
        grown = 0
        if toc_pieces is not None:
            blob = pack_toc(toc_pieces)
            old = _size_of(d / "toc")
            if not self._try_write(d / "toc", blob):
                return False
            grown += len(blob) - old
        body = rec.encode()
        old = _size_of(d / "layer.json")
        ok = self._try_write(d / "layer.json", body)
        if ok:
            grown += len(body) - old
        if ok or grown:
            self.account(f"layers/{hexd}", grown, hexd)
        return ok

    def load_layer(self, blob_digest: str) -> tuple[LayerRecord, TocPieces] | None:
        """The record and TOC bytes of a layer, or None if absent or unreadable."""
        hexd = hex_of(blob_digest)
        d = self._layer_dir(hexd)
        try:
            rec = LayerRecord.decode((d / "layer.json").read_bytes())
            pieces = unpack_toc((d / "toc").read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cache-corrupt layer=%s: unreadable record (%s); ignoring it", hexd, exc)
            return None
        if rec.blob_digest != blob_digest:
            log.warning("cache-corrupt layer=%s: record names %s", hexd, rec.blob_digest)
            return None
        self.touch(f"layers/{hexd}", d / "layer.json")
        return rec, pieces

    def layer_records(self) -> Iterator[LayerRecord]:
        for d in _dirs(self.dir / "layers"):
            try:
                yield LayerRecord.decode((d / "layer.json").read_bytes())
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def save_profile(self, blob_digest: str, paths: list[str]) -> bool:
        """Store a layer's learned profile; it counts towards (and is evicted with) the layer."""
        hexd = hex_of(blob_digest)
        body = encode_profile(paths)
        path = self._layer_dir(hexd) / "profile.json"
        old = _size_of(path)
        ok = self._try_write(path, body)
        if ok:
            self.account(f"layers/{hexd}", len(body) - old, hexd)
        return ok

    def load_profile(self, blob_digest: str) -> list[str]:
        return read_profile(self._layer_dir(hex_of(blob_digest)) / "profile.json")

    # -- use counts (kept here, beside the data they protect; never evicted) --------------------

    def save_uses(self, uses: UseCounts) -> bool:
        return self._try_write(self.dir / "uses.json", encode_uses(uses))

    def load_uses(self) -> UseCounts:
        return read_uses(self.dir / "uses.json")

    # -- eviction -------------------------------------------------------------------------------

    def evict(self, protected_layers: set[str], protected_chunks: set[str]) -> EvictReport:
        """Remove least recently used data until the cache is under its limit (with margin).

        Data of protected layers (podman uses them) goes last, and only if nothing else is left;
        the unpacked tree of a protected layer never goes (an overlay mount may read it).
        """
        report = EvictReport()
        if self.limit <= 0:
            return report
        target = int(self.limit * _LOW_WATER)
        with self._lock:
            order = sorted(self._units.items(), key=lambda kv: kv[1].used)

        def is_protected(key: str, u: _Unit) -> bool:
            if u.layer is not None:
                return u.layer in protected_layers
            return key.partition("/")[2] in protected_chunks

        for pass_protected in (False, True):
            for key, u in order:
                if self.total <= target:
                    break
                if is_protected(key, u) != pass_protected or key not in self._units:
                    continue
                if pass_protected and key.startswith("native/"):
                    continue
                if self._remove(key):
                    report.freed += u.size
                    report.removed += 1
                    report.protected_removed += pass_protected
                    if key.startswith("native/"):
                        report.native_removed.append(key.partition("/")[2])
        report.remaining = self.total
        if report.protected_removed:
            log.warning(
                "cache-limit limit=%d: could not stay under the limit without evicting %d item(s) "
                "of layers in use; they will be fetched again when read",
                self.limit,
                report.protected_removed,
            )
        return report

    def _remove(self, key: str) -> bool:
        kind, _, name = key.partition("/")
        try:
            if kind == "chunks":
                self.chunk_file(name).unlink()
            elif kind == "blobs":
                self.blob_file(name).unlink()
            elif kind == "ingest" and name in self.open_ingests:
                # Ours: keep the download open (it may resume) but drop its data.
                self.open_ingests[name].discard()
            elif kind == "ingest":
                d = self.dir / "ingest" / name
                fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return False  # being written (by us or another process): skip it
                    remove_dir(d)
                finally:
                    os.close(fd)
            elif kind == "layers":
                remove_dir(self.dir / "layers" / name)
            elif kind == "native":
                remove_tree(self.dir / "native" / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cache-evict %s failed: %s", key, exc)
            return False
        self.forget_unit(key)
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "bytes": self.total,
            "limit_bytes": self.limit,
            "degraded": self.degraded,
            "hits": self.hits,
            "misses": self.misses,
            "corrupt": self.corrupt,
        }


# -- helpers --------------------------------------------------------------------------------------


def _size_of(path: Path) -> int:
    """The size of the file a write is about to replace (0 if there is none)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _files(base: Path, depth: int) -> Iterator[Path]:
    try:
        it = list(os.scandir(base))
    except OSError:
        return
    for ent in it:
        if depth > 1 and ent.is_dir(follow_symlinks=False):
            yield from _files(Path(ent.path), depth - 1)
        elif depth == 1 and ent.is_file(follow_symlinks=False):
            yield Path(ent.path)


def _dirs(base: Path) -> Iterator[Path]:
    try:
        it = list(os.scandir(base))
    except OSError:
        return
    for ent in it:
        if ent.is_dir(follow_symlinks=False):
            yield Path(ent.path)
