"""Hostile TOCs and layers at the index level: what the index the store serves from accepts
(and how it shows it), what it refuses, and that refusals and lies end in clean errors.

The FUSE side of the same cases is tests/fuse/test_fuse_hostile.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Any

import pytest

from als.errors import AlsError, FormatError, VerifyError
from als.formats import MAX_DEPTH, MAX_NAME, MAX_PATH, EntryType, LayerIndex, load_index, read_file
from tests.unit.conftest import CountingReader, sha256, simple_layer, wrap_estargz, wrap_zstd

FILES = {"a/one": b"hello\n", "a/two": bytes(range(256)) * 20, "b": b""}


def _layer(extra: list[dict[str, Any]], *, zstd: bool = False) -> tuple[bytes, LayerIndex]:
    region, toc = simple_layer(FILES, zstd=zstd, chunk=2048)
    toc["entries"] += extra
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    return blob, load_index(CountingReader(blob), len(blob), layer="hostile")


def _refused(extra: list[dict[str, Any]], match: str) -> None:
    for zstd in (False, True):
        with pytest.raises(FormatError, match=match):
            _layer(extra, zstd=zstd)


# ---- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "./../x", "/../etc/passwd", "a/b/../../../x", "..", "x/.."]
)
def test_path_traversal_is_refused(name: str) -> None:
    _refused([{"name": name, "type": "reg"}], "'..'")


@pytest.mark.parametrize(
    ("name", "path"),
    [("/etc/passwd", "etc/passwd"), ("//etc//x/", "etc/x"), ("/./c/./d", "c/d"), ("./e", "e")],
)
def test_absolute_names_stay_inside_the_layer(name: str, path: str) -> None:
    _, ix = _layer([{"name": name, "type": "dir" if name.endswith("/") else "fifo"}])
    i = ix.lookup(path)
    assert i is not None and ix.entry(i).path == path
    # every component is a plain name: no "/", "." or ".." anywhere in the tree
    for k in ix.iter_ids():
        assert all(c not in ("", ".", "..") for c in ix.entry(k).path.split("/")[1:])
        assert "/" not in ix.entry_name(k)


@pytest.mark.parametrize("name", ["a/x\x00y", "\x00", "nul\x00/../../x"])
def test_names_with_nul_are_refused(name: str) -> None:
    _refused([{"name": name, "type": "reg"}], "NUL")


def test_xattr_names_with_nul_are_refused() -> None:
    _refused([{"name": "x", "type": "dir", "xattrs": {"user.a\x00b": "YQ=="}}], "xattr")


def test_names_with_slashes_are_paths_not_names() -> None:
    _, ix = _layer([{"name": "p//q///r", "type": "fifo"}])
    r = ix.lookup("p/q/r")
    assert r is not None and ix.entry_name(r) == "r"
    assert ix.type(ix.entry_parent(r)) == EntryType.DIR  # p and p/q are implied directories


def test_deep_nesting_up_to_the_cap() -> None:
    deep = "/".join(["d"] * MAX_DEPTH)
    _, ix = _layer([{"name": deep, "type": "fifo"}])
    assert ix.lookup(deep) is not None
    _refused([{"name": deep + "/e", "type": "fifo"}], f"deeper than {MAX_DEPTH}")


def test_long_names_and_paths_are_refused() -> None:
    _refused([{"name": "n" * (MAX_NAME + 1), "type": "fifo"}], f"longer than {MAX_NAME}")
    long_path = "/".join(["p" * 200] * (MAX_PATH // 200 + 1))
    _refused([{"name": long_path, "type": "fifo"}], f"longer than {MAX_PATH}")


@pytest.mark.parametrize(
    "extra",
    [
        [{"name": "b", "type": "reg"}],
        [{"name": "./b", "type": "fifo"}],
        [{"name": "d/", "type": "dir"}, {"name": "/d", "type": "dir"}],
        [{"name": "s", "type": "symlink", "linkName": "x"}, {"name": "s", "type": "fifo"}],
    ],
)
def test_duplicate_entries_are_refused(extra: list[dict[str, Any]]) -> None:
    _refused(extra, "duplicate")


def test_a_listed_directory_may_follow_its_implied_one() -> None:
    _, ix = _layer([{"name": "a/", "type": "dir", "mode": 0o700, "uid": 7}])
    a = ix.entry(ix.lookup("a") or 0)
    assert a.type == EntryType.DIR and (a.mode, a.uid) == (0o700, 7)


# ---- links, devices, modes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["/etc/shadow", "../../../../../../etc/passwd", "/proc/self/root", "x" * MAX_PATH]
)
def test_symlinks_out_of_the_layer_are_kept_verbatim(target: str) -> None:
    _, ix = _layer([{"name": "evil", "type": "symlink", "linkName": target}])
    e = ix.entry(ix.lookup("evil") or 0)
    assert e.type == EntryType.SYMLINK and e.link == target


@pytest.mark.parametrize("target", ["", "a\x00b", "x" * (MAX_PATH + 1)])
def test_unservable_symlink_targets_are_refused(target: str) -> None:
    _refused([{"name": "evil", "type": "symlink", "linkName": target}], "symlink target")


def test_hardlink_to_a_device_is_the_device() -> None:
    _, ix = _layer(
        [
            {"name": "dev/sda", "type": "block", "devMajor": 8, "devMinor": 0, "mode": 0o660},
            {"name": "innocent", "type": "hardlink", "linkName": "dev/sda"},
        ]
    )
    h = ix.entry(ix.lookup("innocent") or 0)
    t = ix.entry(h.target)
    assert t.type == EntryType.BLOCK and (t.devmajor, t.devminor) == (8, 0)
    assert ix.size(h.id) == 0 and not list(ix.chunks(h.id))  # no data to read through it
    assert h.nlink == t.nlink == 2


@pytest.mark.parametrize(
    ("mode", "kept"), [(0o4755, 0o4755), (0o2755, 0o2755), (0o7777, 0o7777), (0o104755, 0o4755)]
)
def test_setuid_setgid_bits_are_kept_file_type_bits_dropped(mode: int, kept: int) -> None:
    _, ix = _layer([{"name": "suid", "type": "fifo", "mode": mode, "uid": 0}])
    assert ix.entry(ix.lookup("suid") or 0).mode == kept


@pytest.mark.parametrize("field", ["mode", "uid", "gid"])
def test_ids_and_modes_out_of_range_are_refused(field: str) -> None:
    _refused([{"name": "x", "type": "fifo", field: 1 << 32}], "integers")


# ---- entry counts -------------------------------------------------------------------------


def _dirs_toc(n: int) -> bytes:
    entries = [{"name": f"d{k // 1000}/f{k}", "type": "fifo"} for k in range(n)]
    return json.dumps({"version": 1, "entries": entries}).encode()


def test_entry_count_cap_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    from als.formats import builder, toc

    monkeypatch.setattr(builder, "MAX_ENTRIES", 5000)
    region, _ = simple_layer({})
    blob = wrap_estargz(region, _dirs_toc(4000))
    assert len(load_index(CountingReader(blob), len(blob))) > 4000
    blob = wrap_estargz(region, _dirs_toc(6000))
    with pytest.raises(FormatError, match="more than 5000 entries"):
        load_index(CountingReader(blob), len(blob))
    monkeypatch.setattr(toc, "MAX_TOC_RECORDS", 100)
    with pytest.raises(FormatError, match="more than 100 records"):
        load_index(CountingReader(blob), len(blob))


def test_many_entries_cost_bounded_time_and_memory() -> None:
    # The index is columnar (no object per entry): ~100 bytes an entry stay in memory.
    n = 20_000
    region, _ = simple_layer({})
    blob = wrap_estargz(region, _dirs_toc(n))
    t = time.monotonic()
    ix = load_index(CountingReader(blob), len(blob))
    elapsed = time.monotonic() - t
    assert len(ix) == n + 21  # the root and 20 implied directories
    assert ix.nbytes() < 200 * n, ix.nbytes()  # what stays in memory per layer
    assert elapsed < 30, elapsed  # linear: ~2 s on a loaded 2-core machine


# ---- chunk tables -------------------------------------------------------------------------


def _entries(zstd: bool = False) -> tuple[bytes, list[dict[str, Any]]]:
    region, toc = simple_layer(FILES, zstd=zstd, chunk=2048)
    return region, copy.deepcopy(toc["entries"])


def _load(
    region: bytes, entries: list[dict[str, Any]], zstd: bool = False
) -> tuple[bytes, LayerIndex]:
    toc = {"version": 1, "entries": entries}
    blob = wrap_zstd(region, toc)[0] if zstd else wrap_estargz(region, toc)
    return blob, load_index(CountingReader(blob), len(blob), layer="hostile")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda es: es[2].update(chunkOffset=1000), "gap/overlap"),  # overlaps chunk 0
        (lambda es: es[2].update(chunkOffset=0), "gap/overlap"),  # restarts the file
        (lambda es: es.insert(3, dict(es[2])), "gap/overlap"),  # the same chunk twice
        (lambda es: es[1].update(offset=1 << 40), "outside the data area"),
        (lambda es: es[2].update(offset=-1), "offset"),
        (lambda es: es[2].update(chunkSize=1 << 20), "invalid size"),
        (lambda es: es[2].update(innerOffset=1 << 31), "innerOffset"),
    ],
)
def test_bad_chunk_tables_are_refused(mutate: Any, match: str) -> None:
    for zstd in (False, True):
        region, es = _entries(zstd)
        mutate(es)
        with pytest.raises(FormatError, match=match):
            _load(region, es, zstd)


def test_chunk_pointing_into_the_toc_is_refused() -> None:
    region, es = _entries()
    es[1]["offset"] = len(region)  # the first byte of the TOC, not file data
    with pytest.raises(FormatError, match="outside the data area"):
        _load(region, es)


def test_two_files_sharing_compressed_bytes_read_back_verified() -> None:
    # Deduplicated chunks (two entries pointing at one blob range) are legitimate.
    region, es = _entries()
    one = next(e for e in es if e["name"] == "a/one")
    es.append({**one, "name": "copy"})
    blob, ix = _load(region, es)
    r = CountingReader(blob)
    assert read_file(ix, ix.lookup("copy") or 0, r) == FILES["a/one"]


# ---- TOCs that verify but lie -------------------------------------------------------------


def _liar(size: int, digest_of: bytes, chunk_digest: str | None = None) -> tuple[bytes, LayerIndex]:
    content = b"0123456789ABCDEFGHIJ"  # 20 bytes in the blob
    region, toc = simple_layer({"liar": content}, chunk_digests=False)
    e = toc["entries"][0]
    e.update(size=size, digest=sha256(digest_of))
    if chunk_digest is not None:
        e["chunkDigest"] = chunk_digest
    return _load(region, toc["entries"])


def test_toc_size_smaller_than_the_chunk_with_the_full_digest_is_a_verify_error() -> None:
    blob, ix = _liar(10, b"0123456789ABCDEFGHIJ")
    with pytest.raises(VerifyError, match="digest mismatch"):
        read_file(ix, ix.lookup("liar") or 0, CountingReader(blob))


def test_toc_size_larger_than_the_chunk_is_a_verify_error() -> None:
    # The compressed range runs to the next chunk: it holds the file and a block of padding
    # (532 bytes in all), never 1000.
    blob, ix = _liar(1000, b"0123456789ABCDEFGHIJ" + bytes(980))
    with pytest.raises(VerifyError, match="ends after 532 of 1000 bytes"):
        read_file(ix, ix.lookup("liar") or 0, CountingReader(blob))
    blob, ix = _liar(30, b"0123456789ABCDEFGHIJ" + b"X" * 10)
    with pytest.raises(VerifyError, match="digest mismatch"):
        read_file(ix, ix.lookup("liar") or 0, CountingReader(blob))


def test_toc_size_and_digest_agreeing_on_a_prefix_serve_that_prefix() -> None:
    # Consistent with itself: the file is what the (verified) TOC says, and nothing else.
    blob, ix = _liar(10, b"0123456789")
    assert read_file(ix, ix.lookup("liar") or 0, CountingReader(blob)) == b"0123456789"


def test_wrong_chunk_digest_is_a_verify_error() -> None:
    blob, ix = _liar(20, b"0123456789ABCDEFGHIJ", chunk_digest=sha256(b"something else"))
    with pytest.raises(VerifyError, match="digest mismatch"):
        read_file(ix, ix.lookup("liar") or 0, CountingReader(blob))


def test_a_toc_that_does_not_match_its_digest_is_refused() -> None:
    region, toc = simple_layer(FILES)
    blob = wrap_estargz(region, toc)
    wrong = "sha256:" + hashlib.sha256(b"another toc").hexdigest()
    with pytest.raises(VerifyError, match="TOC digest"):
        load_index(CountingReader(blob), len(blob), expected_toc_digest=wrong)
    with pytest.raises(AlsError):
        load_index(
            CountingReader(blob),
            len(blob),
            annotations={"containerd.io/snapshot/stargz/toc.digest": wrong},
        )
