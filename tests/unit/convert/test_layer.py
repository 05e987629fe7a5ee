"""als.convert.layer and refs: bounded decompression, tar reordering with a landmark, the
read-back verification, image locations."""

from __future__ import annotations

import gzip
from collections.abc import Sequence

import pytest

from als.convert.layer import build, drop_format_members, read_tar, reorder_tar, verify
from als.convert.refs import parse_location
from als.errors import ConfigError, FormatError, VerifyError
from als.formats import load_index
from als.formats.tarsplit import scan_tar
from tests.support.tarspec import FileSpec, tar_from_spec

SPEC: dict[str, bytes | FileSpec] = {
    "a/one": b"1" * 3000,
    "b/two": b"2" * 5000,
    "b/link": FileSpec("hardlink", link="a/one"),
    "c/three": b"3" * 100,
}


def _names(tar: bytes) -> list[str]:
    return [m.name.rstrip("/") for m in scan_tar(tar).members]


def test_read_tar_sniffs_and_bounds() -> None:
    tar = tar_from_spec(SPEC)
    assert read_tar(gzip.compress(tar) + gzip.compress(b"")) == tar
    assert read_tar(build(tar, "zstd").blob) == tar
    with pytest.raises(FormatError, match="more than 1000"):
        read_tar(gzip.compress(tar), limit=1000)
    with pytest.raises(FormatError, match="invalid gzip"):
        read_tar(gzip.compress(tar)[:-30])


def test_reorder_tar_moves_files_parents_and_link_targets_first() -> None:
    tar = tar_from_spec(SPEC)
    out = reorder_tar(tar, ["c/three", "b/link"])
    names = _names(out)
    landmark = names.index(".prefetch.landmark")
    assert set(names[:landmark]) >= {"c", "c/three", "b", "b/link", "a", "a/one"}
    assert names[:landmark].index("a/one") < names[:landmark].index("b/link")
    assert "b/two" in names[landmark:]
    assert sorted(n for n in names if n != ".prefetch.landmark") == sorted(_names(tar))
    assert drop_format_members(out) != out
    assert _names(drop_format_members(out)) == [n for n in names if n != ".prefetch.landmark"]


@pytest.mark.parametrize("fmt", ["estargz", "estargz-zstd", "zstd-chunked"])
def test_prioritized_layers_mark_their_prefetch_region(fmt: str) -> None:
    built = build(tar_from_spec(SPEC), fmt, prioritized=["c/three"])
    blob = built.blob

    def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [blob[o : o + n] for o, n in ranges]

    ix = load_index(read, len(blob), annotations=built.annotations)
    assert ix.prefetch_end is not None
    assert [ix.path(i) for i in ix.files_in_order(ix.prefetch_end)] == ["c/three"]
    assert verify(blob, built.annotations, toc_digest=built.toc_digest,
                  diff_id=built.diff_id, layer="t") == 3  # fmt: skip


def test_verify_refuses_damage_and_a_wrong_diff_id() -> None:
    built = build(tar_from_spec(SPEC), "estargz")
    kw = {"toc_digest": built.toc_digest, "layer": "t"}
    with pytest.raises(VerifyError, match="decompressed stream"):
        verify(built.blob, built.annotations, diff_id="sha256:" + "0" * 64, **kw)
    i = built.blob.index(b"\x1f\x8b", 100)
    bad = built.blob[: i + 20] + bytes([built.blob[i + 20] ^ 0xFF]) + built.blob[i + 21 :]
    with pytest.raises(VerifyError, match="does not verify"):
        verify(bad, built.annotations, diff_id=built.diff_id, **kw)


def test_locations() -> None:
    assert str(parse_location("docker://h:5000/r/a:t", source=True)) == "docker://h:5000/r/a:t"
    loc = parse_location("oci:/some/dir:tag", source=False)
    assert (loc.transport, loc.ref, loc.tag) == ("oci", "/some/dir", "tag")
    loc = parse_location("oci:./a/b", source=True)
    assert (loc.ref, loc.tag) == ("./a/b", None)
    assert parse_location("containers-storage:localhost/x:1", source=True).ref == "localhost/x:1"
    with pytest.raises(ConfigError, match="source only"):
        parse_location("containers-storage:x", source=False)
    with pytest.raises(ConfigError, match="not an image location"):
        parse_location("quay.io/x", source=True)


def test_read_tar_joins_many_gzip_members_across_input_windows() -> None:
    import random

    import als.convert.layer as layer_mod

    rng = random.Random(7)
    parts = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(400)]
    blob = b"".join(gzip.compress(p) for p in parts)
    old = layer_mod._WINDOW
    try:
        for window in (1, 7, 512, 4096, 1 << 20):  # members end inside, at and across windows
            layer_mod._WINDOW = window
            assert read_tar(blob + b"\0garbage") == b"".join(parts)
            with pytest.raises(FormatError, match="truncated"):
                read_tar(blob[:-5])
            with pytest.raises(FormatError, match="more than"):
                read_tar(blob, limit=sum(map(len, parts)) - 1)
    finally:
        layer_mod._WINDOW = old
