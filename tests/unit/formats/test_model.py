"""LayerIndex / IndexBuilder semantics, and footer / annotation detection variants."""

from __future__ import annotations

import hashlib

import pytest

from als.errors import FormatError, VerifyError
from als.formats import (
    EntryType,
    IndexBuilder,
    LayerAnnotations,
    detect_format,
    load_index,
    parse_footer,
)
from als.formats.toc import parse_time_ns
from tests.unit.conftest import CountingReader, simple_layer, wrap_zstd


def _builder() -> IndexBuilder:
    return IndexBuilder(format="estargz", toc_digest="sha256:x", blob_size=1000, toc_offset=900)


def test_implied_parents_children_and_lookup() -> None:
    b = _builder()
    b.add("z/y/x", EntryType.REG, 0o644, 1, 2, "u", "g", 5)
    b.add("./é", EntryType.DIR, 0o700)
    b.add("B", EntryType.SYMLINK, link="z")
    b.add("a", EntryType.FIFO, 0o600)
    b.add("z/", EntryType.DIR, 0o711, 7, 7)  # listed after being implied: takes the attributes
    ix = b.finish()
    z = ix.lookup("z")
    y = ix.lookup("/z/./y/")
    assert z is not None and y is not None
    assert ix.entry(z).mode == 0o711 and ix.entry(z).uid == 7
    ey = ix.entry(y)
    assert (ey.mode, ey.uid, ey.gid, ey.mtime_ns) == (0o755, 0, 0, 0)  # implied
    assert [ix.entry(c).name for c in ix.children(0)] == ["B", "a", "z", "é"]  # bytes order
    assert ix.child(0, "é") == ix.lookup("é")
    assert ix.child(0, "missing") is None and ix.child(ix.lookup("B") or 0, "x") is None
    assert ix.lookup("z/y/x/deeper") is None
    x = ix.entry(ix.lookup("z/y/x") or 0)
    assert (x.uname, x.gname, x.mtime_ns, x.parent) == ("u", "g", 5, y)
    assert ix.entry(0).nlink == 2 + 2 and ix.entry(z).nlink == 3
    assert all(ix.entry(i).parent < i for i in range(1, len(ix)))


def test_hidden_names_only_at_root() -> None:
    b = _builder()
    assert b.add("stargz.index.json", EntryType.REG) is None
    assert b.add("./.prefetch.landmark", EntryType.REG) is None
    assert b.add("sub/.prefetch.landmark", EntryType.REG) is not None
    ix = b.finish()
    assert ix.lookup("sub/.prefetch.landmark") is not None
    assert ix.lookup(".prefetch.landmark") is None


def test_chunk_ends_use_next_offset() -> None:
    b = _builder()
    digest = hashlib.sha256(b"").digest()
    b.add("f", EntryType.REG, size=30, digest=digest)
    b.add_chunk(100, 0, 10)
    b.add_chunk(200, 10, 20)
    b.add_hidden_data(".prefetch.landmark", 250)
    b.add("g", EntryType.REG, size=5, digest=digest)
    b.add_chunk(300, 0, 5)
    ix = b.finish()
    assert [(c.coffset, c.cend) for c in ix.chunks(ix.lookup("f") or 0)] == [
        (100, 200),
        (200, 250),
    ]
    assert ix.chunks(ix.lookup("g") or 0)[0].cend == 900
    # a small chunk far from the next offset does not cost a huge read
    b2 = IndexBuilder(format="estargz", toc_digest="x", blob_size=1 << 40, toc_offset=1 << 39)
    b2.add("tiny", EntryType.REG, size=10, digest=digest)
    b2.add_chunk(0, 0, 10)
    tiny = b2.finish()
    assert tiny.chunks(1)[0].cend == 20 + 64 * 1024
    assert ix.prefetch_end == 250
    assert ix.chunk_at(ix.lookup("f") or 0, 9) == 0 and ix.chunk_at(ix.lookup("f") or 0, 10) == 1
    assert ix.regular_bytes() == 35 and ix.regular_files() == 2


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2020-09-13T12:26:40Z", 1_600_000_000 * 10**9),
        ("2020-09-13T14:26:40.5+02:00", 1_600_000_000 * 10**9 + 500_000_000),
        ("2020-09-13T12:26:40.123456789123Z", 1_600_000_000_123_456_789),
        ("0001-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59Z", -(10**9)),
    ],
)
def test_time_parsing(text: str, ns: int) -> None:
    assert parse_time_ns(text) == ns


@pytest.mark.parametrize(
    "bad",
    ["", "2020-13-01T00:00:00Z", "2020-09-13 12:26", "x" * 50, "9999-01-01T00:00:00Z",
     "1000-01-01T00:00:00Z"],
)  # fmt: skip
def test_time_parsing_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="time"):
        parse_time_ns(bad)


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


def test_entry_views_are_cheap_and_read_only() -> None:
    region, toc = simple_layer({"x": b"1"})
    toc["entries"][0]["xattrs"] = {"user.k": "dg=="}
    from tests.unit.conftest import wrap_estargz

    blob = wrap_estargz(region, toc)
    ix = load_index(CountingReader(blob), len(blob))
    e = ix.entry(ix.lookup("x") or 0)
    assert dict(e.xattrs) == {"user.k": b"v"}
    with pytest.raises(TypeError):
        e.xattrs["user.k"] = b"w"  # type: ignore[index]
    with pytest.raises(IndexError):
        ix.entry(len(ix))


def test_detect_format_plain_and_garbage() -> None:
    from tests.unit.conftest import gz, zst

    tarish = bytearray(1024)
    tarish[257:262] = b"ustar"
    for blob, fmt in ((gz(b"x"), "gzip"), (zst(b"x"), "zstd"), (bytes(tarish), "tar")):
        assert detect_format(blob[:512], blob, len(blob)) == fmt
    with pytest.raises(FormatError, match="unrecognised"):
        detect_format(b"hello", b"hello", 5)
