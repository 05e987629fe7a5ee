"""als.oci: annotation keys, formats and the one reading of a descriptor's TOC digest."""

from __future__ import annotations

import pytest

from als import oci
from als.digest import sha256_of
from als.formats.writer import build_estargz, build_zstd_chunked
from tests.support.tarspec import FileSpec, tar_from_spec

D1, D2 = sha256_of(b"1"), sha256_of(b"2")


def test_toc_digest_keys_in_order_and_malformed_values_ignored() -> None:
    assert oci.toc_digest_of({oci.ANN_TOC_DIGEST: D1, oci.ANN_MANIFEST_CHECKSUM: D2}) == D1
    assert oci.toc_digest_of({oci.ANN_LEGACY_MANIFEST_CHECKSUM: D2}) == D2
    assert (
        oci.toc_digest_of({oci.ANN_TOC_DIGEST: "sha256:nope", oci.ANN_MANIFEST_CHECKSUM: D2}) == D2
    )
    assert oci.toc_digest_of({oci.ANN_TOC_DIGEST: 7}) is None
    assert oci.toc_digest_of({}) is None


@pytest.mark.parametrize(
    ("media_type", "annotations", "fmt"),
    [
        (oci.OCI_LAYER_GZIP, {oci.ANN_TOC_DIGEST: D1}, "estargz"),
        (oci.OCI_LAYER_ZSTD, {oci.ANN_TOC_DIGEST: D1}, "estargz-zstd"),
        (oci.OCI_LAYER_ZSTD, {oci.ANN_MANIFEST_CHECKSUM: D1}, "zstd-chunked"),
        # stargz-snapshotter's zstd variant carries both keys (docs/formats.md)
        (
            oci.OCI_LAYER_ZSTD,
            {oci.ANN_TOC_DIGEST: D1, oci.ANN_LEGACY_MANIFEST_CHECKSUM: D2},
            "estargz-zstd",
        ),
        (oci.OCI_LAYER_ZSTD, {oci.ANN_LEGACY_MANIFEST_CHECKSUM: D1}, "zstd-chunked"),
        (oci.OCI_LAYER_ZSTD, {}, "zstd"),
        (oci.DOCKER_LAYER_GZIP, {}, "gzip"),
        (oci.OCI_LAYER_TAR, {}, "tar"),
        ("application/x-unknown", {}, "unknown"),
    ],
)
def test_format_of_descriptor(media_type: str, annotations: dict[str, str], fmt: str) -> None:
    assert oci.format_of_descriptor(media_type, annotations) == fmt


def test_what_the_writers_annotate_is_what_the_readers_find() -> None:
    tar = tar_from_spec({"a": b"x" * 100, "d/l": FileSpec("symlink", link="../a")})
    es = build_estargz(tar)
    assert oci.toc_digest_of(es.annotations) == es.toc_digest
    assert oci.format_of_descriptor(es.media_type, es.annotations) == "estargz"
    assert int(es.annotations[oci.ANN_UNCOMPRESSED_SIZE]) > 0
    zc = build_zstd_chunked(tar)
    assert oci.toc_digest_of(zc.annotations) == zc.toc_digest
    assert oci.format_of_descriptor(zc.media_type, zc.annotations) == "zstd-chunked"
    assert set(oci.LAZY_FORMATS) < set(oci.FORMATS)
