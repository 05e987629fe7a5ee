"""``als inspect REF``: describe a remote image's layers and whether als can serve them lazily."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from als.errors import AlsError, NotLazy
from als.oci import LAZY_FORMATS, format_of_descriptor, toc_digest_of
from als.registry.auth import CredentialStore
from als.registry.client import RegistryClient
from als.registry.config import RegistriesConf
from als.registry.types import LayerDescriptor


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
    try:
        from als.formats.detect import load_index
    except ImportError:
        report.probe_error = "als.formats is not available in this build: cannot probe"
        return

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
    _print_text(
        img.ref,
        img.manifest_digest,
        img.index_digest,
        img.platform,
        img.config_digest,
        img.source,
        reports,
    )
    return 0


def _print_text(
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
