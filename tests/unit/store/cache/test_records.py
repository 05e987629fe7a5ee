"""als.store.cache.records: layer records, TOC pieces, profiles and use counts, as the
DiskCache stores them."""

from __future__ import annotations

import json
import logging
import os

import pytest

from als.store.cache import DiskCache
from tests.unit.store.cache.helpers import dg, make_record

LOGGER = "als.store.cache"


# -- layer records ----------------------------------------------------------------------------


def test_layer_record_round_trip(cache: DiskCache) -> None:
    rec = make_record(b"blob one", refs=["a.example/x:1", "b.example/y@sha256:" + "0" * 64])
    pieces = [(0, b"header"), (1000, os.urandom(300)), (5000, b"")]
    assert cache.load_layer(rec.blob_digest) is None
    assert cache.save_layer(rec, pieces)
    found = cache.load_layer(rec.blob_digest)
    assert found is not None
    got, got_pieces = found
    assert got == rec
    assert got_pieces == pieces
    other = make_record(b"blob two")
    other.diff_id = None
    assert cache.save_layer(other, [(7, b"x")])
    assert sorted(r.blob_digest for r in cache.layer_records()) == sorted(
        [rec.blob_digest, other.blob_digest]
    )
    assert {r.blob_digest: r for r in cache.layer_records()}[other.blob_digest] == other
    # survives a restart
    again = DiskCache(cache.dir, 0)
    again.open()
    assert again.load_layer(other.blob_digest) == (other, [(7, b"x")])


def test_layer_records_skips_unreadable(cache: DiskCache) -> None:
    good = make_record(b"good")
    assert cache.save_layer(good, [(0, b"t")])
    (cache.dir / "layers" / ("1" * 64)).mkdir()
    (cache.dir / "layers" / ("1" * 64) / "layer.json").write_text("{broken")
    (cache.dir / "layers" / ("2" * 64)).mkdir()  # no record at all
    bad_digest = make_record(b"bad").to_json()
    bad_digest["toc_digest"] = "sha256:nope"
    (cache.dir / "layers" / ("3" * 64)).mkdir()
    (cache.dir / "layers" / ("3" * 64) / "layer.json").write_text(json.dumps(bad_digest))
    assert [r.blob_digest for r in cache.layer_records()] == [good.blob_digest]


@pytest.mark.parametrize("damage", ["truncate", "no-newline", "bad-head", "negative"])
def test_damaged_toc_is_rejected(
    cache: DiskCache, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    rec = make_record(b"blob")
    assert cache.save_layer(rec, [(0, b"abcdef"), (100, b"ghijkl")])
    toc = cache.dir / "layers" / rec.blob_digest[7:] / "toc"
    raw = toc.read_bytes()
    if damage == "truncate":
        toc.write_bytes(raw[:-1])
    elif damage == "no-newline":
        toc.write_bytes(raw.replace(b"\n", b" "))
    elif damage == "bad-head":
        toc.write_bytes(b"[[0, 6], [100]]\nabcdefghijkl")
    else:
        toc.write_bytes(b"[[0, -1]]\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load_layer(rec.blob_digest) is None
    assert any(
        "cache-corrupt" in r.getMessage() and rec.blob_digest[7:] in r.getMessage()
        for r in caplog.records
    )


def test_record_naming_another_digest_is_rejected(
    cache: DiskCache, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_record(b"layer a"), make_record(b"layer b")
    assert cache.save_layer(b, [(0, b"toc")])
    src = cache.dir / "layers" / b.blob_digest[7:]
    dst = cache.dir / "layers" / a.blob_digest[7:]
    dst.mkdir()
    for name in ("layer.json", "toc"):
        (dst / name).write_bytes((src / name).read_bytes())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load_layer(a.blob_digest) is None
    assert any(
        "cache-corrupt" in r.getMessage() and b.blob_digest in r.getMessage()
        for r in caplog.records
    )
    assert cache.load_layer(b.blob_digest) is not None


def test_record_without_toc_is_absent(cache: DiskCache) -> None:
    rec = make_record(b"blob")
    assert cache.save_layer(rec, None)
    assert cache.load_layer(rec.blob_digest) is None
    assert [r.blob_digest for r in cache.layer_records()] == [rec.blob_digest]


def test_saving_a_record_again_keeps_accounting_exact(cache: DiskCache) -> None:
    rec = make_record(b"blob")
    assert cache.save_layer(rec, [(0, b"x" * 1000)])
    for i in range(5):
        rec.refs.append(f"example.com/img:{i}")
        assert cache.save_layer(rec, None)
        assert cache.save_profile(rec.blob_digest, [f"file{j}" for j in range(i)])
    assert cache.save_layer(rec, [(0, b"y" * 10)])
    counted = cache.total
    cache.rescan()
    assert cache.total == counted
    found = cache.load_layer(rec.blob_digest)
    assert found is not None
    assert found[0].refs == rec.refs


def test_profile_round_trip(cache: DiskCache, caplog: pytest.LogCaptureFixture) -> None:
    d = dg(b"blob")
    assert cache.load_profile(d) == []
    files = ["usr/bin/sh", "etc/passwd", "é/ü"]
    assert cache.save_profile(d, files)
    assert cache.load_profile(d) == files
    path = cache.dir / "layers" / d[7:] / "profile.json"
    path.write_text(json.dumps({"files": ["a", 3, None, "b"]}))
    assert cache.load_profile(d) == ["a", "b"]
    path.write_text("{")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load_profile(d) == []
    assert any("cache-corrupt" in r.getMessage() for r in caplog.records)


def test_uses_round_trip(cache: DiskCache, caplog: pytest.LogCaptureFixture) -> None:
    assert cache.load_uses() == {}
    uses = {("a.example/x:1", dg(b"1")): 2, ("b.example/y:2", dg(b"2")): 1, ("z", dg(b"3")): 0}
    assert cache.save_uses(uses)
    assert cache.load_uses() == {k: n for k, n in uses.items() if n > 0}
    for bad in ("{", '{"a": 1}', "[[1, 2]]", '[["r", "d", "x"]]', "3"):
        (cache.dir / "uses.json").write_text(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert cache.load_uses() == {}
        assert any("cache-corrupt uses.json" in r.getMessage() for r in caplog.records), bad
