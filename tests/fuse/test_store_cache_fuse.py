"""The disk cache through a real FUSE mount: restarts offline, eviction while reading, many readers.

The registry is the in-process fake (it can be switched off and counts requests); the store is
mounted for real and read with ordinary tools.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

from tests.support.fakesource import FakeSource
from tests.support.layers import make_layer, noise
from tests.support.mount import ThreadMount, b64, needs_fuse
from tests.support.mount import wait_until as wait

pytestmark = [needs_fuse, pytest.mark.fuse]

REF = "registry.test/cache/demo:1"


FILES = {f"srv/data/file{i:02d}.bin": noise(str(i), 40_000 + 7_000 * i) for i in range(24)}
FILES["srv/big.bin"] = noise("big", 1_500_000)


def sums(root: Path) -> dict[str, str]:
    out = subprocess.run(
        ["find", ".", "-type", "f", "-exec", "sha256sum", "{}", "+"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return {line[66:].removeprefix("./"): line[:64] for line in out.splitlines()}


EXPECTED = {p: hashlib.sha256(d).hexdigest() for p, d in FILES.items()}


@pytest.mark.parametrize("native", [False, True], ids=["fuse", "native"])
@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_restart_serves_the_complete_layer_offline(tmp_path: Path, fmt: str, native: bool) -> None:
    layer = make_layer(FILES, fmt, chunk_size=128 * 1024)
    src = FakeSource()
    src.add_image(REF, [layer])
    root = tmp_path / "als"
    with ThreadMount(root, src, background_fetch=True, background_delay=0) as m:
        diff = m.layer_dir(REF, layer.digest) / "diff"
        assert (diff / "srv/data/file03.bin").read_bytes() == FILES["srv/data/file03.bin"]
        mgr = m.ops.manager
        wait(lambda: mgr.layers[layer.digest].complete)
    src.fail_all = True
    requests = src.requests
    with ThreadMount(root, src, native_layers=native) as m:
        diff = m.layer_dir(REF, layer.digest) / "diff"
        if native:  # served from the tree unpacked in the cache once the layer is native
            os.stat(diff)
            wait(lambda: m.ops.manager.layers[layer.digest].native is not None)
            wait(diff.is_symlink)
        assert diff.is_symlink() == native
        assert sums(diff) == EXPECTED
        tar = subprocess.run(
            ["tar", "-cf", "-", "."], cwd=diff, capture_output=True, check=True, timeout=120
        )
        assert len(tar.stdout) > sum(len(d) for d in FILES.values())
    assert src.requests == requests


def test_many_readers_under_a_small_cache_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="als")
    layer = make_layer(FILES, "estargz", chunk_size=64 * 1024)
    src = FakeSource()
    src.add_image(REF, [layer])
    root = tmp_path / "als"
    with ThreadMount(root, src, memory_cache_mb=1) as m:
        mgr = m.ops.manager
        diff = m.pool / b64(REF) / layer.digest / "diff"
        assert (diff / "srv").is_dir()
        mgr.disk.limit = 600_000  # far below the layer's 2.5 MB: eviction runs all the time

        def check(path: str) -> bool:
            with open(diff / path, "rb") as f:
                # the kernel keeps file pages: drop them so every round reads through the store
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                data = f.read()
            return data == FILES[path]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(check, [p for _ in range(3) for p in FILES]))
        assert all(results)

        def settled() -> bool:
            # Read-ahead and cache writes the readers started may still land: let them finish,
            # evict, and count what is on disk afresh.
            trio.from_thread.run(mgr.scheduler.writes_done, trio_token=m._token)
            trio.from_thread.run(mgr.evict, trio_token=m._token)
            mgr.disk.rescan()
            return bool(mgr.disk.total <= 600_000)

        wait(settled)
        assert mgr.disk.corrupt == 0
    assert "cache-evict" in caplog.text
