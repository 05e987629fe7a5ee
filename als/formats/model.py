"""The in-memory model of a lazily-pullable layer: a compact, columnar index of its entries.

A store holds the index of many layers at once, so nothing here keeps one Python object per
entry. Every per-entry attribute lives in a column (``array`` / ``bytearray``), names are one UTF-8
blob with an offsets array, user and group names are interned, and rare attributes (symlink
targets, xattrs, device numbers, innerOffset) live in sparse dicts. :class:`Entry` and
:class:`Chunk` objects are *views* built on demand.

:class:`als.formats.builder.IndexBuilder` is the only way to make a :class:`LayerIndex`; it
enforces the tree invariants (no ``..``, no duplicates, parents are directories, hardlinks point
to earlier entries) so that every index that exists is safe to serve and to extract.
"""

from __future__ import annotations

import enum
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

# Limits applied while validating a TOC (hostile input must not exhaust memory or time).
MAX_ENTRIES = 2_000_000  # entries in the tree
MAX_TOC_RECORDS = 2 * MAX_ENTRIES  # JSON records, chunk records included
MAX_PATH = 4096  # bytes, UTF-8
MAX_NAME = 255  # bytes, UTF-8
MAX_DEPTH = 256  # path components
MAX_TOC_JSON = 512 * 1024 * 1024  # uncompressed TOC JSON
MAX_FILE_SIZE = 1 << 40  # 1 TiB
MAX_XATTR_VALUE = 64 * 1024
MAX_INNER = 1 << 30  # eStargz innerOffset  # Linux XATTR_SIZE_MAX
MAX_ID = (1 << 32) - 1

# Names at the layer root that belong to the format, never to the tree.
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
HIDDEN_ROOT_NAMES = frozenset({TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})

# (offset, length) ranges of the blob -> exactly those bytes, one bytes object per range.
ReadRanges = Callable[[Sequence[tuple[int, int]]], list[bytes]]

EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class EntryType(enum.IntEnum):
    REG = 0
    DIR = 1
    SYMLINK = 2
    HARDLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6


@dataclass(frozen=True, slots=True)
class Chunk:
    coffset: int
    cend: int
    uoffset: int
    size: int
    inner: int
    digest: str | None
    zeros: bool


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    path: str
    name: str
    parent: int
    type: EntryType
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime_ns: int
    size: int
    link: str
    devmajor: int
    devminor: int
    xattrs: Mapping[str, bytes]
    digest: str | None
    target: int
    nlink: int


# Flag bits of the index's chunk-flags column (set by the builder, read here).
CHUNK_HAS_DIGEST = 1
CHUNK_ZEROS = 2

_T_REG = int(EntryType.REG)
_EMPTY_XATTRS: Mapping[str, bytes] = MappingProxyType({})


def _hex_digest(raw: bytes | bytearray) -> str:
    return "sha256:" + raw.hex()


class _ChunkList(Sequence[Chunk]):
    """The chunks of one file, as a lazy sequence over the index's chunk columns."""

    __slots__ = ("_ix", "_lo", "_n")

    def __init__(self, ix: LayerIndex, lo: int, hi: int) -> None:
        self._ix = ix
        self._lo = lo
        self._n = hi - lo

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k):  # type: ignore[no-untyped-def]  # overloads int/slice
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(self._n))]
        if k < 0:
            k += self._n
        if not 0 <= k < self._n:
            raise IndexError(k)
        return self._ix._chunk(self._lo + k)

    def __iter__(self) -> Iterator[Chunk]:
        for j in range(self._lo, self._lo + self._n):
            yield self._ix._chunk(j)


class LayerIndex:
    """A validated, immutable layer index. Built by :class:`~als.formats.builder.IndexBuilder`."""

    format: str
    toc_digest: str
    blob_size: int
    toc_offset: int
    prefetch_end: int | None
    no_prefetch: bool
    layer: str
    toc_size: int  # compressed size of the TOC region as stored in the blob (0 if unknown)
    toc_json_size: int  # uncompressed TOC JSON size
    root_listed: bool  # the TOC has an entry for the root directory itself ("./")
    # zstd:chunked: where the tar-split is (offset, compressed length, uncompressed length) and
    # the digest of its compressed bytes the TOC states; None when the blob has none.
    tarsplit: tuple[int, int, int] | None
    tarsplit_digest: str | None

    def __init__(self) -> None:
        raise TypeError("LayerIndex is built by IndexBuilder")

    # ---- entries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._parent)

    def _name(self, i: int) -> str:
        off = self._noff
        return self._nblob[off[i] : off[i + 1]].decode("utf-8")

    def _name_bytes(self, i: int) -> bytes:
        off = self._noff
        return self._nblob[off[i] : off[i + 1]]

    def entry_name(self, i: int) -> str:
        """Last path component of entry ``i`` ("" for the root)."""
        return self._name(i) if i else ""

    def entry_parent(self, i: int) -> int:
        return self._parent[i]

    def path(self, i: int) -> str:
        """The cleaned path of entry ``i`` ("" for the root)."""
        parts: list[str] = []
        parent = self._parent
        while i:
            parts.append(self._name(i))
            i = parent[i]
        parts.reverse()
        return "/".join(parts)

    def type(self, i: int) -> EntryType:
        return EntryType(self._type[i])

    def resolved(self, i: int) -> int:
        """The id of the inode entry ``i`` names (its hardlink target, or itself)."""
        t = self._target[i]
        return i if t < 0 else t

    def entry(self, i: int) -> Entry:
        if not 0 <= i < len(self._parent):
            raise IndexError(f"entry id {i} out of range")
        r = self.resolved(i)
        t = EntryType(self._type[i])
        dev = self._dev.get(i)
        xattrs = self._xattrs.get(i)
        return Entry(
            id=i,
            path=self.path(i),
            name=self._name(i) if i else "",
            parent=self._parent[i],
            type=t,
            mode=self._mode[i],
            uid=self._uid[i],
            gid=self._gid[i],
            uname=self._names_tab[self._uname[i]],
            gname=self._names_tab[self._gname[i]],
            mtime_ns=self._mtime[i],
            size=self._size[r],
            link=self._links.get(i, ""),
            devmajor=dev[0] if dev else 0,
            devminor=dev[1] if dev else 0,
            xattrs=MappingProxyType(xattrs) if xattrs else _EMPTY_XATTRS,
            digest=self.digest(r),
            target=self._target[i],
            nlink=self._nlink[i],
        )

    def digest(self, i: int) -> str | None:
        """Whole-file digest of the inode entry ``i`` names (resolving hardlinks)."""
        r = self.resolved(i)
        if not self._hasdig[r]:
            return None
        return _hex_digest(self._digest[32 * r : 32 * r + 32])

    def size(self, i: int) -> int:
        return self._size[self.resolved(i)]

    def lookup(self, path: str) -> int | None:
        cur = 0
        for comp in path.split("/"):
            if comp in ("", "."):
                continue
            nxt = self.child(cur, comp)
            if nxt is None:
                return None
            cur = nxt
        return cur

    def child(self, dir_id: int, name: str) -> int | None:
        if not 0 <= dir_id < len(self._parent) or self._type[dir_id] != EntryType.DIR:
            return None
        try:
            key = name.encode("utf-8")
        except UnicodeEncodeError:
            return None
        lo, hi = self._cstart[dir_id], self._cstart[dir_id + 1]
        ids = self._child_ids
        k = bisect_left(ids, key, lo, hi, key=self._name_bytes)
        if k < hi and self._name_bytes(ids[k]) == key:
            return ids[k]
        return None

    def children(self, dir_id: int) -> Sequence[int]:
        if not 0 <= dir_id < len(self._parent):
            raise IndexError(f"entry id {dir_id} out of range")
        return self._child_ids[self._cstart[dir_id] : self._cstart[dir_id + 1]]

    def iter_ids(self) -> range:
        """All ids in layer order; a parent always comes before its children."""
        return range(len(self._parent))

    # ---- file data -------------------------------------------------------------------------

    def _chunk(self, j: int) -> Chunk:
        flags = self._c_flags[j]
        return Chunk(
            coffset=self._c_off[j],
            cend=self._c_end[j],
            uoffset=self._c_uoff[j],
            size=self._c_size[j],
            inner=self._c_inner.get(j, 0),
            digest=_hex_digest(self._c_digest[32 * j : 32 * j + 32])
            if flags & CHUNK_HAS_DIGEST
            else None,
            zeros=bool(flags & CHUNK_ZEROS),
        )

    def chunks(self, i: int) -> Sequence[Chunk]:
        r = self.resolved(i)
        return _ChunkList(self, self._chstart[r], self._chstart[r + 1])

    def chunk_at(self, i: int, offset: int) -> int:
        """Index (into ``chunks(i)``) of the chunk holding file offset ``offset``."""
        r = self.resolved(i)
        lo, hi = self._chstart[r], self._chstart[r + 1]
        k = bisect_right(self._c_uoff, offset, lo, hi) - 1
        if k < lo:
            raise IndexError(f"offset {offset} outside the file")
        return k - lo

    def whole_file_verify(self, i: int) -> bool:
        r = self.resolved(i)
        flags = self._c_flags
        return any(
            not flags[j] & CHUNK_HAS_DIGEST for j in range(self._chstart[r], self._chstart[r + 1])
        )

    def files_in_order(self, coffset_end: int | None = None) -> list[int]:
        """Regular files with data, by the offset of their first chunk in the blob.

        With ``coffset_end``, only files whose first chunk starts before it (the prioritized
        region of an eStargz layer ends at its prefetch landmark).
        """
        t, chstart, c_off = self._type, self._chstart, self._c_off
        found = [
            (c_off[chstart[i]], i)
            for i in range(len(t))
            if t[i] == _T_REG
            and chstart[i] < chstart[i + 1]
            and (coffset_end is None or c_off[chstart[i]] < coffset_end)
        ]
        found.sort()
        return [i for _, i in found]

    def chunk_digests(self) -> set[str]:
        """The digests of every chunk that has one (the content-addressed cache keys)."""
        flags, raw = self._c_flags, self._c_digest
        return {
            _hex_digest(raw[32 * j : 32 * j + 32])
            for j in range(len(flags))
            if flags[j] & CHUNK_HAS_DIGEST
        }

    def regular_bytes(self) -> int:
        return self._regular_bytes

    def regular_files(self) -> int:
        """Number of REG entries (hardlinks not counted)."""
        return self._regular_files

    def chunk_count(self) -> int:
        return len(self._c_off)

    def nbytes(self) -> int:
        n = 0
        for col in self._columns():
            n += sys.getsizeof(col)
        for d in (self._links, self._xattrs, self._dev, self._c_inner):
            n += sys.getsizeof(d)
        n += sum(sys.getsizeof(s) for s in self._links.values())
        n += sum(
            sys.getsizeof(x) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in x.items())
            for x in self._xattrs.values()
        )
        n += sum(sys.getsizeof(s) for s in self._names_tab)
        return n

    # ---- internals -------------------------------------------------------------------------

    _nblob: bytes
    _noff: array[int]
    _parent: array[int]
    _type: bytearray
    _mode: array[int]
    _uid: array[int]
    _gid: array[int]
    _uname: array[int]
    _gname: array[int]
    _names_tab: list[str]
    _mtime: array[int]
    _size: array[int]
    _digest: bytearray
    _hasdig: bytearray
    _target: array[int]
    _nlink: array[int]
    _links: dict[int, str]
    _xattrs: dict[int, dict[str, bytes]]
    _dev: dict[int, tuple[int, int]]
    _child_ids: array[int]
    _cstart: array[int]
    _chstart: array[int]
    _c_off: array[int]
    _c_end: array[int]
    _c_uoff: array[int]
    _c_size: array[int]
    _c_digest: bytearray
    _c_flags: bytearray
    _c_inner: dict[int, int]
    _regular_bytes: int
    _regular_files: int

    def _columns(self) -> list[object]:
        return [
            self._nblob, self._noff, self._parent, self._type, self._mode, self._uid, self._gid,
            self._uname, self._gname, self._names_tab, self._mtime, self._size, self._digest,
            self._hasdig, self._target, self._nlink, self._child_ids, self._cstart,
            self._chstart, self._c_off, self._c_end, self._c_uoff, self._c_size, self._c_digest,
            self._c_flags,
        ]  # fmt: skip
