"""LayerIndex: lookup, children and link counts of a built index, and its read-only entry views."""

from __future__ import annotations

import pytest

from als.formats import EntryType, IndexBuilder, load_index
from tests.unit.conftest import CountingReader, simple_layer


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
