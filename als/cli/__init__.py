"""The ``als`` command: the parser and a lazy dispatch to one module per subcommand.

Each subcommand lives in its own module (:mod:`als.cli.inspect`, :mod:`als.cli.extract`,
:mod:`als.cli.convert`, :mod:`als.cli.status`), imported only when it runs, so that building the
parser stays cheap and ``als status`` needs nothing beyond the standard library.
``als-mount`` is :mod:`als.cli.mount`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from als import __version__
from als.cli.convert import add_arguments as add_convert_arguments
from als.errors import AlsError
from als.paths import DEFAULT_ROOT


def _inspect(args: argparse.Namespace) -> int:
    from als.cli.inspect import inspect_main

    return inspect_main(args)


def _extract(args: argparse.Namespace) -> int:
    from als.cli.extract import extract_main

    return extract_main(args)


def _convert(args: argparse.Namespace) -> int:
    from als.cli.convert import convert_main

    return convert_main(args)


def _status(args: argparse.Namespace) -> int:
    from als.cli.status import status_main

    return status_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="als", description="lazy-pulling layer store for podman")
    p.add_argument("--version", action="version", version=f"als {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="describe a layer blob (file) or a remote image (REF)")
    ins.add_argument("target", help="a blob file, or an image reference such as host/repo:tag")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--annotations", metavar="FILE", help="JSON file of layer annotations")
    ins.add_argument("--probe", action="store_true", help="remote: read each blob's tail too")
    ins.add_argument("--platform", help="remote: os/arch[/variant] (default: this host)")
    ins.add_argument("--registries-conf", metavar="FILE", help="remote: registries.conf to use")
    ins.add_argument("--authfile", metavar="FILE", help="remote: credentials file")
    ins.set_defaults(func=_inspect)

    ext = sub.add_parser("extract", help="unpack a layer blob, verifying every byte")
    ext.add_argument("blob")
    ext.add_argument("dest")
    ext.add_argument("--annotations", metavar="FILE", help="JSON file of layer annotations")
    ext.add_argument(
        "--whiteouts",
        choices=["overlay", "aufs"],
        default="overlay",
        help="overlay: char 0/0 and opaque xattr (default); aufs: .wh. files as in the tar",
    )
    ext.set_defaults(func=_extract)

    conv = sub.add_parser(
        "convert",
        help="make a layer tar, or a whole image, lazily pullable (eStargz, zstd:chunked)",
    )
    add_convert_arguments(conv)
    conv.set_defaults(func=_convert)

    st = sub.add_parser("status", help="show the running store's cache, layers and fetches")
    st.add_argument("root", nargs="?", help=f"store root (default: {DEFAULT_ROOT})")
    st.add_argument("--json", action="store_true", help="print the raw status JSON")
    st.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 1) until Ctrl-C",
    )
    st.set_defaults(func=_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv and "convert" in argv[: argv.index("--")]:
        # `als convert SRC DEST --optimize -- CMD ARGS...`: the command is not parsed
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if command:
        args.command = command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        rc: int = args.func(args)
    except AlsError as exc:
        print(f"als: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`als convert ... | head`): stop quietly, as cat does, and keep
        # the interpreter from complaining again while it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    return rc
