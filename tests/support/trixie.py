"""A Debian trixie root filesystem with podman 5.4, for the podman version matrix.

The root is built once with debootstrap from the Debian mirror the host's apt uses, cached
outside the repository (``ALS_TRIXIE_ROOT``, by default under /var/cache/als-test/) and reused
while its stamp matches ``PACKAGES``. Building it takes a few minutes and about 450 MB; when it
cannot be built (no root, no debootstrap, no mirror reachable) ``trixie_root()`` raises
``Unavailable`` with the reason, and the tests that need it skip saying so.

``TrixiePodman`` runs the root's podman against the host's kernel, FUSE and als store:

- the root is a mount point (runc wants that): an overlay of the cached root per user;
- ``/sys/fs/cgroup/unified`` is covered by a tmpfs (crun refuses a hybrid cgroup layout);
- ``/run`` and the graphroot are tmpfs, so nothing of a run survives it;
- the host's als root is bind-mounted with shared propagation, so a ``.pool`` mounted again
  after an als restart appears inside;
- nothing starts services (a policy-rc.d answering 101 is installed, and nothing runs an init).

``podman exec`` is not trustworthy in such a root (the exec lands in the host's root
filesystem), so checks use ``podman run`` output and ``podman mount``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUITE = "trixie"
PACKAGES = ("podman", "runc", "crun", "skopeo", "fuse-overlayfs", "ca-certificates", "busybox")
DEFAULT_ROOT = Path("/var/cache/als-test/trixie-podman")
_STAMP = ".als-trixie-stamp"
_BUILD_TIMEOUT = 1800.0


class Unavailable(Exception):
    """The trixie root cannot be had on this machine; the message says why."""


def host_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian archive URL the host's apt uses (not the security archive)."""
    files = sorted(sources.glob("sources.list.d/*.sources")) + sorted(
        sources.glob("sources.list.d/*.list")
    )
    if (sources / "sources.list").exists():
        files.insert(0, sources / "sources.list")
    for f in files:
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            urls = re.findall(r"^URIs:\s*(\S+)", text, flags=re.M)
        else:
            urls = re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s", text, flags=re.M)
        for url in urls:
            if url.rstrip("/").endswith("/debian"):
                return str(url)
    raise Unavailable(f"no Debian mirror (a URL ending in /debian) in {sources}/sources.list*")


def _stamp_text(mirror: str) -> str:
    return f"suite={SUITE} packages={','.join(PACKAGES)} mirror={mirror}\n"


def trixie_root(root: Path | None = None) -> Path:
    """The cached trixie root, built now if it is missing. Raises Unavailable."""
    root = root or Path(os.environ.get("ALS_TRIXIE_ROOT", str(DEFAULT_ROOT)))
    if os.geteuid() != 0:
        raise Unavailable("building and using the trixie root needs root")
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed")
    mirror = host_mirror()
    stamp = root / _STAMP
    if stamp.exists() and stamp.read_text() == _stamp_text(mirror):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        if stamp.exists() and stamp.read_text() == _stamp_text(mirror):
            return root
        _build(root, mirror)
    return root


def _build(root: Path, mirror: str) -> None:
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    log = root.with_name(root.name + ".build.log")
    started = time.monotonic()
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
        SUITE,
        str(tmp),
        mirror,
    ]
    try:
        with open(log, "w") as out:
            p = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=_BUILD_TIMEOUT, check=False
            )
    except subprocess.TimeoutExpired:
        raise Unavailable(f"debootstrap {SUITE} from {mirror} timed out (log: {log})") from None
    if p.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise Unavailable(
            f"debootstrap {SUITE} from {mirror} failed ({p.returncode}): {' | '.join(tail)}"
        )
    policy = tmp / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    for d in ("sys/fs/cgroup/unified", "var/lib/als"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    # Podman in the root reads its configuration from the paths the tests bind-mount.
    (tmp / _STAMP).write_text(_stamp_text(mirror))
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    with open(log, "a") as out:
        out.write(f"built in {time.monotonic() - started:.0f} s\n")


def package_version(root: Path, package: str) -> str:
    p = subprocess.run(
        ["chroot", str(root), "dpkg-query", "-W", "-f=${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return p.stdout.strip() if p.returncode == 0 else ""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _run(*argv: str | Path) -> None:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {p.stderr.strip()}")


@contextlib.contextmanager
def shared_dir(path: Path) -> Iterator[Path]:
    """``path`` as a shared mount point, so that mounts made below it later (an als-mount's
    ``.pool``, again after a restart) appear in its bind copies too."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "--bind", path, path)
    try:
        _run("mount", "--make-shared", path)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


class TrixiePodman:
    """podman 5.4 from the trixie root, run with ``chroot``.

    ``start()`` mounts, in the host's namespace: an overlay of the cached root (so the cache
    stays as built and each user has its own ``/etc`` and ``/var``), proc, ``/sys`` and
    ``/dev`` (as slaves: nothing done inside propagates back), a tmpfs over
    ``sys/fs/cgroup/unified``, tmpfs ``/run`` and graphroot, and the als root (a slave of a
    ``shared_dir``). ``stop()`` removes every container and unmounts it all.
    """

    GRAPH = "/var/lib/containers/storage"
    ALS = "/var/lib/als"
    GLOBAL = ("--cgroup-manager=cgroupfs", "--events-backend=file", "--log-level=error")

    def __init__(
        self, root: Path, workdir: Path, als_root: Path | None, registries_conf: Path
    ) -> None:
        self.cache = root
        self.workdir = workdir
        self.rootfs = workdir / "rootfs"
        self.als_root = als_root
        self.registries_conf = registries_conf
        self._mounted: list[Path] = []

    def start(self) -> TrixiePodman:
        w, r = self.workdir, self.rootfs
        for d in (w / "upper", w / "work", r):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._mount(
                r,
                "-t",
                "overlay",
                "-o",
                f"lowerdir={self.cache},upperdir={w / 'upper'},workdir={w / 'work'}",
                "overlay",
            )
            _run("mount", "--make-private", r)
            self._mount(r / "proc", "-t", "proc", "proc")
            for name in ("sys", "dev"):
                self._mount(r / name, "--rbind", f"/{name}")
                _run("mount", "--make-rslave", r / name)
            if (r / "sys/fs/cgroup/unified").is_dir():
                self._mount(r / "sys/fs/cgroup/unified", "-t", "tmpfs", "tmpfs")
            self._mount(r / "run", "-t", "tmpfs", "-o", "mode=0755", "tmpfs")
            (r / "var/lib/containers/storage").mkdir(parents=True, exist_ok=True)
            self._mount(r / "var/lib/containers/storage", "-t", "tmpfs", "-o", "mode=0700", "tmpfs")
            (r / "var/tmp").mkdir(exist_ok=True)
            self._mount(r / "var/tmp", "-t", "tmpfs", "tmpfs")
            if self.als_root is not None:
                (r / "var/lib/als").mkdir(parents=True, exist_ok=True)
                self._mount(r / "var/lib/als", "--rbind", str(self.als_root))
                _run("mount", "--make-rslave", r / "var/lib/als")
        except BaseException:
            self.stop()
            raise
        etc = r / "etc/containers"
        etc.mkdir(parents=True, exist_ok=True)
        opts = ""
        if self.als_root is not None:
            opts = f'\n[storage.options]\nadditionallayerstores = ["{self.ALS}/.pool:ref"]\n'
        (etc / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.GRAPH}"\n'
            'runroot = "/run/containers/storage"\n' + opts
        )
        shutil.copyfile(self.registries_conf, etc / "registries.conf")
        return self

    def _mount(self, target: Path, *args: str) -> None:
        _run("mount", *args, target)
        self._mounted.append(target)

    def stop(self) -> None:
        if self._mounted:
            self("rm", "-af", "-t", "0", check=False, timeout=120)
            self("system", "reset", "--force", check=False, timeout=120)
        # Whatever podman left mounted below the root (overlays of containers, shm) goes too.
        subprocess.run(["umount", "-R", "-l", str(self.rootfs)], check=False, capture_output=True)
        self._mounted.clear()

    def path(self, inside: str) -> Path:
        """A path inside the root, as the host sees it."""
        return self.rootfs / inside.lstrip("/")

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True, runtime: str = ""
    ) -> Result:
        t = time.monotonic()
        argv = ["chroot", str(self.rootfs), "podman", *self.GLOBAL]
        if runtime:
            argv.append(f"--runtime={runtime}")
        p = subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"},
        )
        res = Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t)
        if check and p.returncode != 0:
            raise AssertionError(
                f"podman 5.4 {' '.join(args)} failed ({p.returncode}):\n{p.stderr}"
            )
        return res

    def version(self) -> str:
        return self("version", "--format", "{{.Client.Version}}").stdout.strip()

    def layer_diff_links(self) -> dict[str, str]:
        """podman layer id -> where its diff points (inside the root), for ALS layers."""
        out = {}
        overlay = self.path(self.GRAPH) / "overlay"
        if overlay.is_dir():
            for d in overlay.iterdir():
                diff = d / "diff"
                if diff.is_symlink():
                    out[d.name] = os.readlink(diff)
        return out


@contextlib.contextmanager
def trixie_podman(
    root: Path, workdir: Path, als_root: Path | None, registries_conf: Path
) -> Iterator[TrixiePodman]:
    pm = TrixiePodman(root, workdir, als_root, registries_conf).start()
    try:
        yield pm
    finally:
        pm.stop()
