"""``als extract BLOB DEST``: unpack a local lazily-pullable blob, verifying every byte.

The extraction itself is the library :mod:`als.extract`; this is its command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from als.cli.blobfile import load_annotations, open_blob
from als.errors import NotLazy
from als.extract import extract_index
from als.formats.detect import load_index


def extract_main(args: argparse.Namespace) -> int:
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
