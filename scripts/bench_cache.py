#!/usr/bin/env python3
"""Benchmark: the store's disk cache, with real podman, als-mount and docker-registry.

Uses the demo's image (busybox base layer + this machine's Python standard library as the app
layer, see scripts/demo.py) and measures two things, each next to its baseline:

(a) *Second podman run after an als restart, registry stopped.* The eStargz image is pulled
    and run through als with background fetch on (delay 0); once every layer is complete in
    the cache, als is stopped, the registry is stopped, als is started again on the same root
    and ``podman run`` is timed (als restarted before each repetition, so every timed run is
    the first one served by a fresh store). Baseline: ``podman run`` of the same image pulled
    normally as gzip (no als, already in podman's storage). The registry bytes during these
    runs are 0 by construction (it is not running); the store's own ``fetched_bytes`` is
    reported as well, and the container output is checked against the online run.
(b) *Registry bytes for two images sharing a base layer.* Images A and B (different
    repositories, the demo's base layer; A's app layer is the demo's, B's is Perl's library
    from /usr/share/perl, or random files without it), eStargz, background fetch off:
    ``podman pull`` + ``podman run`` of A then of B through one als; the layer-blob bytes the
    registry sent (its access log) for A, for B and in total, against the sum of the two
    images' layer-blob sizes (what two normal pulls download), and the bytes of the shared
    base blob sent during B (expected 0). Two normal pulls into one podman storage are
    measured too, for reference (podman itself skips a layer it already has).

Needs root (FUSE, podman overlay storage), podman, fusermount3 and docker-registry; no
internet. Everything runs in a temp dir that is removed at the end, also on failure.
Prints one JSON object per measurement on stdout and a Markdown table on stderr.
Usage: bench_cache.py [--quick] [--repeat N] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo, a sibling script

from demo import CMD, READS, app_spec, base_spec

from als.cli.status import StatusError, fetch_status
from als.formats.writer import BuiltLayer, build_estargz, build_gzip
from tests.support.mount import FUSE_AVAILABLE, ProcessMount
from tests.support.podman import PODMAN, Podman, write_registries_conf
from tests.support.registry import RegistryServer, push_image_full, registry_available
from tests.support.tarspec import FileSpec, tar_from_spec

NAME = "bench_cache"
COMPLETE_TIMEOUT = 600.0  # seconds to wait for the background downloads of row (a)


def emit(metric: str, value: float, unit: str, **extra: Any) -> None:
    print(
        json.dumps(
            {"bench": "cache", "metric": metric, "value": round(value, 4), "unit": unit, **extra}
        ),
        flush=True,
    )


def note(msg: str) -> None:
    print(f"{NAME}: {msg}", file=sys.stderr, flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


@dataclass
class Images:
    base_lazy: BuiltLayer
    app_a_lazy: BuiltLayer
    app_b_lazy: BuiltLayer
    base_plain: BuiltLayer
    app_a_plain: BuiltLayer

    @property
    def a_lazy(self) -> list[BuiltLayer]:
        return [self.base_lazy, self.app_a_lazy]

    @property
    def b_lazy(self) -> list[BuiltLayer]:
        return [self.base_lazy, self.app_b_lazy]

    @property
    def a_plain(self) -> list[BuiltLayer]:
        return [self.base_plain, self.app_a_plain]


PERL = Path("/usr/share/perl")


def app_b_spec() -> tuple[dict[str, bytes | FileSpec], list[str]]:
    """B's app layer: Perl's library (other content than A's), else deterministic random
    files; and the two files B's command reads."""
    spec: dict[str, bytes | FileSpec] = {}
    for p in sorted(PERL.rglob("*")) if PERL.is_dir() else []:
        if p.is_file() and not p.is_symlink():
            spec[str(p.relative_to("/"))] = FileSpec(content=p.read_bytes(), mode=0o644)
    if len(spec) < 2:
        rnd = random.Random(7)
        spec = {
            f"opt/app-b/lib/m{i:04d}.txt": rnd.randbytes(rnd.randrange(1, 64) << 10)
            for i in range(400)
        }
    files = sorted(spec)
    return spec, [files[len(files) // 3], files[2 * len(files) // 3]]


def build() -> tuple[Images, str]:
    """The demo's layers for A (and its gzip twin), B's layers; and B's command."""
    spec_b, reads_b = app_b_spec()
    tars = [tar_from_spec(base_spec()), tar_from_spec(app_spec()), tar_from_spec(spec_b)]

    def lazy(tar: bytes, reads: Sequence[str]) -> BuiltLayer:
        return build_estargz(tar, prioritized=[r for r in reads if r.encode() in tar])

    img = Images(
        lazy(tars[0], READS),
        lazy(tars[1], READS),
        lazy(tars[2], reads_b),
        build_gzip(tars[0]),
        build_gzip(tars[1]),
    )
    cmd_b = (
        f"cat /etc/motd; head -c 300 /{reads_b[0]}; echo; sha256sum /{reads_b[1]}; "
        f'echo "$(ls /{Path(reads_b[1]).parent} | wc -l) entries"'
    )
    return img, cmd_b


@dataclass
class Env:
    """Everything the bench starts; ``close()`` stops and removes all of it."""

    work: Path
    reg: RegistryServer
    conf: Path = field(init=False)
    mounts: list[ProcessMount] = field(default_factory=list)
    podmen: list[Podman] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conf = write_registries_conf(self.work / "registries.conf", [self.reg.host])

    def podman(self, name: str, pool: Path | None) -> Podman:
        pm = Podman(self.work / f"podman-{name}", self.conf, als_pool=pool)
        self.podmen.append(pm)
        return pm

    def als(self, name: str, **options: bool | float) -> ProcessMount:
        cfg = self.work / f"{name}.toml"
        cfg.write_text(
            "".join(
                f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n"
                for k, v in options.items()
            )
        )
        m = ProcessMount(
            self.work / name, "--config", str(cfg), "--registries-conf", str(self.conf)
        ).start()
        self.mounts.append(m)
        return m

    def restart(self, m: ProcessMount) -> ProcessMount:
        m.stop()
        again = ProcessMount(m.root, *m.args, env=m.env).start()
        self.mounts.append(again)
        return again

    def close(self) -> None:
        # podman first (its containers and layers point into the als mounts), then als.
        for pm in self.podmen:
            try:
                pm.reset()
            except Exception as exc:  # keep cleaning up; report what failed
                note(f"cleanup: podman reset in {pm.base} failed: {exc}")
        for m in self.mounts:
            if m.proc is not None:
                try:
                    m.stop()
                except Exception as exc:  # the rest must still go
                    note(f"cleanup: stopping als-mount at {m.root} failed: {exc}")
        self.reg.close()
        shutil.rmtree(self.work, ignore_errors=True)


def layer_bytes(reg: RegistryServer, layers: Sequence[BuiltLayer], since: int) -> int:
    return sum(reg.blob_bytes_sent(x.digest, since=since) for x in layers)


def all_bytes(reg: RegistryServer, since: int) -> int:
    return sum(e.bytes_sent for e in reg.access_log(since=since))


def wait_complete(root: Path, want: int, timeout: float) -> float:
    """Poll the store's status until ``want`` layers are complete; return the seconds taken."""
    t0 = time.monotonic()
    last: list[dict[str, Any]] = []
    while time.monotonic() - t0 < timeout:
        try:
            last = list(fetch_status(root).get("layers") or [])
        except StatusError as exc:
            note(f"status: {exc}")
        if sum(1 for la in last if la.get("complete")) >= want:
            return time.monotonic() - t0
        time.sleep(0.5)
    detail = ", ".join(
        f"{la.get('digest', '?')[:19]} {la.get('cached_bytes')}/{la.get('size')} "
        f"({la.get('background')}: {la.get('last_error')})"
        for la in last
    )
    raise SystemExit(f"{NAME}: layers not complete after {timeout:g} s: {detail or 'none'}")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def log_sources(text: str) -> dict[str, int]:
    """How many ``layer-ready`` lines name each source (registry, cache, memory)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "layer-ready" in line and " from=" in line:
            src = line.split(" from=", 1)[1].split()[0]
            out[src] = out.get(src, 0) + 1
    return out


def row_b(env: Env, img: Images, cmd_b: str) -> dict[str, Any]:
    reg = env.reg
    als = env.als("als-b", background_fetch=False)
    pm = env.podman("b-als", als.pool)
    per: dict[str, int] = {}
    per_all: dict[str, int] = {}
    base_during_b = 0
    for name, layers, cmd in (("a", img.a_lazy, CMD), ("b", img.b_lazy, cmd_b)):
        ref = f"{reg.host}/bench/app-{name}:estargz"
        mark = reg.mark()
        pm.pull(ref)
        pm.run(ref, "sh", "-c", cmd)
        per[name] = layer_bytes(reg, layers, mark)
        per_all[name] = all_bytes(reg, mark)
        if name == "b":
            base_during_b = reg.blob_bytes_sent(img.base_lazy.digest, since=mark)
    links = len(pm.layer_diff_links())
    # Reference: two normal pulls of the same eStargz images into one podman storage, no als.
    plain = env.podman("b-plain", None)
    mark = reg.mark()
    for name in ("a", "b"):
        plain.pull(f"{reg.host}/bench/app-{name}:estargz")
    normal = layer_bytes(reg, [*img.a_lazy, img.app_b_lazy], mark)
    size_a = sum(x.size for x in img.a_lazy)
    size_b = sum(x.size for x in img.b_lazy)
    return {
        "a": per["a"],
        "b": per["b"],
        "all_a": per_all["a"],
        "all_b": per_all["b"],
        "size_a": size_a,
        "size_b": size_b,
        "base_size": img.base_lazy.size,
        "base_during_b": base_during_b,
        "normal_shared": normal,
        "als_layers": links,
    }


def row_a(env: Env, img: Images, repeat: int) -> dict[str, Any]:
    reg = env.reg
    lazy_ref = f"{reg.host}/bench/app-a:estargz"
    plain_ref = f"{reg.host}/bench/app-a:gzip"
    # Baseline: a normal pull of the gzip image, then runs from podman's own storage.
    base_pm = env.podman("a-plain", None)
    base_cold = timed(lambda: (base_pm.pull(plain_ref), base_pm.run(plain_ref, "sh", "-c", CMD)))
    base_runs = [base_pm.run(plain_ref, "sh", "-c", CMD).seconds for _ in range(repeat)]

    als = env.als("als-a", background_fetch=True, background_delay=0.0)
    pm = env.podman("a-als", als.pool)
    mark = reg.mark()
    t0 = time.monotonic()
    pm.pull(lazy_ref)
    expected = pm.run(lazy_ref, "sh", "-c", CMD).stdout
    cold = time.monotonic() - t0
    fill = wait_complete(als.root, len(img.a_lazy), COMPLETE_TIMEOUT)
    fill_bytes = layer_bytes(reg, img.a_lazy, mark)
    status = fetch_status(als.root)
    cached = sum(int(la.get("cached_bytes") or 0) for la in status.get("layers") or [])
    links = len(pm.layer_diff_links())

    reg.stop()
    reg_mark = reg.mark()
    log_mark = als.log_path.stat().st_size
    offline: list[float] = []
    fetched = 0
    for _ in range(repeat):
        als = env.restart(als)
        got = pm.run(lazy_ref, "sh", "-c", CMD)
        if got.stdout != expected:
            raise SystemExit(f"{NAME}: the offline run printed something else:\n{got.stdout}")
        offline.append(got.seconds)
        fetched += int(fetch_status(als.root).get("fetched_bytes") or 0)
    with open(als.log_path, "rb") as f:
        f.seek(log_mark)
        sources = log_sources(f.read().decode(errors="replace"))
    # The registry is stopped, so this is 0; read from its access log all the same.
    reg_offline = all_bytes(reg, reg_mark)
    return {
        "cold": cold,
        "base_cold": base_cold,
        "fill_seconds": fill,
        "fill_bytes": fill_bytes,
        "cached": cached,
        "size": sum(x.size for x in img.a_lazy),
        "offline": offline,
        "base_runs": base_runs,
        "fetched": fetched,
        "reg_offline": reg_offline,
        "sources": sources,
        "als_layers": links,
    }


def report(a: dict[str, Any], b: dict[str, Any], repeat: int, json_only: bool) -> None:
    off = statistics.median(a["offline"])
    base = statistics.median(a["base_runs"])
    emit(
        "offline_second_run.seconds",
        off,
        "s",
        repeat=repeat,
        runs=a["offline"],
        registry="stopped",
        als_restarted=True,
    )
    emit(
        "baseline_local_run.seconds",
        base,
        "s",
        repeat=repeat,
        runs=a["base_runs"],
        image="gzip, normal pull",
    )
    emit("offline_second_run.ratio", off / base, "x", baseline="baseline_local_run.seconds")
    emit("offline_second_run.registry_bytes", a["reg_offline"], "B", registry="stopped")
    emit("offline_second_run.store_fetched_bytes", a["fetched"], "B")
    emit(
        "offline_second_run.layer_sources",
        sum(a["sources"].values()),
        "lookups",
        **{f"from_{k}": v for k, v in a["sources"].items()},
    )
    emit("cold_pull_run.seconds", a["cold"], "s", store="als, background fetch, delay 0")
    emit("baseline_cold_pull_run.seconds", a["base_cold"], "s", image="gzip, normal pull")
    emit("cold_pull_run.ratio", a["cold"] / a["base_cold"], "x")
    emit(
        "background_fill.seconds",
        a["fill_seconds"],
        "s",
        registry_bytes=a["fill_bytes"],
        cached_bytes=a["cached"],
        image_bytes=a["size"],
    )
    total = b["a"] + b["b"]
    sizes = b["size_a"] + b["size_b"]
    emit(
        "shared_base.image_a.registry_bytes",
        b["a"],
        "B",
        image_bytes=b["size_a"],
        all_requests_bytes=b["all_a"],
        percent=round(100 * b["a"] / b["size_a"], 2),
    )
    emit(
        "shared_base.image_b.registry_bytes",
        b["b"],
        "B",
        image_bytes=b["size_b"],
        all_requests_bytes=b["all_b"],
        percent=round(100 * b["b"] / b["size_b"], 2),
    )
    emit(
        "shared_base.total.registry_bytes",
        total,
        "B",
        two_normal_pulls_bytes=sizes,
        percent=round(100 * total / sizes, 2),
    )
    emit(
        "shared_base.base_blob_during_b.bytes",
        b["base_during_b"],
        "B",
        base_blob_bytes=b["base_size"],
    )
    emit(
        "shared_base.normal_pulls_one_storage.bytes",
        b["normal_shared"],
        "B",
        percent_of_sum=round(100 * b["normal_shared"] / sizes, 2),
    )
    if json_only:
        return

    def p(line: str = "") -> None:
        print(line, file=sys.stderr)

    srcs = ", ".join(f"{k} {v}" for k, v in sorted(a["sources"].items())) or "none logged"
    p(
        f"\n### Disk cache: demo image (busybox + Python stdlib, {mb(a['size'])} eStargz), "
        f"median of {repeat}\n"
    )
    p("| measurement | als | baseline | ratio | notes |")
    p("|---|---:|---:|---:|---|")
    p(
        f"| (a) second `podman run` after an als restart, registry stopped | {off:.2f} s | "
        f"{base:.2f} s (`podman run`, normal gzip pull, local storage) | {off / base:.2f}x | "
        f"registry bytes {a['reg_offline']} (registry stopped), store fetched "
        f"{a['fetched']} B; layer lookups from: {srcs} |"
    )
    p(
        f"| (a) cold `podman pull` + `run` (background fetch, delay 0) | {a['cold']:.2f} s | "
        f"{a['base_cold']:.2f} s (normal gzip pull + run) | {a['cold'] / a['base_cold']:.2f}x | "
        f"cache filled in {a['fill_seconds']:.1f} s more, {mb(a['fill_bytes'])} from the "
        f"registry for {mb(a['size'])} of layers |"
    )
    p(
        f"| (b) registry bytes, image A | {mb(b['a'])} | {mb(b['size_a'])} (A's layer blobs) | "
        f"{100 * b['a'] / b['size_a']:.1f} % | background fetch off |"
    )
    p(
        f"| (b) registry bytes, image B (shares A's base) | {mb(b['b'])} | {mb(b['size_b'])} "
        f"(B's layer blobs) | {100 * b['b'] / b['size_b']:.1f} % | |"
    )
    p(
        f"| (b) registry bytes, A + B | {mb(total)} | {mb(sizes)} (two normal pulls) | "
        f"{100 * total / sizes:.1f} % | two normal pulls into one podman storage measured: "
        f"{mb(b['normal_shared'])} |"
    )
    p(
        f"| (b) shared base blob sent during B | {b['base_during_b']} B | {b['base_size']} B | "
        f"{100 * b['base_during_b'] / b['base_size']:.1f} % | expected 0 |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition (same as --repeat 1)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--json-only", action="store_true", help="no Markdown table on stderr")
    args = ap.parse_args()
    repeat = 1 if args.quick else max(1, args.repeat)
    if os.geteuid() != 0:
        print(
            f"{NAME}: needs root (it mounts als with FUSE and runs podman with overlay "
            "storage); run it as root, e.g. sudo scripts/bench cache",
            file=sys.stderr,
        )
        return 2
    missing = [
        what
        for what, ok in (
            ("podman", PODMAN is not None),
            ("docker-registry", registry_available()),
            ("/dev/fuse and fusermount3", FUSE_AVAILABLE),
        )
        if not ok
    ]
    if missing:
        print(f"{NAME}: needs {', '.join(missing)}; skipped", file=sys.stderr)
        return 0
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    work = Path(tempfile.mkdtemp(prefix="als-bench-cache-"))
    env: Env | None = None
    try:
        reg = RegistryServer(work / "registry")
        try:
            reg.start()
        except BaseException:
            reg.close()
            raise
        env = Env(work, reg)
        if not args.json_only:
            note("building the demo image layers (busybox, Python stdlib) ...")
        img, cmd_b = build()
        push_image_full(reg, "bench/app-a", "estargz", img.a_lazy)
        push_image_full(reg, "bench/app-a", "gzip", img.a_plain)
        push_image_full(reg, "bench/app-b", "estargz", img.b_lazy)
        if not args.json_only:
            note("(b) two images sharing a base layer ...")
        b = row_b(env, img, cmd_b)
        if not args.json_only:
            note(f"(a) offline second run, {repeat} repetition(s) ...")
        a = row_a(env, img, repeat)
        report(a, b, repeat, args.json_only)
    finally:
        if env is not None:
            env.close()
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
