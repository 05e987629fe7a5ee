from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from als.digest import is_digest
from als.oci import toc_digest_of
from als.store.fs.protocol import (
    b64decode_segment,
    info_json,
    parse_annotation_segment,
    parse_ref_segment,
    parse_rootfs_name,
)
from als.store.ports import LayerInfo

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def enc(s: str) -> bytes:
    return base64.b64encode(s.encode())


def test_ref_segment() -> None:
    assert parse_ref_segment(enc("docker.io/library/python:3.9")) == "docker.io/library/python:3.9"
    assert parse_ref_segment(enc("127.0.0.1:5000/a/b@" + D1)) == "127.0.0.1:5000/a/b@" + D1
    assert parse_ref_segment(b"not base64!") is None
    assert parse_ref_segment(b"YWJj") == "abc"
    assert parse_ref_segment(enc("a=b")) is None  # an annotation, not a reference
    assert parse_ref_segment(enc("has space")) is None
    assert parse_ref_segment(b"YWJ") is None  # missing padding
    assert parse_ref_segment(b"") is None
    assert parse_ref_segment(enc("\x00x")) is None


def test_annotation_segment() -> None:
    k = "containers/image/target.layerdigest"
    assert parse_annotation_segment(enc(f"{k}={D1}")) == (k, D1)
    assert parse_annotation_segment(enc("x=")) == ("x", "")
    assert parse_annotation_segment(enc("=v")) is None
    assert parse_annotation_segment(enc("novalue")) is None
    assert parse_annotation_segment(b"%%%") is None


def test_rootfs_name() -> None:
    assert parse_rootfs_name(b"rootfs." + b"a" * 64) == "a" * 64
    for bad in (b"rootfs.", b"rootfs..", b"rootfs./x", b"rootfs.a/b", b"rootfs.\xff", b"diff"):
        assert parse_rootfs_name(bad) is None


def test_digest_and_toc_annotations() -> None:
    assert is_digest(D1)
    assert not is_digest("sha256:" + "A" * 64)
    assert not is_digest("md5:" + "1" * 32)
    assert toc_digest_of({"containerd.io/snapshot/stargz/toc.digest": D1}) == D1
    assert toc_digest_of({"io.containers.zstd-chunked.manifest-checksum": D2}) == D2
    assert toc_digest_of({"io.github.containers.zstd-chunked.manifest-checksum": D3}) == D3
    assert toc_digest_of({"containerd.io/snapshot/stargz/toc.digest": "garbage"}) is None
    assert toc_digest_of({}) is None


def test_info_dialects() -> None:
    info = LayerInfo(
        blob_digest=D1,
        blob_size=1234,
        diff_id=D2,
        toc_digest=D3,
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        uncompressed_size=5000,
    )
    old = json.loads(info_json(info, D1))
    assert old == {
        "compressed-diff-digest": D1,
        "compressed-size": 1234,
        "compression": 2,
        "diff-digest": D2,
        "diff-size": 5000,
    }
    new = json.loads(info_json(info, D3))
    assert new["toc-digest"] == D3
    assert new["flags"] == {"expected-layer-diffid": D2}
    assert "diff-digest" not in new
    zstd = LayerInfo(D1, 1, D2, D3, "application/vnd.oci.image.layer.v1.tar+zstd", None)
    assert json.loads(info_json(zstd, D3))["compression"] == 4
    assert json.loads(info_json(zstd, D3))["diff-size"] == -1
    assert json.loads(info_json(zstd, D1))["diff-size"] == 0


@given(st.binary(max_size=300))
def test_segment_parsers_never_raise(data: bytes) -> None:
    for parse in (
        b64decode_segment,
        parse_ref_segment,
        parse_annotation_segment,
        parse_rootfs_name,
    ):
        parse(data)  # returns a value or None: never raises


@pytest.mark.parametrize("text", ["docker.io/library/busybox:latest", "h:1/r@" + D1])
def test_roundtrip(text: str) -> None:
    assert b64decode_segment(enc(text)) == text
