"""Helpers shared by the disk cache tests."""

from __future__ import annotations

import hashlib

from als.store.cache import DiskCache, LayerRecord


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tmp_files(c: DiskCache) -> list[str]:
    return sorted(p.name for p in (c.dir / "tmp").iterdir())


def make_record(blob: bytes, toc: bytes = b"toc", refs: list[str] | None = None) -> LayerRecord:
    return LayerRecord(
        blob_digest=dg(blob),
        blob_size=len(blob),
        diff_id=dg(b"diff" + blob),
        toc_digest=dg(toc),
        media_type="application/vnd.oci.image.layer.v1.tar+zstd",
        format="zstd:chunked",
        annotations={"io.github.containers.zstd-chunked.manifest-position": "1:2:3:1"},
        refs=list(refs or ["example.com/img:1"]),
    )
