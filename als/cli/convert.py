"""``als convert``: a layer tar into a layer blob, or a whole image into a lazily pullable one.

``als convert FILE.tar OUT``: one layer (plain, gzip or zstd tar in; the blob out).
``als convert SRC DEST``: SRC and DEST are ``docker://REF`` or ``oci:DIR[:TAG]`` (and SRC also
``containers-storage:REF``); the work is :mod:`als.convert`'s, this module only parses and
prints. The parser in :mod:`als.cli` imports this module, so it imports the writers, the
registry client and zstandard only when a conversion runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from als.errors import AlsError, ConfigError
from als.oci import CONVERT_FORMATS, IMAGE_FORMATS

__all__ = ["CONVERT_FORMATS", "IMAGE_FORMATS", "add_arguments", "convert_main"]

IMAGE_PREFIXES = ("docker://", "oci:", "containers-storage:")


def add_arguments(conv: argparse.ArgumentParser) -> None:
    conv.add_argument(
        "src",
        help="a tar (plain, gzip or zstd), or an image: docker://REF, "
        "oci:DIR[:TAG], containers-storage:REF",
    )
    conv.add_argument("dest", help="a blob file, or an image: docker://REF, oci:DIR[:TAG]")
    conv.set_defaults(command=[])
    conv.epilog = "--optimize runs the image's entrypoint/cmd, or the command after --"
    conv.add_argument(
        "--format",
        choices=CONVERT_FORMATS,
        default="estargz",
        help="layer format (default: estargz; images: " + ", ".join(IMAGE_FORMATS) + ")",
    )
    conv.add_argument(
        "--chunk-size",
        type=int,
        metavar="N",
        help="eStargz chunk size (default 4 MiB); zstd:chunked: fixed N-byte chunks instead of "
        "the rolling checksum",
    )
    conv.add_argument(
        "--prioritize",
        action="append",
        metavar="PATH",
        help="layer: put PATH first, before .prefetch.landmark (repeatable)",
    )
    conv.add_argument("--prioritize-file", metavar="FILE", help="layer: paths, one per line")
    conv.add_argument(
        "--annotations-out", metavar="FILE", help="layer: also write the layer annotations"
    )
    conv.add_argument("--platform", help="image: os/arch[/variant] or all (default: this host)")
    conv.add_argument("--json", action="store_true", help="image: print the result as JSON")
    conv.add_argument(
        "--record-dir", metavar="DIR", help="image: conversion records (default ~/.cache/als)"
    )
    conv.add_argument("--no-record", action="store_true", help="image: keep no records")
    conv.add_argument("--registries-conf", metavar="FILE", help="image: registries.conf to use")
    conv.add_argument("--authfile", metavar="FILE", help="image: credentials file")
    conv.add_argument(
        "--optimize",
        action="store_true",
        help="image: run it with podman, put the files it opens first",
    )
    conv.add_argument(
        "--optimize-seconds", type=float, default=10.0, metavar="N", help="run time (default 10)"
    )
    conv.add_argument(
        "--optimize-allow-failure",
        action="store_true",
        help="keep what was recorded when the command fails",
    )
    conv.add_argument(
        "--optimize-network", action="store_true", help="give the optimize run a network"
    )
    conv.add_argument(
        "--optimize-run-arg",
        action="append",
        metavar="ARG",
        help="an extra podman run argument, e.g. --optimize-run-arg=--runtime=runc (repeatable)",
    )


def convert_main(args: argparse.Namespace) -> int:
    if args.src.startswith(IMAGE_PREFIXES) or args.dest.startswith(IMAGE_PREFIXES):
        return _image_main(args)
    if args.command or args.optimize:
        raise ConfigError("--optimize and a command need an image (docker://, oci:...)")
    return _layer_main(args)


# ---- one layer --------------------------------------------------------------------------------


def _layer_main(args: argparse.Namespace) -> int:
    """Write the blob to DEST and print a JSON description on stdout.

    ``--annotations-out FILE`` also writes the layer annotations (a plain JSON object of
    strings, the form ``als inspect --annotations`` reads).
    """
    from als.convert.layer import build, read_tar
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
    if prioritized and args.format not in ("estargz", "estargz-zstd"):
        raise ConfigError(f"prioritized files need an eStargz format, not {args.format}")
    layer = build(
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
    out = {
        "format": layer.format,
        "digest": layer.digest,
        "size": layer.size,
        "diff_id": layer.diff_id,
        "toc_digest": layer.toc_digest,
        "media_type": layer.media_type,
        "annotations": layer.annotations,
    }
    print(json.dumps(out, indent=2))
    return 0


# ---- whole images -----------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """One line per event on stderr when it is a terminal (or always with ``verbose``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()

    def __call__(self, e: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = e.get("event")
        if kind == "layer":
            line = (
                f"layer {e['index']}/{e['count']} {e['platform']} {e['source'][7:19]} "
                f"{e['source_format']} -> {e['action']}"
            )
            if e["action"] == "converted":
                line += (
                    f": {_mb(e['bytes_in'])} in, {_mb(e['bytes_out'])} out, {e['seconds']:.1f}s,"
                    f" {e['files_verified']} files verified"
                )
        elif kind == "write":
            line = f"blob {e['digest'][7:19]}: {e['how']} ({_mb(e['size'])})"
        else:
            line = str(e.get("message", e))
        print(f"[{time.monotonic() - self.start:6.1f}s] {line}", file=sys.stderr, flush=True)


def _image_main(args: argparse.Namespace) -> int:
    from als.convert.run import Request, convert_image

    if args.prioritize or args.prioritize_file or args.annotations_out:
        raise ConfigError("--prioritize, --prioritize-file and --annotations-out are for layers")
    req = Request(
        src=args.src,
        dest=args.dest,
        fmt=args.format,
        platform=args.platform,
        chunk_size=args.chunk_size,
        record_dir=args.record_dir,
        no_record=args.no_record,
        registries_conf=args.registries_conf,
        authfile=args.authfile,
        optimize=args.optimize,
        optimize_seconds=args.optimize_seconds,
        optimize_command=list(args.command),
        optimize_allow_failure=args.optimize_allow_failure,
        optimize_network=args.optimize_network,
        podman_run_args=list(args.optimize_run_arg or []),
    )
    if args.command and not args.optimize:
        raise ConfigError("a command after -- is only used with --optimize")
    result = convert_image(req, _Progress(sys.stderr.isatty() or bool(args.verbose)))
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
        return 0
    layers = [ly for im in result.images for ly in im.layers]
    converted = sum(1 for ly in layers if ly.action == "converted")
    print(
        f"{result.destination}@{result.digest}: {len(result.images)} image(s), "
        f"{len(layers)} layers ({converted} converted, "
        f"{sum(1 for ly in layers if ly.action == 'recorded')} from records, "
        f"{sum(1 for ly in layers if ly.action == 'kept')} kept), "
        f"{_mb(result.written_bytes)} written, {result.seconds:.1f}s"
    )
    return 0
