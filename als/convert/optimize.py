"""``als convert --optimize``: learn which files an image opens at start-up.

1. The image (this host's platform) is converted without priorities into the conversion
   records and served by a loopback registry (:mod:`als.convert.serve`).
2. A temporary als store (``als-mount`` in a subprocess, an empty disk cache, a learning
   window of N seconds, no prefetch) is mounted, and a private podman storage uses it as its
   additional layer store.
3. podman pulls the image lazily and runs it (its entrypoint/cmd, or the command given) for N
   seconds with no network (unless allowed), then the container is killed.
4. The store saves each layer's access profile (the files opened) in its disk cache
   (``layers/<hex>/profile.json``, :mod:`als.store.cache.records`); those paths, mapped back
   to the source layers, are the prioritized files of the real conversion.

Everything runs in a temporary directory that is removed afterwards, mounts included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from als.convert.image import Converter, Options, Progress
from als.convert.records import RecordStore
from als.convert.serve import LocalRegistry
from als.convert.store import Doc, Source
from als.errors import AlsError, ConfigError
from als.formats.model import HIDDEN_ROOT_NAMES

if TYPE_CHECKING:
    from collections.abc import Callable

    from als.convert.run import Request

REPO = "als-optimize/image"
TAG = "run"
SETTLE = 3.0  # seconds without a new profile before the learning is taken as done


class _ServeDestination:
    """A Destination that hands the converted image to the loopback registry."""

    name = "optimize run"

    def __init__(self, reg: LocalRegistry, records: RecordStore) -> None:
        self.reg = reg
        self.records = records

    def has_blob(self, digest: str) -> bool:
        return False

    def put_blob(
        self, digest: str, load: Callable[[], bytes], mount_from: tuple[str, ...] = ()
    ) -> str:
        path = self.records.blob_path(digest)
        self.reg.blobs[digest] = path if path.is_file() else load()
        return "uploaded"

    def put_manifest(self, doc: Doc, *, top: bool) -> None:
        self.reg.add_manifest(doc, TAG if top else None)

    def commit(self) -> str:
        return self.reg.manifests[TAG].digest

    def abort(self) -> None:
        pass


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress({"event": "optimize", "message": message})


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        raise ConfigError(f"--optimize needs {cmd[0]}, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise AlsError(f"optimize run: {' '.join(cmd[:3])} took more than {timeout:.0f}s") from None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def record_profile(
    src: Source, req: Request, records: RecordStore, progress: Progress | None
) -> dict[str, list[str]]:
    """Run the image and return the files it opened, by source layer digest."""
    if os.geteuid() != 0:
        raise ConfigError("--optimize mounts a temporary store: run it as root")
    reg = LocalRegistry()
    conv = Converter(src, _ServeDestination(reg, records), records,
                     Options(fmt=req.fmt, chunk_size=req.chunk_size), progress)  # fmt: skip
    result = conv.convert()
    image = result.images[0]
    by_blob = {ly.digest: ly.source for ly in image.layers}
    tmp = Path(tempfile.mkdtemp(prefix="als-optimize-"))
    runroot = Path(tempfile.mkdtemp(prefix="als-opt-", dir="/tmp"))  # podman wants it short
    store: subprocess.Popen[bytes] | None = None
    root = tmp / "store"
    cache = tmp / "cache"
    env: dict[str, str] = {}
    try:
        host = reg.start()
        ref = f"{host}/{REPO}:{TAG}"
        (tmp / "store.toml").write_text(
            f"profile_window = {req.optimize_seconds}\nprefetch = false\n"
            'background_fetch = false\nlog_level = "warning"\n'
        )
        (tmp / "registries.conf").write_text(
            f'unqualified-search-registries = []\n\n[[registry]]\nlocation = "{host}"\n'
            "insecure = true\n"
        )
        store = subprocess.Popen(
            [sys.executable, "-m", "als.cli.mount", str(root), "--config", str(tmp / "store.toml"),
             "--cache-dir", str(cache), "--registries-conf", str(tmp / "registries.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        pool = root / ".pool"
        _wait_mounted(pool, store)
        (tmp / "storage.conf").write_text(
            '[storage]\ndriver = "overlay"\n'
            f'graphroot = "{tmp / "graph"}"\nrunroot = "{runroot}"\n'
            f'[storage.options]\nadditionallayerstores = ["{pool}:ref"]\n'
        )
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(tmp / "storage.conf"),
               "CONTAINERS_REGISTRIES_CONF": str(tmp / "registries.conf")}  # fmt: skip
        # podman's own temporary directory goes private too: the run must not share (or, on
        # cleanup, remove) the state of the host's podman.
        podman = [req.podman, "--tmpdir", str(runroot / "libpod")]
        _say(progress, f"pulling {ref} lazily through a temporary store")
        p = _run([*podman, "pull", "--tls-verify=false", ref], env, 600)
        if p.returncode != 0:
            raise AlsError(f"optimize run: podman pull failed: {_last_line(p.stderr)}")
        name = f"als-optimize-{os.getpid()}"
        net = [] if req.optimize_network else ["--network", "none"]
        cmd = [*podman, "run", "--name", name, *net, *req.podman_run_args, ref,
               *req.optimize_command]  # fmt: skip
        _say(progress, f"running the image for {req.optimize_seconds:g}s")
        started = time.monotonic()
        run = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _out, err = run.communicate(timeout=req.optimize_seconds)
            rc = run.returncode
        except subprocess.TimeoutExpired:
            _run([*podman, "kill", name], env, 60)
            _out, err = run.communicate(timeout=60)
            rc = None
        _run([*podman, "rm", "-f", name], env, 60)
        if rc not in (None, 0) and not req.optimize_allow_failure:
            raise AlsError(
                f"optimize run: the command exited with status {rc} before "
                f"{req.optimize_seconds:g}s: {_last_line(err)} "
                "(--optimize-allow-failure keeps what was recorded)"
            )
        profiles = _wait_profiles(cache, list(by_blob), started + req.optimize_seconds)
    finally:
        if env:  # the private storage only: never `podman system reset` (host networks)
            _run([req.podman, "--tmpdir", str(runroot / "libpod"), "rmi", "-a", "-f"], env, 120)
            _unmount_under(tmp / "graph")
        if store is not None:
            _stop_store(store, root / ".pool")
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)
    out = {by_blob[d]: files for d, files in profiles.items() if files}
    _say(progress, f"recorded {sum(len(f) for f in out.values())} files in {len(out)} layer(s)")
    return out


def _unmount_under(path: Path) -> None:
    """Lazily unmount whatever podman left mounted below ``path`` (overlay, shm)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(path) + "/"
    targets = [m.split()[1] for m in mounts if len(m.split()) > 1]
    for t in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", t], check=False, capture_output=True)


def _wait_mounted(pool: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.ismount(pool):
            return
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AlsError(f"optimize run: the temporary store did not start: {_last_line(err)}")
        time.sleep(0.05)
    raise AlsError(f"optimize run: the temporary store was not mounted after {timeout:.0f}s")


def _stop_store(proc: subprocess.Popen[bytes], pool: Path) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if os.path.ismount(pool):
        subprocess.run(["fusermount3", "-u", "-z", str(pool)], check=False, capture_output=True)


def _wait_profiles(cache: Path, blobs: list[str], after: float) -> dict[str, list[str]]:
    """The saved profiles of ``blobs``: waits until the learning window has passed and no new
    profile appeared for SETTLE seconds (at most 2 windows)."""
    from als.store.cache.records import read_profile

    found: dict[str, list[str]] = {}
    last_change = time.monotonic()
    limit = after + 30.0
    while time.monotonic() < limit:
        for d in blobs:
            if d not in found:
                p = cache / "layers" / d.removeprefix("sha256:") / "profile.json"
                if p.is_file():
                    found[d] = [f for f in read_profile(p) if f not in HIDDEN_ROOT_NAMES]
                    last_change = time.monotonic()
        if len(found) == len(blobs):
            break
        now = time.monotonic()
        if now > after + 1 and now - last_change > SETTLE:
            break
        time.sleep(0.2)
    return found
