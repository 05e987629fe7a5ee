"""Conversion records: each source layer is converted once per set of options.

A record is keyed by the source layer's digest and the options that shape the result (format,
chunk size, prioritized files, the record version); it names the converted blob, its DiffID,
media type and annotations, and where it was last pushed (for cross-repository mounts). The
converted blobs are kept next to the records, content-addressed and checked against their
digest when read, so a record whose blob is gone or damaged only costs a new conversion.

Layout under the record directory (default ``$XDG_CACHE_HOME/als/convert``)::

    records/<sha256 of the key>.json
    blobs/sha256/<hex>
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from als.digest import hex_of, is_digest, sha256_of
from als.fsutil import write_atomic

log = logging.getLogger(__name__)

RECORD_VERSION = 1


def default_record_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "als" / "convert"


def record_key(
    source_digest: str, fmt: str, chunk_size: int | None, prioritized: Sequence[str]
) -> str:
    text = json.dumps(
        {
            "v": RECORD_VERSION,
            "source": source_digest,
            "format": fmt,
            "chunk_size": chunk_size,
            "prioritized": list(prioritized),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Record:
    digest: str
    size: int
    diff_id: str
    media_type: str
    annotations: dict[str, str]
    format: str
    toc_digest: str
    pushed_to: list[str] = field(default_factory=list)  # "host/repository"


class RecordStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "records").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def _record_path(self, key: str) -> Path:
        return self.root / "records" / f"{key}.json"

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / hex_of(digest)

    def get(self, key: str) -> Record | None:
        """The record for ``key``, or None (missing or malformed: logged and ignored)."""
        path = self._record_path(key)
        try:
            raw = json.loads(path.read_bytes())
            rec = Record(
                digest=str(raw["digest"]),
                size=int(raw["size"]),
                diff_id=str(raw["diff_id"]),
                media_type=str(raw["media_type"]),
                annotations={str(k): str(v) for k, v in dict(raw["annotations"]).items()},
                format=str(raw["format"]),
                toc_digest=str(raw["toc_digest"]),
                pushed_to=[str(x) for x in raw.get("pushed_to") or []],
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring conversion record %s: %s", path.name, exc)
            return None
        if not (is_digest(rec.digest) and is_digest(rec.diff_id)) or rec.size < 0:
            log.warning("ignoring conversion record %s: bad digests", path.name)
            return None
        return rec

    def put(self, key: str, rec: Record) -> None:
        write_atomic(self._record_path(key), json.dumps(asdict(rec), sort_keys=True).encode())

    def load_blob(self, digest: str) -> bytes | None:
        """The stored blob, if present and intact."""
        try:
            data = self.blob_path(digest).read_bytes()
        except OSError:
            return None
        if sha256_of(data) != digest:
            log.warning("conversion record blob %s is damaged; converting again", digest)
            return None
        return data

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def save_blob(self, digest: str, data: bytes) -> None:
        if not self.has_blob(digest):
            write_atomic(self.blob_path(digest), data)
