"""The Go-made layer blobs in ``tests/fixtures/go-made`` (provenance in its README.md).

Written by the real Go producers (stargz-snapshotter's estargz 0.12, containers/storage 1.43)
from the same ``in.tar``, they are the interoperability vectors of the format tests and seeds of
the fuzzers. They are part of the repository: a missing file is an error, never a skip.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

GO_MADE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "go-made"
GO_BLOBS = ("esgz.bin", "esgz-zstd.bin", "zchunked.bin", "legacy-stargz-footer47.bin")
# The layer annotations a registry would carry for the blobs (from the README).
GO_ANNOTATIONS: Mapping[str, Mapping[str, str]] = {
    "esgz-zstd.bin": {"io.containers.zstd-chunked.manifest-position": "1536:790:2443:1"},
    "zchunked.bin": {"io.containers.zstd-chunked.manifest-position": "1105:622:2088:1"},
}


def go_made(name: str) -> bytes:
    """The bytes of one fixture file (``in.tar`` or a blob); raises if it is missing."""
    path = GO_MADE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"Go-made fixture {name} is missing from {GO_MADE_DIR}")
    return path.read_bytes()
