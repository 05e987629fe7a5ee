"""The real ``als-mount`` process: readiness, one instance per root, clean and unclean stops."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from als.errors import ConfigError
from als.store.config import StoreConfig
from tests.support.mount import ALS_MOUNT, ProcessMount, is_mounted, needs_fuse, wait_mounted

pytestmark = [needs_fuse, pytest.mark.fuse]


def test_sigterm_unmounts_cleanly(tmp_path: Path) -> None:
    m = ProcessMount(tmp_path / "root").start()
    assert is_mounted(m.pool)
    assert m.stop() == 0
    assert not is_mounted(m.pool)
    assert "unmounted" in m.log()


def test_second_instance_refuses(tmp_path: Path) -> None:
    with ProcessMount(tmp_path / "root") as m:
        assert m.proc is not None
        p = subprocess.run(
            [*ALS_MOUNT, str(m.root)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert p.returncode == 1
        assert f"another als-mount (pid {m.proc.pid})" in p.stderr
        assert is_mounted(m.pool)


def test_stale_mount_after_kill_is_cleaned_up(tmp_path: Path) -> None:
    m = ProcessMount(tmp_path / "root").start()
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    # the kernel mount is left behind, dead (a name never asked for reaches the dead server;
    # a listing the kernel keeps, under zero-message opendir, may still be shown)
    with pytest.raises(OSError) as e:
        os.stat(m.pool / "never-looked-up")
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    m2 = ProcessMount(tmp_path / "root").start()
    try:
        assert os.listdir(m2.pool) == []
        assert "stale mount" in m2.log()
    finally:
        m2.stop()


def test_sd_notify_ready(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        m = ProcessMount(tmp_path / "root", env={"NOTIFY_SOCKET": str(sock_path)}).start()

        def until(word: str) -> list[str]:
            seen: list[str] = []
            while word not in (seen[-1] if seen else ""):
                seen.append(sock.recv(4096).decode())
            return seen

        try:
            # the connection goes to systemd's store first (FDSTORE), then READY
            before = until("READY=1")
            assert sum("FDSTORE=1" in x for x in before) == 4, before
            assert is_mounted(m.pool)
        finally:
            m.stop()
        until("STOPPING=1")


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "als.toml"
    cfg.write_text("lookup_timeout = 'soon'\n")
    p = subprocess.run(
        [*ALS_MOUNT, str(tmp_path / "root"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 2
    assert "lookup_timeout must be a non-negative number" in p.stderr
    assert not (tmp_path / "root" / ".pool").exists() or not is_mounted(tmp_path / "root" / ".pool")


def test_config_file_and_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "als.toml"
    cfg.write_text("lookup_timeout = 3\nmemory_cache_mb = 16\nlog_level = 'debug'\n")
    c = StoreConfig.load(str(cfg), {"memory_cache_mb": 32, "root": str(tmp_path)})
    assert (c.lookup_timeout, c.memory_cache_mb, c.log_level) == (3.0, 32, "debug")
    assert c.pool == tmp_path / ".pool"
    cfg.write_text("no_such_option = 1\n")
    with pytest.raises(ConfigError, match="unknown config option"):
        StoreConfig.load(str(cfg))
    with pytest.raises(ConfigError, match="cannot read"):
        StoreConfig.load(str(tmp_path / "missing.toml"))


def test_wait_helper_notices_early_exit(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError):
        wait_mounted(tmp_path, timeout=5, proc=p)
    time.sleep(0)


def test_status_and_metrics_of_the_running_daemon(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ProcessMount(tmp_path / "root", "--metrics-listen", f"127.0.0.1:{port}") as m:
        assert m.proc is not None
        sock = m.root / ".als.sock"
        assert sock.exists()
        assert sock.stat().st_mode & 0o777 == 0o660
        p = subprocess.run(
            [sys.executable, "-m", "als", "status", str(m.root), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        doc = json.loads(p.stdout)
        # the supervisor (our process) runs the store in a server process of its own
        assert doc["server"] == {"generation": 1, "supervisor_pid": m.proc.pid}
        assert doc["pid"] != m.proc.pid
        assert doc["layers"] == []
        assert doc["cache"]["dir"] == str(m.root / "cache")
        assert doc["cache"]["limit_bytes"] == 10240 * 1024 * 1024
        assert (m.root / "cache" / "blobs" / "sha256").is_dir()
        assert (m.root / "cache").stat().st_mode & 0o777 == 0o700
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            body = b""
            while chunk := c.recv(65536):
                body += chunk
        assert body.startswith(b"HTTP/1.0 200")
        assert b"als_fuse_read_seconds_bucket" in body
        assert b"als_cache_limit_bytes 1.073741824e+10" in body
    assert not sock.exists()
    p = subprocess.run(
        [sys.executable, "-m", "als", "status", str(m.root)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 1
    assert "no running store" in p.stderr
