"""The FUSE connection outlives its server (issue 15): the real ``als-mount`` supervisor, a real
registry, and a reader that keeps checking file contents through kills and an upgrade.

The reader drops each file's pages before reading it (``POSIX_FADV_DONTNEED``), so every round
reaches the server rather than the kernel's page cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.faultproxy import Fault, FaultProxy
from tests.support.layers import BuiltLayer, make_layer, noise
from tests.support.mount import (
    ALS_MOUNT,
    ProcessMount,
    needs_fuse,
    store_status,
    takeover,
    wait_until,
)
from tests.support.podman import write_registries_conf
from tests.support.registry import RegistryServer, push_image, registry_available

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    pytest.mark.skipif(not registry_available(), reason="docker-registry is not installed"),
]

FILES = {f"data/f{i:02d}.bin": noise(f"f{i}", 200_000 + 37 * i) for i in range(12)}
FILES["etc/motd"] = b"kept connection\n"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def layer(registry: RegistryServer) -> BuiltLayer:
    built = make_layer(dict(FILES), "estargz", chunk_size=64 * 1024)
    push_image(registry, "takeover/app", "1", [built])
    return built


def start(
    tmp_path: Path, host: str, *extra: str, env: dict[str, str] | None = None, config: str = ""
) -> ProcessMount:
    conf = write_registries_conf(tmp_path / "registries.conf", [host])
    cfg = tmp_path / "als.toml"
    # Reads must reach the server: no background download, no native tree, no memory cache.
    cfg.write_text(
        "background_fetch = false\nnative_layers = false\nmemory_cache_mb = 0\n" + config
    )
    return ProcessMount(
        tmp_path / "als", "--registries-conf", str(conf), "--config", str(cfg), *extra, env=env
    ).start()


def server_pid(m: ProcessMount) -> int:
    return int(store_status(m.root).get("pid", -1))


def read_uncached(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass
class Reader:
    """Reads every file of the layer in a loop and checks it; records errors and pauses."""

    diff: Path
    files: dict[str, bytes] = field(default_factory=lambda: FILES)
    errors: list[str] = field(default_factory=list)
    reads: int = 0
    longest_gap: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            for name, want in self.files.items():
                try:
                    got = read_uncached(self.diff / name)
                except OSError as exc:
                    self.errors.append(f"{name}: {exc}")
                    continue
                if got != want:
                    self.errors.append(f"{name}: wrong bytes ({len(got)} of {len(want)})")
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.reads += 1

    def __enter__(self) -> Reader:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)

    def wait_reads(self, n: int, limit: float = 60) -> None:
        target = self.reads + n
        wait_until(lambda: self.reads >= target or bool(self.errors), limit)


def test_a_reader_keeps_reading_through_kills_of_the_server(
    registry: RegistryServer, layer: BuiltLayer, tmp_path: Path
) -> None:
    m = start(tmp_path, registry.host)
    try:
        diff = m.layer_dir(f"{registry.host}/takeover/app:1", layer.digest) / "diff"
        assert read_uncached(diff / "etc/motd") == FILES["etc/motd"]
        with Reader(diff) as reader:
            reader.wait_reads(20)
            for kill in (1, 2):
                pid = server_pid(m)
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda p=pid: server_pid(m) not in (p, -1), 30)  # type: ignore[misc]
                reader.wait_reads(30)
                assert reader.errors == [], f"kill {kill}: {reader.errors[:5]}"
        assert reader.errors == []
        log = m.log()
        assert log.count("restart-done generation=") == 2
        assert store_status(m.root)["server"] == {"generation": 3, "supervisor_pid": m.proc.pid}  # type: ignore[union-attr]
        # The same inodes, served by the third server: the layer directory is known to it.
        assert "takeover-restored" in log
        assert reader.longest_gap < 10, reader.longest_gap
    finally:
        m.stop()


def test_a_takeover_hands_over_without_a_failed_read(
    registry: RegistryServer, layer: BuiltLayer, tmp_path: Path
) -> None:
    m = start(tmp_path, registry.host)
    try:
        diff = m.layer_dir(f"{registry.host}/takeover/app:1", layer.digest) / "diff"
        old = server_pid(m)
        with Reader(diff) as reader:
            reader.wait_reads(20)
            p = takeover(m.root)
            assert p.returncode == 0, p.stderr
            assert "server generation 2" in p.stdout
            reader.wait_reads(30)
        assert reader.errors == []
        assert server_pid(m) != old
        assert "takeover-done generation=2" in m.log()
    finally:
        m.stop()


def test_a_read_in_flight_when_the_server_dies_is_answered_by_the_next(
    registry: RegistryServer, layer: BuiltLayer, tmp_path: Path
) -> None:
    with FaultProxy(registry.url) as proxy:
        m = start(tmp_path, proxy.host)
        try:
            ref = f"{proxy.host}/takeover/app:1"
            diff = m.layer_dir(ref, layer.digest) / "diff"
            assert (diff / "etc").is_dir()  # the layer is resolved; its blob is not read yet
            proxy.add(Fault("stall", match=r"GET /v2/.*/blobs/", times=None, delay=2.0))
            result: list[bytes | Exception] = []

            def read() -> None:
                try:
                    result.append(read_uncached(diff / "data/f07.bin"))
                except OSError as exc:
                    result.append(exc)

            t = threading.Thread(target=read)
            t.start()
            wait_until(lambda: len(proxy.requests_for(r"/blobs/")) > 0, 20)
            os.kill(server_pid(m), signal.SIGKILL)  # the read is in the dead server's hands
            t.join(60)
            assert result == [FILES["data/f07.bin"]]
            assert "resend=True" in m.log()
        finally:
            m.stop()


LAUNCH = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
high = [os.dup(fd) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)  # dup2 onto itself keeps close-on-exec
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def test_a_killed_supervisor_hands_over_through_systemds_store(
    registry: RegistryServer, layer: BuiltLayer, tmp_path: Path
) -> None:
    """What systemd does with FileDescriptorStoreMax= and Restart=: it keeps the descriptors
    the supervisor stored, and passes them (LISTEN_FDS) to the unit's next start."""
    import socket

    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    stored: dict[str, int] = {}
    m = start(tmp_path, registry.host, env={"NOTIFY_SOCKET": str(notify)})
    m2: subprocess.Popen[bytes] | None = None
    try:
        while len(stored) < 4:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
            fields = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
            if fields.get("FDSTORE") == "1":
                stored[fields["FDNAME"]] = fds[0]
        assert set(stored) == {"als-fuse", "als-init", "als-journal", "als-underlay"}
        diff = m.layer_dir(f"{registry.host}/takeover/app:1", layer.digest) / "diff"
        with Reader(diff) as reader:
            reader.wait_reads(20)
            assert m.proc is not None
            m.proc.kill()  # the supervisor: its server follows it (parent-death signal)
            m.proc.wait()
            names = list(stored)
            env = {
                **os.environ,
                "LISTEN_FDS": str(len(names)),
                "LISTEN_FDNAMES": ":".join(names),
                "NOTIFY_SOCKET": str(notify),
            }
            with open(m.log_path, "ab") as logf:
                m2 = subprocess.Popen(
                    [
                        ALS_MOUNT[0],
                        "-c",
                        LAUNCH,
                        ",".join(str(stored[n]) for n in names),
                        *ALS_MOUNT[1:],
                        str(m.root),
                        "--log-level",
                        "debug",
                        *m.args,
                    ],
                    pass_fds=list(stored.values()),
                    env=env,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                )
            wait_until(lambda: "took over the FUSE connection" in m.log(), 30)
            reader.wait_reads(30)
        assert reader.errors == [], reader.errors[:5]
        assert "stale mount" not in m.log()
        assert store_status(m.root)["server"] == {"generation": 2, "supervisor_pid": m2.pid}
        m2.terminate()
        assert m2.wait(30) == 0
        removed: set[str] = set()
        while len(removed) < 4:
            text = sock.recv(4096).decode()
            if "FDSTOREREMOVE=1" in text:
                removed.add(text.split("FDNAME=")[1].strip())
        assert removed == set(stored)
    finally:
        if m2 is not None and m2.poll() is None:
            m2.kill()
            m2.wait()
        for fd in stored.values():
            os.close(fd)
        sock.close()
        m.stop()


def test_a_restore_waits_only_for_the_layer_a_request_needs(
    registry: RegistryServer, layer: BuiltLayer, tmp_path: Path
) -> None:
    """After a kill, a layer whose records are gone is looked up at the registry again (slow
    here: its manifest stalls 3 s); readers of another layer go on meanwhile."""
    other_files = {f"srv/o{i}.bin": noise(f"o{i}", 150_000 + i) for i in range(6)}
    other = make_layer(dict(other_files), "estargz", chunk_size=64 * 1024)
    push_image(registry, "takeover/other", "1", [other])
    with FaultProxy(registry.url) as proxy:
        m = start(tmp_path, proxy.host)
        try:
            slow = m.layer_dir(f"{proxy.host}/takeover/app:1", layer.digest) / "diff"
            fast = m.layer_dir(f"{proxy.host}/takeover/other:1", other.digest) / "diff"
            with Reader(slow) as r_slow, Reader(fast, other_files) as r_fast:
                r_slow.wait_reads(10)
                r_fast.wait_reads(10)
                # the slow layer's records are gone: the next server must ask the registry
                shutil.rmtree(m.root / "cache" / "layers" / layer.digest.split(":")[1])
                proxy.add(Fault("stall", match=r"/takeover/app/manifests/", times=None, delay=3))
                r_slow.longest_gap = r_fast.longest_gap = 0.0
                os.kill(server_pid(m), signal.SIGKILL)
                r_fast.wait_reads(30)
                r_slow.wait_reads(10)
            assert r_slow.errors == [] and r_fast.errors == []
            assert r_slow.longest_gap >= 2.5, r_slow.longest_gap
            assert r_fast.longest_gap < 2.0, r_fast.longest_gap
            assert "layers=2/2" in m.log()
        finally:
            m.stop()


def test_a_failed_takeover_is_reported_and_the_running_server_goes_on(
    registry: RegistryServer, layer: BuiltLayer, tmp_path: Path
) -> None:
    """An upgrade whose new server cannot start (here: a broken config file) fails fast and
    says why; the old server keeps serving, and a later takeover works."""
    m = start(tmp_path, registry.host)
    try:
        diff = m.layer_dir(f"{registry.host}/takeover/app:1", layer.digest) / "diff"
        cfg = tmp_path / "als.toml"
        good = cfg.read_text()
        old = server_pid(m)
        with Reader(diff) as reader:
            reader.wait_reads(20)
            cfg.write_text(good + "lookup_timeout = 'soon'\n")
            t0 = time.monotonic()
            p = takeover(m.root)
            assert p.returncode == 1
            assert "takeover failed: the new server exited with status 2" in p.stderr
            assert time.monotonic() - t0 < 30
            reader.wait_reads(20)
            assert server_pid(m) == old
            cfg.write_text(good)
            assert takeover(m.root).returncode == 0
            reader.wait_reads(20)
        assert reader.errors == []
        assert server_pid(m) != old
        assert "takeover failed" in m.log()
    finally:
        m.stop()


def test_a_hung_server_is_replaced_by_the_watchdog(
    registry: RegistryServer, layer: BuiltLayer, tmp_path: Path
) -> None:
    """A server that stops answering (here: SIGSTOP, as a deadlock would look) is killed after
    watchdog_s and replaced; readers only pause."""
    m = start(tmp_path, registry.host, config="watchdog_s = 2.0\n")
    hung = 0
    try:
        diff = m.layer_dir(f"{registry.host}/takeover/app:1", layer.digest) / "diff"
        with Reader(diff) as reader:
            reader.wait_reads(20)
            hung = server_pid(m)
            os.kill(hung, signal.SIGSTOP)
            wait_until(lambda: server_pid(m) not in (hung, -1), 30)
            reader.wait_reads(20)
        assert reader.errors == []
        assert "has not answered for" in m.log()
        assert 1.5 < reader.longest_gap < 10, reader.longest_gap
    finally:
        if hung > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)
        m.stop()
