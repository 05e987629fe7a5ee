#!/usr/bin/env python3
"""Benchmark (issue 14): ``als convert`` of whole images, each figure next to its baseline
measured in the same run.

Workload (scripts/bench_workloads.py, cached): ``large`` (Debian 12 minbase + python3-numpy),
or ``small`` with ``--quick``; its ``gzip`` and strace-prioritized ``estargz-prio`` images are
pushed to a local docker-registry.

1. ``convert``: wall time of ``als convert docker://REG/bench/W:gzip docker://REG/... --format
   estargz`` (this checkout's ``python -m als``, a fresh record directory: a first conversion,
   registry to registry) against ``podman push --compression-format zstd:chunked`` of the same
   image (pulled normally into a fresh podman storage first, untimed) to another repository of
   the same registry. Each repetition converts and pushes to new repositories, interleaved.
   Also the time of the ``--optimize`` conversion (no target).
2. ``lazy``: cold ``podman pull`` + ``podman run`` of the workload's command (empty podman
   storage, empty als cache, background fetch off: bench_perf's ``pull_run``) of the
   ``--optimize`` output (``--optimize-seconds N`` with the workload's command) against the
   ``estargz-prio`` image, the unoptimized ``als convert`` output and podman's zstd:chunked push;
   the registry bytes of each.

podman pulls and pushes with an empty blob-info cache of its own (a private mount namespace;
podman 4.3.1 would otherwise mount the gzip blobs it knows instead of compressing them). Not
measured yet: a second image on the same base (the issue's third benchmark item).

Needs root, podman, fusermount3, docker-registry and unshare. Prints JSON lines on stdout, a
Markdown table on stderr, and writes results.jsonl and results.md to --out.
Usage: bench_convert.py [--quick] [--repeat N] [--workloads small|large] [--optimize-seconds N]
                        [--out DIR] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_perf as bp
from bench_workloads import Workload, cache_root, large, small

from als.oci import OCI_MANIFEST, format_of_descriptor

NAME = "bench_convert"
ROOT = Path(__file__).resolve().parents[1]
OPTIMIZE_SECONDS = 10.0  # als convert's default: the large command needs about 2 s of it
QUICK_OPTIMIZE_SECONDS = 5.0
PRIO = "estargz-prio"  # the workload's strace-prioritized eStargz (the baseline of --optimize)
ALS = "als-estargz"  # als convert --format estargz
OPT = "als-optimized"  # als convert --format estargz --optimize
PODMAN = "podman-zstd-chunked"  # podman push --compression-format zstd:chunked

# Targets of issue 14: (workload, variant or "*", metric) -> (op, bound, description)
TARGETS: dict[tuple[str, str, str], tuple[str, float, str]] = {
    ("*", "*", "convert.seconds"): ("<=", 1.5, "<= 1.5x podman push zstd:chunked"),
    ("large", "*", "lazy.vs_prio.seconds"): ("<=", 1.05, "<= 1.05x strace-prioritized"),
}
# The lazy comparisons of the --optimize output: metric -> (variant, baseline's name)
AGAINST = {
    "lazy.vs_prio.seconds": (PRIO, "estargz-prio (strace)"),
    "lazy.vs_estargz.seconds": (ALS, "als convert, not optimized"),
    "lazy.vs_zstd_chunked.seconds": (PODMAN, "podman push zstd:chunked"),
}


def row(
    bench: str,
    w: str,
    v: str,
    metric: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    baseline_name: str = "",
    note: str = "",
    **extra: Any,
) -> bp.Row:
    return bp.make_row(
        bench, w, v, metric, value, unit, baseline, baseline_name, note, targets=TARGETS, **extra
    )


# --- the commands -----------------------------------------------------------------------------


def convert_argv(
    src: str,
    dest: str,
    registries_conf: Path,
    record_dir: Path,
    optimize_seconds: float | None = None,
    command: Sequence[str] = (),
    run_args: Sequence[str] = (),
) -> list[str]:
    """``python -m als convert`` of registry image ``src`` to ``dest`` as eStargz (JSON result);
    with ``optimize_seconds``, ``--optimize`` running ``command`` with podman ``run_args``."""
    argv = [
        sys.executable,
        "-m",
        "als",
        "convert",
        "--json",
        "--registries-conf",
        str(registries_conf),
        "--record-dir",
        str(record_dir),
        f"docker://{src}",
        f"docker://{dest}",
        "--format",
        "estargz",
    ]
    if optimize_seconds is not None:
        argv += ["--optimize", "--optimize-seconds", f"{optimize_seconds:g}"]
        argv += [f"--optimize-run-arg={a}" for a in run_args]
        if command:
            argv += ["--", *command]
    return argv


def optimize_run_args() -> list[str]:
    """The podman run flags bench_perf's runs use; --optimize gives the run no network itself."""
    from tests.support.podman import RUN_FLAGS

    return [a for a in RUN_FLAGS if a not in ("--network", "none")]


def als_convert(argv: Sequence[str]) -> tuple[float, dict[str, Any]]:
    """(wall seconds, the JSON result) of one ``als convert``; SystemExit when it fails."""
    t0 = time.monotonic()
    p = subprocess.run(
        list(argv),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=3600,
    )
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{NAME}: als convert failed ({p.returncode}):\n{p.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(p.stdout)
    return took, result


def result_layers(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The layers of the (single-platform) image an ``als convert --json`` result describes."""
    (image,) = result["images"]
    layers: list[dict[str, Any]] = image["layers"]
    return layers


def not_zstd_chunked(layers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The digests of manifest layer descriptors that do not declare zstd:chunked."""
    return [
        str(d.get("digest"))
        for d in layers
        if format_of_descriptor(str(d.get("mediaType", "")), d.get("annotations") or {})
        != "zstd-chunked"
    ]


def manifest_layers(env: bp.Env, ref: str) -> list[dict[str, Any]]:
    """The layer descriptors of ``HOST/REPO:TAG``'s manifest, from the registry."""
    repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
    r = env.reg.session().get(
        f"{env.reg.url}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}, timeout=30
    )
    r.raise_for_status()
    layers: list[dict[str, Any]] = r.json()["layers"]
    return layers


HOST_CACHE = "/var/lib/containers/cache"


def private_cache_argv(cache: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` in a private mount namespace where ``cache`` is bind-mounted over podman's
    blob-info cache directory (the host's own cache is neither read nor written)."""
    script = f'mkdir -p {HOST_CACHE} && mount --bind "$0" {HOST_CACHE} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(cache), *argv]


def podman_cmd(pm: Any, cache: Path, *args: str, timeout: float = 3600) -> float:
    """Seconds of ``podman ARGS`` in ``pm``'s storage with blob-info cache ``cache``.

    podman 4.3.1 has no ``--force-compression``: a layer its blob-info cache (root's is
    host-wide) says the registry already has, gzip or not, is mounted across repositories
    instead of compressed. A cache of its own per command keeps it from knowing any."""
    from tests.support.podman import PODMAN

    assert PODMAN is not None
    cache.mkdir(parents=True, exist_ok=True)
    argv = private_cache_argv(cache, [PODMAN, "--tmpdir", str(pm.tmpdir), *args])
    t0 = time.monotonic()
    p = subprocess.run(
        argv,
        env=pm.env,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{NAME}: podman {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return took


def podman_push(pm: Any, cache: Path, src: str, dest: str) -> float:
    """Seconds of ``podman push --compression-format zstd:chunked`` of local image ``src``, with
    an empty blob-info cache ``cache`` (see ``podman_cmd``; the result is checked)."""
    return podman_cmd(
        pm,
        cache,
        "push",
        "--tls-verify=false",
        "--compression-format",
        "zstd:chunked",
        src,
        f"docker://{dest}",
    )


# --- the rows ---------------------------------------------------------------------------------


def convert_rows(
    w: str,
    als_runs: Sequence[float],
    podman_runs: Sequence[float],
    optimize: float,
    optimize_seconds: float,
    bytes_in: int,
    bytes_out: int,
    prioritized: int,
    **detail: Any,
) -> list[bp.Row]:
    """The conversion time against podman's push, and the --optimize conversion's; ``detail``
    goes into the first row's JSON."""
    base = bp.median(podman_runs)
    return [
        row(
            "convert",
            w,
            ALS,
            "convert.seconds",
            bp.median(als_runs),
            "s",
            base,
            "podman push zstd:chunked",
            note="gzip image to eStargz, registry to registry",
            runs=list(als_runs),
            baseline_runs=list(podman_runs),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            **detail,
        ),
        row(
            "convert",
            w,
            OPT,
            "convert.optimize.seconds",
            optimize,
            "s",
            base,
            "podman push zstd:chunked",
            note=f"--optimize-seconds {optimize_seconds:g}, the run included; "
            f"{prioritized} files recorded",
            optimize_seconds=optimize_seconds,
            prioritized=prioritized,
        ),
    ]


def lazy_rows(
    w: str,
    runs: Mapping[str, Sequence[tuple[float, int, int]]],
    sizes: Mapping[str, int],
) -> list[bp.Row]:
    """The --optimize output's pull + run against each other variant, then each variant's
    registry bytes; ``runs``: variant -> bench_perf.pull_run results."""
    secs = {v: [r[0] for r in rs] for v, rs in runs.items()}
    mine = bp.median(secs[OPT])
    rows = [
        row(
            "lazy",
            w,
            OPT,
            metric,
            mine,
            "s",
            bp.median(secs[v]),
            name,
            note="pull + run, background fetch off",
            runs=secs[OPT],
            baseline_runs=secs[v],
        )
        for metric, (v, name) in AGAINST.items()
    ]
    for v, rs in runs.items():
        rows.append(
            row(
                "lazy",
                w,
                v,
                "lazy.registry_bytes",
                int(bp.median([r[1] for r in rs])),
                "B",
                sizes[v],
                "image's compressed layers",
                note="layer blobs sent during pull + run",
            )
        )
    return rows


# --- the benchmark ----------------------------------------------------------------------------


def bench(env: bp.Env, w: Workload, args: argparse.Namespace, out: bp.Output) -> None:
    from tests.support.registry import push_image_full

    host = env.reg.host
    for v in ("gzip", PRIO):
        push_image_full(env.reg, f"bench/{w.name}", v, w.layers[v])
    src = bp.ref_of(env, w, "gzip")
    # 1: convert time, als convert and podman push interleaved, each to new repositories
    als_t: list[float] = []
    podman_t: list[float] = []
    pm = env.podman(None)
    try:
        out.say(f"convert {w.name}: podman pull of gzip (untimed) ...")
        podman_cmd(pm, env.fresh("blob-info-cache"), "pull", "--tls-verify=false", src)
        for rep in range(args.repeat):
            out.say(f"convert {w.name}: repetition {rep + 1}/{args.repeat}: als convert ...")
            dest = f"{host}/bench/{w.name}-als{rep + 1}:estargz"
            t, result = als_convert(convert_argv(src, dest, env.conf, env.fresh("records")))
            als_t.append(t)
            out.say(f"convert {w.name}: als convert {t:.1f} s; podman push zstd:chunked ...")
            pdest = f"{host}/bench/{w.name}-podman{rep + 1}:zstd-chunked"
            podman_t.append(podman_push(pm, env.fresh("blob-info-cache"), src, pdest))
            out.say(f"convert {w.name}: podman push {podman_t[-1]:.1f} s")
            if rep == 0:
                als_ref, als_result, als_layers = dest, result, result_layers(result)
                podman_ref, podman_layers = pdest, manifest_layers(env, pdest)
                if bad := not_zstd_chunked(podman_layers):
                    raise SystemExit(f"{NAME}: podman pushed {bad} of {pdest} not as zstd:chunked")
    finally:
        env.drop_podman(pm)
    n = args.optimize_seconds
    out.say(f"convert {w.name}: als convert --optimize --optimize-seconds {n:g} ...")
    opt_ref = f"{host}/bench/{w.name}-als:optimized"
    argv = convert_argv(
        src, opt_ref, env.conf, env.fresh("records"), n, w.command, optimize_run_args()
    )
    opt_t, opt = als_convert(argv)
    opt_layers = result_layers(opt)
    for r in convert_rows(
        w.name,
        als_t,
        podman_t,
        opt_t,
        n,
        w.compressed("gzip"),
        sum(x["size"] for x in als_layers),
        sum(x["prioritized"] for x in opt_layers),
        # als's own figures of the first conversion: per layer (read, convert, verify), total
        layer_seconds=[x["seconds"] for x in als_layers],
        als_seconds=als_result["seconds"],
    ):
        out.add(r)
    # 2: lazy pull + run, the variants interleaved
    images: dict[str, tuple[str, list[str], int]] = {
        PRIO: (bp.ref_of(env, w, PRIO), [x.digest for x in w.layers[PRIO]], w.compressed(PRIO)),
        OPT: (opt_ref, [x["digest"] for x in opt_layers], sum(x["size"] for x in opt_layers)),
        ALS: (als_ref, [x["digest"] for x in als_layers], sum(x["size"] for x in als_layers)),
        PODMAN: (
            podman_ref,
            [x["digest"] for x in podman_layers],
            sum(int(x["size"]) for x in podman_layers),
        ),
    }
    runs: dict[str, list[tuple[float, int, int]]] = {}
    for rep in range(args.repeat):
        for v, (ref, digests, _size) in images.items():
            out.say(f"lazy {w.name}: repetition {rep + 1}/{args.repeat}: {v} ...")

            def once(
                v: str = v, ref: str = ref, digests: list[str] = digests
            ) -> tuple[float, int, int]:
                als = env.als(background=False)
                try:
                    return bp.pull_run(env, w, v, als.pool, ref=ref, digests=digests)
                finally:
                    env.drop_als(als)

            runs.setdefault(v, []).append(bp.retry(out, once))
    for r in lazy_rows(w.name, runs, {v: size for v, (_r, _d, size) in images.items()}):
        out.add(r)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small workload, one repetition")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (median)")
    ap.add_argument("--workloads", default=None, help="comma list: small,large (default large)")
    ap.add_argument(
        "--optimize-seconds",
        type=float,
        default=None,
        help=f"the --optimize run (default {OPTIMIZE_SECONDS:g}, quick {QUICK_OPTIMIZE_SECONDS:g})",
    )
    ap.add_argument("--out", type=Path, default=None, help="directory for results.jsonl, .md")
    ap.add_argument("--json-only", action="store_true", help="no progress or table on stderr")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 1
    args.repeat = max(1, args.repeat)
    names = args.workloads or ("small" if args.quick else "large")
    args.workloads = [x for x in names.split(",") if x]
    if bad := [x for x in args.workloads if x not in ("small", "large")]:
        ap.error(f"unknown workload: {', '.join(bad)}")
    if args.optimize_seconds is None:
        args.optimize_seconds = QUICK_OPTIMIZE_SECONDS if args.quick else OPTIMIZE_SECONDS
    if args.optimize_seconds <= 0:
        ap.error("--optimize-seconds must be positive")
    if args.out is None:
        args.out = cache_root().parent / "results" / ("convert-quick" if args.quick else "convert")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(f"{NAME}: needs root (FUSE mounts, podman overlay storage)", file=sys.stderr)
        return 2
    missing = bp.check_tools()
    if missing:
        print(f"{NAME}: needs {', '.join(missing)}; skipped", file=sys.stderr)
        return 0
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    out = bp.Output(args.out, args.json_only, NAME)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="als-bench-convert-"))
    env: bp.Env | None = None
    try:
        workloads = []
        for name in args.workloads:
            out.say(f"workload {name} (cached under {cache_root()}) ...")
            variants = ("gzip", PRIO)
            workloads.append(small(variants) if name == "small" else large(variants))
        env = bp.Env(work)
        for w in workloads:
            out.add(
                row(
                    "workload",
                    w.name,
                    "gzip",
                    "workload.size",
                    w.uncompressed,
                    "B",
                    note=f"{len(w.tar_sizes)} layers, {sum(w.entries)} entries uncompressed",
                    compressed=w.compressed("gzip"),
                    prioritized=len(w.prioritized),
                    command=w.command,
                )
            )
            bench(env, w, args, out)
    finally:
        if env is not None:
            env.close()
        shutil.rmtree(work, ignore_errors=True)
    bp.report(out, args, time.monotonic() - started, "als convert benchmark", draw=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
