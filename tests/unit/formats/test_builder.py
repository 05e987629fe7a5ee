"""IndexBuilder: hidden format files, chunk ends and the prefetch landmark."""

from __future__ import annotations

import hashlib

from als.formats import EntryType, IndexBuilder


def _builder() -> IndexBuilder:
    return IndexBuilder(format="estargz", toc_digest="sha256:x", blob_size=1000, toc_offset=900)


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
