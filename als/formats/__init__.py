"""Readers for lazily-pullable layer formats (eStargz, eStargz-zstd, zstd:chunked).

Pure functions over bytes: no network, no FUSE, no trio. See docs/formats.md.
"""

from __future__ import annotations

from als.formats.builder import IndexBuilder
from als.formats.decode import decode_chunk, iter_file, read_file, verify_file
from als.formats.detect import (
    Footer,
    LayerAnnotations,
    detect_format,
    load_index,
    parse_footer,
    sniff_plain,
    tar_size,
)
from als.formats.model import (
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_FILE_SIZE,
    MAX_NAME,
    MAX_PATH,
    MAX_TOC_JSON,
    Chunk,
    Entry,
    EntryType,
    LayerIndex,
    ReadRanges,
)
from als.oci import FORMATS, LAZY_FORMATS

__all__ = [
    "FORMATS",
    "LAZY_FORMATS",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_FILE_SIZE",
    "MAX_NAME",
    "MAX_PATH",
    "MAX_TOC_JSON",
    "Chunk",
    "Entry",
    "EntryType",
    "Footer",
    "IndexBuilder",
    "LayerAnnotations",
    "LayerIndex",
    "ReadRanges",
    "decode_chunk",
    "detect_format",
    "iter_file",
    "load_index",
    "parse_footer",
    "read_file",
    "sniff_plain",
    "tar_size",
    "verify_file",
]
