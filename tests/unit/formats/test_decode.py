"""Chunk decoding: gzip members / zstd frames, innerOffset, zeros, bounds, verification."""

from __future__ import annotations

import os
import time

import pytest

from als.errors import VerifyError
from als.formats import Chunk, decode_chunk, load_index, read_file, verify_file
from tests.unit.conftest import (
    CountingReader,
    gz,
    sha256,
    simple_layer,
    wrap_estargz,
    wrap_zstd,
    zst,
)


def _flip(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x55
    return bytes(b)


@pytest.mark.parametrize("zstd", [False, True])
def test_corrupt_chunk_byte_is_verify_error_with_entry_and_both_digests(zstd: bool) -> None:
    data = os.urandom(6000)  # incompressible: stored (gzip) / raw (zstd) blocks
    region, toc = simple_layer({"dir/f.bin": data}, zstd=zstd, chunk=3000)
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob), layer="Lx")
    fid = ix.lookup("dir/f.bin")
    assert fid is not None
    second = ix.chunks(fid)[1]
    bad = _flip(blob, second.coffset + (second.cend - second.coffset) // 2)
    with pytest.raises(VerifyError) as ei:
        read_file(ix, fid, CountingReader(bad))
    msg = str(ei.value)
    assert "Lx" in msg and "dir/f.bin" in msg and second.digest is not None
    assert second.digest in msg
    assert "got sha256:" in msg or "invalid" in msg or "ends after" in msg
    # the same chunk given directly to decode_chunk
    with pytest.raises(VerifyError):
        decode_chunk(ix, second, bad[second.coffset : second.cend], path="dir/f.bin")
    # and the good bytes decode
    assert read_file(ix, fid, r) == data


@pytest.mark.parametrize("zstd", [False, True])
def test_substituted_chunk_names_entry_and_both_digests(zstd: bool) -> None:
    # A validly compressed chunk with other content (what a malicious mirror would serve): the
    # compression layer cannot notice; the chunk digest does.
    data = os.urandom(4000)
    region, toc = simple_layer({"dir/f": data}, zstd=zstd)
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    ix = load_index(CountingReader(blob), len(blob), layer="Ly")
    fid = ix.lookup("dir/f")
    assert fid is not None
    (c,) = ix.chunks(fid)
    evil = os.urandom(4000)
    with pytest.raises(VerifyError) as ei:
        decode_chunk(ix, c, (zst if zstd else gz)(evil), path="dir/f")
    msg = str(ei.value)
    assert f"expected {c.digest}, got {sha256(evil)}" in msg
    assert "Ly" in msg and "dir/f" in msg
    assert sha256(data) == c.digest


def test_chunk_spanning_several_members_and_trailing_data() -> None:
    data = b"0123456789" * 50
    region = gz(b"\0" * 512)
    off = len(region)
    region += gz(data[:123]) + gz(b"") + gz(data[123:]) + gz(b"pad and next header" * 30)
    toc = {
        "version": 1,
        "entries": [
            {"name": "f", "type": "reg", "size": len(data), "offset": off, "digest": sha256(data)}
        ],
    }
    blob = wrap_estargz(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    assert read_file(ix, ix.lookup("f") or 0, r) == data


def test_inner_offset_shares_a_member() -> None:
    a, b = b"A" * 300, b"B" * 200
    region = gz(b"\0" * 512)
    off = len(region)
    region += gz(a + bytes(212) + bytes(512) + b) + gz(b"\0" * 1024)
    toc = {
        "version": 1,
        "entries": [
            {"name": "a", "type": "reg", "size": 300, "offset": off, "digest": sha256(a)},
            {
                "name": "b",
                "type": "reg",
                "size": 200,
                "offset": off,
                "innerOffset": 1024,
                "digest": sha256(b),
                "chunkDigest": sha256(b),
            },
        ],
    }
    blob = wrap_estargz(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    cb = ix.chunks(ix.lookup("b") or 0)[0]
    assert cb.inner == 1024 and cb.coffset == off
    assert read_file(ix, ix.lookup("a") or 0, r) == a
    assert read_file(ix, ix.lookup("b") or 0, r) == b


def test_zstd_frame_followed_by_other_frames() -> None:
    data = b"payload!" * 100
    region = zst(b"\0" * 512)
    off = len(region)
    region += zst(data) + zst(b"\0" * 600 + b"header") + zst(b"more")
    toc = {
        "version": 1,
        "entries": [
            {"name": "f", "type": "reg", "size": len(data), "offset": off, "digest": sha256(data)}
        ],
    }
    blob, _ = wrap_zstd(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    c = ix.chunks(ix.lookup("f") or 0)[0]
    assert c.cend == ix.toc_offset  # the only data offset: reads up to the TOC
    assert read_file(ix, ix.lookup("f") or 0, r) == data


@pytest.mark.parametrize("zstd", [False, True])
def test_decompression_bomb_is_bounded(zstd: bool) -> None:
    bomb = (zst if zstd else gz)(bytes(256 << 20))
    region, toc = simple_layer({"f": bytes(10)}, zstd=zstd)
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    ix = load_index(CountingReader(blob), len(blob))
    c = ix.chunks(ix.lookup("f") or 0)[0]
    t0 = time.monotonic()
    # The bomb decodes to zeros, so the first 10 bytes even verify: bounded output, no error.
    assert decode_chunk(ix, c, bomb) == bytes(10)
    big = Chunk(c.coffset, c.cend, 0, 1 << 20, 0, None, False)
    assert len(decode_chunk(ix, big, bomb)) == 1 << 20
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("zstd", [False, True])
def test_truncated_or_garbage_chunk(zstd: bool) -> None:
    data = os.urandom(3000)
    region, toc = simple_layer({"f": data}, zstd=zstd)
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    ix = load_index(CountingReader(blob), len(blob))
    c = ix.chunks(ix.lookup("f") or 0)[0]
    raw = blob[c.coffset : c.cend]
    for bad in (raw[:20], b"", b"garbage" * 10):
        with pytest.raises(VerifyError) as ei:
            decode_chunk(ix, c, bad, path="f")
        assert "f" in str(ei.value) and (c.digest or "") in str(ei.value)


def test_zeros_chunk_synthesized_and_verified() -> None:
    region, toc = simple_layer({"z": bytes(5000)}, zstd=True)
    toc["entries"][0]["chunkType"] = "zeros"
    blob, _ = wrap_zstd(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    (c,) = ix.chunks(ix.lookup("z") or 0)
    assert c.zeros
    assert decode_chunk(ix, c, b"") == bytes(5000)
    calls = len(r.calls)
    assert read_file(ix, ix.lookup("z") or 0, r) == bytes(5000)
    assert len(r.calls) == calls  # nothing fetched for a zeros chunk
    # a lying zeros chunk fails its digest
    toc["entries"][0]["chunkDigest"] = sha256(b"x" * 5000)
    toc["entries"][0]["digest"] = sha256(b"x" * 5000)
    blob2, _ = wrap_zstd(region, toc)
    ix2 = load_index(CountingReader(blob2), len(blob2))
    with pytest.raises(VerifyError):
        decode_chunk(ix2, ix2.chunks(ix2.lookup("z") or 0)[0], b"")


def test_whole_file_verification_without_chunk_digests() -> None:
    data = os.urandom(9000)
    region, toc = simple_layer({"w": data}, chunk=3000, chunk_digests=False)
    blob = wrap_estargz(region, toc)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    fid = ix.lookup("w")
    assert fid is not None and ix.whole_file_verify(fid)
    assert all(c.digest is None for c in ix.chunks(fid))
    assert read_file(ix, fid, r) == data
    verify_file(ix, fid, data)
    with pytest.raises(VerifyError) as ei:
        verify_file(ix, fid, data[:-1] + b"!")
    assert sha256(data) in str(ei.value) and "w" in str(ei.value)
    bad = _flip(blob, ix.chunks(fid)[2].coffset + 200)
    with pytest.raises(VerifyError):
        read_file(ix, fid, CountingReader(bad))


def test_single_chunk_without_chunk_digest_uses_file_digest() -> None:
    data = b"single"
    region, toc = simple_layer({"s": data}, chunk_digests=False)
    blob = wrap_estargz(region, toc)
    ix = load_index(CountingReader(blob), len(blob))
    fid = ix.lookup("s") or 0
    assert not ix.whole_file_verify(fid)
    assert ix.chunks(fid)[0].digest == sha256(data)
