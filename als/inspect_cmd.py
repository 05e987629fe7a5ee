"""``als inspect BLOB`` and ``als extract BLOB DEST`` for local blob files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from als.errors import AlsError, ConfigError, FormatError, NotLazy
from als.formats.decode import iter_file
from als.formats.detect import load_index
from als.formats.model import EntryType, LayerIndex, ReadRanges
from als.overlay import is_whiteout_name

_KIND_KEYS = {
    EntryType.REG: "regular_files",
    EntryType.DIR: "directories",
    EntryType.SYMLINK: "symlinks",
    EntryType.HARDLINK: "hardlinks",
    EntryType.CHAR: "devices",
    EntryType.BLOCK: "devices",
    EntryType.FIFO: "fifos",
}


@contextmanager
def open_blob(path: str) -> Iterator[tuple[ReadRanges, int, list[int]]]:
    """A ReadRanges over a local file (pread), its size, and a one-item read-call counter."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"cannot open {path}: {exc.strerror}") from None
    calls = [0]
    try:
        size = os.fstat(fd).st_size

        def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            calls[0] += 1
            out = []
            for off, n in ranges:
                if off < 0 or n < 0 or off + n > size:
                    raise FormatError(f"{path}: read [{off}, +{n}) outside the blob ({size} B)")
                b = os.pread(fd, n, off)
                if len(b) != n:
                    raise FormatError(f"{path}: short read at offset {off}")
                out.append(b)
            return out

        yield read, size, calls
    finally:
        os.close(fd)


def load_annotations(path: str | None) -> dict[str, str] | None:
    """A JSON object of annotations, or an OCI descriptor holding one under "annotations"."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read annotations file {path}: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), dict):
        doc = doc["annotations"]
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in doc.items()
    ):
        raise ConfigError(f"annotations file {path}: want a JSON object of strings")
    return doc


def _counts(index: LayerIndex) -> dict[str, int]:
    out = dict.fromkeys(
        ("regular_files", "directories", "symlinks", "hardlinks", "devices", "fifos"), 0
    )
    whiteouts = 0
    for i in index.iter_ids():
        t = index.type(i)
        out[_KIND_KEYS[t]] += 1
        if t != EntryType.DIR and is_whiteout_name(index.entry_name(i)):
            whiteouts += 1
    out["whiteouts"] = whiteouts
    return out


def verify_all(index: LayerIndex, read: ReadRanges) -> int:
    """Decode and verify every chunk of every regular file; returns the bytes checked."""
    total = 0
    for i in index.iter_ids():
        if index.type(i) == EntryType.REG and index.size(i):
            for piece in iter_file(index, i, read):
                total += len(piece)
    return total


def describe(path: str, annotations: dict[str, str] | None) -> dict[str, Any]:
    """Everything ``als inspect`` reports about a local blob, as a JSON-able dict."""
    with open_blob(path) as (read, size, _calls):
        info: dict[str, Any] = {"blob": path, "blob_size": size}
        try:
            index = load_index(read, size, annotations=annotations, layer=os.path.basename(path))
        except NotLazy as exc:
            info.update(format=exc.format, lazy=False, toc_digest=None, entries=None)
            info["verified"] = False
            return info
        counts = _counts(index)
        landmark: dict[str, Any] = {"type": None, "offset": None}
        if index.prefetch_end is not None:
            landmark = {"type": "prefetch", "offset": index.prefetch_end}
        elif index.no_prefetch:
            landmark = {"type": "no-prefetch", "offset": None}
        info.update(
            format=index.format,
            lazy=True,
            toc_digest=index.toc_digest,
            entries=len(index),
            **counts,
            chunks=index.chunk_count(),
            compressed_bytes=index.toc_offset,
            uncompressed_bytes=index.regular_bytes(),
            toc_offset=index.toc_offset,
            toc_size=index.toc_size,
            toc_json_size=index.toc_json_size,
            landmark=landmark,
            toc_verified_against_annotation=bool(
                annotations
                and any(
                    k in annotations
                    for k in (
                        "containerd.io/snapshot/stargz/toc.digest",
                        "io.github.containers.zstd-chunked.manifest-checksum",
                        "io.containers.zstd-chunked.manifest-checksum",
                    )
                )
            ),
        )
        try:
            verify_all(index, read)
            info["verified"] = True
        except AlsError as exc:
            info["verified"] = False
            info["error"] = str(exc)
        return info


def _print_text(info: dict[str, Any], out: Callable[[str], None]) -> None:
    out(f"format:        {info['format']} ({'lazy' if info['lazy'] else 'not lazily pullable'})")
    out(f"blob size:     {info['blob_size']} bytes")
    if not info["lazy"]:
        return
    out(f"toc digest:    {info['toc_digest']}")
    out(
        f"toc:           at {info['toc_offset']}, {info['toc_size']} bytes stored, "
        f"{info['toc_json_size']} bytes JSON"
    )
    out(
        f"entries:       {info['entries']} (regular {info['regular_files']}, directories "
        f"{info['directories']}, symlinks {info['symlinks']}, hardlinks {info['hardlinks']}, "
        f"devices {info['devices']}, fifos {info['fifos']}, whiteouts {info['whiteouts']})"
    )
    out(f"compressed:    {info['compressed_bytes']} bytes of file data in {info['chunks']} chunks")
    out(f"uncompressed:  {info['uncompressed_bytes']} bytes in regular files")
    lm = info["landmark"]
    lms = lm["type"] or "none"
    if lm["offset"] is not None:
        lms += f" (prefetch [0, {lm['offset']}))"
    out(f"landmark:      {lms}")
    how = "TOC digest matched the annotation; " if info["toc_verified_against_annotation"] else ""
    verdict = f"yes ({how}every chunk and file digest checked)" if info["verified"] else "NO"
    out(f"verified:      {verdict}")
    if "error" in info:
        out(f"error:         {info['error']}")


def inspect_blob(args: argparse.Namespace) -> int:
    info = describe(args.target, load_annotations(args.annotations))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _print_text(info, print)
    if info["lazy"] and not info["verified"]:
        print(f"als: error: {info.get('error', 'verification failed')}", file=sys.stderr)
        return 1
    return 0


def extract_blob(args: argparse.Namespace) -> int:
    from als.extract import extract_index

    annotations = load_annotations(args.annotations)
    with open_blob(args.blob) as (read, size, _calls):
        try:
            index = load_index(
                read, size, annotations=annotations, layer=os.path.basename(args.blob)
            )
        except NotLazy as exc:
            raise NotLazy(
                exc.format,
                f"{args.blob} is a plain {exc.format} layer, not lazily pullable: als extract "
                "only unpacks eStargz and zstd:chunked blobs (use tar -x for this one)",
            ) from None
        stats = extract_index(index, read, args.dest, whiteouts=args.whiteouts)
    print(
        f"extracted {stats.entries} entries ({stats.files} files, {stats.bytes} bytes, "
        f"{stats.whiteouts} whiteouts) to {args.dest}",
        file=sys.stderr,
    )
    return 0
