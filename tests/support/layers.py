"""Test helpers: build layer blobs with the project's writers.

Keep this small and stable: FUSE, store and end-to-end tests build their layers through it.

    layer = make_layer({"etc/os-release": b"ID=test\\n", "bin/sh": FileSpec(type="symlink",
                        link="busybox")}, "zstd-chunked")
    layer.blob, layer.digest, layer.diff_id, layer.annotations, layer.media_type
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from als.formats.writer import BuiltLayer, build_estargz, build_gzip, build_zstd, build_zstd_chunked
from tests.support.gomade import GO_MADE_DIR, go_made
from tests.support.tarspec import FileSpec, tar_from_spec

__all__ = [
    "ALL_FORMATS",
    "GO_MADE",
    "LAZY_FORMATS",
    "BuiltLayer",
    "FileSpec",
    "go_made",
    "make_layer",
    "make_tar",
    "noise",
]

# Names accepted by make_layer. The lazy ones are what the store serves lazily.
LAZY_FORMATS: tuple[str, ...] = (
    "estargz",
    "estargz-zstd",
    "zstd-chunked",
    "zstd-chunked-1.43",
    "stargz-legacy",
)
ALL_FORMATS: tuple[str, ...] = (*LAZY_FORMATS, "gzip", "zstd")

Spec = Mapping[str, bytes | str | FileSpec]

# tests/fixtures/go-made: blobs written by the real Go producers (see tests/support/gomade.py).
GO_MADE = GO_MADE_DIR


def make_tar(spec: Spec, **kwargs: Any) -> bytes:
    """``tar_from_spec``: a deterministic tar; implied parent dirs are added before children."""
    return tar_from_spec(spec, **kwargs)


def make_layer(
    spec: Spec | bytes,
    fmt: str = "estargz",
    *,
    chunk_size: int | None = None,
    prioritized: Sequence[str] | None = None,
    **kwargs: Any,
) -> BuiltLayer:
    """Build a layer from a ``{path: content | FileSpec}`` spec (or a ready tar) in ``fmt``.

    ``fmt``: estargz, estargz-zstd, stargz-legacy, zstd-chunked (current layout),
    zstd-chunked-1.43, gzip or zstd. ``chunk_size``: eStargz chunk size (default 4 MiB), or a
    fixed zstd:chunked chunk size (default: rolling checksum). Other keyword arguments go to the
    writer.
    """
    tar = spec if isinstance(spec, bytes) else tar_from_spec(spec)
    if fmt in ("estargz", "estargz-zstd", "stargz-legacy"):
        if chunk_size is not None:
            kwargs["chunk_size"] = chunk_size
        return build_estargz(
            tar,
            compression="zstd" if fmt == "estargz-zstd" else "gzip",
            legacy_footer=fmt == "stargz-legacy",
            prioritized=prioritized,
            **kwargs,
        )
    if fmt in ("zstd-chunked", "zstd-chunked-1.43"):
        if chunk_size is not None:
            kwargs.update(chunking="fixed", chunk_size=chunk_size)
        return build_zstd_chunked(
            tar, layout="1.43" if fmt == "zstd-chunked-1.43" else "current", **kwargs
        )
    if fmt == "gzip":
        return build_gzip(tar, **kwargs)
    if fmt == "zstd":
        return build_zstd(tar, **kwargs)
    raise ValueError(f"unknown layer format {fmt!r}; choose from {ALL_FORMATS}")


def noise(name: str, n: int) -> bytes:
    """``n`` incompressible bytes, the same for the same ``name`` (a SHA-256 chain)."""
    out = bytearray()
    seed = name.encode()
    while len(out) < n:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:n])
