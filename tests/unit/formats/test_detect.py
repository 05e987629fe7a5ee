"""Format detection: footer variants, the eStargz-zstd JSON shape, annotations, plain blobs."""

from __future__ import annotations

import pytest

from als.errors import FormatError, VerifyError
from als.formats import LayerAnnotations, detect_format, load_index, parse_footer, tar_size
from tests.support.layers import FileSpec, make_layer, make_tar, noise
from tests.unit.conftest import CountingReader, simple_layer, wrap_zstd


@pytest.mark.parametrize(
    ("footer", "magic"),
    [(40, b"GnUlInUx"), (40, b"GNUlInUx"), (56, b"GnUlInUx"), (64, b"GNUlInUx")],
)
def test_zstd_footer_variants(footer: int, magic: bytes) -> None:
    region, toc = simple_layer({"a": b"abc", "b/c": b"x" * 100}, zstd=True)
    blob, ann = wrap_zstd(region, toc, footer=footer, magic=magic)
    f = parse_footer(blob[-100:], len(blob))
    assert f is not None and f.kind == f"zstd{footer}"
    assert (f.tarsplit is not None) == (footer == 64)
    assert detect_format(blob[:512], blob[-65536:], len(blob)) == "zstd-chunked"
    ix = load_index(CountingReader(blob), len(blob))
    assert ix.format == "zstd-chunked"
    assert ix.toc_digest == ann["io.github.containers.zstd-chunked.manifest-checksum"]
    old = {k.replace("io.github.", "io."): v for k, v in ann.items()}
    for a in (ann, old):
        r = CountingReader(blob)
        assert load_index(r, len(blob), annotations=a).toc_digest == ix.toc_digest
        assert len(r.calls) == 1


def test_estargz_zstd_detected_from_json_shape_and_toc_digest() -> None:
    region, toc = simple_layer({"a": b"abc"}, zstd=True)
    toc["entries"].insert(0, {"name": ".no.prefetch.landmark", "type": "reg", "size": 1})
    blob, ann = wrap_zstd(region, toc, indent=True)
    ix = load_index(CountingReader(blob), len(blob))
    assert ix.format == "estargz-zstd" and ix.no_prefetch
    assert detect_format(blob[:512], blob, len(blob)) == "estargz-zstd"
    # toc_digest is the sha256 of the uncompressed JSON, as the toc.digest annotation says
    js = b'{\n\t"version": 1'
    assert ix.toc_json_size > len(js)
    sg_ann = {"containerd.io/snapshot/stargz/toc.digest": ix.toc_digest}
    assert load_index(CountingReader(blob), len(blob), annotations=sg_ann).format == (
        "estargz-zstd"
    )
    with pytest.raises(VerifyError):
        load_index(CountingReader(blob), len(blob), expected_toc_digest=ann[next(iter(ann))])


def test_annotation_parsing() -> None:
    a = LayerAnnotations.parse(
        {
            "io.containers.zstd-chunked.manifest-position": "1:2:3:1",
            "io.github.containers.zstd-chunked.tarsplit-position": "4:5:6",
        }
    )
    assert a.manifest_position == (1, 2, 3, 1) and a.tarsplit_position == (4, 5, 6)
    assert LayerAnnotations.parse(None) == LayerAnnotations()
    for bad in ({"containerd.io/snapshot/stargz/toc.digest": "sha256:abc"},
                {"io.containers.zstd-chunked.manifest-position": "-1:2:3:1"}):  # fmt: skip
        with pytest.raises(FormatError):
            LayerAnnotations.parse(bad)


def test_detect_format_plain_and_garbage() -> None:
    from tests.unit.conftest import gz, zst

    tarish = bytearray(1024)
    tarish[257:262] = b"ustar"
    for blob, fmt in ((gz(b"x"), "gzip"), (zst(b"x"), "zstd"), (bytes(tarish), "tar")):
        assert detect_format(blob[:512], blob, len(blob)) == fmt
    with pytest.raises(FormatError, match="unrecognised"):
        detect_format(b"hello", b"hello", 5)


TAR_SPEC: dict[str, bytes | str | FileSpec] = {
    "usr/bin/tool": noise("tool", 200_000),
    "usr/share/" + "n" * 140: b"a long name needs a PAX header",
    "etc/x": FileSpec(content=b"1", xattrs={"user.k": b"v"}),
    "etc/link": FileSpec(type="hardlink", link="etc/x"),
}


def test_tar_size_from_the_tarsplit() -> None:
    """zstd:chunked: the size of the layer's tar, read from the tar-split (one read), with or
    without the annotations; layers without a tar-split have none."""
    tar = make_tar(TAR_SPEC)
    layer = make_layer(tar, "zstd-chunked")
    for ann in (layer.annotations, None):
        ix = load_index(CountingReader(layer.blob), len(layer.blob), annotations=ann)
        r = CountingReader(layer.blob)
        assert tar_size(r, ix) == len(tar)
        assert ix.tarsplit is not None and r.calls == [[(ix.tarsplit[0], ix.tarsplit[1])]]
    for fmt in ("zstd-chunked-1.43", "estargz", "estargz-zstd"):
        other = make_layer(tar, fmt)
        ix = load_index(CountingReader(other.blob), len(other.blob))
        r = CountingReader(other.blob)
        assert tar_size(r, ix) is None and r.calls == []


def test_tar_size_verifies_the_tarsplit() -> None:
    layer = make_layer(make_tar(TAR_SPEC), "zstd-chunked")
    ix = load_index(CountingReader(layer.blob), len(layer.blob))
    assert ix.tarsplit is not None
    off = ix.tarsplit[0]
    bad = bytearray(layer.blob)
    bad[off + 20] ^= 0xFF
    with pytest.raises(VerifyError, match="tar-split digest mismatch"):
        tar_size(CountingReader(bytes(bad)), ix)
