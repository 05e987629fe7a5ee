#!/usr/bin/env python3
"""The chaos run: do containers keep reading correct data through registry faults, an
unreachable registry, kills of the store's server and cache eviction?

Set-up (everything real, on loopback): a docker-registry; the project's fault proxy
(tests/support/faultproxy.py) in front of it; three images built from files of this machine
(Python's standard library as eStargz/gzip, Perl's library as eStargz/zstd, the i18n data as
zstd:chunked; each over a busybox base layer), pushed to the registry and pulled by podman
*through the proxy*, lazily through als-mount (the real process, with a small cache limit so that
eviction runs all along, and a small memory cache).

Workload: every container loops over its image's files with ``sha256sum`` and prints one line
per file (``S <sum> <path>`` or ``E <path> <error>``); the harness reads the container logs
(k8s-file, with timestamps) and compares each sum with the one computed from the source files at
build time. The host's page cache is dropped every few seconds so that reads reach als.

Chaos, in turns with quiet gaps: connections reset mid-body, 500/503/429, stalled answers,
truncated bodies, corrupted bytes, connections dropped without an answer, the registry
unreachable (30 s; 5 s with --quick), and twice ``kill -9`` of the store's *server* process (found
through the status document) in the middle of a fault phase. als-mount's supervisor keeps the
FUSE connection and starts a new server; the containers are not touched: their reads pause and go
on (the kernel resends what the dead server had read). Recovery is reported per kill: the time to
the supervisor's ``restart-done`` line (with its ``spawn_to_serving`` and ``since_loss``), and
the longest pause any container saw between two correct reads around the kill.

Every failed read is classified: in a kill phase it is a failure, whatever the error (the kill
phases allow none); elsewhere an EIO is "explained" if a fault that blocked every request was
active within the read deadline before it, or if the store's log shows it gave up retrying within
that window ("giving up after N attempt(s)"); anything else is unexplained. The bar: zero wrong
reads, zero unexplained failures (so zero failed reads in the kill phases), every kill recovered
(a new server served and every container read correctly again, within 10 s), zero unplanned
crashes (no server death that was not induced, the supervisor alive and exiting 0, no traceback
or internal error in the log), eviction seen, every layer pulled lazily, and every container
passing a whole checksum round after the faults.

Prints ``<check>: N passed, N failed`` lines (stderr with the details, stdout for the lines and
the JSON summary) and exits 1 if the bar is not met, 2 if it cannot run (not root, no podman...).
Usage: chaos.py [--quick] [--seed N] [--summary FILE] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from als.cli.status import StatusError, fetch_status
from als.formats.writer import BuiltLayer, build_estargz, build_zstd_chunked
from tests.support.faultproxy import Fault, FaultProxy, Phase, Schedule
from tests.support.mount import FUSE_AVAILABLE, ProcessMount
from tests.support.podman import BUSYBOX, PODMAN, RUN_FLAGS, Podman, write_registries_conf
from tests.support.registry import RegistryServer, push_image, registry_available
from tests.support.tarspec import FileSpec, tar_from_spec

NAME = "chaos"
BLOB = r"^GET /v2/\S+/blobs/sha256:"
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+@/-]+$")
APPLETS = ["sh", "sha256sum", "echo", "cat", "sleep"]
RUN_SH = r"""trap 'exit 0' TERM
n=0
while :; do
  n=$((n+1))
  echo "R $n"
  while IFS= read -r f; do
    if out=$(sha256sum "$f" 2>&1); then echo "S ${out%% *} $f"; else echo "E $f rc=$? $out"; fi
  done < "$1"
  echo "D $n"
done
"""


def note(msg: str) -> None:
    print(f"{NAME}: {msg}", file=sys.stderr, flush=True)


# ---- the plan --------------------------------------------------------------------------------


START_TIMEOUT = 90.0  # seconds for als-mount to serve at the start, under load
SERVER_TIMEOUT = 90.0  # seconds for a new server to serve after a kill (generous: a failure)
RECOVERY_BAR = 10.0  # seconds from a kill until every container read correctly again


@dataclass(frozen=True)
class ImageDef:
    name: str
    fmt: str  # estargz, estargz-zstd, zstd-chunked
    source: Path
    max_files: int
    max_bytes: int


@dataclass
class Plan:
    quick: bool
    images: list[ImageDef]
    containers: list[tuple[str, str]]  # (container, image name)
    read_timeout: float
    cache_limit_mb: int
    memory_cache_mb: int
    phase: float  # seconds of each fault phase
    gap: float  # quiet seconds between phases
    unreachable: float
    stall: float  # seconds a stalled answer waits
    p: float  # probability of the transient faults
    warmup: float
    drop_every: float
    final_timeout: float
    kill_after: float  # seconds into a kill phase (its faults active) before the kill -9


def make_plan(quick: bool) -> Plan:
    py = Path("/usr/lib/python3.11")
    perl = Path("/usr/share/perl")
    i18n = Path("/usr/share/i18n")
    if quick:
        images = [
            ImageDef("py", "estargz", py, 160, 3 << 20),
            ImageDef("perl", "estargz-zstd", perl, 160, 3 << 20),
            ImageDef("i18n", "zstd-chunked", i18n, 120, 3 << 20),
        ]
        return Plan(
            True,
            images,
            [("c-py", "py"), ("c-perl", "perl"), ("c-i18n", "i18n")],
            read_timeout=8.0,
            cache_limit_mb=2,
            memory_cache_mb=1,
            phase=9.0,
            gap=3.0,
            unreachable=5.0,
            stall=2.0,
            p=0.2,
            warmup=6.0,
            drop_every=2.0,
            final_timeout=90.0,
            kill_after=3.0,
        )
    images = [
        ImageDef("py", "estargz", py, 100_000, 64 << 20),
        ImageDef("perl", "estargz-zstd", perl, 100_000, 64 << 20),
        ImageDef("i18n", "zstd-chunked", i18n, 100_000, 64 << 20),
    ]
    return Plan(
        False,
        images,
        [
            ("c-py-1", "py"),
            ("c-py-2", "py"),
            ("c-perl", "perl"),
            ("c-i18n-1", "i18n"),
            ("c-i18n-2", "i18n"),
        ],
        read_timeout=10.0,
        cache_limit_mb=8,
        memory_cache_mb=1,
        phase=40.0,
        gap=10.0,
        unreachable=30.0,
        stall=3.0,
        p=0.25,
        warmup=20.0,
        drop_every=3.0,
        final_timeout=240.0,
        kill_after=10.0,
    )


# ---- images ----------------------------------------------------------------------------------


@dataclass
class Image:
    name: str
    fmt: str
    ref: str
    layers: list[BuiltLayer]
    sums: dict[str, str]  # path in the container -> sha256 hex of the source file


def collect(defn: ImageDef) -> dict[str, bytes]:
    """Regular files of ``defn.source`` (safe names, no caches), spread evenly over the tree,
    at most ``max_files`` and ``max_bytes``; deterministic. Made-up files if the source is
    missing."""
    files: list[Path] = []
    if defn.source.is_dir():
        for p in sorted(defn.source.rglob("*")):
            if "__pycache__" in p.parts or "site-packages" in p.parts or "dist-packages" in p.parts:
                continue
            if p.is_file() and not p.is_symlink() and SAFE_NAME.match(str(p)):
                files.append(p)
    out: dict[str, bytes] = {}
    if files:
        step = max(1, len(files) // defn.max_files)
        total = 0
        for p in files[::step]:
            data = p.read_bytes()
            if len(out) >= defn.max_files:
                break
            if total + len(data) > defn.max_bytes:
                continue
            out[str(p.relative_to("/"))] = data
            total += len(data)
    if len(out) < 10:  # no such directory here: deterministic stand-ins
        import random

        rnd = random.Random(defn.name)
        n = min(defn.max_files, 300)
        size = max(1, defn.max_bytes // n)
        out = {
            f"opt/{defn.name}/f{i:04d}.txt": rnd.randbytes(rnd.randrange(1, 2 * size))
            for i in range(n)
        }
    return out


def build_layer(fmt: str, spec: dict[str, bytes | FileSpec]) -> BuiltLayer:
    tar = tar_from_spec(spec)
    if fmt == "estargz":
        return build_estargz(tar)
    if fmt == "estargz-zstd":
        return build_estargz(tar, compression="zstd")
    if fmt == "zstd-chunked":
        return build_zstd_chunked(tar)
    raise ValueError(f"unknown format {fmt}")


def build_images(plan: Plan, reg: RegistryServer, pull_host: str) -> list[Image]:
    busybox = Path(BUSYBOX).read_bytes()
    base: dict[str, bytes | FileSpec] = {"bin/busybox": FileSpec(content=busybox, mode=0o755)}
    for a in APPLETS:
        base[f"bin/{a}"] = FileSpec(type="symlink", link="busybox")
    images = []
    for d in plan.images:
        files = collect(d)
        app: dict[str, bytes | FileSpec] = {
            k: FileSpec(content=v, mode=0o644) for k, v in files.items()
        }
        layers = [build_layer(d.fmt, base), build_layer(d.fmt, app)]
        push_image(reg, f"chaos/{d.name}", "1", layers)
        sums = {"/" + k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        images.append(Image(d.name, d.fmt, f"{pull_host}/chaos/{d.name}:1", layers, sums))
        note(
            f"image {d.name}: {d.fmt}, {len(files)} files, "
            f"{sum(len(v) for v in files.values()) / 1e6:.1f} MB of files, layers "
            f"{' + '.join(f'{x.size / 1e6:.2f} MB' for x in layers)}"
        )
    return images


# ---- container logs --------------------------------------------------------------------------


@dataclass
class Read:
    t: float
    container: str
    path: str
    ok: bool
    wrong: bool = False
    error: str = ""  # the error text of a failed read
    errno: str = ""  # EIO, ENOTCONN, ENOENT, other
    verdict: str = ""  # correct, wrong, explained, unexplained
    why: str = ""
    in_kill_phase: bool = False  # a failed read while a kill phase ran (never explained)


def parse_k8s_time(stamp: str) -> float:
    # 2024-06-11T10:00:00.123456789+00:00: Python wants at most six fraction digits
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)$", stamp)
    if m is None:
        raise ValueError(f"bad k8s-file timestamp {stamp!r}")
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return dt.datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}").timestamp()


def classify_errno(text: str) -> str:
    low = text.lower()
    if "i/o error" in low or "input/output" in low:
        return "EIO"
    if low.startswith("rc=135"):
        # sha256sum killed by SIGBUS (128 + 7): a page of its own binary (busybox, in the
        # image's lazily pulled layer) could not be read in. The kernel reports an EIO on a
        # mapped page this way, so it counts as one.
        return "EIO"
    if "not connected" in low:
        return "ENOTCONN"
    if "no such file" in low:
        return "ENOENT"
    return "other"


class Collector:
    """Tails one container's k8s-file log; turns its lines into ``Read``s and rounds."""

    def __init__(self, name: str, path: Path, sums: dict[str, str]) -> None:
        self.name = name
        self.path = path
        self.sums = sums
        self.offset = 0
        self.partial = ""
        self.reads: list[Read] = []
        self.rounds: list[tuple[str, float, int]] = []  # ("R"/"D", time, round number)
        self.noise: list[str] = []  # lines that are none of ours (e.g. the shell's own errors)

    def poll(self) -> None:
        try:
            if self.path.stat().st_size < self.offset:  # a new container, a new log file
                self.offset, self.partial = 0, ""
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for raw in data[: end + 1].decode(errors="replace").splitlines():
            self._line(raw)

    def _line(self, raw: str) -> None:
        parts = raw.split(" ", 3)
        if len(parts) < 3:
            return
        stamp, _stream, tag = parts[0], parts[1], parts[2]
        text = parts[3] if len(parts) > 3 else ""
        if tag == "P":
            self.partial += text
            return
        text, self.partial = self.partial + text, ""
        t = parse_k8s_time(stamp)
        if text.startswith("S "):
            fields = text.split(" ", 2)
            if len(fields) == 3 and fields[2] in self.sums:
                good = self.sums[fields[2]] == fields[1]
                self.reads.append(
                    Read(
                        t,
                        self.name,
                        fields[2],
                        good,
                        wrong=not good,
                        error="" if good else f"got sha256 {fields[1]}",
                    )
                )
                return
        elif text.startswith("E "):
            fields = text.split(" ", 2)
            if len(fields) >= 2 and fields[1] in self.sums:
                err = fields[2] if len(fields) > 2 else ""
                self.reads.append(
                    Read(t, self.name, fields[1], False, error=err, errno=classify_errno(err))
                )
                return
        elif text[:2] in ("R ", "D ") and text[2:].isdigit():
            self.rounds.append((text[0], t, int(text[2:])))
            return
        self.noise.append(f"{t:.3f} {text}")

    def clean_round_after(self, t0: float) -> float | None:
        """The end time of the first complete round that started after ``t0`` with every file
        read correctly, or None."""
        start: float | None = None
        for kind, t, _n in self.rounds:
            if kind == "R":
                start = t if t > t0 else None
            elif kind == "D" and start is not None:
                window = [r for r in self.reads if start <= r.t <= t]
                if {r.path for r in window if r.ok} >= set(self.sums) and not any(
                    not r.ok for r in window
                ):
                    return t
                start = None
        return None


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class Kill:
    """One induced ``kill -9`` of the store's server and the takeover after it (wall-clock
    times)."""

    t: float  # the kill
    pid: int  # the killed server
    generation: int
    new_pid: int = 0
    new_generation: int = 0
    status_back: float = 0.0  # the status document names a newer server (0: never)
    phase: str = ""


@dataclass
class Run:
    plan: Plan
    work: Path
    reg: RegistryServer
    proxy: FaultProxy
    conf: Path
    root: Path
    als_args: tuple[str, ...]
    mount: ProcessMount | None = None
    pm: Podman | None = None
    images: list[Image] = field(default_factory=list)
    collectors: dict[str, Collector] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    drops: int = 0
    drop_error: str = ""
    run_args: dict[str, list[str]] = field(default_factory=dict)  # podman run arguments

    # -- als-mount --
    def start_als(self) -> ProcessMount:
        # Under the chaos load (busy CPUs, page cache dropped every few seconds) the start-up
        # (Python imports from a cold cache, a stale mount's cleanup) can take well over the
        # tests' usual 20 s.
        self.mount = ProcessMount(self.root, *self.als_args).start(timeout=START_TIMEOUT)
        return self.mount

    def als_log(self) -> str:
        assert self.mount is not None
        return self.mount.log()

    def server(self) -> tuple[int, int] | None:
        """The serving server's pid and generation, from the status document (None between two
        servers)."""
        try:
            doc = fetch_status(self.root, timeout=10.0)
        except StatusError:
            return None
        srv = doc.get("server")
        if not isinstance(srv, dict) or not isinstance(doc.get("pid"), int):
            return None
        assert self.mount is not None and self.mount.proc is not None
        if srv.get("supervisor_pid") != self.mount.proc.pid:
            note(f"the store at {self.root} is not served by our als-mount: {srv}")
            return None
        return int(doc["pid"]), int(srv["generation"])

    def kill_server(self, phase: str) -> None:
        """``kill -9`` of the serving server, some seconds into the phase (its faults active,
        reads retrying in the server); then wait until the status document names a newer
        server. als-mount (the supervisor) and the containers are left alone."""
        time.sleep(self.plan.kill_after)
        found = None
        deadline = time.monotonic() + SERVER_TIMEOUT
        while found is None and time.monotonic() < deadline:
            found = self.server()
            if found is None:
                time.sleep(0.2)
        if found is None:  # reported as a kill that did not recover (fewer than planned)
            note(f"no server answers the status at {self.root}: no kill")
            return
        pid, gen = found
        k = Kill(t=time.time(), pid=pid, generation=gen, phase=phase)
        self.kills.append(k)
        os.kill(pid, signal.SIGKILL)
        note(f"kill -9 server pid {pid} (generation {gen})")
        while time.monotonic() < deadline:
            now = self.server()
            if now is not None and now[1] > gen:
                k.new_pid, k.new_generation = now
                k.status_back = time.time()
                break
            time.sleep(0.1)
        if k.status_back:
            note(
                f"server generation {k.new_generation} (pid {k.new_pid}) in the status "
                f"{k.status_back - k.t:.2f} s after the kill"
            )
        else:
            note(f"no new server {SERVER_TIMEOUT:g} s after the kill")

    # -- page cache --
    def dropper(self) -> None:
        while not self.stop.wait(self.plan.drop_every):
            try:
                Path("/proc/sys/vm/drop_caches").write_text("1\n")
                self.drops += 1
            except OSError as exc:
                self.drop_error = str(exc)
                return

    def poller(self) -> None:
        while not self.stop.wait(0.5):
            self.poll()

    def poll(self) -> None:
        with self.lock:
            for c in self.collectors.values():
                c.poll()


def container_cmd(name: str) -> list[str]:
    return ["sh", "/chaos/run.sh", f"/chaos/list-{name}"]


def pull_lazily(run: Run) -> dict[str, Any]:
    """podman pull through the proxy; check that every layer is served by als and that the
    pull moved only a part of the layer blobs."""
    assert run.pm is not None
    pm = run.pm
    checks: dict[str, Any] = {
        "layers": 0,
        "lazy": 0,
        "blob_bytes": 0,
        "pull_bytes": 0,
        "details": [],
    }
    for img in run.images:
        mark = run.proxy.request_count
        t0 = time.monotonic()
        pm.pull(img.ref)
        took = time.monotonic() - t0
        recs = run.proxy.requests_for("")[mark:]
        log = run.als_log()
        for layer in img.layers:
            sent = sum(r.bytes_sent for r in recs if layer.digest in r.path and r.method == "GET")
            ready = re.search(rf"layer-ready ref=\S+ digest={layer.digest} .*lazy=true", log)
            lazy = ready is not None and sent < layer.size
            checks["layers"] += 1
            checks["lazy"] += lazy
            checks["blob_bytes"] += layer.size
            checks["pull_bytes"] += sent
            checks["details"].append(
                {
                    "image": img.name,
                    "digest": layer.digest,
                    "size": layer.size,
                    "sent_during_pull": sent,
                    "layer_ready_lazy": ready is not None,
                }
            )
        note(f"pulled {img.ref} in {took:.1f} s")
    checks["als_layers_in_podman"] = len(pm.layer_diff_links())
    return checks


def phases(run: Run) -> list[Phase]:
    plan = run.plan
    p = plan.p
    n = plan.phase

    def quiet(i: int) -> Phase:
        return Phase(f"quiet-{i}", plan.gap)

    def with_kill(name: str, faults: list[Fault]) -> Phase:
        """A fault phase with a kill -9 of the server in it (longer: the kill comes
        ``kill_after`` seconds in, and the phase goes on well past the takeover)."""
        return Phase(name, n + 4, faults, action=lambda: run.kill_server(name))

    seq = [
        Phase(
            "reset-mid-body",
            n,
            [Fault("reset", BLOB, times=None, probability=p, random_offset=True)],
        ),
        with_kill(
            "http-5xx-429+kill-1",
            [
                Fault("status", BLOB, times=None, status=500, probability=p / 2),
                Fault("status", BLOB, times=None, status=503, probability=p / 2),
                Fault("status", BLOB, times=None, status=429, retry_after="1", probability=p / 2),
            ],
        ),
        Phase("stall", n, [Fault("stall", BLOB, times=None, delay=plan.stall, probability=p)]),
        Phase(
            "truncate", n, [Fault("truncate", BLOB, times=None, probability=p, random_offset=True)]
        ),
        Phase(
            "corrupt", n, [Fault("corrupt", BLOB, times=None, probability=p, random_offset=True)]
        ),
        Phase("unreachable", plan.unreachable, unreachable=True),
        with_kill("drop+kill-2", [Fault("drop", BLOB, times=None, probability=p)]),
    ]
    if not plan.quick:
        seq.append(
            Phase(
                "mixed",
                1.5 * n,
                [
                    Fault("reset", BLOB, times=None, probability=p / 4, random_offset=True),
                    Fault("status", BLOB, times=None, status=503, probability=p / 4),
                    Fault("stall", BLOB, times=None, delay=plan.stall, probability=p / 4),
                    Fault("truncate", BLOB, times=None, probability=p / 4, random_offset=True),
                    Fault("corrupt", BLOB, times=None, probability=p / 4, random_offset=True),
                    Fault("drop", BLOB, times=None, probability=p / 4),
                ],
            )
        )
    out: list[Phase] = []
    for i, ph in enumerate(seq):
        out += [ph, quiet(i + 1)]
    return out


# Phases whose fault answers every request it matches: data is truly unavailable meanwhile.
def blocks_everything(ph: Phase) -> bool:
    return ph.unreachable or any(
        f.probability >= 1.0 and f.kind in ("status", "drop", "reset", "truncate", "corrupt")
        for f in ph.faults
    )


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_events(text: str, needle: str) -> list[tuple[float, str]]:
    out = []
    for line in text.splitlines():
        if needle in line and (m := LOG_TIME.match(line)):
            t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((t, line))
    return out


SERVER_START = re.compile(r"server-start generation=(\d+) pid=(\d+)")
SERVER_DEATH = re.compile(r"server pid (\d+) \(generation (\d+)\) died with (signal|status) (\d+)")
RESTORED = re.compile(r"takeover-restored nodes=\d+ instances=\d+ layers=(\d+)/(\d+) in ([\d.]+)s")
RESTART_DONE = re.compile(
    r"restart-done generation=(\d+) pid=(\d+) spawn_to_serving=([\d.]+)s since_loss=([\d.]+)s"
)


def supervisor_events(log: str) -> dict[str, Any]:
    """The supervisor's lines about its servers: starts, deaths (with the exit code as
    ``Popen.returncode`` has it: -9 for SIGKILL) and replacements serving again."""
    deaths = []
    for t, line in log_events(log, " died with "):
        if m := SERVER_DEATH.search(line):
            code = -int(m.group(4)) if m.group(3) == "signal" else int(m.group(4))
            deaths.append(
                {"t": t, "pid": int(m.group(1)), "generation": int(m.group(2)), "code": code}
            )
    restarts = []
    for t, line in log_events(log, "restart-done "):
        if m := RESTART_DONE.search(line):
            restarts.append(
                {
                    "t": t,
                    "generation": int(m.group(1)),
                    "pid": int(m.group(2)),
                    "spawn_to_serving": float(m.group(3)),
                    "since_loss": float(m.group(4)),
                }
            )
    restored = []
    for t, line in log_events(log, "takeover-restored "):
        if m := RESTORED.search(line):
            restored.append(
                {
                    "t": t,
                    "layers": int(m.group(1)),
                    "of": int(m.group(2)),
                    "seconds": float(m.group(3)),
                }
            )
    return {
        "servers_started": sum(1 for _ in SERVER_START.finditer(log)),
        "deaths": deaths,
        "restarts": restarts,
        "restored": restored,
    }


def kill_report(run: Run, k: Kill, sup: dict[str, Any], done: list[Phase]) -> dict[str, Any]:
    """Recovery after one kill: the supervisor's restart-done (from the log), each container's
    first correct read once the new server served, and the longest pause between two correct
    reads around the kill (next to the longest gap elsewhere in the same phase, for scale)."""
    death = next((d for d in sup["deaths"] if d["pid"] == k.pid), None)
    back = next(
        (e for e in sup["restarts"] if e["generation"] > k.generation and e["t"] >= k.t - 1.0),
        None,
    )
    # the new server holds every request until it has looked the layers up again
    restored = (
        None
        if back is None
        else next((e for e in sup["restored"] if e["t"] >= back["t"] - 1.0), None)
    )
    phase = next((ph for ph in done if ph.name == k.phase), None)
    per: dict[str, dict[str, float | None]] = {}
    for name, c in run.collectors.items():
        oks = sorted(r.t for r in c.reads if r.ok)
        first = None if back is None else next((t for t in oks if t >= back["t"]), None)
        pairs = list(itertools.pairwise(oks))
        pause: float | None = None
        elsewhere = 0.0
        if first is not None:
            around = [b - a for a, b in pairs if b >= k.t and a <= first]
            pause = max(around, default=None)
            if phase is not None and phase.started is not None and phase.ended is not None:
                elsewhere = max(
                    (
                        b - a
                        for a, b in pairs
                        if a >= phase.started and b <= phase.ended and (b < k.t or a > first)
                    ),
                    default=0.0,
                )
        per[name] = {
            "first_correct_read_s": None if first is None else round(first - k.t, 2),
            "pause_s": None if pause is None else round(pause, 2),
            "longest_gap_elsewhere_in_phase_s": round(elsewhere, 2),
        }
    firsts = [v["first_correct_read_s"] for v in per.values()]
    pauses = [v["pause_s"] for v in per.values()]
    recover = None if None in firsts or back is None else max(f or 0.0 for f in firsts)
    return {
        "phase": k.phase,
        "killed_pid": k.pid,
        "killed_generation": k.generation,
        "exit_code": None if death is None else death["code"],
        "new_pid": None if back is None else back["pid"],
        "new_generation": None if back is None else back["generation"],
        "restart_done_s": None if back is None else round(back["t"] - k.t, 3),
        "spawn_to_serving_s": None if back is None else back["spawn_to_serving"],
        "since_loss_s": None if back is None else back["since_loss"],
        "status_names_new_server_s": round(k.status_back - k.t, 2) if k.status_back else None,
        "takeover_restored_s": None if restored is None else round(restored["t"] - k.t, 3),
        "restore_seconds": None if restored is None else restored["seconds"],
        "layers_restored": None if restored is None else f"{restored['layers']}/{restored['of']}",
        "containers": per,
        "recover_seconds": recover,
        "longest_pause_s": None if None in pauses else max(x or 0.0 for x in pauses),
        "longest_gap_elsewhere_in_phase_s": max(
            (v["longest_gap_elsewhere_in_phase_s"] or 0.0 for v in per.values()), default=0.0
        ),
        "recovered": recover is not None and recover <= RECOVERY_BAR,
    }


def judge(run: Run, done: list[Phase], final_start: float) -> dict[str, Any]:
    """Classify every read; build the summary."""
    plan = run.plan
    reach = plan.read_timeout + 5.0
    log = run.als_log()
    gave_up = [(t, line) for t, line in log_events(log, "read-failed") if "giving up after" in line]
    reads = [r for c in run.collectors.values() for r in c.reads]
    reads.sort(key=lambda r: r.t)
    images = {i.name: i for i in run.images}
    layers_of = {c: {x.digest for x in images[i].layers} for c, i in plan.containers}
    kill_phases = [ph for ph in done if ph.action is not None]
    for r in reads:
        if r.ok:
            r.verdict = "correct"
            continue
        if r.wrong:
            r.verdict = "wrong"
            continue
        in_kill = next((ph.name for ph in kill_phases if ph.active_at(r.t)), None)
        if in_kill is not None:
            # the server's death must not show: no error explains a failed read here
            r.verdict, r.why = "unexplained", f"failed in the kill phase {in_kill}"
            r.in_kill_phase = True
            continue
        if r.errno == "EIO":
            blocking = [
                ph.name for ph in done if blocks_everything(ph) and ph.active_at(r.t, after=reach)
            ]
            if blocking:
                r.verdict, r.why = "explained", f"registry unavailable: {blocking[0]}"
                continue
            given = [
                line
                for t, line in gave_up
                if r.t - reach <= t <= r.t + 2.0
                and any(d in line for d in layers_of.get(r.container, set()))
            ]
            if given:
                r.verdict = "explained"
                r.why = "store retried until its deadline: " + given[-1].split(": ", 1)[-1][:300]
                continue
            digests = layers_of.get(r.container, set())
            near = [
                line
                for t, line in log_events(log, "-failed")
                if r.t - reach <= t <= r.t + 2.0 and any(d in line for d in digests)
            ]
            r.why = near[-1].split(": ", 1)[-1][:300] if near else "no store log line"
        r.verdict = "unexplained"

    def phase_of(t: float) -> str:
        for ph in done:
            if ph.active_at(t):
                return ph.name
        return "warm-up" if done and t < (done[0].started or 0) else "final"

    by_phase: dict[str, dict[str, Any]] = {}
    for ph in [Phase("warm-up", 0), *done, Phase("final", 0)]:
        by_phase[ph.name] = {
            "attempted": 0,
            "correct": 0,
            "eio": 0,
            "failed": 0,
            "unexplained": 0,
            "wrong": 0,
            "fault_hits": ph.hits,
        }
    for r in reads:
        b = by_phase[phase_of(r.t)]
        b["attempted"] += 1
        b["correct"] += r.verdict == "correct"
        b["eio"] += r.errno == "EIO"
        b["failed"] += not r.ok
        b["unexplained"] += r.verdict == "unexplained"
        b["wrong"] += r.verdict == "wrong"
    # time to recover: from the end of a fault phase until every container read a file right
    for ph in done:
        if ph.name.startswith("quiet") or ph.ended is None:
            continue
        firsts = []
        for c in run.collectors.values():
            t = next((r.t for r in c.reads if r.ok and r.t >= (ph.ended or 0)), None)
            firsts.append(None if t is None else t - (ph.ended or 0))
        fails = [r for r in reads if not r.ok and ph.active_at(r.t)]
        last_fail = max((r.t for r in fails), default=None)
        by_phase[ph.name]["recover_seconds"] = (
            None if None in firsts else round(max(f or 0.0 for f in firsts), 2)
        )
        by_phase[ph.name]["failed_reads"] = len(fails)
        by_phase[ph.name]["last_failure_after_end"] = (
            None if last_fail is None else round(last_fail - (ph.ended or 0), 2)
        )
    sup = supervisor_events(log)
    kills = [kill_report(run, k, sup, done) for k in run.kills]
    count: dict[str, int] = {}
    for r in reads:
        count[r.verdict] = count.get(r.verdict, 0) + 1
    final = {}
    for name, c in run.collectors.items():
        t = c.clean_round_after(final_start)
        final[name] = {
            "pass": t is not None,
            "files": len(c.sums),
            "seconds": None if t is None else round(t - final_start, 2),
        }
    tracebacks = log.count("Traceback")
    internal = len(re.findall(r"internal error", log, re.IGNORECASE))
    proc = run.mount.proc if run.mount else None
    alive = proc is not None and proc.poll() is None
    induced = {k.pid for k in run.kills}
    deaths = sup["deaths"]
    unplanned_deaths = [d for d in deaths if d["pid"] not in induced]
    unplanned = len(unplanned_deaths) + (0 if alive else 1)
    evictions = len(log_events(log, "cache-evict"))
    hits: dict[str, int] = {}
    records = run.proxy.requests_for("")
    for rec in records:
        if rec.fault:
            hits[rec.fault] = hits.get(rec.fault, 0) + 1
    proxy_requests = len(records)
    examples = [
        {
            "t": round(r.t, 3),
            "container": r.container,
            "path": r.path,
            "error": r.error,
            "why": r.why,
        }
        for r in reads
        if r.verdict in ("wrong", "unexplained")
    ][:20]
    return {
        "variant": "quick" if plan.quick else "full",
        "images": [
            {
                "name": i.name,
                "format": i.fmt,
                "files": len(i.sums),
                "layer_bytes": [x.size for x in i.layers],
            }
            for i in run.images
        ],
        "containers": len(run.collectors),
        "settings": {
            "read_timeout_s": plan.read_timeout,
            "cache_limit_mb": plan.cache_limit_mb,
            "memory_cache_mb": plan.memory_cache_mb,
            "fault_probability": plan.p,
            "unreachable_s": plan.unreachable,
            "stall_s": plan.stall,
            "page_cache_drops": run.drops,
            "page_cache_drop_error": run.drop_error,
        },
        "reads": {
            "attempted": len(reads),
            "correct": count.get("correct", 0),
            "wrong": count.get("wrong", 0),
            "eio_explained": count.get("explained", 0),
            "eio_unexplained": sum(
                1 for r in reads if r.verdict == "unexplained" and r.errno == "EIO"
            ),
            "other_unexplained": sum(
                1 for r in reads if r.verdict == "unexplained" and r.errno != "EIO"
            ),
            "failed_in_kill_phases": sum(1 for r in reads if r.in_kill_phase),
            "in_kill_phases": sum(
                1 for r in reads if any(ph.active_at(r.t) for ph in done if ph.action is not None)
            ),
        },
        "phases": by_phase,
        "server_kills": kills,
        "daemon": {
            "servers_started": sup["servers_started"],
            "planned_kills": sum(1 for ph in done if ph.action is not None),
            "induced_kills": len(run.kills),
            "exit_codes_of_killed": [k["exit_code"] for k in kills],
            "unplanned_server_deaths": unplanned_deaths,
            "alive_at_end": alive,
            "tracebacks": tracebacks,
            "internal_errors": internal,
            "unplanned_crashes": unplanned,
        },
        "cache": {
            "evictions": evictions,
            "cache_limit_lines": len(log_events(log, "cache-limit")),
            "layer_complete_lines": len(log_events(log, "layer-complete")),
        },
        "proxy": {"requests": proxy_requests, "faults_applied": hits},
        "final_checksum": final,
        "problems": examples,
        "container_noise": {n: c.noise[:10] for n, c in run.collectors.items() if c.noise},
    }


def verdict_lines(s: dict[str, Any], lazy: dict[str, Any]) -> tuple[list[str], bool]:
    r = s["reads"]
    d = s["daemon"]
    bad_reads = r["wrong"] + r["eio_unexplained"] + r["other_unexplained"]
    final_ok = sum(1 for v in s["final_checksum"].values() if v["pass"])
    final_bad = len(s["final_checksum"]) - final_ok
    health_fail = d["unplanned_crashes"] + d["tracebacks"] + d["internal_errors"]
    lazy_bad = lazy["layers"] - lazy["lazy"]
    if lazy["als_layers_in_podman"] < lazy["layers"]:
        lazy_bad = max(lazy_bad, 1)
    evict_bad = 0 if s["cache"]["evictions"] > 0 else 1
    kills = s["server_kills"]
    kills_ok = sum(1 for k in kills if k["recovered"])
    kills_bad = max(len(kills), d["planned_kills"]) - kills_ok
    kill_reads_bad = r["failed_in_kill_phases"]
    lines = [
        f"reads: {r['attempted'] - bad_reads} passed, {bad_reads} failed "
        f"(correct {r['correct']}, wrong data {r['wrong']}, EIO explained by a fault "
        f"{r['eio_explained']}, EIO unexplained {r['eio_unexplained']}, other errors "
        f"{r['other_unexplained']}; failed in the kill phases {kill_reads_bad})",
        f"reads in the kill phases: {r['in_kill_phases'] - kill_reads_bad} passed, "
        f"{kill_reads_bad} failed",
        f"wrong data: {r['attempted'] - r['wrong']} passed, {r['wrong']} failed",
        f"server kills recovered within {RECOVERY_BAR:g} s: {kills_ok} passed, {kills_bad} failed"
        + "".join(
            f"; kill {i}: restart-done {fmt_s(k['restart_done_s'], 3)} after it "
            f"(spawn to serving {fmt_s(k['spawn_to_serving_s'], 3)}), layers "
            f"{k['layers_restored'] or 'not'} restored {fmt_s(k['takeover_restored_s'], 3)} "
            f"after it, every container reading "
            f"correctly {fmt_s(k['recover_seconds'])} after it, longest pause "
            f"{fmt_s(k['longest_pause_s'])}"
            for i, k in enumerate(kills, 1)
        ),
        f"final checksum per container: {final_ok} passed, {final_bad} failed",
        f"daemon health: {max(0, 3 - health_fail)} passed, {health_fail} failed "
        f"(unplanned crashes {d['unplanned_crashes']}, tracebacks {d['tracebacks']}, "
        f"internal errors {d['internal_errors']}, induced server kills {d['induced_kills']})",
        f"lazy pull: {lazy['layers'] - lazy_bad} passed, {lazy_bad} failed "
        f"({lazy['pull_bytes']} of {lazy['blob_bytes']} layer-blob bytes moved by the pull)",
        f"cache eviction seen: {1 - evict_bad} passed, {evict_bad} failed "
        f"({s['cache']['evictions']} evictions)",
    ]
    ok = (
        bad_reads == 0
        and kills_bad == 0
        and final_bad == 0
        and health_fail == 0
        and lazy_bad == 0
        and evict_bad == 0
    )
    return lines, ok


def fmt_s(v: float | None, digits: int = 2) -> str:
    return "never" if v is None else f"{v:.{digits}f} s"


def tables(s: dict[str, Any]) -> list[str]:
    """The per-phase and per-kill figures as Markdown tables (as in docs/reliability.md)."""
    out = [
        "| phase | reads | correct | failed | faults applied | recovered after |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, b in s["phases"].items():
        if name.startswith("quiet") or name in ("warm-up", "final"):
            continue
        rec = b.get("recover_seconds")
        failed = f"{b['failed']}"
        if b["failed"]:
            failed += f" ({b['eio']} EIO, {b['unexplained']} unexplained)"
        out.append(
            f"| {name} | {b['attempted']} | {b['correct']} | {failed} | {b['fault_hits']} "
            f"| {'-' if rec is None else f'{rec:g} s'} |"
        )
    out += [
        "",
        "| kill | phase | server pid (generation) | restart-done after the kill | "
        "spawn to serving | since loss | every container reading again | "
        "longest pause | longest gap elsewhere in the phase |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, k in enumerate(s["server_kills"], 1):
        out.append(
            f"| {i} | {k['phase']} | {k['killed_pid']} ({k['killed_generation']}) -> "
            f"{k['new_pid']} ({k['new_generation']}) | {fmt_s(k['restart_done_s'], 3)} "
            f"| {fmt_s(k['spawn_to_serving_s'], 3)} | {fmt_s(k['since_loss_s'], 3)} "
            f"| {fmt_s(k['recover_seconds'])} | {fmt_s(k['longest_pause_s'])} "
            f"| {fmt_s(k['longest_gap_elsewhere_in_phase_s'])} |"
        )
    return out


def execute(plan: Plan, work: Path, seed: int) -> tuple[dict[str, Any], bool]:
    reg = RegistryServer(work / "registry")
    reg.start()
    proxy = FaultProxy(reg.url, seed=seed).start()
    conf = write_registries_conf(work / "registries.conf", [reg.host, proxy.host])
    als_conf = work / "als.toml"
    als_conf.write_text(
        f"cache_limit_mb = {plan.cache_limit_mb}\n"
        f"memory_cache_mb = {plan.memory_cache_mb}\n"
        f"read_timeout = {plan.read_timeout}\n"
        "background_delay = 1.0\n"
    )
    run = Run(
        plan,
        work,
        reg,
        proxy,
        conf,
        work / "als",
        ("--registries-conf", str(conf), "--config", str(als_conf)),
    )
    threads: list[threading.Thread] = []
    try:
        note("building and pushing the images ...")
        run.images = build_images(plan, reg, proxy.host)
        vol = work / "vol"
        vol.mkdir()
        (vol / "run.sh").write_text(RUN_SH)
        by_name = {i.name: i for i in run.images}
        run.start_als()
        run.pm = Podman(work / "podman", conf, als_pool=run.root / ".pool")
        lazy = pull_lazily(run)
        logs = work / "logs"
        logs.mkdir()
        for cname, iname in plan.containers:
            img = by_name[iname]
            (vol / f"list-{cname}").write_text("".join(f"{p}\n" for p in img.sums))
            log_path = logs / f"{cname}.log"
            run.run_args[cname] = [
                "--name",
                cname,
                *RUN_FLAGS,
                "--log-driver",
                "k8s-file",
                "--log-opt",
                f"path={log_path}",
                "-v",
                f"{vol}:/chaos:ro",
                img.ref,
                *container_cmd(cname),
            ]
            run.pm("run", "-d", *run.run_args[cname])
            run.collectors[cname] = Collector(cname, log_path, img.sums)
        for target in (run.dropper, run.poller):
            th = threading.Thread(target=target, daemon=True)
            th.start()
            threads.append(th)
        note(f"{len(plan.containers)} containers running; warm-up {plan.warmup:g} s")
        time.sleep(plan.warmup)
        sched = Schedule(proxy, phases(run))

        def announce(ph: Phase) -> None:
            note(f"phase {ph.name} ({ph.duration:g} s)")

        done = sched.run(on_phase=announce)
        final_start = time.time()
        note("faults over; waiting for a clean checksum round in every container")
        deadline = time.monotonic() + plan.final_timeout
        while time.monotonic() < deadline:
            run.poll()
            with run.lock:
                clean = all(
                    c.clean_round_after(final_start) is not None for c in run.collectors.values()
                )
            if clean:
                break
            time.sleep(1.0)
        run.poll()
        summary = judge(run, done, final_start)
        summary["lazy_pull"] = lazy
        lines, ok = verdict_lines(summary, lazy)
        summary["passed"] = ok
        summary["lines"] = lines
        # the daemon must still stop cleanly
        if run.mount is not None and run.mount.proc is not None and run.mount.proc.poll() is None:
            run.stop.set()
            for cname, _ in plan.containers:
                run.pm("rm", "-f", "-t", "0", cname, check=False)
            code = run.mount.stop()
            summary["daemon"]["exit_status"] = code
            if code != 0:
                summary["passed"] = False
                summary["lines"].append(f"daemon clean stop: 0 passed, 1 failed (exit {code})")
        return summary, summary["passed"]
    finally:
        run.stop.set()
        for th in threads:
            th.join(5)
        if run.pm is not None:
            for cname, _ in plan.containers:
                with contextlib.suppress(Exception):
                    run.pm("rm", "-f", "-t", "0", cname, check=False)
            with contextlib.suppress(Exception):
                run.pm.reset()
        if run.mount is not None:
            with contextlib.suppress(Exception):
                run.mount.stop()
        proxy.stop()
        reg.close()


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE, podman overlay storage, dropping the page cache)"
    missing = [
        what
        for what, ok in (
            ("podman", PODMAN is not None),
            ("docker-registry", registry_available()),
            ("/dev/fuse and fusermount3", FUSE_AVAILABLE),
            ("busybox-static", os.path.exists(BUSYBOX)),
        )
        if not ok
    ]
    return f"needs {', '.join(missing)}" if missing else None


def main(argv: list[str] | None = None, write: Callable[[str], object] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI variant (under 4 minutes)")
    ap.add_argument("--seed", type=int, default=20240611, help="seed of the fault proxy")
    ap.add_argument("--summary", type=Path, help="also write the JSON summary to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    out = write or (lambda s: print(s, flush=True))
    why = preflight()
    if why:
        note(f"{why}; not run")
        return 2
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    plan = make_plan(args.quick)
    work = Path(tempfile.mkdtemp(prefix="als-chaos-"))
    t0 = time.monotonic()
    try:
        summary, ok = execute(plan, work, args.seed)
    finally:
        if args.keep:
            note(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    for line in summary["lines"]:
        out(line)
    for line in tables(summary):
        out(line)
    out(json.dumps(summary, sort_keys=True))
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if not ok:
        for p in summary["problems"]:
            note(f"problem: {p}")
    note(f"{'PASSED' if ok else 'FAILED'} in {summary['seconds']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
