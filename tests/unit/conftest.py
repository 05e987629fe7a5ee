"""Shared helpers for the format reader / extract / inspect unit tests.

The wrapping helpers here are deliberately tiny and independent of ``als.formats.writer``: they
let tests put an arbitrary (hostile) TOC JSON into an otherwise well-formed blob.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.support import gomade

# The Go-made fixtures (tests/fixtures/go-made), under the names the tests here use.
GO_MADE_DIR = gomade.GO_MADE_DIR
GO_BLOBS = gomade.GO_BLOBS


def sha256(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def go_blob(name: str) -> bytes:
    """A file of the Go-made fixtures (``tests/fixtures/go-made``); a missing one fails the test."""
    return gomade.go_made(name)


class CountingReader:
    """A ReadRanges over bytes that records every call."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.calls: list[list[tuple[int, int]]] = []

    def __call__(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls.append(list(ranges))
        out = []
        for off, n in ranges:
            assert off >= 0 and off + n <= len(self.blob), (off, n, len(self.blob))
            out.append(self.blob[off : off + n])
        return out


def gz(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def ustar_header(name: str, size: int) -> bytes:
    h = bytearray(512)
    h[0 : len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"        "
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def toc_bytes(toc: Any, *, indent: bool = True) -> bytes:
    """TOC JSON as stargz-snapshotter (tab-indented) or containers/storage (compact) write it."""
    if isinstance(toc, bytes):
        return toc
    if indent:
        return json.dumps(toc, indent="\t").encode()
    return json.dumps(toc, separators=(",", ":")).encode()


def wrap_estargz(region: bytes, toc: Any, *, legacy: bool = False) -> bytes:
    """data region + gzip(TOC tar) + 51-byte (or legacy 47-byte) footer."""
    js = toc_bytes(toc)
    pad = (-len(js)) % 512
    toc_member = gz(ustar_header("stargz.index.json", len(js)) + js + bytes(pad) + bytes(1024))
    off = len(region)
    if legacy:
        footer = b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x16\x00" + b"%016x" % off + b"STARGZ"
    else:
        footer = b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x1a\x00SG\x16\x00" + b"%016x" % off + b"STARGZ"
    footer += b"\x01\x00\x00\xff\xff" + bytes(8)
    return region + toc_member + footer


def skippable(payload: bytes) -> bytes:
    return b"\x50\x2a\x4d\x18" + struct.pack("<I", len(payload)) + payload


def wrap_zstd(
    region: bytes,
    toc: Any,
    *,
    footer: int = 40,
    magic: bytes | None = None,
    indent: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """data region + skippable(zstd(TOC)) [+ skippable(tar-split)] + skippable(footer).

    Returns the blob and the zstd:chunked annotations (new-style keys) describing it.
    """
    js = toc_bytes(toc, indent=indent)
    comp = zst(js)
    blob = region + skippable(comp)
    off = len(region) + 8
    head = struct.pack("<4Q", off, len(comp), len(js), 1)
    if footer == 40:
        payload = head + (magic or b"GnUlInUx")
    elif footer == 56:
        payload = head + (magic or b"GnUlInUx") + bytes(16)
    else:
        ts = zst(b'{"type":2,"payload":"","position":0}\n')
        ts_off = len(blob) + 8
        blob += skippable(ts)
        payload = head + struct.pack("<3Q", ts_off, len(ts), 40) + (magic or b"GNUlInUx")
    blob += skippable(payload)
    ann = {
        "io.github.containers.zstd-chunked.manifest-checksum": sha256(comp),
        "io.github.containers.zstd-chunked.manifest-position": f"{off}:{len(comp)}:{len(js)}:1",
    }
    return blob, ann


def simple_layer(
    files: dict[str, bytes], *, zstd: bool = False, chunk: int = 0, chunk_digests: bool = True
) -> tuple[bytes, dict[str, Any]]:
    """A data region with one member/frame per chunk of each file, and the matching TOC.

    The region holds file payloads only (no tar headers): enough for TOC readers.
    """
    comp = zst if zstd else gz
    region = bytearray(comp(b"\0" * 512))  # stands in for the first tar header(s)
    entries: list[dict[str, Any]] = []
    for name, data in files.items():
        e: dict[str, Any] = {"name": name, "type": "reg", "size": len(data), "mode": 0o644}
        e["digest"] = sha256(data)
        entries.append(e)
        if not data:
            continue
        step = chunk or len(data)
        for k, start in enumerate(range(0, len(data), step)):
            piece = data[start : start + step]
            rec = e if k == 0 else {"name": name, "type": "chunk", "chunkOffset": start}
            rec["offset"] = len(region)
            if step < len(data):
                rec["chunkSize"] = len(piece)
            if chunk_digests:
                rec["chunkDigest"] = sha256(piece)
            if k:
                entries.append(rec)
            region += comp(piece)
        region += comp(b"\0" * 512)  # padding + next header
    return bytes(region), {"version": 1, "entries": entries}


@pytest.fixture
def go_made_dir() -> Path:
    """The Go-made fixtures' folder; it is part of the repository, so it must be there."""
    assert GO_MADE_DIR.is_dir(), f"{GO_MADE_DIR} is missing"
    return GO_MADE_DIR
