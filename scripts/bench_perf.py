#!/usr/bin/env python3
"""Benchmark (issue 6): lazy start, registry bytes, filesystem speed and daemon memory of als,
each next to its baseline measured in the same run.

Workloads (scripts/bench_workloads.py, cached): ``small`` (busybox + Python stdlib) and
``large`` (Debian 12 minbase + python3-numpy), each as gzip, eStargz with prioritized files,
eStargz without, and zstd:chunked, pushed to a local docker-registry.

1. ``lazy``: cold ``podman pull`` + ``podman run`` of the command (empty podman storage, empty
   als cache) per lazy variant, background fetch off and on, against a normal pull + run of the
   gzip image without als; registry bytes sent for the image's layer blobs during pull + run.
2. ``netem`` (``--netem``): the same with 20 ms delay and 200 Mbit/s on the registry's loopback
   traffic (``tc``; removed afterwards, also on failure).
3. ``fs``: on the largest layer of the workload mounted by ``als-mount`` (no podman), cold and
   warm metadata walk (``find -printf``), cold and warm read of every file
   (``tar -cf - . | cat``), warm sequential read of the largest file; next to the same tree
   extracted on a tmpfs, and next to ``curl blob | gzip -dc | tar -x`` from the same registry.
4. ``memory``: the daemon's RSS idle, with every layer of the workload walked, after reading
   every file, and per 10,000 entries.
5. ``steady``: after a lazy pull with background fetch on, once every layer is native, a new
   container's root (``podman create`` + ``podman mount``): warm metadata walk and warm read of
   every file, against the same image pulled normally; then with als-mount killed and its
   mount removed, ``podman run`` of the image and a read of every file of a new container.

Needs root, podman, fusermount3, docker-registry, curl; the large workload needs Debian's
archive the first time it is built. Prints JSON lines on stdout, a Markdown table on stderr,
and writes results.jsonl, results.md and lazy-start.png (matplotlib, if installed) to --out.
Usage: bench_perf.py [--quick] [--repeat N] [--workloads small,large] [--netem]
                     [--only lazy,fs,memory,steady] [--out DIR] [--json-only]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_workloads import LAZY_VARIANTS, Workload, cache_root, large, small

from als.store.config import StoreConfig

NAME = "bench_perf"
GB = 1e9
MB = 1e6

# Targets of issue 6: (workload, variant or "*", metric) -> (op, bound, description)
TARGETS: dict[tuple[str, str, str], tuple[str, float, str]] = {
    ("large", "estargz-prio", "lazy.bg_off.seconds"): ("<=", 0.25, "<= 0.25x baseline"),
    ("large", "estargz-prio", "lazy.bg_off.registry_bytes"): ("<", 0.25, "< 25 % of image"),
    ("*", "*", "fs.read_cold.seconds"): ("<=", 1.5, "<= 1.5x download+unpack"),
    ("*", "*", "fs.read_warm.seconds"): ("<=", 2.0, "<= 2x tmpfs"),
    ("*", "*", "fs.walk_warm.seconds"): ("<=", 2.0, "<= 2x tmpfs"),
    ("*", "*", "fs.largest_warm.throughput"): (">=", 1000.0, ">= 1 GB/s"),
    ("large", "*", "memory.rss_walked"): ("<", 80.0, "< 80 MB"),
    # Issue 16: once layers are native, a new container reads like a normally pulled one.
    ("*", "*", "steady.walk_warm.seconds"): ("<=", 1.1, "<= 1.1x normal pull"),
    ("*", "*", "steady.read_warm.seconds"): ("<=", 1.1, "<= 1.1x normal pull"),
}


@dataclass
class Row:
    """One measurement: its value, its baseline's, their ratio and the issue's target."""

    bench: str
    workload: str
    variant: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        for k in ("value", "baseline", "ratio"):
            if isinstance(d[k], float):
                d[k] = round(d[k], 4)
        return d


Targets = Mapping[tuple[str, str, str], tuple[str, float, str]]


def judge(row: Row, targets: Targets | None = None) -> Row:
    """Fill ``target``/``met`` from ``targets`` (default TARGETS); the ratio is compared, or the
    value where the target is absolute (MB/s, MB)."""
    targets = TARGETS if targets is None else targets
    for key in (
        (row.workload, row.variant, row.metric),
        (row.workload, "*", row.metric),
        ("*", "*", row.metric),
    ):
        if key in targets:
            op, bound, desc = targets[key]
            got = row.value if row.unit in ("MB/s", "MB") else row.ratio
            row.target = desc
            if got is not None:
                row.met = got <= bound if op == "<=" else got < bound if op == "<" else got >= bound
            break
    return row


def make_row(
    bench: str,
    w: str,
    v: str,
    metric: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    baseline_name: str = "",
    note: str = "",
    targets: Targets | None = None,
    **extra: Any,
) -> Row:
    ratio = value / baseline if baseline else None
    return judge(
        Row(
            bench, w, v, metric, value, unit, baseline, baseline_name, ratio, note=note, extra=extra
        ),
        targets,
    )


class Output:
    """JSON lines on stdout as rows come; the table, the JSON file and the chart at the end."""

    def __init__(self, out: Path, quiet: bool, name: str = NAME) -> None:
        self.rows: list[Row] = []
        self.out = out
        self.quiet = quiet
        self.name = name

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(json.dumps(row.json()), flush=True)

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"{self.name}: {msg}", file=sys.stderr, flush=True)


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return ""
    if unit == "B":
        return f"{v / MB:.2f} MB"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    return f"{v:.1f} {unit}"


def markdown(rows: Sequence[Row], header: str = "") -> str:
    lines = [header] if header else []
    lines += [
        "| workload | variant | measurement | als | baseline | ratio | target | met |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        base = fmt_value(r.baseline, r.unit)
        if r.baseline_name:
            base = f"{base} ({r.baseline_name})" if base else r.baseline_name
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "" if r.met is None else ("met" if r.met else "**missed**")
        what = r.metric + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {r.workload} | {r.variant} | {what} | {fmt_value(r.value, r.unit)} | "
            f"{base} | {ratio} | {r.target or ''} | {met} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: Sequence[Row], path: Path) -> bool:
    """A bar chart of the lazy-start rows (seconds per variant, baseline first)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lazy = [r for r in rows if r.bench in ("lazy", "netem") and r.metric.endswith(".seconds")]
    groups = sorted({(r.bench, r.workload) for r in lazy}, key=lambda g: (g[1] != "small", g))
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.8), squeeze=False)
    for ax, (bench, w) in zip(axes[0], groups, strict=True):
        these = [r for r in lazy if (r.bench, r.workload) == (bench, w)]
        base = [r.value for r in these if r.metric == "baseline.seconds"]
        these = [r for r in these if r.metric != "baseline.seconds"]
        labels = ["gzip\n(normal pull)"]
        values = [base[0] if base else 0.0]
        colors = ["#888888"]
        for r in these:
            bg = "bg on" if ".bg_on." in r.metric else "bg off"
            labels.append(f"{r.variant}\n{bg}")
            values.append(r.value)
            colors.append("#2b7bba" if bg == "bg off" else "#8fbce0")
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("pull + run, seconds")
        ax.set_title(f"{w}{' (netem)' if bench == 'netem' else ''}", fontsize=10)
    fig.suptitle("als lazy start: podman pull + run, cold", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --- the environment ------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def sh(cmd: str, cwd: Path | None = None) -> float:
    """Seconds ``sh -c cmd`` took (it must succeed)."""
    t0 = time.monotonic()
    subprocess.run(["sh", "-c", cmd], cwd=cwd, check=True)
    return time.monotonic() - t0


def drop_caches() -> None:
    """Let the kernel drop clean page cache, dentries and inodes (for tmpfs: little)."""
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def rss_mb(pid: int) -> float:
    """VmRSS of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def store_pid(pid: int) -> int:
    """The process that runs the store: als-mount's server child when it supervises one."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def layer_bytes_sent(access: Sequence[Any], digests: Sequence[str]) -> int:
    """Bytes the registry sent for the given blobs (GET requests of the access log)."""
    return sum(
        e.bytes_sent
        for e in access
        if e.method == "GET" and any(f"/blobs/{d}" in e.path for d in digests)
    )


class NetemUnavailable(Exception):
    """The kernel has no prio/netem queueing disciplines (or tc failed)."""


class LinkEmulator:
    """A TCP relay in front of the registry that delays every piece of data by ``delay``
    seconds in each direction and shares ``rate_bps`` among all connections: what netem on
    ``lo`` does, for kernels without netem. Listens on 127.0.0.1:<free port>."""

    def __init__(
        self, upstream: tuple[str, int], delay: float = 0.020, rate_bps: float = 200e6
    ) -> None:
        self.upstream, self.delay, self.rate = upstream, delay, rate_bps
        self._lock = threading.Lock()
        self._free_at = 0.0
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pace(self, n: int, now: float) -> float:
        """When ``n`` bytes arriving ``now`` (after their delay) have passed the shared link."""
        with self._lock:
            start = max(self._free_at, now)
            self._free_at = start + n * 8 / self.rate
            return self._free_at

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                if self._stop.is_set():
                    return
                continue
            up.settimeout(None)
            self._socks += [client, up]
            for src, dst in ((client, up), (up, client)):
                q: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
                threading.Thread(target=self._read, args=(src, q), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, q), daemon=True).start()

    @staticmethod
    def _read(src: socket.socket, q: queue.Queue[tuple[float, bytes] | None]) -> None:
        try:
            while data := src.recv(65536):
                q.put((time.monotonic(), data))
        except OSError:
            pass
        q.put(None)

    def _write(self, dst: socket.socket, q: queue.Queue[tuple[float, bytes] | None]) -> None:
        try:
            while (item := q.get()) is not None:
                t, data = item
                due = self.pace(len(data), max(time.monotonic(), t + self.delay))
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                dst.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def emulated_link(env: Env, out: Output) -> Iterator[tuple[str, str]]:
    """20 ms delay and 200 Mbit/s between the registry and everyone: ``tc netem`` on the
    registry's loopback port, or (kernel without netem) a delaying relay. Yields the registry
    host to use and how the link is emulated; undone on exit, also on failure."""
    port = int(env.reg.host.rsplit(":", 1)[1])
    try:
        with Netem(port):
            yield env.reg.host, "tc netem on lo (registry port)"
        return
    except NetemUnavailable as exc:
        out.say(f"netem: {exc}; using a delaying TCP relay instead")
    relay = LinkEmulator(("127.0.0.1", port))
    from tests.support.podman import write_registries_conf

    write_registries_conf(env.conf, [env.reg.host, relay.host])
    try:
        yield relay.host, "delaying TCP relay (kernel without netem)"
    finally:
        relay.close()


class Netem:
    """20 ms delay and 200 Mbit/s on loopback traffic to and from one TCP port.

    A ``prio`` root qdisc on ``lo`` with a fourth band (unused by the default priomap) holding
    ``netem``; u32 filters send the port's packets there. Refuses to start if ``lo`` already has
    a root qdisc of its own; ``close()`` deletes the root qdisc it added."""

    def __init__(self, port: int, delay_ms: int = 20, rate: str = "200mbit") -> None:
        self.port, self.delay_ms, self.rate = port, delay_ms, rate
        self.active = False

    @staticmethod
    def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tc", *args], check=check, capture_output=True, text=True)

    def commands(self) -> list[list[str]]:
        port = str(self.port)
        return [
            ["qdisc", "add", "dev", "lo", "root", "handle", "1:", "prio", "bands", "4"],
            [
                "qdisc",
                "add",
                "dev",
                "lo",
                "parent",
                "1:4",
                "handle",
                "40:",
                "netem",
                "delay",
                f"{self.delay_ms}ms",
                "rate",
                self.rate,
            ],
            [
                "filter",
                "add",
                "dev",
                "lo",
                "parent",
                "1:0",
                "protocol",
                "ip",
                "prio",
                "1",
                "u32",
                "match",
                "ip",
                "sport",
                port,
                "0xffff",
                "flowid",
                "1:4",
            ],
            [
                "filter",
                "add",
                "dev",
                "lo",
                "parent",
                "1:0",
                "protocol",
                "ip",
                "prio",
                "1",
                "u32",
                "match",
                "ip",
                "dport",
                port,
                "0xffff",
                "flowid",
                "1:4",
            ],
        ]

    def __enter__(self) -> Netem:
        shown = self._tc("qdisc", "show", "dev", "lo").stdout
        if "noqueue" not in shown.split("\n", 1)[0]:
            raise SystemExit(f"{NAME}: lo already has a qdisc ({shown.strip()}); not touching it")
        first, *rest = self.commands()
        got = self._tc(*first, check=False)
        if got.returncode != 0:
            raise NetemUnavailable(f"tc {' '.join(first)}: {got.stderr.strip()}")
        self.active = True
        try:
            for c in rest:
                got = self._tc(*c, check=False)
                if got.returncode != 0:
                    raise NetemUnavailable(f"tc {' '.join(c)}: {got.stderr.strip()}")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.active:
            self._tc("qdisc", "del", "dev", "lo", "root", "handle", "1:", check=False)
            self.active = False

    def __exit__(self, *exc: object) -> None:
        self.close()


class Env:
    """Registry, als mounts, podman storages and a tmpfs; ``close()`` removes all of it."""

    def __init__(self, work: Path) -> None:
        from tests.support.podman import write_registries_conf
        from tests.support.registry import RegistryServer

        self.work = work
        self.reg = RegistryServer(work / "registry")
        try:
            self.reg.start()
        except BaseException:
            self.reg.close()
            raise
        self.conf = write_registries_conf(work / "registries.conf", [self.reg.host])
        self.mounts: list[Any] = []
        self.podmen: list[Any] = []
        self.tmpfs: list[Path] = []
        self.n = 0

    def fresh(self, prefix: str) -> Path:
        self.n += 1
        return self.work / f"{prefix}-{self.n}"

    def als(self, *, background: bool, extra: str = "") -> Any:
        from tests.support.mount import ProcessMount

        root = self.fresh("als")
        cfg = self.work / f"{root.name}.toml"
        cfg.write_text(
            f'background_fetch = {str(background).lower()}\nlog_level = "info"\n' + extra
        )
        m = ProcessMount(
            root, "--config", str(cfg), "--registries-conf", str(self.conf), "--log-level", "info"
        )
        self.mounts.append(m)
        try:
            return m.start()
        except RuntimeError as exc:
            tail = m.log()[-1500:] if m.log_path.exists() else "(no log)"
            raise AssertionError(f"als-mount did not start: {exc}\n{tail}") from exc

    def drop_als(self, m: Any) -> None:
        if m.proc is not None and m.proc.poll() is None:
            m.stop()
        shutil.rmtree(m.root, ignore_errors=True)

    def podman(self, pool: Path | None) -> Any:
        from tests.support.podman import Podman

        pm = Podman(self.fresh("podman"), self.conf, als_pool=pool)
        self.podmen.append(pm)
        return pm

    def drop_podman(self, pm: Any) -> None:
        pm.reset()
        shutil.rmtree(pm.base, ignore_errors=True)

    def mount_tmpfs(self) -> Path:
        d = self.fresh("tmpfs")
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(d)], check=True)
        self.tmpfs.append(d)
        return d

    def close(self) -> None:
        for pm in self.podmen:
            with contextlib.suppress(Exception):
                pm.reset()
        for m in self.mounts:
            if m.proc is not None and m.proc.poll() is None:
                with contextlib.suppress(Exception):
                    m.stop()
        for d in self.tmpfs:
            subprocess.run(["umount", "-l", str(d)], check=False)
        self.reg.close()
        shutil.rmtree(self.work, ignore_errors=True)


def push_all(env: Env, w: Workload) -> None:
    from tests.support.registry import push_image_full

    for v, layers in w.layers.items():
        push_image_full(env.reg, f"bench/{w.name}", v, layers)


def ref_of(env: Env, w: Workload, v: str, host: str | None = None) -> str:
    return f"{host or env.reg.host}/bench/{w.name}:{v}"


# --- 1, 2: lazy start -------------------------------------------------------------------------


def pull_run(
    env: Env,
    w: Workload,
    v: str,
    pool: Path | None,
    host: str | None = None,
    *,
    ref: str | None = None,
    digests: Sequence[str] | None = None,
) -> tuple[float, int, int]:
    """Cold pull + run in a fresh podman storage: (seconds, layer-blob bytes, all bytes).
    ``ref`` and ``digests`` (its layer blobs) name an image that is not one of ``w``'s variants
    (default: variant ``v`` of ``w``)."""
    pm = env.podman(pool)
    ref = ref or ref_of(env, w, v, host)
    try:
        mark = env.reg.mark()
        t0 = time.monotonic()
        pm.pull(ref)
        got = pm.run(ref, *w.command)
        took = time.monotonic() - t0
        if w.expect not in got.stdout:
            raise SystemExit(f"{NAME}: {ref} printed {got.stdout!r}, expected {w.expect!r}")
        if pool is not None and not pm.layer_diff_links():
            raise SystemExit(f"{NAME}: podman did not use als for {ref}")
        access = env.reg.access_log(since=mark)
        if digests is None:
            digests = [x.digest for x in w.layers[v]]
        return took, layer_bytes_sent(access, digests), sum(e.bytes_sent for e in access)
    finally:
        env.drop_podman(pm)


def retry(
    out: Output, fn: Callable[[], tuple[float, int, int]], attempts: int = 3
) -> tuple[float, int, int]:
    """``fn()``, measured again (from scratch) when podman or als-mount fails to start: podman
    4.3 sometimes loses a ``run --rm`` container's exit code under load; such a run says
    nothing about als. Every failure is reported on stderr."""
    for i in range(attempts):
        try:
            return fn()
        except AssertionError as exc:  # what tests.support.podman raises for a failed command
            if i == attempts - 1:
                raise
            out.say(f"failed ({str(exc)[-600:]}); measuring again")
    raise AssertionError("unreachable")


def bench_lazy(
    env: Env,
    w: Workload,
    repeat: int,
    out: Output,
    bench: str,
    host: str | None = None,
    link: str = "loopback",
) -> None:
    base_t: list[float] = []
    lazy: dict[tuple[str, bool], list[tuple[float, int, int]]] = {}
    base_bytes = 0
    for rep in range(repeat):
        out.say(f"{bench} {w.name}: repetition {rep + 1}/{repeat}: gzip baseline ...")
        t, base_bytes, _ = retry(out, lambda: pull_run(env, w, "gzip", None, host))
        base_t.append(t)
        for v in LAZY_VARIANTS:
            for bg in (False, True):
                out.say(f"{bench} {w.name}: {v}, background fetch {'on' if bg else 'off'} ...")

                def once(v: str = v, bg: bool = bg) -> tuple[float, int, int]:
                    als = env.als(background=bg)
                    try:
                        return pull_run(env, w, v, als.pool, host)
                    finally:
                        env.drop_als(als)

                lazy.setdefault((v, bg), []).append(retry(out, once))
    b = median(base_t)
    out.add(
        make_row(
            bench,
            w.name,
            "gzip",
            "baseline.seconds",
            b,
            "s",
            note="normal pull + run, no als",
            runs=base_t,
            registry_bytes=base_bytes,
            link=link,
        )
    )
    for (v, bg), runs in lazy.items():
        mode = "bg_on" if bg else "bg_off"
        secs = [r[0] for r in runs]
        out.add(
            make_row(
                bench,
                w.name,
                v,
                f"lazy.{mode}.seconds",
                median(secs),
                "s",
                b,
                "gzip pull + run",
                note=f"pull + run, background fetch {'on' if bg else 'off'}",
                runs=secs,
                link=link,
            )
        )
        sent = int(median([r[1] for r in runs]))
        out.add(
            make_row(
                bench,
                w.name,
                v,
                f"lazy.{mode}.registry_bytes",
                sent,
                "B",
                w.compressed(v),
                "image's compressed layers",
                note="layer blobs sent during pull + run",
                all_requests_bytes=int(median([r[2] for r in runs])),
            )
        )


# --- 3: filesystem ----------------------------------------------------------------------------

WALK = "find . -printf '%s %m %U %G\\n' > /dev/null"
READ_ALL = "tar -cf - . | cat > /dev/null"


def largest_file(tar_path: Path) -> tuple[str, int]:
    best = ("", -1)
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if m.isreg() and m.size > best[1]:
                best = (m.name, m.size)
    return best


def read_speed(path: Path, size: int, tries: int = 3) -> float:
    """Warm sequential read of one file, MB/s (best of ``tries`` after one warming read)."""

    def once() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass

    once()
    best = min(timed(once) for _ in range(tries))
    return size / best / MB


@dataclass
class FsTimes:
    walk_cold: float = 0.0
    walk_warm: float = 0.0
    read_cold: float = 0.0
    read_warm: float = 0.0
    largest: float = 0.0
    lookup: float = 0.0


def fs_on(tree: Path, big: str, big_size: int, fresh: Callable[[], Path] | None) -> FsTimes:
    """The walk and read timings on ``tree``; ``fresh()`` gives a cold copy for the cold read
    (a new mount with an empty cache); without it the kernel's caches are dropped instead."""
    t = FsTimes()
    if fresh is None:
        drop_caches()
    t.walk_cold = sh(WALK, tree)
    t.walk_warm = min(sh(WALK, tree) for _ in range(3))
    if fresh is not None:
        tree = fresh()
    else:
        drop_caches()
    t.read_cold = sh(READ_ALL, tree)
    t.read_warm = min(sh(READ_ALL, tree) for _ in range(3))
    t.largest = read_speed(tree / big, big_size)
    return t


def bench_fs(env: Env, w: Workload, variants: Sequence[str], out: Output) -> None:
    idx = max(range(len(w.tar_sizes)), key=lambda i: w.tar_sizes[i])
    tar_path = cache_root() / w.name / f"layer-{idx}.tar"
    big, big_size = largest_file(tar_path)
    entries = w.entries[idx]
    # Baseline 1: the same tree on a tmpfs.
    native = env.mount_tmpfs()
    subprocess.run(["tar", "-xf", str(tar_path), "-C", str(native), "--numeric-owner"], check=True)
    out.say(f"fs {w.name}: layer {idx} ({entries} entries), tmpfs baseline ...")
    nat = fs_on(native, big, big_size, None)
    # Baseline 2: download the gzip blob, decompress, unpack into a tmpfs.
    dl_dir = env.mount_tmpfs()
    gz = w.layers["gzip"][idx]
    url = f"{env.reg.url}/v2/bench/{w.name}/blobs/{gz.digest}"
    download = min(
        sh(
            f"curl -sf --noproxy '*' '{url}' | gzip -dc | tar -x --numeric-owner "
            f"-C {dl_dir} && rm -rf {dl_dir}/* {dl_dir}/.[!.]*"
        )
        for _ in range(2)
    )
    for v in variants:
        layer = w.layers[v][idx]
        ref = ref_of(env, w, v)
        mounts: list[Any] = []

        def fresh_tree(v: str = v, digest: str = layer.digest, mounts: list[Any] = mounts) -> Path:
            while mounts:
                env.drop_als(mounts.pop())
            als = env.als(background=False)
            mounts.append(als)
            return Path(als.pool) / b64(ref_of(env, w, v)) / digest / "diff"

        out.say(f"fs {w.name}: {v} ...")
        try:
            tree = fresh_tree()
            lookup = timed(functools.partial(os.listdir, tree))
            t = fs_on(tree, big, big_size, fresh_tree)
            t.lookup = lookup
        finally:
            while mounts:
                env.drop_als(mounts.pop())
        note = f"layer {idx}, {entries} entries, {w.tar_sizes[idx] / MB:.0f} MB"
        out.add(
            make_row(
                "fs",
                w.name,
                v,
                "fs.layer_lookup.seconds",
                t.lookup,
                "s",
                note="first access to the layer's diff: manifest + TOC",
                ref=ref,
            )
        )
        out.add(
            make_row(
                "fs",
                w.name,
                v,
                "fs.walk_cold.seconds",
                t.walk_cold,
                "s",
                nat.walk_cold,
                "tmpfs",
                note=note,
            )
        )
        out.add(
            make_row(
                "fs", w.name, v, "fs.walk_warm.seconds", t.walk_warm, "s", nat.walk_warm, "tmpfs"
            )
        )
        out.add(
            make_row(
                "fs",
                w.name,
                v,
                "fs.read_cold.seconds",
                t.read_cold,
                "s",
                download,
                "curl | gzip -dc | tar -x",
                tmpfs=nat.read_cold,
            )
        )
        out.add(
            make_row(
                "fs", w.name, v, "fs.read_warm.seconds", t.read_warm, "s", nat.read_warm, "tmpfs"
            )
        )
        out.add(
            make_row(
                "fs",
                w.name,
                v,
                "fs.largest_warm.throughput",
                t.largest,
                "MB/s",
                nat.largest,
                "tmpfs",
                note=f"{big}, {big_size / MB:.1f} MB",
            )
        )


# --- 4: memory --------------------------------------------------------------------------------


def bench_memory(env: Env, w: Workload, variant: str, out: Output) -> None:
    als = env.als(background=False)
    try:
        time.sleep(1.0)
        assert als.proc is not None
        supervisor = rss_mb(als.proc.pid)
        server = store_pid(als.proc.pid)
        idle = rss_mb(server)
        for layer in w.layers[variant]:
            tree = Path(als.pool) / b64(ref_of(env, w, variant)) / layer.digest / "diff"
            sh(WALK, tree)
        walked = rss_mb(server)
        for layer in w.layers[variant]:
            tree = Path(als.pool) / b64(ref_of(env, w, variant)) / layer.digest / "diff"
            sh(READ_ALL, tree)
        read = rss_mb(server)
        # At rest: the memory cache is emptied after memory_release_s without reads.
        time.sleep(StoreConfig().memory_release_s + 1.5)
        rest = rss_mb(server)
    finally:
        env.drop_als(als)
    n = sum(w.entries)
    out.add(
        make_row(
            "memory",
            w.name,
            variant,
            "memory.rss_idle",
            idle,
            "MB",
            note="als-mount's server, mounted, no layer",
        )
    )
    if server != als.proc.pid:
        out.add(
            make_row(
                "memory",
                w.name,
                variant,
                "memory.rss_supervisor",
                supervisor,
                "MB",
                note="als-mount's supervisor (keeps the FUSE connection; stdlib only)",
            )
        )
    out.add(
        make_row(
            "memory",
            w.name,
            variant,
            "memory.rss_walked",
            walked,
            "MB",
            note=f"every layer looked up and walked, {n} entries",
        )
    )
    out.add(
        make_row(
            "memory",
            w.name,
            variant,
            "memory.rss_read",
            read,
            "MB",
            note="after reading every file (memory cache included)",
        )
    )
    out.add(
        make_row(
            "memory",
            w.name,
            variant,
            "memory.rss_rest",
            rest,
            "MB",
            note="then at rest: the memory cache emptied after memory_release_s",
        )
    )
    out.add(
        make_row(
            "memory",
            w.name,
            variant,
            "memory.per_10k_entries",
            (walked - idle) / n * 10_000,
            "MB",
            note="(walked - idle) per 10,000",
        )
    )


# --- 5: steady state (native layers) ----------------------------------------------------------


def wait_native(root: Path, digests: Sequence[str], timeout: float = 900) -> float:
    """Seconds until every layer is native (als status), or SystemExit."""
    from als.cli.status import StatusError, fetch_status

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(StatusError):
            native = {x["digest"] for x in fetch_status(root)["layers"] if x.get("native")}
            if set(digests) <= native:
                return time.monotonic() - t0
        time.sleep(0.5)
    raise SystemExit(f"{NAME}: layers not native after {timeout:.0f} s")


def container_root(pm: Any, ref: str) -> Path:
    from tests.support.podman import RUN_FLAGS

    cid = pm("create", *RUN_FLAGS, ref, "true").stdout.strip()
    return Path(pm("mount", cid).stdout.strip())


def warm(cmd: str, tree: Path) -> float:
    sh(cmd, tree)
    return min(sh(cmd, tree) for _ in range(3))


def bench_steady(env: Env, w: Workload, variant: str, out: Output) -> None:
    from tests.support.mount import force_unmount

    ref = ref_of(env, w, variant)
    digests = [x.digest for x in w.layers[variant]]
    normal = env.podman(None)
    als = env.als(background=True, extra="background_delay = 0.0\n")
    pm = env.podman(als.pool)
    try:
        out.say(f"steady {w.name}: normal pull of gzip ...")
        normal.pull(ref_of(env, w, "gzip"))
        base = container_root(normal, ref_of(env, w, "gzip"))
        b_walk, b_read = warm(WALK, base), warm(READ_ALL, base)
        out.say(f"steady {w.name}: {variant} through als, waiting for native layers ...")
        pm.pull(ref)
        took = wait_native(als.root, digests)
        tree = container_root(pm, ref)
        links = [os.path.realpath(x) for x in pm.layer_diff_links().values()]
        if not links or not all(x.startswith(str(als.root / "cache" / "native")) for x in links):
            raise SystemExit(f"{NAME}: podman's layers do not resolve to native trees: {links}")
        walk, read = warm(WALK, tree), warm(READ_ALL, tree)
        assert als.proc is not None
        als.proc.kill()
        als.proc.wait()
        force_unmount(als.pool)
        got = pm.run(ref, *w.command)
        killed_ok = w.expect in got.stdout
        killed_read = sh(READ_ALL, container_root(pm, ref))
    finally:
        env.drop_podman(pm)
        env.drop_podman(normal)
        env.drop_als(als)
    note = "a new container's root, every layer"
    out.add(
        make_row(
            "steady",
            w.name,
            variant,
            "steady.native_after.seconds",
            took,
            "s",
            note="from the end of the pull until every layer is native",
        )
    )
    out.add(
        make_row(
            "steady",
            w.name,
            variant,
            "steady.walk_warm.seconds",
            walk,
            "s",
            b_walk,
            "normal pull",
            note=note,
        )
    )
    out.add(
        make_row(
            "steady",
            w.name,
            variant,
            "steady.read_warm.seconds",
            read,
            "s",
            b_read,
            "normal pull",
            note=note,
        )
    )
    out.add(
        make_row(
            "steady",
            w.name,
            variant,
            "steady.killed_read.seconds",
            killed_read,
            "s",
            b_read,
            "normal pull (warm)",
            note=f"als-mount killed, mount removed; podman run {'ok' if killed_ok else 'FAILED'}",
            run_ok=killed_ok,
        )
    )
    if not killed_ok:
        raise SystemExit(f"{NAME}: podman run without the store printed {got.stdout!r}")


# --- main -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small workload only, one repetition, eStargz only in fs/memory",
    )
    ap.add_argument("--repeat", type=int, default=3, help="cold pull+run repetitions (median)")
    ap.add_argument("--workloads", default=None, help="comma list: small,large")
    ap.add_argument(
        "--only",
        default="lazy,fs,memory,steady",
        help="comma list of lazy, fs, memory, steady (netem comes with --netem)",
    )
    ap.add_argument(
        "--netem",
        action="store_true",
        help="also the lazy comparison with 20 ms / 200 Mbit/s on the registry port",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for results.jsonl, results.md, lazy-start.png",
    )
    ap.add_argument("--json-only", action="store_true", help="no progress or table on stderr")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 1
    args.repeat = max(1, args.repeat)
    args.workloads = [
        x for x in (args.workloads or ("small" if args.quick else "small,large")).split(",") if x
    ]
    args.only = [x for x in args.only.split(",") if x]
    bad = [x for x in args.workloads if x not in ("small", "large")] + [
        x for x in args.only if x not in ("lazy", "fs", "memory", "steady")
    ]
    if bad:
        ap.error(f"unknown workload or part: {', '.join(bad)}")
    if args.out is None:
        args.out = cache_root().parent / "results" / ("quick" if args.quick else "full")
    return args


def check_tools() -> list[str]:
    from tests.support.mount import FUSE_AVAILABLE
    from tests.support.podman import PODMAN
    from tests.support.registry import registry_available

    return [
        what
        for what, ok in (
            ("podman", PODMAN is not None),
            ("docker-registry", registry_available()),
            ("/dev/fuse and fusermount3", FUSE_AVAILABLE),
            ("curl", shutil.which("curl") is not None),
        )
        if not ok
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(
            f"{NAME}: needs root (FUSE mounts, podman overlay storage, tmpfs mounts)",
            file=sys.stderr,
        )
        return 2
    missing = check_tools()
    if missing:
        print(f"{NAME}: needs {', '.join(missing)}; skipped", file=sys.stderr)
        return 0
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    out = Output(args.out, args.json_only)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="als-bench-perf-"))
    env: Env | None = None
    try:
        workloads = []
        for name in args.workloads:
            out.say(f"workload {name} (cached under {cache_root()}) ...")
            workloads.append(small() if name == "small" else large())
        env = Env(work)
        for w in workloads:
            push_all(env, w)
            out.add(
                make_row(
                    "workload",
                    w.name,
                    "gzip",
                    "workload.size",
                    w.uncompressed,
                    "B",
                    note=f"{len(w.tar_sizes)} layers, {sum(w.entries)} entries uncompressed",
                    layers=len(w.tar_sizes),
                    entries=sum(w.entries),
                    compressed={v: w.compressed(v) for v in w.layers},
                    prioritized=len(w.prioritized),
                    command=w.command,
                )
            )
        fs_variants = ["estargz"] if args.quick else ["estargz", "zstd-chunked"]
        for w in workloads:
            if "lazy" in args.only:
                bench_lazy(env, w, args.repeat, out, "lazy")
            if args.netem:
                with emulated_link(env, out) as (host, how):
                    out.say(f"netem {w.name}: {how}")
                    bench_lazy(env, w, args.repeat, out, "netem", host, how)
            if "fs" in args.only:
                bench_fs(env, w, fs_variants, out)
            if "memory" in args.only:
                bench_memory(env, w, "estargz", out)
            if "steady" in args.only:
                bench_steady(env, w, "estargz-prio", out)
    finally:
        if env is not None:
            env.close()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    report(out, args, elapsed)
    return 0


def report(
    out: Output,
    args: argparse.Namespace,
    elapsed: float,
    title: str = "als benchmark",
    draw: bool = True,
) -> None:
    """results.md, results.jsonl (and the chart, with ``draw``) in ``args.out``; the table and
    the missed targets on stderr."""
    args.out.mkdir(parents=True, exist_ok=True)
    m = machine()
    header = (
        f"### {title} ({'quick' if args.quick else 'full'}; {args.repeat} "
        f"repetition(s); {m['cpus']} CPUs, {m['memory_gib']} GiB; {elapsed:.0f} s)\n"
    )
    table = markdown(out.rows, header)
    (args.out / "results.md").write_text(table)
    with open(args.out / "results.jsonl", "w") as f:
        f.write(
            json.dumps({"machine": m, "args": {k: str(v) for k, v in vars(args).items()}}) + "\n"
        )
        for r in out.rows:
            f.write(json.dumps(r.json()) + "\n")
    drew = draw and chart(out.rows, args.out / "lazy-start.png")
    if not args.json_only:
        print("\n" + table, file=sys.stderr)
        missed = [r for r in out.rows if r.met is False]
        for r in missed:
            got = (
                f"{r.ratio:.2f}x"
                if r.unit not in ("MB", "MB/s") and r.ratio is not None
                else fmt_value(r.value, r.unit)
            )
            print(
                f"{out.name}: target missed: {r.workload} {r.variant} {r.metric}: {got} "
                f"(target {r.target})",
                file=sys.stderr,
            )
        chart_note = ", lazy-start.png" if drew else " (no chart: matplotlib missing)"
        out.say(f"wrote {args.out}/results.md, results.jsonl" + (chart_note if draw else ""))


if __name__ == "__main__":
    raise SystemExit(main())
