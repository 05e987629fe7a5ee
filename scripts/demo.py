"""The demo behind scripts/demo (run that: it installs what this needs)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from als.formats.writer import BuiltLayer, build_estargz, build_gzip
from tests.support.mount import ProcessMount
from tests.support.podman import Podman, write_registries_conf
from tests.support.registry import RegistryServer, push_image
from tests.support.tarspec import FileSpec, tar_from_spec

APPLETS = ["sh", "cat", "ls", "wc", "head", "echo", "sha256sum"]
PYLIB = Path("/usr/lib/python3.11")
# What the demo command reads; eStargz puts these first (prioritized) so they arrive together.
READS = ["bin/busybox", "etc/motd", "usr/lib/python3.11/this.py", "usr/lib/python3.11/os.py"]
CMD = (
    "cat /etc/motd; head -c 300 /usr/lib/python3.11/this.py; echo; "
    'sha256sum /usr/lib/python3.11/os.py; echo "$(ls /usr/lib/python3.11 | wc -l) entries"'
)


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def base_spec() -> dict[str, bytes | FileSpec]:
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    spec: dict[str, bytes | FileSpec] = {
        "bin/busybox": FileSpec(content=busybox.read_bytes(), mode=0o755)
    }
    for a in APPLETS:
        spec[f"bin/{a}"] = FileSpec(type="symlink", link="busybox")
    spec["etc/motd"] = b"hello from a lazily pulled container\n"
    return spec


def app_spec() -> dict[str, bytes | FileSpec]:
    """The Python 3.11 standard library of this machine: many files, few of them read."""
    spec: dict[str, bytes | FileSpec] = {}
    for p in sorted(PYLIB.rglob("*")):
        rel = p.relative_to("/")
        if "__pycache__" in p.parts or "site-packages" in p.parts or "dist-packages" in p.parts:
            continue
        if p.is_symlink():
            spec[str(rel)] = FileSpec(type="symlink", link=str(p.readlink()))
        elif p.is_file():
            spec[str(rel)] = FileSpec(content=p.read_bytes(), mode=p.stat().st_mode & 0o777)
    return spec


def build() -> tuple[list[BuiltLayer], list[BuiltLayer]]:
    tars = [tar_from_spec(base_spec()), tar_from_spec(app_spec())]
    lazy = [build_estargz(t, prioritized=[r for r in READS if r.encode() in t]) for t in tars]
    plain = [build_gzip(t) for t in tars]
    return lazy, plain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="leave registry and store running")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="als-demo-"))
    say(f"working in {work}")
    reg = RegistryServer(work / "registry").start()
    als: ProcessMount | None = None
    try:
        say(f"registry (docker-registry) on {reg.host}")
        say(f"building the demo image from busybox and {PYLIB} ...")
        lazy, plain = build()
        push_image(reg, "demo/app", "estargz", lazy)
        push_image(reg, "demo/app", "gzip", plain)
        size_lazy = sum(x.size for x in lazy)
        size_plain = sum(x.size for x in plain)
        say(f"pushed demo/app:estargz ({size_lazy / 1e6:.1f} MB)")
        say(f"pushed demo/app:gzip ({size_plain / 1e6:.1f} MB)")
        conf = write_registries_conf(work / "registries.conf", [reg.host])
        # The demo measures what a lazy start fetches: no whole-layer downloads behind it.
        als = ProcessMount(
            work / "als", "--registries-conf", str(conf), "--no-background-fetch"
        ).start()
        say(f"als mounted at {als.pool}")

        results = []
        for name, tag, pool, layers in (
            ("als (lazy, eStargz)", "estargz", als.pool, lazy),
            ("normal pull (gzip)", "gzip", None, plain),
        ):
            pm = Podman(work / f"podman-{tag}", conf, als_pool=pool)
            ref = f"{reg.host}/demo/app:{tag}"
            mark = reg.mark()
            t0 = time.monotonic()
            pm.pull(ref)
            t_pull = time.monotonic() - t0
            out = pm.run(ref, "sh", "-c", CMD).stdout
            t_total = time.monotonic() - t0
            fetched = sum(reg.blob_bytes_sent(x.digest, since=mark) for x in layers)
            results.append((name, t_pull, t_total, fetched, sum(x.size for x in layers)))
            if tag == "estargz":
                print(
                    "\n--- container output ---\n" + out.rstrip() + "\n------------------------\n"
                )
                links = pm.layer_diff_links()
                say(f"podman layers served by als: {len(links)} of {len(layers)}")
            if not args.keep:
                pm.reset()
        print()
        print(f"{'':22} {'pull':>8} {'pull+run':>9} {'registry bytes':>15} {'of image':>10}")
        for name, t_pull, t_total, fetched, total in results:
            share = 100 * fetched / total
            print(
                f"{name:22} {t_pull:7.2f}s {t_total:8.2f}s {fetched / 1e6:12.2f} MB {share:8.1f} %"
            )
        lazy_t, plain_t = results[0][2], results[1][2]
        print(
            f"\nlazy pull+run took {lazy_t / plain_t:.2f}x the time of a normal pull+run, "
            f"fetching {results[0][3] / max(results[1][3], 1) * 100:.1f} % of its bytes."
        )
        print("store log lines:")
        for line in als.log().splitlines():
            if "layer-ready" in line:
                print("  " + line.split(" INFO ")[-1][:160])
        if args.keep:
            print(
                f"\nkept running: registry {reg.url} (pid {reg.proc.pid if reg.proc else '?'}), "
                f"als-mount (pid {als.proc.pid if als.proc else '?'}) at {als.pool}."
            )
            print(
                f"stop with: kill {als.proc.pid if als.proc else ''} "
                f"{reg.proc.pid if reg.proc else ''}; rm -rf {work}"
            )
            return 0
    finally:
        if not args.keep:
            if als is not None:
                als.stop()
            reg.stop()
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
