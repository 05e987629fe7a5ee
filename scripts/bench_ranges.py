#!/usr/bin/env python3
"""Benchmark: range-fetch throughput over loopback against a real docker-registry.

A random blob (64 MiB; 16 MiB with --quick) is pushed to a fresh registry, then N random
64 KiB ranges are fetched with the als RegistryClient in several ways:

* ``single``: one request per range, one after the other;
* ``single-8t``: one request per range, from 8 threads sharing one client (as the store does);
* ``multi``: multi-range requests (up to 32 ranges each), no coalescing;
* ``coalesced``: ranges closer than 512 KiB merged into larger ones, then multi-range.

Every result is checked against the blob. Prints one JSON object per measurement on stdout
({"bench": "ranges", "metric": ..., "value": ..., "unit": ...}) and a Markdown table on stderr.
Usage: bench_ranges.py [--quick] [--ranges N] [--blob-mib M]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from als.registry import RegistryClient
from tests.support.registry import RegistryServer, push_blob, registry_available

RANGE = 64 << 10


def emit(metric: str, value: float, unit: str, **extra: Any) -> None:
    print(
        json.dumps(
            {"bench": "ranges", "metric": metric, "value": round(value, 3), "unit": unit, **extra}
        ),
        flush=True,
    )


def run_mode(
    name: str,
    make_client: Callable[[], RegistryClient],
    ref: str,
    digest: str,
    blob: bytes,
    ranges: list[tuple[int, int]],
    threads: int = 1,
) -> dict[str, Any]:
    with make_client() as client:
        client.fetch_ranges(ref, digest, [(0, 1)])  # ping + connection set-up, not measured
        base = client.stats.snapshot()
        t0 = time.perf_counter()
        if threads == 1:
            got = client.fetch_ranges(ref, digest, ranges)
        else:
            got = [b""] * len(ranges)

            def work(k: int) -> None:
                for i in range(k, len(ranges), threads):
                    got[i] = client.fetch_ranges(ref, digest, [ranges[i]])[0]

            ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        elapsed = time.perf_counter() - t0
        stats = client.stats.snapshot()
    for (off, n), data in zip(ranges, got, strict=True):
        if data != blob[off : off + n]:
            raise SystemExit(f"bench_ranges: {name}: wrong bytes at {off}+{n}")
    useful = sum(n for _, n in ranges)
    return {
        "mode": name,
        "seconds": elapsed,
        "requests": stats["requests"] - base["requests"],
        "bytes": stats["bytes_received"] - base["bytes_received"],
        "useful": useful,
        "throughput": useful / elapsed / (1 << 20),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 MiB blob, 64 ranges")
    ap.add_argument("--ranges", type=int, default=None, help="number of 64 KiB ranges")
    ap.add_argument("--blob-mib", type=int, default=None)
    args = ap.parse_args()
    if not registry_available():
        print("bench_ranges: docker-registry is not installed; skipped", file=sys.stderr)
        return 0
    blob_mib = args.blob_mib or (16 if args.quick else 64)
    n = args.ranges or (64 if args.quick else 256)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    rnd = random.Random(1234)
    blob = rnd.randbytes(blob_mib << 20)
    ranges = [(rnd.randrange(0, len(blob) - RANGE), RANGE) for _ in range(n)]
    with (
        tempfile.TemporaryDirectory(prefix="als-bench-ranges-") as tmp,
        RegistryServer(Path(tmp)) as reg,
    ):
        digest = push_blob(reg, "bench/blob", blob)
        ref = f"{reg.host}/bench/blob"
        modes: list[tuple[str, Callable[[], RegistryClient], int]] = [
            ("single", lambda: RegistryClient(multirange=False, coalesce_gap=0), 1),
            ("single-8t", lambda: RegistryClient(multirange=False, coalesce_gap=0), 8),
            ("multi", lambda: RegistryClient(multirange=True, coalesce_gap=0), 1),
            ("coalesced", lambda: RegistryClient(multirange=True, coalesce_gap=512 << 10), 1),
        ]
        results = [
            run_mode(name, mk, ref, digest, blob, ranges, threads) for name, mk, threads in modes
        ]
    for r in results:
        m = r["mode"]
        emit(
            f"{m}.throughput",
            r["throughput"],
            "MiB/s",
            ranges=n,
            range_bytes=RANGE,
            blob_mib=blob_mib,
        )
        emit(f"{m}.seconds", r["seconds"], "s")
        emit(f"{m}.requests", r["requests"], "requests")
        emit(f"{m}.bytes_transferred", r["bytes"] / (1 << 20), "MiB")
    print(
        f"\n### Range fetches over loopback: {n} x 64 KiB from a {blob_mib} MiB blob "
        "(docker-registry 2.8)\n",
        file=sys.stderr,
    )
    print("| mode | requests | time (s) | useful MiB/s | MiB transferred |", file=sys.stderr)
    print("|---|---:|---:|---:|---:|", file=sys.stderr)
    for r in results:
        print(
            f"| {r['mode']} | {r['requests']} | {r['seconds']:.3f} | {r['throughput']:.1f} | "
            f"{r['bytes'] / (1 << 20):.1f} |",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
