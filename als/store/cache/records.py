"""What the store persists besides cached data, and the file formats it uses.

- ``layers/<hex>/layer.json``: a :class:`LayerRecord`, what a lookup resolved;
- ``layers/<hex>/toc``: the blob bytes the TOC was read from, as pieces (:func:`pack_toc`);
- ``layers/<hex>/profile.json``: the files readers opened first (learned prefetch);
- ``uses.json``: podman's use counts, per (reference, digest).

Encoding and decoding only: where the files live, how they are written and how their bytes
are counted is :class:`~als.store.cache.disk.DiskCache`'s business. Nothing read back is
trusted: the readers raise ValueError (records, TOC pieces) or log and return nothing
(profiles, use counts) on malformed content.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from als.digest import hex_of

log = logging.getLogger(__name__)

TocPieces = list[tuple[int, bytes]]
"""The TOC's bytes as (offset in the blob, bytes) pieces."""


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

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LayerRecord:
        return cls.from_json(json.loads(raw))


# -- TOC pieces ---------------------------------------------------------------------------------


def pack_toc(pieces: TocPieces) -> bytes:
    """A JSON line of ``[offset, length]`` pairs, then the pieces' bytes back to back."""
    head = json.dumps([[off, len(data)] for off, data in pieces]).encode() + b"\n"
    return head + b"".join(data for _, data in pieces)


def unpack_toc(blob: bytes) -> TocPieces:
    nl = blob.index(b"\n")
    spans = json.loads(blob[:nl])
    out: TocPieces = []
    pos = nl + 1
    for off, n in spans:
        if int(n) < 0 or pos + int(n) > len(blob):
            raise ValueError("TOC record is truncated")
        out.append((int(off), blob[pos : pos + int(n)]))
        pos += int(n)
    return out


# -- learned prefetch profile -------------------------------------------------------------------


def encode_profile(paths: list[str]) -> bytes:
    return json.dumps({"files": paths}).encode()


def read_profile(path: Path) -> list[str]:
    """The profile stored at ``path``: [] if there is none or it is unreadable."""
    try:
        files = json.loads(path.read_bytes())["files"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cache-corrupt profile %s: %s; ignoring it", path.name, exc)
        return []
    return [f for f in files if isinstance(f, str)]


# -- use counts ---------------------------------------------------------------------------------

UseCounts = dict[tuple[str, str], int]
"""podman's use counts, per (reference, digest)."""


def encode_uses(uses: UseCounts) -> bytes:
    return json.dumps([[r, d, n] for (r, d), n in sorted(uses.items()) if n > 0]).encode()


def read_uses(path: Path) -> UseCounts:
    """The use counts stored at ``path``: none if there is no file or it is unreadable."""
    try:
        raw = json.loads(path.read_bytes())
        return {(str(r), str(d)): int(n) for r, d, n in raw if int(n) > 0}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as exc:
        log.warning("cache-corrupt uses.json: %s; starting with no use counts", exc)
        return {}
