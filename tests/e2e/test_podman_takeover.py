"""End to end with Debian's podman 4.3.1 (issue 15): a running container whose layers are served
by als keeps checksumming its files correctly through two ``kill -9`` of the store's server and
one upgrade handover (``als-mount --takeover``). It is never restarted.

The layers stay on FUSE for the whole run (no background download, no native trees), and the
host's page cache is dropped every second, so the container's reads keep reaching the server.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

from tests.e2e.test_podman_cache import tail, write_config
from tests.e2e.test_podman_native import CHECK, TOP, base_spec, expected_sums
from tests.support.layers import FileSpec, make_layer
from tests.support.mount import (
    ProcessMount,
    force_unmount,
    server_generation,
    store_status,
    takeover,
    wait_until,
)
from tests.support.podman import RUN_FLAGS, Podman, e2e_marks
from tests.support.registry import RegistryServer, push_image

pytestmark = e2e_marks()

EXTRA_APPLETS = ["cut", "wc", "echo", "true"]


def test_a_running_container_reads_through_kills_and_an_upgrade(
    registry: RegistryServer, regconf: Path, tmp_path: Path
) -> None:
    spec = base_spec()
    for applet in EXTRA_APPLETS:
        spec[f"bin/{applet}"] = FileSpec(type="symlink", link="busybox")
    spec["tmp/"] = FileSpec("dir", mode=0o1777)
    layers = [make_layer(spec, "estargz"), make_layer(TOP, "estargz")]
    push_image(registry, "takeover/app", "1", layers)
    ref = f"{registry.host}/takeover/app:1"
    want = hashlib.sha256(expected_sums().encode()).hexdigest()

    root = tmp_path / "als"
    conf = write_config(tmp_path / "als.toml", background_fetch=False, native_layers=False)
    m = ProcessMount(root, "--registries-conf", str(regconf), "--config", str(conf)).start()
    pm = Podman(tmp_path / "podman", regconf, als_pool=root / ".pool")
    # One line per round: exit status of the check, hash of its output, bytes of its errors.
    loop = (
        "trap 'exit 0' TERM; while true; do "
        f"{CHECK} > /tmp/sums 2> /tmp/err; "
        'echo "R $? $(sha256sum < /tmp/sums | cut -c1-64) $(wc -c < /tmp/err)"; '
        "sleep 0.2; done"
    )
    stop = threading.Event()

    def dropper() -> None:
        while not stop.wait(1.0):
            Path("/proc/sys/vm/drop_caches").write_text("1\n")

    def rounds(name: str) -> list[str]:
        out = pm("logs", name, check=False).stdout
        return [line for line in out.splitlines() if line.startswith("R ")]

    def wait_rounds(name: str, n: int) -> None:
        target = len(rounds(name)) + n
        wait_until(lambda: len(rounds(name)) >= target, 120)

    def wait_newer(generation: int) -> None:
        wait_until(lambda: server_generation(root) > generation, 60)

    drops = threading.Thread(target=dropper, daemon=True)
    try:
        pm.pull(ref)
        links = pm.layer_diff_links()
        assert len(links) == 2 and all(str(root / ".pool") in v for v in links.values()), links
        name = pm("run", "-d", *RUN_FLAGS, ref, "sh", "-c", loop).stdout.strip()
        drops.start()
        wait_rounds(name, 3)
        events = []
        for step in ("kill", "kill", "takeover"):
            before = store_status(root)
            if step == "kill":
                os.kill(int(before["pid"]), signal.SIGKILL)
            else:
                p = takeover(root)
                assert p.returncode == 0, p.stderr + tail(m)
            wait_newer(int(before["server"]["generation"]))
            events.append((step, server_generation(root)))
            wait_rounds(name, 4)
            # the rounds after the switch were read through the new server
            reads = store_status(root).get("fuse_requests", {})
            assert isinstance(reads, dict) and reads.get("read", 0) > 0, reads
        stop.set()
        lines = rounds(name)
        bad = [line for line in lines if line != f"R 0 {want} 0"]
        assert not bad, (bad[:5], tail(m))
        assert len(lines) >= 12
        assert [e[1] for e in events] == [2, 3, 4], events
        # still the same container, never restarted, still on the FUSE mount
        assert pm("inspect", "-f", "{{.RestartCount}} {{.State.Status}}", name).stdout.split() == [
            "0",
            "running",
        ]
        log = m.log()
        assert log.count("restart-done generation=") == 2, tail(m)
        assert "takeover-done generation=4" in log, tail(m)
        assert "takeover-restored" in log
    finally:
        stop.set()
        pm("rm", "-a", "-f", "-t", "0", check=False)
        m.stop()
        pm.reset()
        force_unmount(root / ".pool")
