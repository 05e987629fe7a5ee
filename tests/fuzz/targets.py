"""Fuzz targets: one function per parser entry point, each taking raw bytes.

A target returns normally when the parser ended in a valid result (checked for consistency) or
in one of the project's clean errors; anything else escapes as the finding: another exception
type, an inconsistent result (AssertionError), a read outside the blob. The same targets run
under hypothesis (tests/fuzz/test_fuzz_*.py, bounded time in CI) and under atheris or a long
hypothesis run (scripts/fuzz).
"""

from __future__ import annotations

import functools
import hashlib
import json
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from als.errors import AlsError, FormatError, VerifyError
from als.formats import (
    FORMATS,
    LAZY_FORMATS,
    MAX_TOC_JSON,
    EntryType,
    LayerAnnotations,
    LayerIndex,
    detect_format,
    load_index,
    parse_footer,
    read_file,
)
from als.formats.decode import (
    DecodeError,
    decode_chunk,
    decompress_exact,
    gunzip_pieces,
    unzstd_pieces,
)
from als.formats.tarsplit import assemble_tar, scan_tar
from als.formats.toc import build_index, load_toc_json
from tests.fuzz import corpus
from tests.unit.conftest import simple_layer, wrap_estargz, wrap_zstd

# What one example may allocate (Python heap, tracemalloc) for inputs of at most MAX_INPUT.
MAX_INPUT = 64 * 1024
MEMORY_LIMIT = 64 << 20
_READ_FILES = 32  # files read back per valid index
_READ_MAX = 64 * 1024  # ... when at most this big


class BlobReader:
    """ReadRanges over bytes; a range outside the blob is a parser bug (AssertionError)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.requested = 0

    def __call__(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = []
        for off, n in ranges:
            assert type(off) is int and type(n) is int, (off, n)
            assert off >= 0 and n >= 0 and off + n <= len(self.blob), (
                f"read [{off}, +{n}) outside the blob of {len(self.blob)} bytes"
            )
            self.requested += n
            out.append(self.blob[off : off + n])
        return out


def check_index(ix: LayerIndex, read: BlobReader | None) -> None:
    """Invariants every LayerIndex must hold (it is safe to serve and to extract)."""
    n = len(ix)
    assert ix.format in LAZY_FORMATS
    assert 0 <= ix.toc_offset <= ix.blob_size
    assert ix.entry(0).path == "" and ix.type(0) == EntryType.DIR
    read_left = _READ_FILES
    for i in range(n):
        e = ix.entry(i)
        parts = e.path.split("/") if e.path else []
        assert all(p not in ("", ".", "..") and "\x00" not in p and "/" not in p for p in parts)
        assert i == 0 or e.parent < i
        assert ix.lookup(e.path) == i
        assert ix.type(e.parent) == EntryType.DIR
        assert 0 <= e.mode <= 0o7777
        if e.type == EntryType.HARDLINK:
            assert 0 < e.target < i and ix.type(e.target) not in (EntryType.HARDLINK, EntryType.DIR)
        if e.type == EntryType.SYMLINK:
            assert e.link and "\x00" not in e.link
        if e.type == EntryType.DIR:
            names = [ix.entry_name(k).encode() for k in ix.children(i)]
            assert names == sorted(names) and len(set(names)) == len(names)
        is_file = e.type in (EntryType.REG, EntryType.HARDLINK)
        if is_file and ix.type(ix.resolved(i)) == EntryType.REG:
            pos = 0
            for c in ix.chunks(i):
                assert c.uoffset == pos and c.size > 0
                assert 0 <= c.coffset < c.cend <= ix.toc_offset
                pos += c.size
            assert pos == ix.size(i)
            assert ix.digest(i) is not None or not ix.whole_file_verify(i)
            if read is not None and read_left and 0 < ix.size(i) <= _READ_MAX:
                read_left -= 1
                try:
                    data = read_file(ix, i, read)
                except AlsError:
                    pass  # corrupt data: a clean error is all that is allowed
                else:
                    assert len(data) == ix.size(i)
                    d = ix.digest(i)
                    assert d is None or d == "sha256:" + hashlib.sha256(data).hexdigest()


# ---- targets ------------------------------------------------------------------------------


def target_footer(data: bytes) -> None:
    """parse_footer on a blob tail; the first 2 bytes say how much blob lies before the tail."""
    extra = int.from_bytes(data[:2], "big")
    tail = data[2:]
    size = len(tail) + extra
    try:
        f = parse_footer(tail, size)
    except FormatError:
        return
    if f is None:
        return
    assert f.size in (51, 47, 48, 64, 72) and f.size <= len(tail)
    assert 0 <= f.toc_offset <= f.start and f.length > 0
    assert f.start + f.length <= size - f.size, f
    assert f.ulength is None or 0 <= f.ulength <= MAX_TOC_JSON
    if f.tarsplit is not None:
        assert f.start + f.length <= f.tarsplit[0]
        assert f.tarsplit[0] + f.tarsplit[1] <= size - f.size


def target_detect(data: bytes) -> None:
    """detect_format on the head and tail of a blob (the first byte: blob bytes not shown)."""
    extra = data[0] * 1000 if data else 0
    blob = data[1:]
    try:
        fmt = detect_format(blob[:512], blob[-4096:], len(blob) + extra)
    except FormatError:
        return
    assert fmt in FORMATS


def _annotations(blob: bytes, sel: int) -> dict[str, str] | None:
    if not sel & 1:
        return None
    try:
        f = parse_footer(blob[-64 * 1024 :], len(blob))
    except FormatError:
        return None
    if f is None or f.ulength is None:
        return {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "a" * 64}
    return {
        "io.github.containers.zstd-chunked.manifest-position": (
            f"{f.start}:{f.length}:{f.ulength}:1"
        )
    }


def target_load_index(data: bytes) -> None:
    """load_index on a whole blob (first byte: bit 0 = pass zstd:chunked annotations), then
    read files back through the index."""
    sel = data[0] if data else 0
    blob = data[1:]
    read = BlobReader(blob)
    try:
        ix = load_index(read, len(blob), annotations=_annotations(blob, sel), layer="fuzz")
    except AlsError:
        return
    check_index(ix, read)


@functools.cache
def _toc_region(zstd: bool) -> tuple[bytes, bytes]:
    region, toc = simple_layer(
        {"a/one": b"hello\n", "a/two": bytes(range(256)) * 20, "b": b""}, zstd=zstd, chunk=1024
    )
    return region, json.dumps(toc).encode()


def toc_layer_seeds() -> list[bytes]:
    out = [_toc_region(False)[1], _toc_region(True)[1]]
    return [b"\x00" + out[0], b"\x01" + out[1]]


def target_toc_json(data: bytes) -> None:
    """load_toc_json + build_index on TOC JSON bytes (first byte picks the format)."""
    fmt = LAZY_FORMATS[data[0] % len(LAZY_FORMATS)] if data else "estargz"
    try:
        doc = load_toc_json(data[1:], layer="fuzz")
        ix = build_index(
            doc, format=fmt, toc_digest="sha256:" + "0" * 64, blob_size=1 << 20,
            toc_offset=(1 << 20) - 4096, layer="fuzz",
        )  # fmt: skip
    except FormatError:
        return
    check_index(ix, None)


def target_toc_layer(data: bytes) -> None:
    """TOC JSON bytes put into a well-formed blob (first byte: bit 0 = zstd:chunked), loaded,
    and every small file read back."""
    zstd = bool(data[0] & 1) if data else False
    region, _ = _toc_region(zstd)
    js = data[1:]
    blob = wrap_zstd(region, js)[0] if zstd else wrap_estargz(region, js)
    read = BlobReader(blob)
    try:
        ix = load_index(read, len(blob), layer="fuzz")
    except AlsError:
        return
    check_index(ix, read)


def target_zstd_frames(data: bytes) -> None:
    """unzstd_pieces / decompress_exact on arbitrary frames (bytes 0-3: limit, skip)."""
    limit = int.from_bytes(data[:2], "big") * 16
    skip = data[2] * 8 if len(data) > 2 else 0
    frames = data[4:]
    try:
        total = sum(len(p) for p in unzstd_pieces(frames, limit))
        assert total <= limit
        out = decompress_exact(False, frames, skip, limit)
        assert len(out) == limit
    except DecodeError:
        return


def target_gzip_members(data: bytes) -> None:
    """gunzip_pieces / decompress_exact on arbitrary gzip members (bytes 0-3: limit, skip)."""
    limit = int.from_bytes(data[:2], "big") * 16
    skip = data[2] * 8 if len(data) > 2 else 0
    members = data[4:]
    try:
        total = sum(len(p) for p in gunzip_pieces(members, limit))
        assert total <= limit
        out = decompress_exact(True, members, skip, limit)
        assert len(out) == limit
    except DecodeError:
        return


@dataclass(frozen=True)
class _ChunkCase:
    index: LayerIndex
    blob: bytes
    chunks: list[tuple[int, int]]  # (entry id, chunk number)


@functools.cache
def _chunk_cases() -> list[_ChunkCase]:
    out = []
    for _, blob, ann in corpus.all_blobs():
        ix = load_index(BlobReader(blob), len(blob), annotations=ann)
        chunks = [
            (i, k)
            for i in ix.iter_ids()
            if ix.type(i) == EntryType.REG
            for k in range(len(ix.chunks(i)))
        ]
        out.append(_ChunkCase(ix, blob, chunks))
    return out


def chunk_seeds() -> list[bytes]:
    """Valid (selector, chunk data) inputs for target_decode_chunk."""
    out = []
    for n, case in enumerate(_chunk_cases()):
        for m, (i, k) in enumerate(case.chunks):
            c = case.index.chunks(i)[k]
            out.append(bytes([n, m]) + case.blob[c.coffset : c.cend])
    return out


def target_decode_chunk(data: bytes) -> None:
    """decode_chunk with the compressed bytes of one chunk of a seed layer replaced: the
    result is the chunk's true content or a VerifyError (bytes 0-1 pick the chunk)."""
    cases = _chunk_cases()
    if len(data) < 2:
        return
    case = cases[data[0] % len(cases)]
    if not case.chunks:
        return
    i, k = case.chunks[data[1] % len(case.chunks)]
    c = case.index.chunks(i)[k]
    good = decode_chunk(case.index, c, case.blob[c.coffset : c.cend])
    try:
        out = decode_chunk(case.index, c, data[2:])
    except VerifyError:
        return
    assert c.digest is not None
    assert out == good


_TAR_TYPES = ("reg", "dir", "symlink", "hardlink", "char", "block", "fifo")


def target_scan_tar(data: bytes) -> None:
    """scan_tar (the tar header parser) on arbitrary bytes."""
    try:
        scan = scan_tar(data)
    except FormatError:
        return
    prev = -1
    for m in scan.members:
        assert prev < m.start < m.data_start <= m.data_end <= len(data), m
        assert m.size >= 0 and m.type in _TAR_TYPES
        prev = m.start
    assert scan.eof_start <= scan.eof_end <= scan.total == len(data)


@functools.cache
def _tar_contents() -> Mapping[bytes, bytes]:
    out = {}
    for tar in corpus.seed_tars():
        for m in scan_tar(tar).members:
            out[m.name_raw] = tar[m.data_start : m.data_end]
    return out


def target_tarsplit(data: bytes) -> None:
    """assemble_tar on tar-split NDJSON; contents come from the seed tars by name."""
    contents = _tar_contents()

    def content(name: str, name_raw: bytes) -> bytes:
        return contents.get(name_raw, b"")

    try:
        out = assemble_tar(data, content)
    except FormatError:
        return
    assert isinstance(out, bytes)


def target_annotations(data: bytes) -> None:
    """LayerAnnotations.parse on a JSON object of annotations."""
    try:
        ann = json.loads(data)
    except ValueError:
        return
    if not isinstance(ann, dict):
        return
    try:
        a = LayerAnnotations.parse(ann, "fuzz")
    except FormatError:
        return
    assert a.manifest_position is None or len(a.manifest_position) == 4


# ---- registry of targets -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    doc: str


def _blob_seeds() -> list[bytes]:
    return [bytes([s]) + b for _, b, _ in corpus.all_blobs() for s in (0, 1)]


_ALL = (
        Target("footer", target_footer, lambda: [b"\0\0" + t for t in corpus.tails()],
               "estargz/stargz/zstd footers"),
        Target("detect", target_detect, lambda: [b"\0" + b for _, b, _ in corpus.all_blobs()],
               "format sniffing on a blob's head and tail"),
        Target("load_index", target_load_index, _blob_seeds,
               "whole blobs: footer, TOC location, decompression, JSON, index, file reads"),
        Target("toc_json", target_toc_json,
               lambda: [bytes([n]) + t for n, t in enumerate(corpus.seed_tocs())],
               "TOC JSON parsing and validation into the index"),
        Target("toc_layer", target_toc_layer, toc_layer_seeds,
               "TOC JSON inside a well-formed blob, files read back"),
        Target("zstd_frames", target_zstd_frames,
               lambda: [b"\x01\x00\x00\x00" + f for f in corpus.seed_zstd_frames()],
               "zstd frames and skippable frames"),
        Target("gzip_members", target_gzip_members,
               lambda: [b"\x01\x00\x00\x00" + m for m in corpus.seed_gzip_members()],
               "gzip members (eStargz chunks)"),
        Target("decode_chunk", target_decode_chunk, chunk_seeds,
               "chunk decoding and verification"),
        Target("scan_tar", target_scan_tar, corpus.seed_tars, "tar headers (ustar, GNU, PAX)"),
        Target("tarsplit", target_tarsplit, corpus.seed_tarsplits, "tar-split NDJSON"),
        Target("annotations", target_annotations,
               lambda: [json.dumps(dict(a)).encode() for _, _, a in corpus.all_blobs()],
               "layer annotations (TOC digest, manifest position)"),
)  # fmt: skip
TARGETS: dict[str, Target] = {t.name: t for t in _ALL}


def run_bounded(target: Target, data: bytes, memory_limit: int = MEMORY_LIMIT) -> None:
    """Run one example under tracemalloc; fail when it allocated more than ``memory_limit``."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        target.run(data[:MAX_INPUT])
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    assert peak <= memory_limit, f"{target.name}: {peak} bytes allocated for {len(data)} input"
