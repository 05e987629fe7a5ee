"""Mount the store for tests: in a thread of the test process (fake sources), or as the real
``als-mount`` command in a subprocess (real registries)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from als.cli.mount import is_mountpoint
from als.store.config import StoreConfig

is_mounted = is_mountpoint  # the daemon and the tests agree on what "mounted" means

ALS_MOUNT = [sys.executable, "-m", "als.cli.mount"]
"""The ``als-mount`` command of this checkout (the installed script may point elsewhere)."""

FUSE_AVAILABLE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
needs_fuse = pytest.mark.skipif(
    not FUSE_AVAILABLE or os.geteuid() != 0, reason="needs root, /dev/fuse and fusermount3"
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def wait_mounted(
    path: Path, timeout: float = 20, proc: subprocess.Popen[Any] | None = None
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if is_mounted(path):
            try:
                os.listdir(path)  # a stale mount left by a killed daemon is listed but dead
                return
            except OSError:
                pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"als-mount exited with {proc.returncode} before mounting")
        time.sleep(0.05)
    raise TimeoutError(f"{path} not mounted after {timeout}s")


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)


class ThreadMount:
    """The store served by ``als.store.daemon.serve`` in a background thread."""

    def __init__(self, root: Path, source: Any, **cfg: Any) -> None:
        # Tests measure laziness: whole-layer downloads only where a test asks for them.
        cfg.setdefault("background_fetch", False)
        self.cfg = StoreConfig(root=root, **cfg)
        self.cfg.pool.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.ops: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="als-test-mount", daemon=True)

    @property
    def root(self) -> Path:
        return self.cfg.root

    @property
    def pool(self) -> Path:
        return self.cfg.pool

    def _run(self) -> None:
        from als.store.daemon import serve

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as n:
                self.ops = await n.start(
                    lambda task_status: serve(
                        self.cfg, self.source, handle_signals=False, task_status=task_status
                    )
                )
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> ThreadMount:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("store failed to start") from self._error
        wait_mounted(self.pool)
        return self

    def stop(self) -> None:
        import pyfuse3

        if self._token is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
        self._thread.join(30)
        force_unmount(self.pool)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._error is not None and not isinstance(self._error, KeyboardInterrupt):
            raise RuntimeError("store thread failed") from self._error

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.pool / b64(ref) / digest


class ProcessMount:
    """The real ``als-mount`` command in a subprocess, its log captured to a file."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.pool = root / ".pool"
        self.args = args
        self.log_path = root.parent / f"{root.name}-als.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> ProcessMount:
        self.root.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [*ALS_MOUNT, str(self.root), "--log-level", "debug", *self.args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        logf.close()
        wait_mounted(self.pool, timeout, proc=self.proc)
        # A supervisor mounts before its server serves: wait for the server too.
        deadline = time.monotonic() + timeout
        while " serving " not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"als-mount exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"als-mount did not serve in {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.pool / b64(ref) / digest

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        force_unmount(self.pool)
        return self.proc.returncode

    def __enter__(self) -> ProcessMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def store_status(root: Path) -> dict[str, Any]:
    """``als status ROOT --json`` of a running store; {} while none answers (e.g. between two
    servers of a supervisor)."""
    p = subprocess.run(
        [sys.executable, "-m", "als", "status", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if p.returncode != 0:
        return {}
    doc = json.loads(p.stdout)
    assert isinstance(doc, dict)
    return doc


def takeover(root: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``als-mount ROOT --takeover``: hand the store over to a new server (an upgrade)."""
    return subprocess.run(
        [*ALS_MOUNT, str(root), "--takeover"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def server_generation(root: Path) -> int:
    """The generation of the server now serving ``root`` (0 if none answers)."""
    server = store_status(root).get("server")
    return int(server["generation"]) if isinstance(server, dict) else 0


def wait_until(cond: Callable[[], bool], limit: float = 30.0) -> None:
    """Poll ``cond`` every 50 ms until it holds; AssertionError after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)
