"""The on-disk cache: content-addressed, shared safely between processes, bounded in size.

Layout under the cache directory (see docs/cache.md)::

    blobs/sha256/<hex>          complete compressed blobs, verified against their digest
    ingest/<hex>/data           a blob being downloaded (sparse), plus
    ingest/<hex>/ranges         the byte ranges of ``data`` that were written (JSON)
    ingest/<hex>/lock           flock held by the one process that writes this download
    chunks/sha256/<ab>/<hex>    decompressed file chunks, named by their chunk digest
    layers/<hex>/layer.json     what a lookup resolved: digests, DiffID, size, references
    layers/<hex>/toc            the blob bytes the TOC was read from (to rebuild the index)
    layers/<hex>/profile.json   the files readers opened first (learned prefetch)
    uses.json                   podman's use counts, per (reference, digest)
    tmp/                        files being written; renamed into place when complete

Every file is written under ``tmp/`` and renamed into place, so no reader ever sees a partial
file. Nothing read back is trusted: chunks are hashed on every read, partial downloads are
verified chunk by chunk when decoded and as a whole before they move to ``blobs/``, and the
TOC is verified against its digest whenever the index is rebuilt.

Everything here is blocking; the store calls it from worker threads behind its ``disk`` limiter.
"""

from __future__ import annotations

import contextlib
import errno
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
from als.ranges import covers, merge, subtract

log = logging.getLogger(__name__)

_TOUCH_EVERY = 60.0  # seconds between mtime updates that persist a unit's recency
_RETRY_DEGRADED = 30.0  # seconds before writes are tried again after a failure
_LOW_WATER = 0.9  # eviction frees down to this fraction of the limit
_RECORD_EVERY = 1.0  # seconds between rewrites of a download's ranges record
_RECORD_NOW = 256 * 1024  # a write at least this large is recorded at once


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


@dataclass
class LayerRecord:
    """What a lookup resolved, persisted so a restart needs no registry and no tag."""

    blob_digest: str
    blob_size: int
    diff_id: str | None
    toc_digest: str
    media_type: str
    format: str
    annotations: dict[str, str]
    refs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "blob_digest": self.blob_digest,
            "blob_size": self.blob_size,
            "diff_id": self.diff_id,
            "toc_digest": self.toc_digest,
            "media_type": self.media_type,
            "format": self.format,
            "annotations": self.annotations,
            "refs": self.refs,
        }

    @classmethod
    def from_json(cls, d: Any) -> LayerRecord:
        if not isinstance(d, dict):
            raise ValueError("layer record is not an object")
        rec = cls(
            blob_digest=str(d["blob_digest"]),
            blob_size=int(d["blob_size"]),
            diff_id=str(d["diff_id"]) if d.get("diff_id") else None,
            toc_digest=str(d["toc_digest"]),
            media_type=str(d.get("media_type", "")),
            format=str(d.get("format", "")),
            annotations={str(k): str(v) for k, v in dict(d.get("annotations", {})).items()},
            refs=[str(r) for r in d.get("refs", [])],
        )
        hex_of(rec.blob_digest)
        hex_of(rec.toc_digest)
        if rec.blob_size < 0:
            raise ValueError("negative blob size")
        return rec


class Ingest:
    """One partial download: a sparse data file and the record of which ranges it holds.

    Only the process holding the download's lock writes to it; others may read the ranges
    the record lists. Data is written before the record names it, so a crash leaves at worst
    bytes that no record claims.
    """

    def __init__(self, cache: DiskCache, hexd: str, size: int) -> None:
        self.cache = cache
        self.hex = hexd
        self.size = size
        self.dir = cache.dir / "ingest" / hexd
        self.data_path = self.dir / "data"
        self.ranges_path = self.dir / "ranges"
        self.ranges: list[tuple[int, int]] = []
        self._lock_fd: int | None = None
        self._data_fd: int | None = None
        self._mutex = threading.Lock()
        self._dirty = False
        self._saved_at = 0.0

    @property
    def owned(self) -> bool:
        return self._lock_fd is not None

    def acquire(self) -> bool:
        """Take the write lock; False if another process is downloading this blob."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self._data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.reload()
        self.cache.open_ingests[self.hex] = self
        return True

    def reload(self) -> None:
        try:
            raw = json.loads(self.ranges_path.read_bytes())
            ranges = [(int(s), int(e)) for s, e in raw]
        except FileNotFoundError:
            ranges = []
        except (OSError, ValueError, TypeError) as exc:
            log.warning("cache-corrupt ingest=%s: unreadable ranges record (%s)", self.hex, exc)
            ranges = []
        try:
            have = os.stat(self.data_path).st_size
        except FileNotFoundError:
            have = 0
        # Never trust a record beyond what the data file holds, or beyond the blob.
        limit = min(have, self.size)
        self.ranges = merge((s, min(e, limit)) for s, e in ranges if 0 <= s < limit)

    def present(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def missing(self) -> list[tuple[int, int]]:
        return subtract((0, self.size), self.ranges)

    def complete(self) -> bool:
        return not self.missing()

    def write(self, offset: int, data: bytes) -> bool:
        """Store ``data`` at ``offset``; False (and nothing recorded) if it could not be written."""
        if self._data_fd is None or not data or offset < 0 or offset + len(data) > self.size:
            return False
        if not self.cache.writable():
            return False
        with self._mutex:
            try:
                os.pwrite(self._data_fd, data, offset)
            except OSError as exc:
                self.cache.write_failed(exc)
                return False
            new = merge([*self.ranges, (offset, offset + len(data))])
            grown = sum(e - s for s, e in new) - self.present()
            self.ranges = new
            # The record follows the data: at once for large writes (background pieces), at
            # most once a second for small ones (and at close). After a crash it may name less
            # than the file holds, never more.
            self._dirty = True
            if len(data) >= _RECORD_NOW or time.monotonic() - self._saved_at >= _RECORD_EVERY:
                self._save_record()
        self.cache.account(f"ingest/{self.hex}", grown, self.hex)
        return True

    def _save_record(self) -> None:
        try:
            self.cache.write_atomic(self.ranges_path, json.dumps(self.ranges).encode())
        except OSError as exc:
            self.cache.write_failed(exc)
            return
        self._dirty = False
        self._saved_at = time.monotonic()

    def flush(self) -> None:
        """Write the ranges record if it is behind."""
        with self._mutex:
            if self._dirty and self._data_fd is not None:
                self._save_record()

    def read(self, offset: int, length: int) -> bytes | None:
        """Bytes the record lists as present, or None."""
        if not covers(self.ranges, offset, offset + length):
            return None
        try:
            with open(self.data_path, "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except OSError:
            return None
        return data if len(data) == length else None

    def forget(self, offset: int, end: int) -> None:
        """Drop [offset, end) from the record: those bytes proved wrong."""
        with self._mutex:
            kept: list[tuple[int, int]] = []
            for s, e in self.ranges:
                if e <= offset or s >= end:
                    kept.append((s, e))
                else:
                    if s < offset:
                        kept.append((s, offset))
                    if e > end:
                        kept.append((end, e))
            self.ranges = kept
            if self.owned:
                with contextlib.suppress(OSError):
                    self.cache.write_atomic(self.ranges_path, json.dumps(kept).encode())

    def finish(self, digest: str) -> bool:
        """Verify the complete download against ``digest`` and move it to ``blobs/``.

        False if it does not match: the download is then discarded and starts over.
        """
        if self._data_fd is None or not self.complete():
            return False
        h = hashlib.sha256()
        pos = 0
        while pos < self.size:
            piece = os.pread(self._data_fd, min(4 << 20, self.size - pos), pos)
            if not piece:
                break
            h.update(piece)
            pos += len(piece)
        if pos != self.size or "sha256:" + h.hexdigest() != digest:
            log.error(
                "cache-corrupt ingest=%s: the downloaded blob does not match its digest; "
                "discarding it",
                self.hex,
            )
            self.discard()
            return False
        os.ftruncate(self._data_fd, self.size)
        dest = self.cache.blob_file(self.hex)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.data_path, dest)
        self.cache.moved_to_blobs(self.hex, self.size)
        self.close(remove=True)
        return True

    def discard(self) -> None:
        with self._mutex:
            self.ranges = []
            if self._data_fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._data_fd, 0)
            with contextlib.suppress(OSError):
                os.unlink(self.ranges_path)
        self.cache.forget_unit(f"ingest/{self.hex}")

    def close(self, *, remove: bool = False) -> None:
        if not remove:
            self.flush()
        if self.cache.open_ingests.get(self.hex) is self:
            del self.cache.open_ingests[self.hex]
        for name in ("_data_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                if remove and name == "_lock_fd":
                    _remove_tree(self.dir)
                os.close(fd)
                setattr(self, name, None)


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        for child in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
        path.rmdir()


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

    # -- set-up ---------------------------------------------------------------------------------

    def open(self) -> None:
        for sub in ("blobs/sha256", "ingest", "chunks/sha256", "layers", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        # Files under tmp/ belong to writes that never finished (ours, or a crashed process's).
        cutoff = time.time() - 3600
        for p in (self.dir / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff or _pid_dead(p.name):
                    p.unlink()
        self.rescan()

    def rescan(self) -> None:
        """Recount what is on disk (other processes may share the directory)."""
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
        with self._lock:
            self._units = units
            self.total = sum(u.size for u in units.values())

    # -- bookkeeping ----------------------------------------------------------------------------

    def account(self, key: str, grown: int, layer: str | None) -> None:
        now = time.time()
        with self._lock:
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
        tmp = self._tmp()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
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

    def save_layer(self, rec: LayerRecord, toc_pieces: list[tuple[int, bytes]] | None) -> bool:
        hexd = hex_of(rec.blob_digest)
        d = self._layer_dir(hexd)
        grown = 0
        if toc_pieces is not None:
            blob = _pack_pieces(toc_pieces)
            old = _size_of(d / "toc")
            if not self._try_write(d / "toc", blob):
                return False
            grown += len(blob) - old
        body = json.dumps(rec.to_json(), indent=1, sort_keys=True).encode()
        old = _size_of(d / "layer.json")
        ok = self._try_write(d / "layer.json", body)
        if ok:
            grown += len(body) - old
        if ok or grown:
            self.account(f"layers/{hexd}", grown, hexd)
        return ok

    def load_layer(self, blob_digest: str) -> tuple[LayerRecord, list[tuple[int, bytes]]] | None:
        """The record and TOC bytes of a layer, or None if absent or unreadable."""
        hexd = hex_of(blob_digest)
        d = self._layer_dir(hexd)
        try:
            rec = LayerRecord.from_json(json.loads((d / "layer.json").read_bytes()))
            pieces = _unpack_pieces((d / "toc").read_bytes())
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
                yield LayerRecord.from_json(json.loads((d / "layer.json").read_bytes()))
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def save_profile(self, blob_digest: str, paths: list[str]) -> bool:
        hexd = hex_of(blob_digest)
        body = json.dumps({"files": paths}).encode()
        path = self._layer_dir(hexd) / "profile.json"
        old = _size_of(path)
        ok = self._try_write(path, body)
        if ok:
            self.account(f"layers/{hexd}", len(body) - old, hexd)
        return ok

    def load_profile(self, blob_digest: str) -> list[str]:
        path = self._layer_dir(hex_of(blob_digest)) / "profile.json"
        try:
            files = json.loads(path.read_bytes())["files"]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cache-corrupt profile %s: %s; ignoring it", path.name, exc)
            return []
        return [f for f in files if isinstance(f, str)]

    # -- use counts -----------------------------------------------------------------------------

    def save_uses(self, uses: dict[tuple[str, str], int]) -> bool:
        body = json.dumps([[r, d, n] for (r, d), n in sorted(uses.items()) if n > 0]).encode()
        return self._try_write(self.dir / "uses.json", body)

    def load_uses(self) -> dict[tuple[str, str], int]:
        try:
            raw = json.loads((self.dir / "uses.json").read_bytes())
            return {(str(r), str(d)): int(n) for r, d, n in raw if int(n) > 0}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            log.warning("cache-corrupt uses.json: %s; starting with no use counts", exc)
            return {}

    # -- eviction -------------------------------------------------------------------------------

    def evict(self, protected_layers: set[str], protected_chunks: set[str]) -> EvictReport:
        """Remove least recently used data until the cache is under its limit (with margin).

        Data of protected layers (podman uses them) goes last, and only if nothing else is left.
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
                if self._remove(key):
                    report.freed += u.size
                    report.removed += 1
                    report.protected_removed += pass_protected
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
                    _remove_tree(d)
                finally:
                    os.close(fd)
            elif kind == "layers":
                _remove_tree(self.dir / "layers" / name)
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


def _pack_pieces(pieces: list[tuple[int, bytes]]) -> bytes:
    head = json.dumps([[off, len(data)] for off, data in pieces]).encode() + b"\n"
    return head + b"".join(data for _, data in pieces)


def _unpack_pieces(blob: bytes) -> list[tuple[int, bytes]]:
    nl = blob.index(b"\n")
    spans = json.loads(blob[:nl])
    out: list[tuple[int, bytes]] = []
    pos = nl + 1
    for off, n in spans:
        if int(n) < 0 or pos + int(n) > len(blob):
            raise ValueError("TOC record is truncated")
        out.append((int(off), blob[pos : pos + int(n)]))
        pos += int(n)
    return out


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


def _pid_dead(name: str) -> bool:
    pid_text = name.partition(".")[0]
    if not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError as exc:
        return exc.errno != errno.EPERM
    return False
