"""``als inspect BLOB|REF``: describe a local layer blob, or a remote image's layers and
whether als can serve them lazily.

A path that exists is a local blob (parsed and verified here); anything else is an image
reference, resolved through :mod:`als.registry` (imported only then).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from als.cli.blobfile import load_annotations, open_blob
from als.errors import AlsError, NotLazy
from als.formats.decode import iter_file
from als.formats.detect import load_index
from als.formats.model import EntryType, LayerIndex, ReadRanges
from als.oci import LAZY_FORMATS, TOC_DIGEST_KEYS, format_of_descriptor, toc_digest_of
from als.overlay import is_whiteout_name

if TYPE_CHECKING:
    from als.registry import LayerDescriptor, RegistryClient


def inspect_main(args: argparse.Namespace) -> int:
    # A path that exists is a local blob; anything else is a remote image reference.
    if os.path.exists(args.target):
        return inspect_blob(args)
    return inspect_remote(args)


# -- a local blob --

_KIND_KEYS = {
    EntryType.REG: "regular_files",
    EntryType.DIR: "directories",
    EntryType.SYMLINK: "symlinks",
    EntryType.HARDLINK: "hardlinks",
    EntryType.CHAR: "devices",
    EntryType.BLOCK: "devices",
    EntryType.FIFO: "fifos",
}


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
                annotations and any(k in annotations for k in TOC_DIGEST_KEYS)
            ),
        )
        try:
            verify_all(index, read)
            info["verified"] = True
        except AlsError as exc:
            info["verified"] = False
            info["error"] = str(exc)
        return info


def _print_blob_text(info: dict[str, Any], out: Callable[[str], None]) -> None:
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
        _print_blob_text(info, print)
    if info["lazy"] and not info["verified"]:
        print(f"als: error: {info.get('error', 'verification failed')}", file=sys.stderr)
        return 1
    return 0


# -- a remote image --


@dataclass
class LayerReport:
    index: int
    digest: str
    size: int
    media_type: str
    diff_id: str | None
    format: str
    format_source: str  # "annotations", "media type" or "probe"
    toc_digest: str | None
    lazy: bool
    reason: str
    probe_error: str | None = None
    entries: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def format_from_descriptor(desc: LayerDescriptor) -> tuple[str, str | None]:
    """(format, TOC digest) as far as the manifest's descriptor tells."""
    fmt = format_of_descriptor(desc.media_type, desc.annotations)
    return fmt, (toc_digest_of(desc.annotations) if fmt in LAZY_FORMATS else None)


def _lazy(fmt: str, toc_digest: str | None, diff_id: str | None) -> tuple[bool, str]:
    if fmt not in LAZY_FORMATS:
        return False, f"{fmt} layers have no TOC"
    if not toc_digest:
        return False, "no TOC digest in the layer annotations (podman looks layers up by it)"
    if not diff_id:
        return False, "the image config has no DiffID for this layer (podman will not use an ALS)"
    return True, "ok"


def _probe(client: RegistryClient, ref: str, desc: LayerDescriptor, report: LayerReport) -> None:
    def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return client.fetch_ranges(ref, desc.digest, ranges)

    try:
        index = load_index(read, desc.size, annotations=dict(desc.annotations), layer=desc.digest)
    except NotLazy as exc:
        report.format, report.format_source = exc.format, "probe"
        report.lazy, report.reason = False, f"{exc.format} layers have no TOC"
        return
    except AlsError as exc:
        report.probe_error = str(exc)
        report.lazy, report.reason = False, f"probe failed: {exc}"
        return
    report.format, report.format_source = index.format, "probe"
    report.toc_digest = report.toc_digest or index.toc_digest
    report.entries = len(index)
    report.lazy, report.reason = _lazy(index.format, report.toc_digest, desc.diff_id)


def inspect_remote(args: argparse.Namespace) -> int:
    from als.registry import CredentialStore, RegistriesConf, RegistryClient

    conf = RegistriesConf.load(getattr(args, "registries_conf", None))
    authfile = getattr(args, "authfile", None)
    creds = (
        CredentialStore.from_file(authfile) if authfile else CredentialStore.from_default_files()
    )
    with RegistryClient(registries_conf=conf, credentials=creds, max_retry_time=30) as client:
        img = client.resolve(args.target, platform=getattr(args, "platform", None))
        reports = []
        for i, desc in enumerate(img.layers):
            fmt, toc = format_from_descriptor(desc)
            lazy, reason = _lazy(fmt, toc, desc.diff_id)
            rep = LayerReport(
                i,
                desc.digest,
                desc.size,
                desc.media_type,
                desc.diff_id,
                fmt,
                "annotations" if toc else "media type",
                toc,
                lazy,
                reason,
            )
            if getattr(args, "probe", False):
                _probe(client, str(img.ref), desc, rep)
            reports.append(rep)
        stats = client.stats.snapshot()
    if getattr(args, "json", False):
        doc = {
            "ref": str(img.ref),
            "manifest_digest": img.manifest_digest,
            "index_digest": img.index_digest,
            "platform": img.platform,
            "config_digest": img.config_digest,
            "source": img.source,
            "layers": [r.as_json() for r in reports],
            "requests": stats["requests"],
            "bytes_received": stats["bytes_received"],
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _print_remote_text(
        img.ref,
        img.manifest_digest,
        img.index_digest,
        img.platform,
        img.config_digest,
        img.source,
        reports,
    )
    return 0


def _print_remote_text(
    ref: object,
    manifest: str,
    index: str | None,
    platform: str,
    config: str,
    source: str,
    reports: Sequence[LayerReport],
) -> None:
    out = sys.stdout
    print(f"image:     {ref}", file=out)
    print(f"manifest:  {manifest}" + (f"  (from index {index})" if index else ""), file=out)
    print(f"platform:  {platform}", file=out)
    print(f"config:    {config}", file=out)
    print(f"source:    {source}", file=out)
    lazy_n = sum(r.lazy for r in reports)
    print(f"layers:    {len(reports)} ({lazy_n} lazily pullable)", file=out)
    for r in reports:
        rows: Mapping[str, object] = {
            "size": f"{r.size} bytes",
            "media type": r.media_type,
            "diff id": r.diff_id or "-",
            "format": f"{r.format} (from {r.format_source})",
            "toc digest": r.toc_digest or "-",
            "lazy": "yes" if r.lazy else f"no: {r.reason}",
        }
        print(f"\nlayer {r.index}: {r.digest}", file=out)
        for k, v in rows.items():
            print(f"  {k + ':':12} {v}", file=out)
        if r.entries is not None:
            print(f"  {'entries:':12} {r.entries}", file=out)
        if r.probe_error:
            print(f"  {'probe:':12} {r.probe_error}", file=out)
