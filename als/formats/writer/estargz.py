"""The eStargz writer (stargz-snapshotter): gzip, its zstd variant, and the legacy stargz footer.

A new gzip member (zstd frame) starts before every payload chunk; the tar headers of the
following entries go in the member of the preceding payload; then landmark files, the TOC as a
tar entry ``stargz.index.json`` in its own member followed by the tar EOF, and the 51-byte
footer (47 bytes for legacy stargz). With zstd, the TOC JSON goes compressed into a zstd
skippable frame, followed by a 40-byte footer payload (stargz-snapshotter's "zstdchunked"
variant).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import zstandard

from als.digest import sha256_of
from als.errors import FormatError
from als.formats.detect import ZSTD_CHUNKED_MAGIC_OLD
from als.formats.model import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME
from als.formats.tarsplit import BLOCK, TarMember, TarScan, go_json, scan_tar
from als.formats.writer.common import (
    BuiltLayer,
    Framer,
    MiB,
    built_layer,
    clean_name,
    estargz_modtime,
    omit_empty,
    pad,
    skippable,
    ustar_header,
    xattrs_b64,
)
from als.oci import (
    ANN_LEGACY_MANIFEST_CHECKSUM,
    ANN_LEGACY_MANIFEST_POSITION,
    ANN_TOC_DIGEST,
    ANN_UNCOMPRESSED_SIZE,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
)

_LANDMARK_CONTENT = b"\x0f"


@dataclass
class _EsEntry:
    member: TarMember | None  # None for a landmark
    name: str
    header: bytes
    payload: bytes


def _landmark(name: str) -> _EsEntry:
    hdr = ustar_header(name.encode(), size=len(_LANDMARK_CONTENT))
    return _EsEntry(None, name, hdr, _LANDMARK_CONTENT)


def _sort_entries(tar: bytes, scan: TarScan, prioritized: Sequence[str] | None) -> list[_EsEntry]:
    """Dedup (last occurrence wins, at its own position), drop TOC/landmarks, apply priorities."""
    by_name: dict[str, _EsEntry] = {}
    for m in scan.members:
        name = clean_name(m.name)
        if name in (TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            continue
        by_name.pop(name, None)
        by_name[name] = _EsEntry(
            m, name, tar[m.start : m.data_start], tar[m.data_start : m.data_end]
        )
    if not prioritized:
        return [_landmark(NO_PREFETCH_LANDMARK), *by_name.values()]

    first: dict[str, _EsEntry] = {}

    def move(name: str, depth: int = 0) -> None:
        if depth > 256:
            raise FormatError(f"prioritized file {name!r}: hardlink chain too long")
        if name in first:
            return
        if name:
            parent = name.rpartition("/")[0]
            move(parent, depth + 1)
        e = by_name.get(name)
        if e is None:
            return
        if e.member is not None and e.member.type == "hardlink":
            move(clean_name(e.member.linkname), depth + 1)
        if name in by_name:
            first[name] = by_name.pop(name)

    for p in prioritized:
        move(clean_name(p))
    return [*first.values(), _landmark(PREFETCH_LANDMARK), *by_name.values()]


def _estargz_toc_entry(
    e: _EsEntry, unames: dict[int, str], gnames: dict[int, str]
) -> dict[str, object]:
    m = e.member
    if m is None:  # landmark
        return {"name": e.name, "type": "reg", "size": len(e.payload)}

    def if_changed(names: dict[int, str], ident: int, name: str) -> str:
        if not name or names.get(ident) == name:
            return ""
        names[ident] = name
        return name

    return {
        "name": m.name,
        "type": m.type,
        "size": m.size if m.type == "reg" else 0,
        "modtime": estargz_modtime(m.mtime_ns),
        "linkName": m.linkname if m.type in ("symlink", "hardlink") else "",
        "mode": m.mode,
        "uid": m.uid,
        "gid": m.gid,
        "userName": if_changed(unames, m.uid, m.uname),
        "groupName": if_changed(gnames, m.gid, m.gname),
        "offset": 0,
        "innerOffset": 0,
        "devMajor": m.devmajor if m.type in ("char", "block") else 0,
        "devMinor": m.devminor if m.type in ("char", "block") else 0,
        "xattrs": xattrs_b64(m.xattrs),
    }


def _finish_estargz_entry(d: dict[str, object]) -> dict[str, object]:
    order = (
        "name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName",
        "groupName", "offset", "innerOffset", "devMajor", "devMinor", "xattrs", "digest",
        "chunkOffset", "chunkSize", "chunkDigest",
    )  # fmt: skip
    return omit_empty({k: d[k] for k in order if k in d})


def build_estargz(
    tar: bytes,
    *,
    compression: Literal["gzip", "zstd"] = "gzip",
    chunk_size: int = 4 * MiB,
    prioritized: Sequence[str] | None = None,
    min_chunk_size: int = 0,
    legacy_footer: bool = False,
    level: int = 6,
) -> BuiltLayer:
    """Convert an uncompressed tar into eStargz (gzip) or stargz-snapshotter's zstd variant.

    ``prioritized``: paths moved to the front (with their parent directories and hardlink
    targets), followed by ``.prefetch.landmark``; without it ``.no.prefetch.landmark`` comes
    first. ``min_chunk_size`` > 0: a file's first payload chunk stays in the current member
    (recorded with ``innerOffset``) while that member holds fewer than ``min_chunk_size``
    uncompressed bytes. ``legacy_footer``: the 47-byte stargz (CRFS) footer (gzip only).
    Duplicate paths keep only their last occurrence; input ``stargz.index.json`` and landmark
    entries are dropped.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if legacy_footer and compression != "gzip":
        raise ValueError("the legacy stargz footer exists for gzip only")
    scan = scan_tar(tar)
    entries = _sort_entries(tar, scan, prioritized)
    fr = Framer(compression, level)
    toc: list[dict[str, object]] = []
    unames: dict[int, str] = {}
    gnames: dict[int, str] = {}
    member_start_usize = 0  # uncompressed offset at which the currently open unit started
    for e in entries:
        d = _estargz_toc_entry(e, unames, gnames)
        fr.write(e.header)
        size = len(e.payload)
        if d["type"] != "reg":
            toc.append(_finish_estargz_entry(d))
            continue
        d["digest"] = sha256_of(e.payload)
        written = 0
        while written < size:
            cs = min(chunk_size, size - written)
            share = (
                written == 0
                and min_chunk_size > 0
                and e.member is not None
                and fr.usize - member_start_usize < min_chunk_size
            )
            if share:
                d["offset"] = fr.pos
                d["innerOffset"] = fr.usize - member_start_usize
            else:
                d["offset"] = fr.close()
                member_start_usize = fr.usize
            chunk = e.payload[written : written + cs]
            if size - written >= chunk_size:  # as stargz-snapshotter: not on a short last chunk
                d["chunkSize"] = cs
            d["chunkOffset"] = written
            d["chunkDigest"] = sha256_of(chunk)
            fr.write(chunk)
            toc.append(_finish_estargz_entry(d))
            written += cs
            d = {"name": e.member.name if e.member is not None else e.name, "type": "chunk"}
        if size == 0:
            toc.append(_finish_estargz_entry(d))
        fr.write(pad(size))
    toc_offset = fr.close()
    toc_json = go_json({"version": 1, "entries": toc}, indent="\t")
    toc_digest = sha256_of(toc_json)

    if compression == "gzip":
        fr.write(ustar_header(TOC_NAME.encode(), size=len(toc_json)))
        fr.write(toc_json)
        fr.write(pad(len(toc_json)) + bytes(2 * BLOCK))
        fr.close()
        if legacy_footer:
            footer = (
                b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00"
                + b"%016x" % toc_offset
                + b"STARGZ\x01\x00\x00\xff\xff"
                + bytes(8)
            )
        else:
            footer = (
                b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x1a\x00SG\x16\x00"
                + b"%016x" % toc_offset
                + b"STARGZ\x01\x00\x00\xff\xff"
                + bytes(8)
            )
        blob = bytes(fr.blob) + footer
        annotations = {ANN_TOC_DIGEST: toc_digest, ANN_UNCOMPRESSED_SIZE: str(fr.usize)}
        fmt = "stargz-legacy" if legacy_footer else "estargz"
        return built_layer(
            blob, "sha256:" + fr.diff.hexdigest(), toc_digest, annotations, OCI_LAYER_GZIP, fmt
        )

    compressed = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(toc_json)
    manifest_off = len(fr.blob) + 8
    footer_payload = (
        struct.pack("<4Q", manifest_off, len(compressed), len(toc_json), 1) + ZSTD_CHUNKED_MAGIC_OLD
    )
    blob = bytes(fr.blob) + skippable(compressed) + skippable(footer_payload)
    annotations = {
        ANN_TOC_DIGEST: toc_digest,
        ANN_LEGACY_MANIFEST_CHECKSUM: sha256_of(compressed),
        ANN_LEGACY_MANIFEST_POSITION: f"{manifest_off}:{len(compressed)}:{len(toc_json)}:1",
        ANN_UNCOMPRESSED_SIZE: str(fr.usize),
    }
    return built_layer(
        blob, "sha256:" + fr.diff.hexdigest(), toc_digest, annotations, OCI_LAYER_ZSTD,
        "estargz-zstd",
    )  # fmt: skip
