"""Building a :class:`LayerIndex`: path cleaning and :class:`IndexBuilder`.

The TOC readers (``toc.py``) feed entries and chunks to an :class:`IndexBuilder` in layer order;
it cleans every path, enforces the tree invariants (no ``..``, no duplicates, parents are
directories, hardlinks point to earlier entries) and the limits of ``model.py``, and fills the
index's columns. Errors raise :class:`FormatError` naming the layer and the entry.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

from als.errors import FormatError
from als.formats.model import (
    CHUNK_HAS_DIGEST,
    CHUNK_ZEROS,
    HIDDEN_ROOT_NAMES,
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_FILE_SIZE,
    MAX_ID,
    MAX_INNER,
    MAX_NAME,
    MAX_PATH,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    EntryType,
    LayerIndex,
)
from als.oci import LAZY_FORMATS

_ZERO32 = bytes(32)
_T_REG = int(EntryType.REG)
_T_DIR = int(EntryType.DIR)
_T_SYMLINK = int(EntryType.SYMLINK)
_T_HARDLINK = int(EntryType.HARDLINK)
_T_CHAR = int(EntryType.CHAR)
_T_BLOCK = int(EntryType.BLOCK)
_READ_SLACK = 64 * 1024


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
        flags = CHUNK_ZEROS if zeros else 0
        if digest is not None:
            self._c_digest.extend(digest)
            flags |= CHUNK_HAS_DIGEST
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
        ix.tarsplit = None
        ix.tarsplit_digest = None

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
                    if any(not c_flags[j] & CHUNK_HAS_DIGEST for j in range(lo, hi)):
                        raise self._fail(
                            f"entry {self._path_of(i)!r}",
                            "regular file has neither a digest nor chunk digests",
                        )
                elif (
                    chstart[i + 1] - chstart[i] == 1 and not c_flags[chstart[i]] & CHUNK_HAS_DIGEST
                ):
                    # Single-chunk file without chunkDigest: the file digest covers the chunk.
                    j = chstart[i]
                    self._c_digest[32 * j : 32 * j + 32] = self._digest[32 * i : 32 * i + 32]
                    c_flags[j] |= CHUNK_HAS_DIGEST
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
