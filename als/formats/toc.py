"""TOC JSON (eStargz ``stargz.index.json`` / zstd:chunked manifest) -> validated LayerIndex.

Both formats share one schema (see docs/formats.md): a top-level object ``{"version": 1,
"entries": [...]}`` whose entries are tar entries in layer order, with ``chunk`` records following
the regular file they belong to. Unknown keys are ignored; known keys are type-checked.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import re
from typing import Any

from als import digest
from als.errors import FormatError
from als.formats.builder import IndexBuilder, clean_path
from als.formats.model import (
    MAX_FILE_SIZE,
    MAX_ID,
    MAX_NAME,
    MAX_TOC_JSON,
    MAX_TOC_RECORDS,
    MAX_XATTR_VALUE,
    EntryType,
    LayerIndex,
)

_REG = int(EntryType.REG)
_SYMLINK = int(EntryType.SYMLINK)
_HARDLINK = int(EntryType.HARDLINK)
_CHAR = int(EntryType.CHAR)
_BLOCK = int(EntryType.BLOCK)
TOC_TYPES: dict[str, EntryType] = {
    "reg": EntryType.REG,
    "dir": EntryType.DIR,
    "symlink": EntryType.SYMLINK,
    "hardlink": EntryType.HARDLINK,
    "char": EntryType.CHAR,
    "block": EntryType.BLOCK,
    "fifo": EntryType.FIFO,
}

_TIME_RE = re.compile(
    r"(-?\d{4,})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:([Zz])|([+-])(\d\d):(\d\d))"
)
_MAX_OFFSET = 1 << 62
_MAX_XATTRS = 4096
_MAX_OBJECTS = 2 * MAX_TOC_RECORDS + 1  # records, their xattrs maps, the document
_MAX_ARRAYS = MAX_TOC_RECORDS


def parse_digest(value: object) -> bytes:
    """``sha256:<64 lowercase hex>`` -> the raw 32 bytes; ValueError otherwise."""
    return digest.raw_of(value)


def parse_time_ns(value: str) -> int:
    """RFC 3339 (as written by Go) -> nanoseconds since the epoch. Go's zero time -> 0."""
    m = _TIME_RE.fullmatch(value)
    if not m:
        raise ValueError(f"invalid time {value!r:.60}")
    year, mon, day, hh, mm, ss = (int(m.group(k)) for k in range(1, 7))
    if year <= 1:
        return 0  # Go zero time "0001-01-01T00:00:00Z" = unset
    if not (1 <= mon <= 12 and 1 <= day <= 31 and hh < 24 and mm < 60 and ss <= 60):
        raise ValueError(f"invalid time {value!r:.60}")
    if year > 9999:
        raise ValueError(f"time out of range {value!r:.60}")
    try:
        secs = calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0))
    except (ValueError, OverflowError):
        raise ValueError(f"invalid time {value!r:.60}") from None
    if m.group(9):
        off = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        secs -= off if m.group(9) == "+" else -off
    frac = m.group(7) or ""
    ns = secs * 1_000_000_000 + (int((frac + "000000000")[:9]) if frac else 0)
    if not -(1 << 63) <= ns < 1 << 63:
        raise ValueError(f"time out of range {value!r:.60}")  # beyond 1677..2262
    return ns


def _bad(layer: str, where: str, msg: str) -> FormatError:
    prefix = f"layer {layer}: " if layer else ""
    return FormatError(f"{prefix}TOC {where}: {msg}")


def _int(e: dict[str, Any], key: str, hi: int) -> int:
    v = e.get(key, 0)
    if type(v) is not int or not 0 <= v <= hi:
        raise ValueError(f"field {key!r} must be an integer in [0, {hi}], not {v!r:.40}")
    return v


def _str(e: dict[str, Any], key: str) -> str:
    v = e.get(key, "")
    if type(v) is not str:
        raise ValueError(f"field {key!r} must be a string, not {type(v).__name__}")
    return v


def _xattrs(v: object) -> dict[str, bytes] | None:
    if v is None:
        return None
    if type(v) is not dict:
        raise ValueError("field 'xattrs' must be an object")
    if len(v) > _MAX_XATTRS:
        raise ValueError("too many xattrs")
    out: dict[str, bytes] = {}
    for k, b64 in v.items():
        try:
            klen = len(k.encode("utf-8"))
        except UnicodeEncodeError:
            klen = -1
        if not 0 < klen <= MAX_NAME or "\x00" in k:
            raise ValueError(f"invalid xattr name {k!r:.60}")
        if type(b64) is not str:
            raise ValueError(f"xattr {k!r:.60} value must be a base64 string")
        try:
            val = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"xattr {k!r:.60} value is not valid base64") from None
        if len(val) > MAX_XATTR_VALUE:
            raise ValueError(f"xattr {k!r:.60} value too large")
        out[k] = val
    return out or None


def load_toc_json(data: bytes, *, layer: str = "") -> dict[str, Any]:
    """Decode TOC JSON bytes into the top-level object (checked: object, version 1, entries)."""
    if len(data) > MAX_TOC_JSON:
        raise _bad(layer, "JSON", f"larger than {MAX_TOC_JSON} bytes")
    # Parsed JSON costs far more memory than its text: "[{},{},...]" takes ~25 bytes per byte,
    # so a small compressed TOC could need gigabytes before the record count is checked. Count
    # the containers first (bytes inside strings only make the counts larger): at most one
    # object per record plus its xattrs, arrays only as rarely. What remains is at most ~10x.
    if data.count(b"{") > _MAX_OBJECTS or data.count(b"[") > _MAX_ARRAYS:
        raise _bad(layer, "JSON", f"more objects or arrays than {MAX_TOC_RECORDS} records hold")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise _bad(layer, "JSON", "nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _bad(layer, "JSON", f"invalid: {exc}") from None
    if type(doc) is not dict:
        raise _bad(layer, "JSON", f"top level is {type(doc).__name__}, not an object")
    version = doc.get("version")
    if type(version) is not int or version != 1:
        raise _bad(layer, "JSON", f"unsupported version {version!r:.40} (want 1)")
    entries = doc.get("entries")
    if entries is None:
        doc["entries"] = []
    elif type(entries) is not list:
        raise _bad(layer, "JSON", "'entries' is not a list")
    elif len(entries) > MAX_TOC_RECORDS:
        raise _bad(layer, "JSON", f"more than {MAX_TOC_RECORDS} records")
    return doc


def build_index(
    doc: dict[str, Any],
    *,
    format: str,
    toc_digest: str,
    blob_size: int,
    toc_offset: int,
    layer: str = "",
) -> LayerIndex:
    """Turn a decoded TOC object (from :func:`load_toc_json`) into a validated LayerIndex."""
    b = IndexBuilder(
        format=format,
        toc_digest=toc_digest,
        blob_size=blob_size,
        toc_offset=toc_offset,
        layer=layer,
    )
    unames: dict[int, str] = {}
    gnames: dict[int, str] = {}
    times: dict[str, int] = {}
    in_file = False  # the last entry was a regular file (chunks may follow)
    skip_chunks = False  # ... but a hidden one, whose chunks are ignored
    entries: list[Any] = doc["entries"]
    name: object = ""
    add = b.add
    for idx, e in enumerate(entries):
        name = ""
        try:
            if type(e) is not dict:
                raise ValueError("not an object")
            name = e.get("name", "")
            if type(name) is not str:
                raise ValueError("field 'name' must be a string")
            t = e.get("type")
            if t == "chunk":
                if not in_file:
                    raise ValueError("chunk record without a preceding regular file")
                if skip_chunks:
                    continue
                b.add_chunk(
                    _int(e, "offset", _MAX_OFFSET),
                    _int(e, "chunkOffset", MAX_FILE_SIZE),
                    _chunk_size(e, b),
                    inner=_int(e, "innerOffset", MAX_FILE_SIZE),
                    digest=parse_digest(e["chunkDigest"]) if "chunkDigest" in e else None,
                    zeros=_chunk_type(e),
                )
                continue
            et = TOC_TYPES.get(t) if type(t) is str else None
            if et is None:
                raise ValueError(f"unknown entry type {t!r:.40}")
            g = e.get
            mode = g("mode", 0)
            uid = g("uid", 0)
            gid = g("gid", 0)
            if (
                type(mode) is not int
                or type(uid) is not int
                or type(gid) is not int
                or not (0 <= mode <= MAX_ID and 0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID)
            ):
                raise ValueError("'mode', 'uid' and 'gid' must be integers in [0, 2^32)")
            uname = g("userName")
            if uname is None:
                uname = unames.get(uid, "")
            elif type(uname) is not str:
                raise ValueError("field 'userName' must be a string")
            else:
                unames[uid] = uname
            gname = g("groupName")
            if gname is None:
                gname = gnames.get(gid, "")
            elif type(gname) is not str:
                raise ValueError("field 'groupName' must be a string")
            else:
                gnames[gid] = gname
            mt = g("modtime")
            if mt is None:
                mtime = 0
            else:
                mtime = times.get(mt, -1) if type(mt) is str else -2
                if mtime < 0:
                    if type(mt) is not str:
                        raise ValueError("field 'modtime' must be a string")
                    mtime = times[mt] = parse_time_ns(mt)
            size = 0
            digest = None
            dg = None
            link = ""
            devmajor = devminor = 0
            if et == _REG:
                size = g("size", 0)
                if type(size) is not int or not 0 <= size <= MAX_FILE_SIZE:
                    raise ValueError(f"field 'size' must be an integer in [0, {MAX_FILE_SIZE}]")
                dg = g("digest")
                if dg is not None:
                    digest = parse_digest(dg)
            elif et in (_SYMLINK, _HARDLINK):
                link = _str(e, "linkName")
            elif et in (_CHAR, _BLOCK):
                devmajor = _int(e, "devMajor", MAX_ID)
                devminor = _int(e, "devMinor", MAX_ID)
            xa = g("xattrs")
            i = add(
                name,
                et,
                mode,
                uid,
                gid,
                uname,
                gname,
                mtime,
                size,
                link,
                devmajor,
                devminor,
                _xattrs(xa) if xa is not None else None,
                digest,
            )
            in_file = et == _REG
            if i is None:  # a hidden format file (TOC name, landmark): record, never list
                hidden = clean_path(name)
                skip_chunks = True
                has_data = in_file and size > 0 and "offset" in e
                b.add_hidden_data(hidden, _int(e, "offset", _MAX_OFFSET) if has_data else None)
                continue
            skip_chunks = False
            if in_file and size:
                off = g("offset")
                if type(off) is not int:
                    raise ValueError("regular file with data has no integer 'offset'")
                if g("chunkOffset"):
                    raise ValueError("first chunk of a file must have chunkOffset 0")
                cs = g("chunkSize")
                if cs is None or cs == 0:
                    cs = size  # absent: the chunk runs to the end of the file
                elif type(cs) is not int or not 0 < cs <= MAX_FILE_SIZE:
                    raise ValueError(f"invalid chunkSize {cs!r:.40}")
                cd = g("chunkDigest")
                b.add_chunk(
                    off,
                    0,
                    cs,
                    inner=_int(e, "innerOffset", MAX_FILE_SIZE) if "innerOffset" in e else 0,
                    digest=None if cd is None else digest if cd == dg else parse_digest(cd),
                    zeros=_chunk_type(e) if "chunkType" in e else False,
                )
        except ValueError as exc:
            where = f"entry #{idx}" + (f" ({name[:300]!r})" if isinstance(name, str) else "")
            raise _bad(layer, where, str(exc)) from None
        except FormatError as exc:
            # Builder errors already name the entry; add the record number for context.
            raise FormatError(f"{exc} (TOC record #{idx})") from None
    return b.finish()


def _chunk_size(e: dict[str, Any], b: IndexBuilder) -> int:
    cs = _int(e, "chunkSize", MAX_FILE_SIZE)
    if cs:
        return cs
    # Absent chunkSize: "to the end of the file" (stargz-snapshotter's reader rule).
    return b.open_file_size() - _int(e, "chunkOffset", MAX_FILE_SIZE)


def _chunk_type(e: dict[str, Any]) -> bool:
    ct = e.get("chunkType")
    if ct is None or ct in ("", "data"):
        return False
    if ct == "zeros":
        return True
    raise ValueError(f"unknown chunkType {ct!r:.40}")
