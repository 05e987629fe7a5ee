"""The in-memory model of a lazily-pullable layer: a compact, columnar index of its entries.

A store holds the index of many layers at once, so nothing here keeps one Python object per
entry. Every per-entry attribute lives in a column (``array`` / ``bytearray``), names are one UTF-8
blob with an offsets array, user and group names are interned, and rare attributes (symlink
targets, xattrs, device numbers, innerOffset) live in sparse dicts. :class:`Entry` and
:class:`Chunk` objects are *views* built on demand.

:class:`IndexBuilder` is the only way to make a :class:`LayerIndex`; it enforces the tree
invariants (no ``..``, no duplicates, parents are directories, hardlinks point to earlier
entries) so that every index that exists is safe to serve and to extract.
"""

from __future__ import annotations

import enum
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from als.errors import FormatError
from als.oci import LAZY_FORMATS

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


_ZERO32 = bytes(32)
_T_REG = int(EntryType.REG)
_T_DIR = int(EntryType.DIR)
_T_SYMLINK = int(EntryType.SYMLINK)
_T_HARDLINK = int(EntryType.HARDLINK)
_T_CHAR = int(EntryType.CHAR)
_T_BLOCK = int(EntryType.BLOCK)
_EMPTY_XATTRS: Mapping[str, bytes] = MappingProxyType({})
_READ_SLACK = 64 * 1024
_CH_HAS_DIGEST = 1
_CH_ZEROS = 2


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
    """A validated, immutable layer index. Built by :class:`IndexBuilder`."""

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
            if flags & _CH_HAS_DIGEST
            else None,
            zeros=bool(flags & _CH_ZEROS),
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
            not flags[j] & _CH_HAS_DIGEST for j in range(self._chstart[r], self._chstart[r + 1])
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
            if flags[j] & _CH_HAS_DIGEST
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


def _ew(raw_name: str) -> str:
    return f"entry {raw_name[:300]!r}"


def clean_path(raw: str, what: str = "path") -> str:
    """Clean a tar path the way tar does (``/a/./b/`` -> ``a/b``); refuse anything unsafe.

    Leading ``/`` and ``./`` are dropped (tar strips them too); ``..`` anywhere, NUL bytes and
    names that are not valid Unicode are refused rather than normalised. "" is the root.
    """
    r = raw.rstrip("/")
    if (
        r
        and r.isascii()
        and len(r) <= MAX_NAME
        and "\x00" not in r
        and "/." not in r
        and "//" not in r
        and r[0] not in "./"
    ):
        return r  # fast path: already clean, short ASCII path
    return "/".join(split_path(raw, what))


def split_path(raw: str, what: str = "path") -> list[str]:
    """:func:`clean_path` as a list of components ([] for the root)."""
    if "\x00" in raw:
        raise ValueError(f"{what} contains a NUL byte")
    parts = raw.split("/")
    if "" in parts or "." in parts:
        parts = [p for p in parts if p and p != "."]
    if ".." in parts:
        raise ValueError(f"{what} has a '..' component")
    if len(parts) > MAX_DEPTH:
        raise ValueError(f"{what} is deeper than {MAX_DEPTH} components")
    try:
        n = len(raw.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode") from None
    if n > MAX_NAME:
        if n > MAX_PATH and len("/".join(parts).encode("utf-8")) > MAX_PATH:
            raise ValueError(f"{what} is longer than {MAX_PATH} bytes")
        for p in parts:
            if len(p.encode("utf-8")) > MAX_NAME:
                raise ValueError(f"{what} has a component longer than {MAX_NAME} bytes")
    return parts


class IndexBuilder:
    """Accumulates entries (in layer order) and produces a validated :class:`LayerIndex`.

    Errors raise :class:`FormatError` naming the layer and the entry.
    """

    def __init__(
        self,
        *,
        format: str,
        toc_digest: str,
        blob_size: int,
        toc_offset: int,
        layer: str = "",
    ) -> None:
        if format not in LAZY_FORMATS:
            raise ValueError(f"not a lazy format: {format}")
        if not 0 <= toc_offset <= blob_size:
            raise FormatError(f"layer {layer}: TOC offset {toc_offset} outside the blob")
        self.format = format
        self.toc_digest = toc_digest
        self.blob_size = blob_size
        self.toc_offset = toc_offset
        self.layer = layer
        self.toc_size = 0
        self.toc_json_size = 0
        self.prefetch_end: int | None = None
        self.no_prefetch = False
        self._paths: dict[str, int] = {"": 0}
        self._names: list[str] = [""]
        self._parent = array("I", [0])
        self._type = bytearray([EntryType.DIR])
        self._explicit = bytearray([0])
        self._mode = array("H", [0o755])
        self._uid = array("I", [0])
        self._gid = array("I", [0])
        self._names_tab: list[str] = [""]
        self._names_ix: dict[str, int] = {"": 0}
        self._uname = array("I", [0])
        self._gname = array("I", [0])
        self._mtime = array("q", [0])
        self._size = array("q", [0])
        self._digest = bytearray(32)
        self._hasdig = bytearray(1)
        self._target = array("i", [-1])
        self._links: dict[int, str] = {}
        self._xattrs: dict[int, dict[str, bytes]] = {}
        self._dev: dict[int, tuple[int, int]] = {}
        self._chstart = array("I", [0])
        self._c_off = array("q")
        self._c_uoff = array("q")
        self._c_size = array("q")
        self._c_digest = bytearray()
        self._c_flags = bytearray()
        self._c_inner: dict[int, int] = {}
        self._extra_offsets: list[int] = []  # data offsets of hidden entries (landmarks)
        self._open_file = -1  # id of the REG entry whose chunks are being added
        self._open_next = 0  # expected uoffset of its next chunk

    def _fail(self, what: str, msg: str) -> FormatError:
        layer = f"layer {self.layer}: " if self.layer else ""
        return FormatError(f"{layer}{what}: {msg}")

    def _intern(self, s: str) -> int:
        ix = self._names_ix.get(s)
        if ix is None:
            ix = self._names_ix[s] = len(self._names_tab)
            self._names_tab.append(s)
        return ix

    def _new(self, parent: int, name: str, etype: int) -> int:
        i = len(self._names)
        if i > MAX_ENTRIES:
            raise self._fail("TOC", f"more than {MAX_ENTRIES} entries")
        self._names.append(name)
        self._parent.append(parent)
        self._type.append(etype)
        self._explicit.append(0)
        self._mode.append(0o755)
        self._uid.append(0)
        self._gid.append(0)
        self._uname.append(0)
        self._gname.append(0)
        self._mtime.append(0)
        self._size.append(0)
        self._digest += _ZERO32
        self._hasdig.append(0)
        self._target.append(-1)
        self._chstart.append(len(self._c_off))
        return i

    def _close_file(self) -> None:
        i = self._open_file
        if i >= 0:
            self._open_file = -1
            if self._open_next != self._size[i]:
                raise self._fail(
                    f"entry {self._path_of(i)!r}",
                    f"chunks cover {self._open_next} of {self._size[i]} bytes",
                )

    def _path_of(self, i: int) -> str:
        parts = []
        while i:
            parts.append(self._names[i])
            i = self._parent[i]
        return "/".join(reversed(parts))

    def _make_parents(self, parts: list[str], raw_name: str) -> int:
        """Walk (creating implied directories) to the parent of ``parts``; return its id."""
        cur = 0
        prefix = ""
        for comp in parts[:-1]:
            prefix = f"{prefix}/{comp}" if prefix else comp
            nxt = self._paths.get(prefix)
            if nxt is None:
                nxt = self._new(cur, comp, EntryType.DIR)
                self._paths[prefix] = nxt
            elif self._type[nxt] != EntryType.DIR:
                raise self._fail(_ew(raw_name), f"parent {prefix!r} is not a directory")
            cur = nxt
        return cur

    def add(
        self,
        raw_name: str,
        etype: EntryType,
        mode: int = 0,
        uid: int = 0,
        gid: int = 0,
        uname: str = "",
        gname: str = "",
        mtime_ns: int = 0,
        size: int = 0,
        link: str = "",
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: dict[str, bytes] | None = None,
        digest: bytes | None = None,
    ) -> int | None:
        """Add one tree entry. Returns its id, or None for hidden format files (TOC, landmarks).

        ``digest`` is the raw 32-byte sha256. Regular files with data must be followed by their
        chunks (:meth:`add_chunk`) before the next :meth:`add`.
        """
        if self._open_file >= 0:
            self._close_file()
        try:
            path = clean_path(raw_name)
        except ValueError as exc:
            raise self._fail(_ew(raw_name), str(exc)) from None
        if not (0 <= size <= MAX_FILE_SIZE and 0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
            raise self._fail(_ew(raw_name), "size, uid or gid out of range")
        if etype != _T_REG:
            size = 0  # only regular files have data; tar's size field is meaningless otherwise
            digest = None
        if path in HIDDEN_ROOT_NAMES:
            return None
        uname_ix = self._names_ix.get(uname)
        if uname_ix is None:
            uname_ix = self._intern(uname)
        gname_ix = self._names_ix.get(gname)
        if gname_ix is None:
            gname_ix = self._intern(gname)
        mode &= 0o7777
        paths = self._paths
        i_old: int | None
        if not path:
            if etype != _T_DIR:
                raise self._fail(_ew(raw_name), "the layer root must be a directory")
            i_old = 0
        else:
            k = path.rfind("/")
            if k < 0:
                cur = 0
                name = path
            else:
                name = path[k + 1 :]
                cur = paths.get(path[:k], -1)
                if cur < 0:
                    cur = self._make_parents(path.split("/"), raw_name)
                elif self._type[cur] != _T_DIR:
                    raise self._fail(_ew(raw_name), "its parent is not a directory")
            i_old = paths.get(path)
        if i_old is not None:
            if self._explicit[i_old] or etype != _T_DIR:
                raise self._fail(_ew(raw_name), f"duplicate entry for path {path!r}")
            i = i_old  # an implied directory (or the root), now listed
            self._explicit[i] = 1
            self._mode[i] = mode
            self._uid[i] = uid
            self._gid[i] = gid
            self._uname[i] = uname_ix
            self._gname[i] = gname_ix
            self._mtime[i] = mtime_ns
        else:
            i = len(self._names)
            if i > MAX_ENTRIES:
                raise self._fail("TOC", f"more than {MAX_ENTRIES} entries")
            paths[path] = i
            self._names.append(name)
            self._parent.append(cur)
            self._type.append(etype)
            self._explicit.append(1)
            self._mode.append(mode)
            self._uid.append(uid)
            self._gid.append(gid)
            self._uname.append(uname_ix)
            self._gname.append(gname_ix)
            self._mtime.append(mtime_ns)
            self._size.append(size)
            if digest is not None:
                if len(digest) != 32:
                    raise ValueError("digest must be 32 raw bytes")
                self._digest += digest
                self._hasdig.append(1)
            else:
                self._digest += _ZERO32
                self._hasdig.append(0)
            self._target.append(-1)
            self._chstart.append(len(self._c_off))
        if xattrs:
            self._xattrs[i] = xattrs
        if etype == _T_REG:
            if size:
                self._open_file = i
                self._open_next = 0
        elif etype == _T_SYMLINK:
            try:
                blen = len(link.encode("utf-8"))
            except UnicodeEncodeError:
                blen = -1
            if not link or "\x00" in link or not 0 < blen <= MAX_PATH:
                raise self._fail(_ew(raw_name), "invalid symlink target")
            self._links[i] = link
        elif etype == _T_HARDLINK:
            try:
                tpath = clean_path(link, "hardlink target")
            except ValueError as exc:
                raise self._fail(_ew(raw_name), str(exc)) from None
            t = paths.get(tpath)
            if t is None or not self._explicit[t] or t == i:
                raise self._fail(
                    _ew(raw_name), f"hardlink target {tpath!r} is not an earlier entry"
                )
            if self._type[t] == _T_DIR:
                raise self._fail(_ew(raw_name), f"hardlink target {tpath!r} is a directory")
            if self._target[t] >= 0:
                t = self._target[t]
            self._target[i] = t
        elif etype in (_T_CHAR, _T_BLOCK):
            if not (0 <= devmajor <= MAX_ID and 0 <= devminor <= MAX_ID):
                raise self._fail(_ew(raw_name), "device numbers out of range")
            if devmajor or devminor:
                self._dev[i] = (devmajor, devminor)
        return i

    def open_file_size(self) -> int:
        """Size of the regular file whose chunks are being added (0 if none)."""
        return self._size[self._open_file] if self._open_file >= 0 else 0

    def add_hidden_data(self, name: str, coffset: int | None) -> None:
        """Record a hidden format file (a landmark) at the layer root and its data offset."""
        self._close_file()
        if coffset is None:
            if name == NO_PREFETCH_LANDMARK:
                self.no_prefetch = True
            return
        if not 0 <= coffset < self.toc_offset:
            raise FormatError(
                f"layer {self.layer}: {name}: data offset {coffset} outside [0, {self.toc_offset})"
            )
        self._extra_offsets.append(coffset)
        if name == PREFETCH_LANDMARK:
            self.prefetch_end = coffset
        elif name == NO_PREFETCH_LANDMARK:
            self.no_prefetch = True

    def add_chunk(
        self,
        coffset: int,
        uoffset: int,
        size: int,
        *,
        inner: int = 0,
        digest: bytes | None = None,
        zeros: bool = False,
    ) -> None:
        """Add the next chunk of the regular file added last (chunks in uoffset order)."""
        i = self._open_file
        if i < 0:
            raise self._fail("TOC", "chunk without a preceding regular file with data")
        if (
            uoffset != self._open_next
            or size <= 0
            or uoffset + size > self._size[i]
            or not 0 <= coffset < self.toc_offset
            or not 0 <= inner <= MAX_INNER
        ):
            self._chunk_error(i, coffset, uoffset, size, inner)
        j = len(self._c_off)
        self._c_off.append(coffset)
        self._c_uoff.append(uoffset)
        self._c_size.append(size)
        if inner:
            self._c_inner[j] = inner
        flags = _CH_ZEROS if zeros else 0
        if digest is not None:
            self._c_digest.extend(digest)
            flags |= _CH_HAS_DIGEST
        else:
            self._c_digest.extend(bytes(32))
        self._c_flags.append(flags)
        self._open_next = uoffset + size

    def _chunk_error(self, i: int, coffset: int, uoffset: int, size: int, inner: int) -> None:
        what = f"entry {self._path_of(i)!r}"
        if uoffset != self._open_next:
            raise self._fail(
                what, f"chunk at file offset {uoffset}, expected {self._open_next} (gap/overlap)"
            )
        if size <= 0 or uoffset + size > self._size[i]:
            raise self._fail(what, f"chunk at file offset {uoffset} has invalid size {size}")
        if not 0 <= coffset < self.toc_offset:
            raise self._fail(
                what, f"chunk data offset {coffset} outside the data area [0, {self.toc_offset})"
            )
        raise self._fail(what, f"invalid innerOffset {inner}")

    def finish(self) -> LayerIndex:
        self._close_file()
        n = len(self._names)
        ix = object.__new__(LayerIndex)
        ix.format = self.format
        ix.toc_digest = self.toc_digest
        ix.blob_size = self.blob_size
        ix.toc_offset = self.toc_offset
        ix.prefetch_end = self.prefetch_end
        ix.no_prefetch = self.no_prefetch
        ix.layer = self.layer
        ix.toc_size = self.toc_size
        ix.toc_json_size = self.toc_json_size
        ix.root_listed = bool(self._explicit[0])

        names = self._names
        encoded = [s.encode("utf-8") for s in names]
        noff = array("I", [0])
        pos = 0
        for b in encoded:
            pos += len(b)
            noff.append(pos)
        ix._nblob = b"".join(encoded)
        del encoded
        ix._noff = noff
        ix._parent = self._parent
        ix._type = self._type
        ix._mode = self._mode
        ix._uid = self._uid
        ix._gid = self._gid
        ix._uname = self._uname
        ix._gname = self._gname
        ix._names_tab = self._names_tab
        ix._mtime = self._mtime
        ix._size = self._size
        ix._hasdig = self._hasdig
        ix._digest = self._digest
        ix._target = self._target
        ix._links = self._links
        ix._xattrs = self._xattrs
        ix._dev = self._dev

        # Regular files with data but no way to verify them are refused: nothing unverified is
        # ever served.
        tdigest = self._hasdig
        typ = self._type
        chstart = self._chstart
        chstart.append(len(self._c_off))
        c_flags = self._c_flags
        regular_bytes = 0
        regular_files = 0
        size = self._size
        for i in range(n):
            if typ[i] == _T_REG:
                regular_files += 1
                regular_bytes += size[i]
                if not tdigest[i]:
                    lo, hi = chstart[i], chstart[i + 1]
                    if any(not c_flags[j] & _CH_HAS_DIGEST for j in range(lo, hi)):
                        raise self._fail(
                            f"entry {self._path_of(i)!r}",
                            "regular file has neither a digest nor chunk digests",
                        )
                elif chstart[i + 1] - chstart[i] == 1 and not c_flags[chstart[i]] & _CH_HAS_DIGEST:
                    # Single-chunk file without chunkDigest: the file digest covers the chunk.
                    j = chstart[i]
                    self._c_digest[32 * j : 32 * j + 32] = self._digest[32 * i : 32 * i + 32]
                    c_flags[j] |= _CH_HAS_DIGEST
        ix._regular_bytes = regular_bytes
        ix._regular_files = regular_files
        ix._chstart = chstart

        # cend: the next distinct data offset after a chunk's start, else the TOC start --
        # capped at what any deflate/zstd encoder can need for innerOffset + size bytes
        # (< 2x expansion), so a hostile TOC cannot make a small file cost a huge read.
        c_off = self._c_off
        c_size = self._c_size
        c_inner = self._c_inner
        offs = sorted(set(c_off).union(self._extra_offsets))
        noffs = len(offs)
        c_end = array("q", bytes(8 * len(c_off)))
        toc_offset = self.toc_offset
        for j, o in enumerate(c_off):
            k = bisect_right(offs, o)
            end = offs[k] if k < noffs else toc_offset
            cap = o + 2 * (c_size[j] + c_inner.get(j, 0)) + _READ_SLACK
            c_end[j] = end if end <= cap else cap
        ix._c_off = c_off
        ix._c_end = c_end
        ix._c_uoff = self._c_uoff
        ix._c_size = self._c_size
        ix._c_digest = self._c_digest
        ix._c_flags = c_flags
        ix._c_inner = self._c_inner

        # Link counts: files 1 + hardlinks to them; directories 2 + subdirectories.
        nlink = array("I", [1]) * n
        target = self._target
        parent = self._parent
        for i in range(n):
            t = target[i]
            if t >= 0:
                nlink[t] += 1
            if typ[i] == _T_DIR:
                nlink[i] += 1
                if i:
                    nlink[parent[i]] += 1
        for i in range(n):
            t = target[i]
            if t >= 0:
                nlink[i] = nlink[t]
        ix._nlink = nlink

        # Children sorted by (parent, name); UTF-8 byte order equals code point order.
        order = sorted(range(1, n), key=names.__getitem__)
        order.sort(key=parent.__getitem__)  # stable: names stay sorted within a parent
        child_ids = array("I", order)
        del order
        counts = array("I", [0]) * (n + 1)
        for i in range(1, n):
            counts[parent[i] + 1] += 1
        for p in range(n):
            counts[p + 1] += counts[p]
        ix._child_ids = child_ids
        ix._cstart = counts
        self._paths = {}
        self._names = []
        return ix
