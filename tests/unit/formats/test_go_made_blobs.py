"""Readers vs blobs written by the real Go producers (stargz-snapshotter 0.12, c/storage 1.43)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from als.errors import NotLazy, VerifyError
from als.formats import (
    EntryType,
    detect_format,
    load_index,
    read_file,
)
from tests.unit.conftest import GO_BLOBS, CountingReader, go_blob, sha256

EXPECTED_FORMAT = {
    "esgz.bin": "estargz",
    "esgz-zstd.bin": "estargz-zstd",
    "zchunked.bin": "zstd-chunked",
    "legacy-stargz-footer47.bin": "stargz-legacy",
}
# From the fixtures' README (prefix ... suffix of the digest the annotations carry).
README_TOC_DIGEST = {
    "esgz.bin": ("673b1f2d", "96f0"),
    "esgz-zstd.bin": ("24d92942", "118b"),
    "legacy-stargz-footer47.bin": ("673b1f2d", "96f0"),
}
README_POSITION = {
    "esgz-zstd.bin": "1536:790:2443:1",
    "zchunked.bin": "1105:622:2088:1",
}


def _in_tar() -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(go_blob("in.tar"))) as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


def _in_tar_content(name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(go_blob("in.tar"))) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


@pytest.mark.parametrize("name", GO_BLOBS)
def test_format_and_single_tail_read(name: str) -> None:
    blob = go_blob(name)
    r = CountingReader(blob)
    ix = load_index(r, len(blob), layer=name)
    assert ix.format == EXPECTED_FORMAT[name]
    assert len(r.calls) == 1  # small blob: the tail read holds the TOC
    assert ix.blob_size == len(blob)
    assert detect_format(blob[:512], blob[-65536:], len(blob)) == EXPECTED_FORMAT[name]


@pytest.mark.parametrize("name", sorted(README_TOC_DIGEST))
def test_estargz_toc_digest_matches_readme(name: str) -> None:
    blob = go_blob(name)
    ix = load_index(CountingReader(blob), len(blob))
    prefix, suffix = README_TOC_DIGEST[name]
    assert ix.toc_digest.startswith("sha256:" + prefix)
    assert ix.toc_digest.endswith(suffix)
    # and it verifies when given as the annotation / the ALS path digest
    load_index(
        CountingReader(blob),
        len(blob),
        annotations={"containerd.io/snapshot/stargz/toc.digest": ix.toc_digest},
        expected_toc_digest=ix.toc_digest,
    )


def test_zstd_chunked_toc_digest_is_compressed_manifest_sha() -> None:
    blob = go_blob("zchunked.bin")
    off, clen, _, _ = (int(x) for x in README_POSITION["zchunked.bin"].split(":"))
    ix = load_index(CountingReader(blob), len(blob))
    assert ix.toc_digest == sha256(blob[off : off + clen])


@pytest.mark.parametrize("name", sorted(README_POSITION))
@pytest.mark.parametrize("prefix", ["io.containers.", "io.github.containers."])
def test_manifest_position_annotation_costs_one_exact_read(name: str, prefix: str) -> None:
    blob = go_blob(name)
    plain = load_index(CountingReader(blob), len(blob))
    pos = README_POSITION[name]
    off, clen, _, _ = (int(x) for x in pos.split(":"))
    ann = {f"{prefix}zstd-chunked.manifest-position": pos}
    if name == "esgz-zstd.bin":
        ann["containerd.io/snapshot/stargz/toc.digest"] = plain.toc_digest
    else:
        ann[f"{prefix}zstd-chunked.manifest-checksum"] = plain.toc_digest
    r = CountingReader(blob)
    ix = load_index(r, len(blob), annotations=ann)
    assert len(r.calls) == 1
    assert r.calls[0] == [(off - 8, clen + 8)]  # the TOC frame and its skippable header only
    assert ix.format == EXPECTED_FORMAT[name]
    assert ix.toc_digest == plain.toc_digest


def test_wrong_annotation_digest_is_verify_error_naming_both() -> None:
    blob = go_blob("esgz.bin")
    bad = "sha256:" + "ab" * 32
    with pytest.raises(VerifyError) as ei:
        load_index(
            CountingReader(blob),
            len(blob),
            annotations={"containerd.io/snapshot/stargz/toc.digest": bad},
            layer="L1",
        )
    msg = str(ei.value)
    assert bad in msg and "673b1f2d" in msg and "L1" in msg


def test_wrong_manifest_checksum_is_verify_error() -> None:
    blob = go_blob("zchunked.bin")
    ann = {
        "io.containers.zstd-chunked.manifest-position": README_POSITION["zchunked.bin"],
        "io.containers.zstd-chunked.manifest-checksum": "sha256:" + "00" * 32,
    }
    with pytest.raises(VerifyError, match="manifest checksum"):
        load_index(CountingReader(blob), len(blob), annotations=ann)


def test_in_tar_is_not_lazy() -> None:
    blob = go_blob("in.tar")
    with pytest.raises(NotLazy) as ei:
        load_index(CountingReader(blob), len(blob))
    assert ei.value.format == "tar"


@pytest.mark.parametrize("name", GO_BLOBS)
def test_every_entry_matches_in_tar(name: str) -> None:
    blob = go_blob(name)
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    members = _in_tar()
    seen = set()
    for i in ix.iter_ids():
        e = ix.entry(i)
        if i == 0:
            assert e.path == "" and e.type == EntryType.DIR
            continue
        if e.path not in members:
            # implied directory: 0755 root:root
            assert e.type == EntryType.DIR and e.mode == 0o755 and e.uid == e.gid == 0
            assert e.path == "dev"
            continue
        seen.add(e.path)
        m = members[e.path]
        kinds = {
            tarfile.DIRTYPE: EntryType.DIR,
            tarfile.REGTYPE: EntryType.REG,
            tarfile.SYMTYPE: EntryType.SYMLINK,
            tarfile.LNKTYPE: EntryType.HARDLINK,
            tarfile.CHRTYPE: EntryType.CHAR,
        }
        assert e.type == kinds[m.type], e.path
        assert e.mode == m.mode and e.uid == m.uid and e.gid == m.gid, e.path
        assert e.mtime_ns == int(m.mtime) * 1_000_000_000
        xattrs = {
            k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        assert dict(e.xattrs) == xattrs
        if m.issym():
            assert e.link == m.linkname
        if m.ischr():
            assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor)
        if m.islnk():
            target = ix.lookup(m.linkname)
            assert target is not None and e.target == target < i
            assert ix.entry(target).nlink == 2 and e.nlink == 2
            assert read_file(ix, i, r) == _in_tar_content(m.linkname)
        if m.isreg():
            content = read_file(ix, i, r)
            assert content == _in_tar_content(m.name)
            assert e.size == m.size
            if e.digest is not None:
                assert e.digest == sha256(content)
    assert seen == set(members)
    assert ix.lookup("stargz.index.json") is None
    assert ix.lookup(".no.prefetch.landmark") is None
    assert [ix.entry(c).name for c in ix.children(0)] == ["dev", "dir"]
    names = [ix.entry(c).name for c in ix.children(ix.lookup("dir") or 0)]
    assert names == sorted(names, key=lambda s: s.encode())
    assert ix.regular_bytes() == 6 + 10000


def test_landmark_and_chunks_of_esgz() -> None:
    blob = go_blob("esgz.bin")
    ix = load_index(CountingReader(blob), len(blob))
    assert ix.no_prefetch and ix.prefetch_end is None
    big = ix.lookup("dir/big.bin")
    assert big is not None
    chunks = list(ix.chunks(big))
    # Worked example of the reference notes: members at 398, 728, 1056; TOC at 1625.
    assert [(c.coffset, c.cend, c.uoffset, c.size) for c in chunks] == [
        (398, 728, 0, 4096),
        (728, 1056, 4096, 4096),
        (1056, 1625, 8192, 1808),
    ]
    assert ix.toc_offset == 1625
    assert not ix.whole_file_verify(big)
    assert ix.chunk_at(big, 5000) == 1


def test_zchunked_zero_chunk_and_missing_chunk_digests() -> None:
    blob = go_blob("zchunked.bin")
    r = CountingReader(blob)
    ix = load_index(r, len(blob))
    big = ix.lookup("dir/big.bin")
    small = ix.lookup("dir/small.txt")
    assert big is not None and small is not None
    chunks = list(ix.chunks(big))
    assert [c.zeros for c in chunks] == [False, True, False]
    # single-chunk file without chunkDigest: the file digest covers the chunk
    (sc,) = ix.chunks(small)
    assert sc.digest == ix.entry(small).digest
    empty = ix.lookup("dir/empty")
    assert empty is not None and ix.entry(empty).digest is None and not list(ix.chunks(empty))
    # zero chunk synthesized without reading it, verified against its digest
    from als.formats import decode_chunk

    assert decode_chunk(ix, chunks[1], b"") == bytes(3000)
    assert hashlib.sha256(read_file(ix, big, r)).hexdigest() == (ix.entry(big).digest or "")[7:]


def test_toc_json_is_hidden_and_stats() -> None:
    blob = go_blob("esgz.bin")
    ix = load_index(CountingReader(blob), len(blob))
    assert len(ix) == 10  # root + 8 tar entries + implied "dev"
    assert ix.nbytes() > 0
    assert json.loads(json.dumps(ix.toc_digest)) == ix.toc_digest
