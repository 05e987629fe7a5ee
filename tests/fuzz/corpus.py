"""Seed inputs for the format fuzzers: valid layers made with the project's writer, the Go-made
fixtures (tests/fixtures/go-made), and the pieces the parsers see (footers, TOC JSON, zstd
frames, tars, tar-split documents).

Everything here is deterministic and built once per process.
"""

from __future__ import annotations

import functools
import json
import struct
import zlib
from collections.abc import Mapping

import zstandard

from als.formats.detect import parse_footer
from als.formats.tarsplit import build_tarsplit
from als.formats.writer import BuiltLayer, build_estargz, build_zstd_chunked
from tests.support.gomade import GO_ANNOTATIONS, GO_BLOBS, go_made
from tests.support.tarspec import FileSpec, tar_from_spec

SPEC: dict[str, bytes | str | FileSpec] = {
    "etc/os-release": b"ID=fuzz\n",
    "bin/tool": FileSpec(content=bytes(range(256)) * 20, mode=0o4755),
    "bin/sh": FileSpec(type="symlink", link="/bin/tool"),
    "bin/hl": FileSpec(type="hardlink", link="bin/tool"),
    "dev/null": FileSpec(type="char", devmajor=1, devminor=3, mode=0o666),
    "run/fifo": FileSpec(type="fifo"),
    "data/zeros": bytes(3000) + b"tail",
    "data/x": FileSpec(content=b"xattr", xattrs={"user.k": b"v\0w"}, uid=1000, gid=1000),
    "empty": b"",
}
LAZY = ("estargz", "estargz-zstd", "zstd-chunked", "zstd-chunked-1.43", "stargz-legacy")


@functools.cache
def seed_tar() -> bytes:
    return tar_from_spec(SPEC)


@functools.cache
def seed_layers() -> dict[str, BuiltLayer]:
    """One small layer per lazy format, small chunks so that files have several."""
    tar = seed_tar()
    return {
        "estargz": build_estargz(tar, chunk_size=512),
        "estargz-zstd": build_estargz(tar, chunk_size=512, compression="zstd"),
        "stargz-legacy": build_estargz(tar, chunk_size=1024, legacy_footer=True),
        "zstd-chunked": build_zstd_chunked(tar, chunking="fixed", chunk_size=700),
        "zstd-chunked-1.43": build_zstd_chunked(tar, layout="1.43"),
    }


@functools.cache
def go_blobs() -> dict[str, bytes]:
    return {name: go_made(name) for name in GO_BLOBS}


@functools.cache
def go_tar() -> bytes:
    return go_made("in.tar")


def all_blobs() -> list[tuple[str, bytes, Mapping[str, str]]]:
    """(name, blob, annotations) of every seed layer."""
    out: list[tuple[str, bytes, Mapping[str, str]]] = [
        (f, lay.blob, lay.annotations) for f, lay in seed_layers().items()
    ]
    out += [(n, b, GO_ANNOTATIONS.get(n, {})) for n, b in go_blobs().items()]
    return out


def toc_json(blob: bytes) -> bytes:
    """The uncompressed TOC JSON of a (valid) lazy blob."""
    footer = parse_footer(blob[-64 * 1024 :], len(blob))
    assert footer is not None
    region = blob[footer.start : footer.start + footer.length]
    if footer.kind.startswith("zstd"):
        return zstandard.ZstdDecompressor().stream_reader(region, read_across_frames=True).read()
    tar = zlib.decompressobj(31).decompress(region)
    size = int(tar[124:136].split(b"\0")[0], 8)
    return tar[512 : 512 + size]


@functools.cache
def seed_tocs() -> list[bytes]:
    return [toc_json(b) for _, b, _ in all_blobs()]


@functools.cache
def seed_toc_docs() -> list[dict[str, object]]:
    return [json.loads(t) for t in seed_tocs()]


def tails(n: int = 128) -> list[bytes]:
    return [b[-n:] for _, b, _ in all_blobs()]


@functools.cache
def seed_zstd_frames() -> list[bytes]:
    c = zstandard.ZstdCompressor(write_checksum=True)
    plain = [b"", b"hello", bytes(5000), bytes(range(256)) * 8]
    frames = [c.compress(p) for p in plain]
    skip = b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"abcd"
    frames.append(frames[1] + skip + frames[2])
    frames.append(zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 3000))
    return frames


@functools.cache
def seed_gzip_members() -> list[bytes]:
    def gz(data: bytes) -> bytes:
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()

    plain = [b"", b"hello", bytes(5000), bytes(range(256)) * 8]
    members = [gz(p) for p in plain]
    members.append(members[1] + members[3])
    return members


@functools.cache
def seed_tars() -> list[bytes]:
    out = [seed_tar(), tar_from_spec({"a": FileSpec(content=b"x", pax={"atime": "1.5"})})]
    long = "d/" + "n" * 150
    out.append(tar_from_spec({long: b"long name", "l": FileSpec(type="symlink", link=long)}))
    out.append(go_tar())
    return out


@functools.cache
def seed_tarsplits() -> list[bytes]:
    return [build_tarsplit(t) for t in seed_tars()]
