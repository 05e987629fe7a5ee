"""``als convert``: turn a tar (plain, gzip or zstd) into a layer blob of a chosen format.

The parser in :mod:`als.cli` imports :data:`CONVERT_FORMATS` from here, so this module imports
the writers and zstandard only when a conversion runs: building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from als.errors import AlsError, ConfigError, FormatError

if TYPE_CHECKING:
    from als.formats.writer import BuiltLayer

DEFAULT_ESTARGZ_CHUNK = 4 << 20
CONVERT_FORMATS = ("estargz", "estargz-zstd", "zstd-chunked", "zstd-chunked-1.43", "gzip", "zstd")
"""What ``als convert --format`` accepts (the parser's choices)."""


def read_tar(data: bytes, *, name: str = "input") -> bytes:
    """Return the uncompressed tar: gzip and zstd input is sniffed and decompressed."""
    if data[:3] == b"\x1f\x8b\x08":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise FormatError(f"{name}: invalid gzip data: {exc}") from None
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        try:
            with zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data), read_across_frames=True
            ) as r:
                return r.read()
        except zstandard.ZstdError as exc:
            raise FormatError(f"{name}: invalid zstd data: {exc}") from None
    return data


def convert(
    tar: bytes,
    fmt: str,
    *,
    chunk_size: int | None = None,
    prioritized: Sequence[str] = (),
) -> BuiltLayer:
    """Build ``fmt`` (one of CONVERT_FORMATS) from an uncompressed tar."""
    from als.formats.writer import build_estargz, build_gzip, build_zstd, build_zstd_chunked

    if chunk_size is not None and chunk_size <= 0:
        raise ConfigError(f"--chunk-size must be positive, not {chunk_size}")
    if prioritized and fmt not in ("estargz", "estargz-zstd"):
        raise ConfigError(f"prioritized files need an eStargz format, not {fmt}")
    if fmt in ("estargz", "estargz-zstd"):
        return build_estargz(
            tar,
            compression="zstd" if fmt == "estargz-zstd" else "gzip",
            prioritized=list(prioritized) or None,
            chunk_size=chunk_size or DEFAULT_ESTARGZ_CHUNK,
        )
    if fmt in ("zstd-chunked", "zstd-chunked-1.43"):
        layout: Literal["current", "1.43"] = "1.43" if fmt == "zstd-chunked-1.43" else "current"
        if chunk_size:
            return build_zstd_chunked(tar, layout=layout, chunking="fixed", chunk_size=chunk_size)
        return build_zstd_chunked(tar, layout=layout)
    if fmt == "gzip":
        return build_gzip(tar)
    if fmt == "zstd":
        return build_zstd(tar)
    raise ConfigError(f"unknown format {fmt!r}; choose from {', '.join(CONVERT_FORMATS)}")


def describe(layer: BuiltLayer) -> dict[str, object]:
    return {
        "format": layer.format,
        "digest": layer.digest,
        "size": layer.size,
        "diff_id": layer.diff_id,
        "toc_digest": layer.toc_digest,
        "media_type": layer.media_type,
        "annotations": layer.annotations,
    }


def convert_main(args: argparse.Namespace) -> int:
    """CLI entry: writes the blob to DEST and prints a JSON description on stdout.

    ``--annotations-out FILE`` also writes the layer annotations (a plain JSON object of
    strings, the form ``als inspect --annotations`` reads).
    """
    from als.fsutil import write_atomic

    src = Path(args.src)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise AlsError(f"cannot read {src}: {exc.strerror}") from None
    prioritized = list(args.prioritize or [])
    if args.prioritize_file:
        try:
            text = Path(args.prioritize_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise AlsError(f"cannot read {args.prioritize_file}: {exc.strerror}") from None
        prioritized += [line.strip() for line in text.splitlines() if line.strip()]
    layer = convert(
        read_tar(data, name=str(src)),
        args.format,
        chunk_size=args.chunk_size,
        prioritized=prioritized,
    )
    try:
        write_atomic(Path(args.dest), layer.blob)
        if args.annotations_out:
            write_atomic(
                Path(args.annotations_out),
                (json.dumps(layer.annotations, indent=2, sort_keys=True) + "\n").encode(),
            )
    except OSError as exc:
        raise AlsError(f"cannot write {exc.filename or args.dest}: {exc.strerror}") from None
    print(json.dumps(describe(layer), indent=2))
    return 0
