"""Drive Debian's real podman (4.3.1) in a private storage, optionally with als as its ALS."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

RUN_FLAGS = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
    "--network",
    "none",
]
PODMAN = shutil.which("podman")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def e2e_marks() -> list[pytest.MarkDecorator]:
    """The marks of an end-to-end module: FUSE, podman, docker-registry and busybox-static."""
    from tests.support.mount import needs_fuse
    from tests.support.registry import registry_available

    return [
        needs_fuse,
        pytest.mark.podman,
        pytest.mark.skipif(PODMAN is None, reason="podman not installed"),
        pytest.mark.skipif(not registry_available(), reason="docker-registry not installed"),
        pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static not installed"),
    ]


def write_registries_conf(
    path: Path, insecure_hosts: list[str], mirrors: Mapping[str, str] | None = None
) -> Path:
    """A registries.conf: each host insecure (plain http); ``mirrors`` maps a host to the
    (insecure) mirror that podman and als ask first."""
    lines = ["unqualified-search-registries = []", ""]
    for host in insecure_hosts:
        lines += ["[[registry]]", f'location = "{host}"', "insecure = true", ""]
        if mirrors and host in mirrors:
            lines += ["[[registry.mirror]]", f'location = "{mirrors[host]}"', "insecure = true", ""]
    path.write_text("\n".join(lines))
    return path


@dataclass
class Timed:
    seconds: float
    stdout: str
    stderr: str


class Podman:
    """podman with its own graphroot/runroot and storage.conf (als added when ``als_pool``)."""

    def __init__(self, base: Path, registries_conf: Path, als_pool: Path | None = None) -> None:
        self.base = base
        self.graphroot = base / "graph"
        # podman's cleanup process refuses a runroot longer than 50 characters (and then
        # `podman run --rm` waits 20 s for it): keep it short, outside the test's tmp dir.
        self.runroot = Path(tempfile.mkdtemp(prefix="als-pm-", dir="/tmp"))
        # libpod's own state (the "alive" file, locks, exit codes) goes under the runroot too,
        # not the host-wide /run/libpod: `reset()` then removes only this podman's state, and
        # two test runs (or a test and a user's podman) cannot break each other.
        self.tmpdir = self.runroot / "libpod"
        self.base.mkdir(parents=True, exist_ok=True)
        self.storage_conf = base / "storage.conf"
        opts = ""
        if als_pool is not None:
            opts = f'\n[storage.options]\nadditionallayerstores = ["{als_pool}:ref"]\n'
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.graphroot}"\n'
            f'runroot = "{self.runroot}"\n' + opts
        )
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
        }

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> Timed:
        assert PODMAN is not None
        t = time.monotonic()
        p = subprocess.run(
            [PODMAN, "--tmpdir", str(self.tmpdir), *args],
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        took = time.monotonic() - t
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
        return Timed(took, p.stdout, p.stderr)

    def pull(self, ref: str) -> Timed:
        return self("pull", "--tls-verify=false", ref)

    def run(self, ref: str, *cmd: str) -> Timed:
        return self("run", "--rm", *RUN_FLAGS, ref, *cmd)

    def layer_diff_links(self) -> dict[str, str]:
        """podman layer id -> where its diff points, for layers that are symlinks (ALS layers)."""
        out = {}
        overlay = self.graphroot / "overlay"
        if overlay.is_dir():
            for d in overlay.iterdir():
                diff = d / "diff"
                if diff.is_symlink():
                    out[d.name] = os.readlink(diff)
        return out

    def reset(self) -> None:
        self("system", "reset", "--force", check=False, timeout=120)
        shutil.rmtree(self.base / "graph", ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)
