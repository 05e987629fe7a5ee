"""Partial downloads: a sparse data file per blob and the record of which ranges it holds.

Layout under the cache directory::

    ingest/<hex>/data           a blob being downloaded (sparse), plus
    ingest/<hex>/ranges         the byte ranges of ``data`` that were written (JSON)
    ingest/<hex>/lock           flock held by the one process that writes this download

A download is verified as a whole against its digest before it moves to ``blobs/``. Blocking,
like the rest of the cache.
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
from typing import TYPE_CHECKING

from als.fsutil import remove_dir
from als.ranges import covers, merge, subtract

if TYPE_CHECKING:
    from als.store.cache.disk import DiskCache

log = logging.getLogger(__name__)

_RECORD_EVERY = 1.0  # seconds between rewrites of a download's ranges record
_RECORD_NOW = 256 * 1024  # a write at least this large is recorded at once


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
        # finish() moves the data file to blobs/ while readers may still look here.
        for path in (self.data_path, self.cache.blob_file(self.hex)):
            try:
                with open(path, "rb") as f:
                    data = os.pread(f.fileno(), length, offset)
            except OSError:
                continue
            return data if len(data) == length else None
        return None

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
                    remove_dir(self.dir)
                os.close(fd)
                setattr(self, name, None)
