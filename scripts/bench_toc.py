#!/usr/bin/env python3
"""Benchmark: TOC parsing and index memory for a synthetic 100,000-entry eStargz layer.

Prints one JSON object per measurement on stdout and a Markdown table on stderr.
Baseline: ``json.loads`` of the same TOC JSON. Usage: bench_toc.py [--quick] [--entries N]

* parse_build_seconds: JSON bytes -> validated LayerIndex (json.loads + build), CPU s, best of N
* load_index_seconds: the same from a (virtual) eStargz blob: footer, gunzip, sha256, parse, build
* index_bytes_per_entry: memory the index retains (tracemalloc), the JSON and its objects freed
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import sys
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from als.formats.detect import load_index
from als.formats.toc import build_index, load_toc_json

_WORDS = [
    *("usr", "lib", "share", "bin", "etc", "local", "python3", "site-packages", "include"),
    *("doc", "man", "locale", "x86_64-linux-gnu", "node_modules", "src", "test", "vendor"),
    *("github.com", "golang.org", "pkg", "internal", "cache", "perl5", "ssl", "certs"),
    *("zoneinfo", "Europe", "America", "terminfo", "fonts", "icons", "apt", "dpkg", "info"),
]
_EXTS = (".so", ".py", ".pyc", ".h", ".txt", ".gz", ".json", ".js", ".mo", "", ".conf")


def synthetic_toc(n: int, seed: int = 1) -> bytes:
    """A TOC JSON (MarshalIndent style, like stargz-snapshotter) with about ``n`` tree entries."""
    rnd = random.Random(seed)
    entries: list[dict[str, Any]] = []
    dirs = [""]
    files: list[str] = []
    seen: set[str] = set()
    offset = 512
    count = 0
    mt = "2024-05-01T10:20:30Z"
    while count < n:
        r = rnd.random()
        parent = rnd.choice(dirs[-200:]) if rnd.random() < 0.8 else rnd.choice(dirs)
        while parent.count("/") >= 7:  # keep depths realistic (<= 9 components)
            parent = parent.rsplit("/", 1)[0]
        base = f"{rnd.choice(_WORDS)}{rnd.randrange(100000)}"
        path = f"{parent}/{base}" if parent else base
        if path in seen:
            continue
        seen.add(path)
        if r < 0.10 or len(dirs) < 20:
            entries.append(
                {"name": path + "/", "type": "dir", "modtime": mt, "mode": 0o755,
                 "userName": "root", "groupName": "root"}
            )  # fmt: skip
            dirs.append(path)
        elif r < 0.80:
            path += rnd.choice(_EXTS)
            size = rnd.choice((0, rnd.randrange(1, 4096), rnd.randrange(4096, 200000)))
            if rnd.random() < 0.01:
                size = rnd.randrange(8 << 20, 20 << 20)
            dg = "sha256:" + hashlib.sha256(path.encode()).hexdigest()
            e: dict[str, Any] = {"name": path, "type": "reg", "size": size, "modtime": mt,
                                 "mode": 0o644, "uid": 0, "gid": 0}  # fmt: skip
            if size:
                e["offset"] = offset
            e["digest"] = dg
            cs = 4 << 20
            if size > cs:
                e["chunkSize"] = cs
            if size:
                e["chunkDigest"] = "sha256:" + hashlib.sha256(dg.encode()).hexdigest()
            entries.append(e)
            offset += max(64, size // 3)
            for c in range(cs, size, cs):
                cdg = "sha256:" + hashlib.sha256(f"{dg}{c}".encode()).hexdigest()
                ce = {"name": path, "type": "chunk", "offset": offset, "chunkOffset": c,
                      "chunkDigest": cdg}  # fmt: skip
                if size - c >= cs:
                    ce["chunkSize"] = cs
                entries.append(ce)
                offset += cs // 3
            files.append(path)
        elif r < 0.96 or not files:
            entries.append(
                {"name": path, "type": "symlink", "modtime": mt, "mode": 0o777,
                 "linkName": f"../{rnd.choice(_WORDS)}/{base}.so"}
            )  # fmt: skip
        else:
            entries.append(
                {"name": path, "type": "hardlink", "modtime": mt, "mode": 0o644,
                 "linkName": rnd.choice(files)}
            )  # fmt: skip
        count += 1
    toc = {"version": 1, "entries": entries}
    return json.dumps(toc, indent="\t", separators=(",", ": ")).encode()


def virtual_estargz(js: bytes, toc_offset: int) -> tuple[Any, int]:
    """A ReadRanges over a virtual eStargz blob: file data (never read) up to ``toc_offset``,
    then the gzip'ed TOC tar and the 51-byte footer. Returns (read, blob_size)."""
    hdr = bytearray(512)
    hdr[0:17] = b"stargz.index.json"
    hdr[100:108] = b"0000644\0"
    hdr[124:136] = b"%011o\0" % len(js)
    hdr[156:157] = b"0"
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = b"        "
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    member = c.compress(bytes(hdr) + js + bytes(-len(js) % 512) + bytes(1024)) + c.flush()
    footer = (
        b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x1a\x00SG\x16\x00"
        + b"%016x" % toc_offset
        + b"STARGZ\x01\x00\x00\xff\xff"
        + bytes(8)
    )
    tail = member + footer
    size = toc_offset + len(tail)

    def read(ranges: Any) -> list[bytes]:
        out = []
        for off, n in ranges:
            if off >= toc_offset:
                out.append(tail[off - toc_offset : off - toc_offset + n])
            else:  # file data / head: zeros, except the part that overlaps the tail
                lead = min(n, toc_offset - off)
                out.append(bytes(lead) + tail[: n - lead])
        return out

    return read, size


def _build(js: bytes, toc_offset: int) -> Any:
    doc = load_toc_json(js)
    return build_index(doc, format="estargz", toc_digest="sha256:" + "0" * 64,
                       blob_size=toc_offset + 1000, toc_offset=toc_offset)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10,000 entries")
    ap.add_argument("--entries", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=5, help="best of N runs")
    args = ap.parse_args()
    n = args.entries or (10_000 if args.quick else 100_000)
    js = synthetic_toc(n)
    toc_offset = 1 << 50

    best_json = min(_timed(lambda: json.loads(js)) for _ in range(args.repeat))
    best_build = min(_timed(lambda: _build(js, toc_offset)) for _ in range(args.repeat))
    vread, vsize = virtual_estargz(js, toc_offset)
    best_load = min(_timed(lambda: load_index(vread, vsize)) for _ in range(args.repeat))

    # Memory retained by the index once the JSON and the decoded objects are gone.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = _build(js, toc_offset)
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    entries = len(index)
    # Baseline memory: the decoded JSON held as Python objects.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    doc = json.loads(js)
    json_mem = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del doc

    rows = [
        ("parse_build_seconds", best_build, "s", best_json),
        ("load_index_seconds", best_load, "s", best_json),
        ("index_bytes_per_entry", retained / entries, "B", json_mem / entries),
        ("index_nbytes_per_entry", index.nbytes() / entries, "B", json_mem / entries),
        ("toc_json_bytes_per_entry", len(js) / entries, "B", None),
        ("entries", entries, "count", None),
        ("chunks", index.chunk_count(), "count", None),
    ]
    print("| metric | value | unit | baseline (json.loads) | ratio |", file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for metric, value, unit, base in rows:
        ratio = (value / base) if base else None
        rec = {"bench": "toc", "metric": metric, "value": round(value, 4), "unit": unit,
               "baseline": None if base is None else round(base, 4),
               "ratio": None if ratio is None else round(ratio, 3), "n": n}  # fmt: skip
        print(json.dumps(rec))
        print(
            f"| {metric} | {value:.4g} | {unit} | {'' if base is None else f'{base:.4g}'} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} |",
            file=sys.stderr,
        )
    return 0


def _timed(fn: Any) -> float:
    """CPU seconds of one call (process time: steadier than wall time on a shared machine)."""
    gc.collect()
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


if __name__ == "__main__":
    sys.exit(main())
