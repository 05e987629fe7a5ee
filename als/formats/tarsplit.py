"""Raw tar accounting and the tar-split NDJSON format.

``scan_tar`` walks a tar stream the way Go's ``archive/tar`` reader does in "raw accounting" mode:
for every member it records where its header blocks (including PAX/GNU extension headers) start,
where its payload starts and how long it is, together with the resolved header fields. The
writers use it to re-frame a tar without re-serialising any header.

tar-split (vbatts/tar-split, used by containers/storage >= 1.47 inside zstd:chunked blobs) stores
everything of a tar except file payloads as newline-delimited JSON:

* ``{"type":2,"payload":"<base64 raw bytes>","position":N}`` for raw segments (headers, padding,
  end-of-archive blocks and any trailing bytes);
* ``{"type":1,"name":"<name>","size":S,"payload":"<base64 CRC-64/ISO, 8 bytes big-endian>",
  "position":N}`` per member (``name_raw`` instead of ``name`` for non-UTF-8 names, ``size``
  omitted when 0, ``payload`` null when there is no payload).

Concatenating the segments and, for members with a payload, the file contents gives back the
original tar byte for byte (``assemble_tar``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from als.errors import FormatError

BLOCK = 512

# Typeflags -> TOC type names (both eStargz and zstd:chunked use these strings).
_TYPES: Mapping[bytes, str] = {
    b"0": "reg",
    b"\0": "reg",
    b"7": "reg",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}


@dataclass(frozen=True, slots=True)
class TarMember:
    """One tar member, as Go's tar reader resolves it (PAX and GNU extensions applied)."""

    start: int  # offset of the member's first header block (extension headers included)
    data_start: int  # offset of the payload (= end of the header blocks)
    size: int  # payload bytes in the stream (0 for header-only types)
    type: str  # reg, dir, symlink, hardlink, char, block, fifo
    name_raw: bytes
    name: str  # name_raw decoded as UTF-8, invalid bytes replaced by U+FFFD (as Go's JSON does)
    linkname: str
    mode: int  # the header's mode field as-is
    uid: int
    gid: int
    uname: str
    gname: str
    mtime_ns: int
    atime_ns: int | None
    ctime_ns: int | None
    devmajor: int
    devminor: int
    xattrs: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def data_end(self) -> int:
        return self.data_start + self.size

    @property
    def padded_end(self) -> int:
        """Offset right after the payload's padding to the next 512-byte block."""
        return self.data_start + _round_up(self.size)


@dataclass(frozen=True, slots=True)
class TarScan:
    members: list[TarMember]
    eof_start: int  # offset right after the last member's padding
    eof_end: int  # offset after the end-of-archive blocks (== eof_start if there are none)
    total: int  # len(tar)


def _round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _numeric(b: bytes, what: str, at: int) -> int:
    if b and b[0] & 0x80:
        # base-256 (GNU/star): big-endian two's complement, first byte's top bit is the marker
        neg = bool(b[0] & 0x40)
        v = int.from_bytes(bytes([b[0] & 0x7F]) + b[1:], "big")
        if neg:
            v -= 1 << (8 * len(b) - 1)
        return v
    s = _cstr(b).strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise FormatError(f"tar header at offset {at}: invalid {what} field {b!r}") from None


def _pax_time(v: str, at: int) -> int:
    """PAX time "[-]SECONDS[.FRACTION]" -> nanoseconds."""
    neg = v.startswith("-")
    s = v[1:] if neg else v
    whole, _, frac = s.partition(".")
    # ASCII digits only (str.isdigit accepts "²"), and no more than an int64 of seconds holds
    if not (
        whole.isascii()
        and whole.isdigit()
        and len(whole) <= 19
        and frac.isascii()
        and (not frac or frac.isdigit())
    ):
        raise FormatError(f"tar header at offset {at}: invalid PAX time {v[:40]!r}")
    ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def _parse_pax(data: bytes, at: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise FormatError(f"tar PAX header at offset {at}: malformed record")
        try:
            n = int(data[pos:sp])
        except ValueError:
            raise FormatError(f"tar PAX header at offset {at}: malformed record length") from None
        rec = data[sp + 1 : pos + n]
        if n <= sp - pos or pos + n > len(data) or not rec.endswith(b"\n") or b"=" not in rec:
            raise FormatError(f"tar PAX header at offset {at}: malformed record")
        k, _, v = rec[:-1].partition(b"=")
        out[k.decode("utf-8", "replace")] = v
        pos += n
    return out


def _checksum_ok(hdr: bytes) -> bool:
    stored = _cstr(hdr[148:156]).strip(b" ")
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    signed = unsigned - 2 * sum(x for x in hdr[:148] + hdr[156:] if x >= 128)
    return want in (unsigned, signed)


def scan_tar(tar: bytes) -> TarScan:
    """Walk a tar stream; raise FormatError for malformed or unsupported input.

    Unsupported (rejected like the Go writers do): PAX global headers ('g'), GNU sparse
    ('S', and PAX ``GNU.sparse.*``), and any typeflag outside 0-7 and the extension headers.
    """
    members: list[TarMember] = []
    pos = 0
    n = len(tar)
    while True:
        start = pos
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if pos + BLOCK > n:
                if pos == n and start == pos:
                    return TarScan(members, pos, pos, n)  # no end-of-archive blocks at all
                raise FormatError(f"tar stream truncated at offset {pos}")
            hdr = tar[pos : pos + BLOCK]
            if hdr == bytes(BLOCK):
                if start != pos:
                    raise FormatError(f"tar extension header at offset {start} without a member")
                eof_end = pos + BLOCK
                if eof_end + BLOCK <= n and tar[eof_end : eof_end + BLOCK] == bytes(BLOCK):
                    eof_end += BLOCK
                return TarScan(members, pos, eof_end, n)
            if not _checksum_ok(hdr):
                raise FormatError(f"tar header at offset {pos}: bad checksum")
            flag = hdr[156:157]
            size = _numeric(hdr[124:136], "size", pos)
            if size < 0:
                raise FormatError(f"tar header at offset {pos}: negative size")
            data_start = pos + BLOCK
            if flag in (b"x", b"L", b"K"):
                body = tar[data_start : data_start + size]
                if len(body) != size:
                    raise FormatError(f"tar stream truncated in header at offset {pos}")
                if flag == b"x":
                    pax.update(_parse_pax(body, pos))
                elif flag == b"L":
                    long_name = _cstr(body)
                else:
                    long_link = _cstr(body)
                pos = data_start + _round_up(size)
                continue
            if flag == b"g":
                raise FormatError(f"tar header at offset {pos}: PAX global headers are unsupported")
            if flag == b"S" or any(k.startswith("GNU.sparse.") for k in pax):
                raise FormatError(f"tar header at offset {pos}: sparse files are unsupported")
            typ = _TYPES.get(flag)
            if typ is None:
                raise FormatError(f"tar header at offset {pos}: unsupported typeflag {flag!r}")
            break
        magic = hdr[257:265]
        name = _cstr(hdr[0:100])
        if magic == b"ustar\x0000":
            prefix = _cstr(hdr[345:500])
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        if flag == b"\0" and name.endswith(b"/"):
            typ = "dir"
        link = long_link if long_link is not None else _cstr(hdr[157:257])
        if "linkpath" in pax:
            link = pax["linkpath"]
        if "size" in pax:
            size = _pax_int(pax["size"], "size", pos)
            if size < 0:  # would walk the stream backwards (an endless loop)
                raise FormatError(f"tar PAX header at offset {start}: negative size {size}")
        uid = (
            _pax_int(pax["uid"], "uid", pos) if "uid" in pax else _numeric(hdr[108:116], "uid", pos)
        )
        gid = (
            _pax_int(pax["gid"], "gid", pos) if "gid" in pax else _numeric(hdr[116:124], "gid", pos)
        )
        if "mtime" in pax:
            mtime_ns = _pax_time(pax["mtime"].decode("ascii", "replace"), pos)
        else:
            mtime_ns = _numeric(hdr[136:148], "mtime", pos) * 1_000_000_000
        atime_ns: int | None = None
        ctime_ns: int | None = None
        if magic == b"ustar  \0" and hdr[345] != 0:
            atime_ns = _numeric(hdr[345:357], "atime", pos) * 1_000_000_000
        if magic == b"ustar  \0" and hdr[357] != 0:
            ctime_ns = _numeric(hdr[357:369], "ctime", pos) * 1_000_000_000
        if "atime" in pax:
            atime_ns = _pax_time(pax["atime"].decode("ascii", "replace"), pos)
        if "ctime" in pax:
            ctime_ns = _pax_time(pax["ctime"].decode("ascii", "replace"), pos)
        uname = _decode(pax["uname"]) if "uname" in pax else _decode(_cstr(hdr[265:297]))
        gname = _decode(pax["gname"]) if "gname" in pax else _decode(_cstr(hdr[297:329]))
        if magic[:5] == b"ustar":
            devmajor = _numeric(hdr[329:337], "devmajor", pos)
            devminor = _numeric(hdr[337:345], "devminor", pos)
        else:
            devmajor = devminor = 0
        xattrs = {
            k[len("SCHILY.xattr.") :]: v for k, v in pax.items() if k.startswith("SCHILY.xattr.")
        }
        if typ != "reg":
            size = 0  # header-only types carry no payload (Go's reader ignores their size)
        if data_start + size > n:
            raise FormatError(f"tar member {_decode(name)!r} at offset {start} is truncated")
        members.append(
            TarMember(
                start=start,
                data_start=data_start,
                size=size,
                type=typ,
                name_raw=name,
                name=_decode(name),
                linkname=_decode(link),
                mode=_numeric(hdr[100:108], "mode", pos),
                uid=uid,
                gid=gid,
                uname=uname,
                gname=gname,
                mtime_ns=mtime_ns,
                atime_ns=atime_ns,
                ctime_ns=ctime_ns,
                devmajor=devmajor,
                devminor=devminor,
                xattrs=xattrs,
            )
        )
        # the last payload's padding may be missing at the very end of the stream
        pos = min(data_start + _round_up(size), n)


def _pax_int(v: bytes, what: str, at: int) -> int:
    s = v.strip(b" ")
    body = s[1:] if s[:1] == b"-" else s
    if not (body.isdigit() and len(body) <= 19):  # ASCII digits, at most an int64
        raise FormatError(f"tar PAX header at offset {at}: invalid {what} {v[:40]!r}")
    return int(s)


# --- CRC-64/ISO (Go hash/crc64 with crc64.ISO: reflected polynomial 0xD800000000000000) ---


def _make_table() -> list[int]:
    poly = 0xD800000000000000
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _make_table()
_MASK64 = (1 << 64) - 1


def crc64_iso(data: bytes, crc: int = 0) -> int:
    """CRC-64/ISO as Go's ``crc64.Checksum(data, crc64.MakeTable(crc64.ISO))``."""
    tab = _CRC_TABLE
    c = crc ^ _MASK64
    for b in data:
        c = tab[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ _MASK64


# --- JSON in Go's encoding/json style -------------------------------------------------------

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def go_json(obj: object, *, indent: str | None = None) -> bytes:
    """Serialise like Go's encoding/json (HTML-safe escaping, no spaces unless indented).

    Dict key order is kept (callers emit keys in Go struct order); strings must be valid
    Unicode (decode raw names with errors="replace" first, which is what Go does).
    """
    if indent is None:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=indent, separators=(",", ": "))
    if any(c in text for c in _GO_ESCAPES):
        text = "".join(_GO_ESCAPES.get(c, c) for c in text)
    return text.encode("utf-8")


# --- tar-split -----------------------------------------------------------------------------

SEGMENT_TYPE = 2
FILE_TYPE = 1


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _segment(payload: bytes, position: int) -> bytes:
    return go_json({"type": SEGMENT_TYPE, "payload": _b64(payload), "position": position}) + b"\n"


def tarsplit_lines(tar: bytes, scan: TarScan | None = None) -> Iterator[bytes]:
    """Yield the tar-split NDJSON lines (each ending in a newline) for ``tar``."""
    scan = scan if scan is not None else scan_tar(tar)
    position = 0
    prev = 0
    for m in scan.members:
        yield _segment(tar[prev : m.data_start], position)
        position += 1
        entry: dict[str, object] = {"type": FILE_TYPE}
        try:
            entry["name"] = m.name_raw.decode("utf-8")
        except UnicodeDecodeError:
            entry["name_raw"] = _b64(m.name_raw)
        if m.size:
            entry["size"] = m.size
            crc = crc64_iso(tar[m.data_start : m.data_end])
            entry["payload"] = _b64(crc.to_bytes(8, "big"))
        else:
            entry["payload"] = None
        entry["position"] = position
        yield go_json(entry) + b"\n"
        position += 1
        prev = m.data_end
    # padding of the last payload and the end-of-archive blocks, then whatever follows them
    yield _segment(tar[prev : scan.eof_end], position)
    yield _segment(tar[scan.eof_end :], position + 1)


def build_tarsplit(tar: bytes, scan: TarScan | None = None) -> bytes:
    """The uncompressed tar-split NDJSON document for ``tar``."""
    return b"".join(tarsplit_lines(tar, scan))


def assemble_tar(tarsplit: bytes, content: Callable[[str, bytes], bytes]) -> bytes:
    """Rebuild a tar from tar-split NDJSON and file contents.

    ``content(name, name_raw)`` returns the payload of the member named so (tar name as written
    in the header). Payload length and CRC-64 are checked; FormatError on any mismatch.
    """
    out: list[bytes] = []
    for lineno, line in enumerate(tarsplit.splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError as exc:
            raise FormatError(f"tar-split line {lineno}: invalid JSON ({exc})") from None
        if not isinstance(e, dict):
            raise FormatError(f"tar-split line {lineno}: not an object")
        payload = e.get("payload")
        try:
            raw = base64.b64decode(payload, validate=True) if isinstance(payload, str) else b""
        except ValueError:  # binascii.Error, or a non-ASCII string
            raise FormatError(f"tar-split line {lineno}: invalid base64 payload") from None
        if e.get("type") == SEGMENT_TYPE:
            out.append(raw)
        elif e.get("type") == FILE_TYPE:
            size = e.get("size", 0)
            if type(size) is not int or size < 0:
                raise FormatError(f"tar-split line {lineno}: invalid size")
            if size == 0:
                continue
            if "name_raw" in e:
                nr = e["name_raw"]
                try:
                    if type(nr) is not str:
                        raise binascii.Error("not a string")
                    name_raw = base64.b64decode(nr, validate=True)
                except ValueError:  # binascii.Error, or a non-ASCII string
                    raise FormatError(f"tar-split line {lineno}: invalid name_raw") from None
                name = name_raw.decode("utf-8", "replace")
            else:
                nm = e.get("name", "")
                if type(nm) is not str:
                    raise FormatError(f"tar-split line {lineno}: invalid name")
                name = nm
                try:
                    name_raw = name.encode("utf-8")
                except UnicodeEncodeError:
                    raise FormatError(f"tar-split line {lineno}: invalid name") from None
            data = content(name, name_raw)
            if len(data) != size:
                raise FormatError(
                    f"tar-split: {name!r} has {len(data)} bytes, tar-split says {size}"
                )
            if len(raw) != 8 or crc64_iso(data) != int.from_bytes(raw, "big"):
                raise FormatError(f"tar-split: CRC-64 mismatch for {name!r}")
            out.append(data)
        else:
            raise FormatError(f"tar-split line {lineno}: unknown entry type {e.get('type')!r}")
    return b"".join(out)


# The lines Go's tar-split writes (its struct's field order, no spaces, names without escapes),
# read without a JSON parser: a layer's tar-split is tens of thousands of lines and megabytes of
# base64, and its size is needed while podman waits for the lookup. A line that is not exactly
# of this shape (an escape in a name, other fields, other spacing) goes to the JSON parser.
_B64 = rb"[A-Za-z0-9+/]*={0,2}"
_SEGMENT_LINE = re.compile(rb'\{"type":2,"payload":"(' + _B64 + rb')","position":\d+\}')
_FILE_LINE = re.compile(
    rb'\{"type":1,"name":"[\x20\x21\x23-\x5b\x5d-\x7e]*"(?:,"name_raw":"' + _B64 + rb'")?'
    rb'(?:,"size":(0|[1-9]\d{0,18}))?,"payload":(?:null|"' + _B64 + rb'"),"position":\d+\}'
)


def _fast_size(line: bytes) -> int | None:
    """The bytes one tar-split line adds to the tar, if the line has the plain shape."""
    m = _SEGMENT_LINE.fullmatch(line)
    if m is not None:
        payload = m.group(1)
        if len(payload) % 4:
            return None  # invalid base64: the parser below says so
        return len(payload) // 4 * 3 - (len(payload) - len(payload.rstrip(b"=")))
    m = _FILE_LINE.fullmatch(line)
    if m is not None:
        return int(m.group(1) or 0)
    return None


def tarsplit_size(tarsplit: bytes, *, layer: str = "") -> int:
    """The size of the tar a tar-split document describes: its raw segments and the payload
    sizes of its members (what containers/storage counts as a layer's uncompressed size)."""
    lines = [line for line in tarsplit.splitlines() if line.strip()]
    fast = 0
    for line in lines:
        n = _fast_size(line)
        if n is None:
            break
        fast += n
    else:
        return fast
    pre = f"layer {layer}: tar-split" if layer else "tar-split"
    # One parse of the whole document (a JSON array of its lines) instead of one per line: a
    # layer has tens of thousands of lines, and this runs while podman waits for a lookup.
    try:
        entries = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        entries = None
    if not isinstance(entries, list) or len(entries) != len(lines):
        # Say which line is bad (and refuse a line that holds more than one value).
        for lineno, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except ValueError as exc:
                raise FormatError(f"{pre} line {lineno}: invalid JSON ({exc})") from None
        raise FormatError(f"{pre}: a line holds more than one JSON value")
    total = 0
    for lineno, e in enumerate(entries, 1):
        if not isinstance(e, dict):
            raise FormatError(f"{pre} line {lineno}: not an object")
        kind = e.get("type")
        if kind == SEGMENT_TYPE:
            payload = e.get("payload")
            if not isinstance(payload, str):
                raise FormatError(f"{pre} line {lineno}: segment without a payload")
            try:
                total += len(base64.b64decode(payload, validate=True))
            except ValueError:
                raise FormatError(f"{pre} line {lineno}: invalid base64 payload") from None
        elif kind == FILE_TYPE:
            size = e.get("size", 0)
            if type(size) is not int or size < 0:
                raise FormatError(f"{pre} line {lineno}: invalid size")
            total += size
        else:
            raise FormatError(f"{pre} line {lineno}: unknown entry type {kind!r}")
    return total
