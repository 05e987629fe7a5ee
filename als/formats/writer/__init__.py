"""Layer writers: eStargz (gzip and zstd), containers/storage zstd:chunked, plain gzip/zstd.

Pure functions, bytes in and bytes out. They exist for tests (every reader test builds its blobs
here) and for users (``als convert``). The layouts follow the reference notes on the formats;
each writer's module describes its own:

* ``estargz.py``: :func:`build_estargz` (eStargz, its zstd variant, legacy stargz) and landmarks;
* ``zstd_chunked.py``: :func:`build_zstd_chunked` and the rolling-checksum chunker;
* ``common.py``: :class:`BuiltLayer`, compression units, tar headers, times, TOC helpers and the
  plain :func:`build_gzip` / :func:`build_zstd`.

Input headers are never re-serialised: the writers copy the raw header blocks of the input tar
(see ``tarsplit.scan_tar``). Only the TOC entry and the landmark files get headers written here.
"""

from __future__ import annotations

from als.formats.model import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME
from als.formats.writer.common import BuiltLayer, build_gzip, build_zstd
from als.formats.writer.estargz import build_estargz
from als.formats.writer.zstd_chunked import build_zstd_chunked, rollsum_chunks
from als.oci import (
    ANN_LEGACY_MANIFEST_CHECKSUM,
    ANN_LEGACY_MANIFEST_POSITION,
    ANN_MANIFEST_CHECKSUM,
    ANN_MANIFEST_POSITION,
    ANN_TARSPLIT_POSITION,
    ANN_TOC_DIGEST,
    ANN_UNCOMPRESSED_SIZE,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
)

__all__ = [
    "ESTARGZ_UNCOMPRESSED_SIZE",
    "GZIP_MEDIA_TYPE",
    "LEGACY_MANIFEST_CHECKSUM",
    "LEGACY_MANIFEST_POSITION",
    "MANIFEST_CHECKSUM",
    "MANIFEST_POSITION",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TARSPLIT_POSITION",
    "TOC_DIGEST",
    "TOC_TAR_NAME",
    "ZSTD_MEDIA_TYPE",
    "BuiltLayer",
    "build_estargz",
    "build_gzip",
    "build_zstd",
    "build_zstd_chunked",
    "rollsum_chunks",
]

# The writer API's names for facts defined in als.oci and als.formats.model.
GZIP_MEDIA_TYPE = OCI_LAYER_GZIP
ZSTD_MEDIA_TYPE = OCI_LAYER_ZSTD
TOC_DIGEST = ANN_TOC_DIGEST
ESTARGZ_UNCOMPRESSED_SIZE = ANN_UNCOMPRESSED_SIZE
MANIFEST_CHECKSUM = ANN_MANIFEST_CHECKSUM
MANIFEST_POSITION = ANN_MANIFEST_POSITION
TARSPLIT_POSITION = ANN_TARSPLIT_POSITION
LEGACY_MANIFEST_CHECKSUM = ANN_LEGACY_MANIFEST_CHECKSUM
LEGACY_MANIFEST_POSITION = ANN_LEGACY_MANIFEST_POSITION
TOC_TAR_NAME = TOC_NAME
