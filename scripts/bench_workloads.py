#!/usr/bin/env python3
"""The images of the issue-6 benchmark (scripts/bench_perf.py), built once and cached.

Two workloads, each as four variants of the same layers:

* ``small``: busybox-static (one layer, with a few applet links) plus this machine's Python 3
  standard library (second layer; the demo's image, about 20 MB); its command reads four files.
  No network needed.
* ``large``: a Debian 12 minbase rootfs (``debootstrap``, base layer) plus ``python3`` and
  ``python3-numpy`` installed in it with apt (second layer: the difference, with whiteouts for
  removed paths); its command imports numpy. Needs Debian's package archive the first time.

Variants: ``gzip`` (a plain pull, the baseline), ``estargz-prio`` (eStargz, the files the command
opens first: recorded with strace from a run of the command in a chroot), ``estargz`` (no
prioritized files) and ``zstd-chunked``. Everything lands under
``${XDG_CACHE_HOME:-~/.cache}/als-bench/<VERSION>/``; bump ``VERSION`` when a workload changes.

Usage: bench_workloads.py [--workload small|large|all] [--rebuild]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from als.formats.writer import BuiltLayer, build_estargz, build_gzip, build_zstd_chunked
from tests.support.tarspec import tar_from_spec

VERSION = "1"
VARIANTS = ("gzip", "estargz-prio", "estargz", "zstd-chunked")
LAZY_VARIANTS = VARIANTS[1:]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
LARGE_PACKAGES = ("python3", "python3-numpy")
LARGE_CMD = ["python3", "-c", "import numpy; print(numpy.arange(10).sum())"]
LARGE_EXPECT = "45"
# Inside the rootfs, these hold only what the host mounts there at run time.
_VIRTUAL = ("proc", "sys")


def note(msg: str) -> None:
    print(f"bench_workloads: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "als-bench" / VERSION


@dataclass
class Workload:
    """One workload: its variants' layers and what running it looks like."""

    name: str
    command: list[str]  # what `podman run IMAGE ...` runs
    expect: str  # a line the command prints
    layers: dict[str, list[BuiltLayer]]  # variant -> layers, base first
    tar_sizes: list[int]  # uncompressed tar bytes per layer
    entries: list[int]  # tar entries per layer
    prioritized: list[str]  # what estargz-prio puts first

    def compressed(self, variant: str) -> int:
        return sum(x.size for x in self.layers[variant])

    @property
    def uncompressed(self) -> int:
        return sum(self.tar_sizes)


# --- the cache of built layers ----------------------------------------------------------------


def save_layer(layer: BuiltLayer, path: Path) -> None:
    """``path.blob`` plus ``path.json`` (every field but the blob)."""
    meta = {k: v for k, v in dataclasses.asdict(layer).items() if k != "blob"}
    tmp = path.with_suffix(".blob.tmp")
    tmp.write_bytes(layer.blob)
    tmp.rename(path.with_suffix(".blob"))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def load_layer(path: Path) -> BuiltLayer | None:
    """The layer saved by ``save_layer``, or None if absent or not matching its record."""
    blob_p, meta_p = path.with_suffix(".blob"), path.with_suffix(".json")
    if not (blob_p.is_file() and meta_p.is_file()):
        return None
    meta = json.loads(meta_p.read_text())
    blob = blob_p.read_bytes()
    if len(blob) != meta.get("size"):
        return None
    return BuiltLayer(blob=blob, **meta)


def build_variant(variant: str, tar: bytes, prioritized: Sequence[str]) -> BuiltLayer:
    if variant == "gzip":
        return build_gzip(tar)
    if variant == "estargz-prio":
        present = [p for p in prioritized if p.encode() in tar]
        return build_estargz(tar, prioritized=present)
    if variant == "estargz":
        return build_estargz(tar)
    if variant == "zstd-chunked":
        return build_zstd_chunked(tar)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def tar_entries(tar: bytes) -> int:
    import io

    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return sum(1 for _ in tf)


def cached_layers(
    d: Path, tars: Sequence[bytes], prioritized: Sequence[str], variants: Iterable[str]
) -> dict[str, list[BuiltLayer]]:
    out: dict[str, list[BuiltLayer]] = {}
    for v in variants:
        layers = []
        for i, tar in enumerate(tars):
            p = d / v / f"layer-{i}"
            got = load_layer(p)
            if got is None:
                t0 = time.monotonic()
                note(f"{d.name}: building {v} layer {i} ({len(tar) / 1e6:.0f} MB tar) ...")
                got = build_variant(v, tar, prioritized)
                p.parent.mkdir(parents=True, exist_ok=True)
                save_layer(got, p)
                note(
                    f"{d.name}: {v} layer {i}: {got.size / 1e6:.1f} MB in "
                    f"{time.monotonic() - t0:.0f} s"
                )
            layers.append(got)
        out[v] = layers
    return out


def _workload(
    name: str,
    d: Path,
    tars: list[bytes],
    prioritized: list[str],
    cmd: list[str],
    expect: str,
    variants: Iterable[str],
) -> Workload:
    meta_p = d / "entries.json"
    if meta_p.is_file():
        entries = json.loads(meta_p.read_text())
    else:
        entries = [tar_entries(t) for t in tars]
        meta_p.write_text(json.dumps(entries))
    layers = cached_layers(d, tars, prioritized, variants)
    return Workload(name, cmd, expect, layers, [len(t) for t in tars], entries, prioritized)


# --- small: busybox + the Python standard library (the demo's image) --------------------------


def small(variants: Iterable[str] = VARIANTS, rebuild: bool = False) -> Workload:
    from demo import CMD, READS, app_spec, base_spec

    d = cache_root() / "small"
    if rebuild:
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    tars = []
    for i, make in enumerate((base_spec, app_spec)):
        p = d / f"layer-{i}.tar"
        if not p.is_file():
            p.with_suffix(".tmp").write_bytes(tar_from_spec(make()))
            p.with_suffix(".tmp").rename(p)
        tars.append(p.read_bytes())
    return _workload("small", d, tars, list(READS), ["sh", "-c", CMD], "entries", variants)


# --- large: Debian minbase + python3-numpy ----------------------------------------------------


def run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    note("$ " + " ".join(cmd))
    return subprocess.run(list(cmd), check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def ensure_tool(cmd: str, package: str) -> str:
    """The path of ``cmd``, installing Debian's ``package`` with apt-get if it is missing."""
    found = shutil.which(cmd)
    if found:
        return found
    note(f"{cmd} is missing: installing {package} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=False)
    if r.returncode != 0:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", package], env=env)
    return shutil.which(cmd) or f"/usr/sbin/{cmd}"


def _clean_apt(root: Path) -> None:
    """What image builds remove: downloaded packages and package lists."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        base = root / sub
        if not base.is_dir():
            continue
        for p in base.iterdir():
            if p.is_file() and p.name != "lock":
                p.unlink()
    for p in (root / "var/cache/apt").glob("*.bin"):
        p.unlink()


class _ProcMount:
    """/proc mounted inside a chroot for apt's maintainer scripts; always unmounted."""

    def __init__(self, root: Path) -> None:
        self.path = root / "proc"

    def __enter__(self) -> None:
        self.path.mkdir(exist_ok=True)
        run(["mount", "-t", "proc", "proc", str(self.path)])

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


def build_rootfs(d: Path) -> tuple[Path, Path]:
    """``base`` (debootstrap minbase) and ``full`` (base + python3-numpy) under ``d``."""
    base, full = d / "rootfs-base", d / "rootfs-full"
    if not (d / "rootfs-base.done").exists():
        shutil.rmtree(base, ignore_errors=True)
        deb = ensure_tool("debootstrap", "debootstrap")
        run([deb, "--variant=minbase", SUITE, str(base), DEBIAN_MIRROR])
        _clean_apt(base)
        (d / "rootfs-base.done").touch()
    if not (d / "rootfs-full.done").exists():
        shutil.rmtree(full, ignore_errors=True)
        run(["cp", "-a", str(base), str(full)])
        resolv = full / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        shutil.copyfile("/etc/resolv.conf", resolv)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LANG": "C.UTF-8",
            "HOME": "/root",
        }
        with _ProcMount(full):
            run(["chroot", str(full), "apt-get", "update", "-q"], env=env)
            run(
                [
                    "chroot",
                    str(full),
                    "apt-get",
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    *LARGE_PACKAGES,
                ],
                env=env,
            )
            run(["chroot", str(full), "apt-get", "clean"], env=env)
        resolv.unlink()
        if (base / "etc/resolv.conf").exists():
            shutil.copy2(base / "etc/resolv.conf", resolv)
        _clean_apt(full)
        (d / "rootfs-full.done").touch()
    return base, full


Snapshot = dict[str, tuple[int, int, int, int, int, int, str]]


def snapshot(root: Path) -> Snapshot:
    """rel path -> (mode, uid, gid, size, mtime_ns, rdev, symlink target) of every entry."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir.split(os.sep)[0] in _VIRTUAL:
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.normpath(os.path.join(rel_dir, n))
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if stat.S_ISREG(st.st_mode) else 0,
                st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_rdev,
                link,
            )
    return out


def layer_diff(lower: Snapshot, upper: Snapshot) -> tuple[list[str], list[str]]:
    """What a layer on top of ``lower`` holds to give ``upper``: (paths to add, sorted, parents
    included; whiteout paths). A removed directory gets one whiteout, not one per child."""
    changed = {p for p, v in upper.items() if lower.get(p) != v}
    for p in list(changed):
        parent = os.path.dirname(p)
        while parent and parent not in changed:
            changed.add(parent)
            parent = os.path.dirname(parent)
    removed = sorted(p for p in lower if p not in upper)
    whiteouts: list[str] = []
    for p in removed:
        if any(
            p.startswith(w + "/")
            for w in removed
            if w != p and w in lower and stat.S_ISDIR(lower[w][0])
        ):
            continue
        parent, name = os.path.split(p)
        whiteouts.append(os.path.join(parent, ".wh." + name) if parent else ".wh." + name)
    return sorted(changed, key=lambda s: s.split("/")), whiteouts


def tar_tree(root: Path, paths: Sequence[str], whiteouts: Sequence[str], out: Path) -> None:
    """A PAX tar of ``paths`` under ``root`` (in that order, hardlinks kept) plus whiteouts.
    Owner names are left out: the numeric ids are what matter inside the image."""
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel in paths:
            info = tf.gettarinfo(str(root / rel), arcname=rel)
            if info is None:  # sockets
                continue
            info.uname = info.gname = ""
            if info.isreg():
                with open(root / rel, "rb") as f:
                    tf.addfile(info, f)
            else:
                tf.addfile(info)
        for w in whiteouts:
            info = tarfile.TarInfo(w)
            info.mode = 0o600
            info.mtime = 0
            tf.addfile(info)
    tmp.rename(out)


def tree_paths(snap: Snapshot) -> list[str]:
    return sorted(snap, key=lambda s: s.split("/"))


def record_opens(root: Path, cmd: Sequence[str]) -> list[str]:
    """The regular files ``cmd`` opens or executes in a chroot of ``root``, in first-open order,
    as paths inside the image (symlinks resolved)."""
    log = root.parent / "strace.log"
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    run(
        [
            ensure_tool("strace", "strace"),
            "-f",
            "-qq",
            "-e",
            "trace=chroot,execve,open,openat",
            "-o",
            str(log),
            "chroot",
            str(root),
            *cmd,
        ],
        env=env,
        capture_output=True,
    )
    return parse_strace(log.read_text(errors="replace"), lambda p: _resolve_in(root, p))


_STRACE_CALL = re.compile(
    r'^(?:\d+\s+)?(chroot|execve|openat|open)\((?:AT_FDCWD, )?"([^"]*)".*'
    r"\)\s+=\s+(-?\d+)"
)


def parse_strace(text: str, resolve: Callable[[str], str | None]) -> list[str]:
    """Paths of successful opens/execs after the (successful) chroot call, resolved with
    ``resolve`` (None: not a regular file in the image), deduplicated in order."""
    seen: dict[str, None] = {}
    inside = False
    for line in text.splitlines():
        m = _STRACE_CALL.match(line.strip())
        if m is None or int(m.group(3)) < 0:
            continue
        call, path = m.group(1), m.group(2)
        if call == "chroot":
            inside = True
            continue
        if not inside:
            continue
        got = resolve(path)
        if got is not None:
            seen.setdefault(got, None)
    return list(seen)


def _resolve_in(root: Path, path: str) -> str | None:
    """``path`` as seen inside ``root`` with its symlinks resolved, relative, if a regular file."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        cand = root.joinpath(*done, part)
        if cand.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(cand)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    rel = "/".join(done)
    full = root / rel
    return rel if rel and full.is_file() and not full.is_symlink() else None


def large(variants: Iterable[str] = VARIANTS, rebuild: bool = False) -> Workload:
    d = cache_root() / "large"
    if rebuild:
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    tar_ps = [d / "layer-0.tar", d / "layer-1.tar"]
    prio_p = d / "prioritized.json"
    if not all(p.is_file() for p in tar_ps) or not prio_p.is_file():
        base, full = build_rootfs(d)
        prio = record_opens(full, LARGE_CMD)
        note(f"large: the command opened {len(prio)} files")
        lower, upper = snapshot(base), snapshot(full)
        tar_tree(base, tree_paths(lower), [], tar_ps[0])
        paths, whiteouts = layer_diff(lower, upper)
        tar_tree(full, paths, whiteouts, tar_ps[1])
        prio_p.write_text(json.dumps(prio, indent=0))
    tars = [p.read_bytes() for p in tar_ps]
    prio = json.loads(prio_p.read_text())
    return _workload("large", d, tars, prio, list(LARGE_CMD), LARGE_EXPECT, variants)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--workload", choices=("small", "large", "all"), default="all")
    ap.add_argument("--rebuild", action="store_true", help="drop the cached workload first")
    args = ap.parse_args()
    for name, fn in (("small", small), ("large", large)):
        if args.workload in (name, "all"):
            w = fn(rebuild=args.rebuild)
            sizes = ", ".join(f"{v} {w.compressed(v) / 1e6:.1f} MB" for v in w.layers)
            print(
                f"{w.name}: {len(w.tar_sizes)} layers, {w.uncompressed / 1e6:.1f} MB tar, "
                f"{sum(w.entries)} entries, {len(w.prioritized)} prioritized; {sizes}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
