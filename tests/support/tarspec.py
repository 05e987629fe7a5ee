"""``tar_from_spec``: deterministic tars from ``{path: content | FileSpec}``, for tests and scripts.

Test-only code: the shipped package never builds tars from a spec. Headers are written with the
writers' own ustar header function (as Go's archive/tar writes them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from als.formats.tarsplit import BLOCK
from als.formats.writer.common import pad, ustar_header

__all__ = ["DEFAULT_MTIME", "EntryKind", "FileSpec", "tar_from_spec"]

EntryKind = Literal["reg", "dir", "symlink", "hardlink", "char", "block", "fifo"]

_TYPEFLAGS: Mapping[str, bytes] = {
    "reg": b"0",
    "hardlink": b"1",
    "symlink": b"2",
    "char": b"3",
    "block": b"4",
    "dir": b"5",
    "fifo": b"6",
}
_DEFAULT_MODES: Mapping[str, int] = {"dir": 0o755, "symlink": 0o777}

DEFAULT_MTIME = 1_600_000_000


@dataclass(frozen=True)
class FileSpec:
    """One tar entry for ``tar_from_spec``.

    ``mode`` defaults to 0644 (0755 for dirs, 0777 for symlinks). ``mtime`` (float seconds) or
    ``mtime_ns`` (integer nanoseconds) default to the ``mtime`` given to ``tar_from_spec``;
    sub-second times are written as a PAX ``mtime`` record. ``link`` is the symlink target or
    the hardlink target's path. ``xattrs`` become PAX ``SCHILY.xattr.*`` records (raw bytes).
    ``pax`` adds arbitrary PAX records (e.g. ``atime``).
    """

    type: EntryKind = "reg"
    content: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: float | None = None
    mtime_ns: int | None = None
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    pax: Mapping[str, str] = field(default_factory=dict)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n = len(str(n).encode()) + len(body)
    return str(n).encode() + body


def _split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    if len(name) <= 100:
        return b"", name
    for i in range(len(name) - 1, 0, -1):
        if name[i : i + 1] == b"/" and i <= 155 and len(name) - i - 1 <= 100 and i > 0:
            return name[:i], name[i + 1 :]
    return None


def _fits_octal(v: int, width: int) -> bool:
    return 0 <= v < 1 << (3 * (width - 1))


def _member_bytes(name: str, spec: FileSpec, default_mtime_ns: int) -> bytes:
    bname = name.encode("utf-8", "surrogateescape")
    if spec.type == "dir" and not bname.endswith(b"/"):
        bname += b"/"
    blink = spec.link.encode("utf-8", "surrogateescape")
    if spec.mtime_ns is not None:
        mtime_ns = spec.mtime_ns
    elif spec.mtime is not None:
        mtime_ns = round(spec.mtime * 1_000_000_000)
    else:
        mtime_ns = default_mtime_ns
    content = spec.content if spec.type == "reg" else b""
    mode = spec.mode if spec.mode is not None else _DEFAULT_MODES.get(spec.type, 0o644)
    uname = spec.uname.encode("utf-8", "surrogateescape")
    gname = spec.gname.encode("utf-8", "surrogateescape")

    pax: list[tuple[bytes, bytes]] = []
    split = _split_ustar_name(bname)
    if split is None:
        pax.append((b"path", bname))
        split = (b"", bname[:100])
    if len(blink) > 100:
        pax.append((b"linkpath", blink))
        blink = blink[:100]
    secs, frac = divmod(mtime_ns, 1_000_000_000)
    if frac or not _fits_octal(secs, 12):
        sign = "-" if mtime_ns < 0 else ""
        whole, part = divmod(abs(mtime_ns), 1_000_000_000)
        text = f"{sign}{whole}.{part:09d}".rstrip("0").rstrip(".")
        pax.append((b"mtime", text.encode()))
        secs = secs if _fits_octal(secs, 12) else 0
    for id_key, id_val in (("uid", spec.uid), ("gid", spec.gid)):
        if not _fits_octal(id_val, 8):
            pax.append((id_key.encode(), str(id_val).encode()))
    if len(content) >= 8**11:
        pax.append((b"size", str(len(content)).encode()))
    for key, bval in (("uname", uname), ("gname", gname)):
        if len(bval) > 32:
            pax.append((key.encode(), bval))
    for k, v in spec.pax.items():
        pax.append((k.encode(), v.encode("utf-8", "surrogateescape")))
    for k in sorted(spec.xattrs):
        pax.append((b"SCHILY.xattr." + k.encode("utf-8", "surrogateescape"), spec.xattrs[k]))

    out = bytearray()
    if pax:
        records = b"".join(_pax_record(k, v) for k, v in pax)
        base = bname.rstrip(b"/").rpartition(b"/")[2][:80] or b"root"
        out += ustar_header(b"PaxHeaders.0/" + base, typeflag=b"x", size=len(records))
        out += records + pad(len(records))
    out += ustar_header(
        split[1],
        prefix=split[0],
        typeflag=_TYPEFLAGS[spec.type],
        size=len(content) if len(content) < 8**11 else 0,
        mode=mode & 0o7777777,
        uid=spec.uid if _fits_octal(spec.uid, 8) else 0,
        gid=spec.gid if _fits_octal(spec.gid, 8) else 0,
        mtime=secs if secs >= 0 else 0,
        linkname=blink,
        uname=uname[:32],
        gname=gname[:32],
        devmajor=spec.devmajor,
        devminor=spec.devminor,
    )
    out += content + pad(len(content))
    return bytes(out)


def tar_from_spec(
    spec: Mapping[str, bytes | str | FileSpec],
    *,
    mtime: float | int = DEFAULT_MTIME,
    implied_dirs: bool = True,
    eof: bool = True,
) -> bytes:
    """Build a tar from ``{path: content | FileSpec}``, deterministically, in the given order.

    Names are written verbatim (absolute or ``..`` names included, for hostile-input tests).
    ``bytes`` values are regular files, ``str`` values regular files with UTF-8 text; a key
    ending in "/" is a directory (its value may be a FileSpec with the dir's attributes or
    anything else). With ``implied_dirs`` every missing parent directory is written (0755,
    root) right before its first child; a directory listed later in ``spec`` is then written
    at that earlier place instead. ``eof`` appends the two zero blocks.
    """
    default_ns = round(mtime * 1_000_000_000)
    norm: dict[str, FileSpec] = {}
    for key, value in spec.items():
        is_dir = key.endswith("/")
        path = key.rstrip("/") if is_dir else key  # kept verbatim: tests write hostile names too
        if isinstance(value, FileSpec):
            fs = value
        elif is_dir:
            fs = FileSpec(type="dir")
        elif isinstance(value, str):
            fs = FileSpec(content=value.encode("utf-8"))
        else:
            fs = FileSpec(content=bytes(value))
        if is_dir and fs.type != "dir":
            fs = dataclasses.replace(fs, type="dir")
        norm[path] = fs
    out = bytearray()
    written: set[str] = set()

    def emit(path: str) -> None:
        if path in written:
            return
        if implied_dirs:
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent and parent not in written:
                    written.add(parent)
                    out.extend(
                        _member_bytes(parent, norm.get(parent, FileSpec(type="dir")), default_ns)
                    )
        written.add(path)
        out.extend(_member_bytes(path, norm[path], default_ns))

    for path in norm:
        emit(path)
    if eof:
        out += bytes(2 * BLOCK)
    return bytes(out)
