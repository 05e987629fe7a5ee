"""End to end with podman 5.4 (Debian trixie's, in a cached root; tests/support/trixie.py).

The same images as tests/e2e/test_podman.py (podman 4.3.1), through podman 5.4, which asks the
store by TOC digest and only for layers that have one. Laziness is proven as there: podman's
``diff`` is a symlink into the pool, the registry sent part of each blob, and the store logged
``layer-ready`` (and ``layer-use`` / ``layer-release``) for each layer.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from als.oci import OCI_MANIFEST, toc_digest_of
from tests.e2e.test_podman import CMD, UPPER, base_spec
from tests.support.layers import BuiltLayer, make_layer
from tests.support.mount import (
    ProcessMount,
    server_generation,
    store_status,
    takeover,
    wait_until,
)
from tests.support.podman import e2e_marks
from tests.support.registry import RegistryServer, push_image
from tests.support.trixie import TrixiePodman, Unavailable, shared_dir, trixie_podman, trixie_root

pytestmark = e2e_marks()

ALS_ARGS = ("--no-background-fetch",)
SAVED = "/root/m54-save.tar"  # a path inside the root (in its overlay)
PRIORITIZED = ["bin/busybox", "bin/sh", "etc/motd", "etc/os-release"]


@pytest.fixture(scope="module")
def root() -> Path:
    t = time.monotonic()
    try:
        path = trixie_root()
    except Unavailable as exc:
        pytest.skip(f"podman 5.4 matrix skipped: {exc}")
    took = time.monotonic() - t
    if took > 5:
        print(f"trixie root with podman 5.4 built in {took:.0f} s")
    return path


@pytest.fixture(scope="module")
def als_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with shared_dir(tmp_path_factory.mktemp("als54") / "root") as path:
        yield path


@pytest.fixture(scope="module")
def als(als_root: Path, regconf: Path) -> Iterator[ProcessMount]:
    with ProcessMount(als_root, "--registries-conf", str(regconf), *ALS_ARGS) as m:
        yield m


@pytest.fixture(scope="module")
def pm(
    root: Path,
    als: ProcessMount,
    als_root: Path,
    regconf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TrixiePodman]:
    with trixie_podman(root, tmp_path_factory.mktemp("pm54"), als_root, regconf) as p:
        assert p.version().startswith("5.4"), p.version()
        yield p


def lazy_layers(fmt: str) -> list[BuiltLayer]:
    kw: dict[str, Any] = {"prioritized": PRIORITIZED} if fmt.startswith("estargz") else {}
    return [make_layer(base_spec(), fmt, **kw), make_layer(UPPER, fmt)]


def pool_path(ref: str, digest: str) -> str:
    return f"{TrixiePodman.ALS}/.pool/{base64.b64encode(ref.encode()).decode()}/{digest}/diff"


@pytest.fixture(scope="module")
def baseline(registry: RegistryServer, pm: TrixiePodman) -> str:
    """podman 5.4's output for a plain gzip image (no layer has a TOC: the store is not asked)."""
    push_image(
        registry, "m54/plain", "1", [make_layer(base_spec(), "gzip"), make_layer(UPPER, "gzip")]
    )
    ref = f"{registry.host}/m54/plain:1"
    pm("pull", "--tls-verify=false", ref)
    out = pm("run", "--rm", "--network=none", ref, "sh", "-c", CMD).stdout
    assert "upper motd" in out
    assert pm.layer_diff_links() == {}
    pm("rmi", ref)
    return out


def assert_lazy(
    registry: RegistryServer,
    als: ProcessMount,
    pm: TrixiePodman,
    ref: str,
    layers: list[BuiltLayer],
    mark: int,
) -> None:
    links = set(pm.layer_diff_links().values())
    log = als.log()
    for layer in layers:
        assert pool_path(ref, layer.toc_digest) in links, (layer.format, links)
        assert f"layer-ready ref={ref} digest={layer.toc_digest} format=" in log
        assert f"layer-use ref={ref} digest={layer.toc_digest}" in log
        sent = registry.blob_bytes_sent(layer.digest, since=mark)
        assert sent < 0.5 * layer.size, (layer.format, sent, layer.size)


@pytest.mark.parametrize(
    ("fmt", "runtime"),
    [("estargz", "runc"), ("estargz-zstd", "runc"), ("zstd-chunked", "crun")],
)
def test_lazy_pull_and_run(
    fmt: str,
    runtime: str,
    registry: RegistryServer,
    als: ProcessMount,
    pm: TrixiePodman,
    baseline: str,
) -> None:
    layers = lazy_layers(fmt)
    repo = f"m54/{fmt}"
    push_image(registry, repo, "1", layers)
    ref = f"{registry.host}/{repo}:1"
    mark = registry.mark()
    pm("pull", "--tls-verify=false", ref)
    out = pm("run", "--rm", "--network=none", ref, "sh", "-c", CMD, runtime=runtime).stdout
    assert out == baseline
    assert_lazy(registry, als, pm, ref, layers, mark)
    # F3: every layer has a size (podman history printed -1B for zstd:chunked layers)
    sizes = pm("history", "--format", "{{.Size}}", ref).stdout.split()
    assert sizes and not any(s.startswith("-") for s in sizes), sizes
    pm("rmi", ref)
    assert f"layer-release ref={ref} digest={layers[0].toc_digest}" in als.log()


def test_mixed_image(
    registry: RegistryServer, als: ProcessMount, pm: TrixiePodman, baseline: str
) -> None:
    """A lazy lower layer under a plain gzip one: the lower is served, the upper pulled."""
    lower = make_layer(base_spec(), "zstd-chunked")
    push_image(registry, "m54/mixed", "1", [lower, make_layer(UPPER, "gzip")])
    ref = f"{registry.host}/m54/mixed:1"
    mark = registry.mark()
    pm("pull", "--tls-verify=false", ref)
    assert pm("run", "--rm", "--network=none", ref, "sh", "-c", CMD).stdout == baseline
    assert list(pm.layer_diff_links().values()) == [pool_path(ref, lower.toc_digest)]
    assert registry.blob_bytes_sent(lower.digest, since=mark) < 0.5 * lower.size
    pm("rmi", ref)


def test_save_push_commit(
    registry: RegistryServer, als: ProcessMount, pm: TrixiePodman, baseline: str
) -> None:
    """podman save and push read the store's `blob` files; commit stacks a layer on top. No
    blob costs more than its size (F5), and what was saved and pushed runs the same."""
    layers = lazy_layers("estargz")
    push_image(registry, "m54/save", "1", layers)
    ref = f"{registry.host}/m54/save:1"
    mark = registry.mark()
    pm("pull", "--tls-verify=false", ref)
    assert pm("run", "--rm", "--network=none", ref, "sh", "-c", CMD).stdout == baseline
    pm("save", "-o", SAVED, ref)
    assert pm.path(SAVED).stat().st_size > sum(x.size for x in layers)
    pushed = f"{registry.host}/m54/pushed:1"
    pm("push", "--tls-verify=false", ref, pushed)
    for layer in layers:
        assert registry.blob_bytes_sent(layer.digest, since=mark) <= layer.size
    pm("run", "--name", "m54-commit", "--network=none", ref, "sh", "-c", "echo made > /made")
    pm("commit", "m54-commit", "localhost/m54-committed:1")
    pm("rm", "m54-commit")
    out = pm("run", "--rm", "--network=none", "localhost/m54-committed:1", "cat", "/made").stdout
    assert out == "made\n"
    pm("rmi", "-f", "localhost/m54-committed:1", ref)
    pm("load", "-i", SAVED)
    assert pm("run", "--rm", "--network=none", ref, "sh", "-c", CMD).stdout == baseline
    pm("rmi", "-f", ref)
    pm("pull", "--tls-verify=false", pushed)
    assert pm("run", "--rm", "--network=none", pushed, "sh", "-c", CMD).stdout == baseline
    pm("rmi", "-f", pushed)


def test_moved_tag(registry: RegistryServer, als: ProcessMount, pm: TrixiePodman) -> None:
    """F2: a tag moved to an image sharing no layer with the one the store resolved."""
    ref = f"{registry.host}/m54/moving:latest"
    first = lazy_layers("zstd-chunked")
    push_image(registry, "m54/moving", "latest", first)
    pm("pull", "--tls-verify=false", ref)
    second = [make_layer({**base_spec(), "etc/motd": b"second image\n"}, "zstd-chunked")]
    push_image(registry, "m54/moving", "latest", second)
    mark = registry.mark()
    pm("pull", "--tls-verify=false", ref)
    assert pm("run", "--rm", "--network=none", ref, "cat", "/etc/motd").stdout == "second image\n"
    assert_lazy(registry, als, pm, ref, second, mark)
    assert f"digest={second[0].toc_digest} lazy=false" not in als.log()
    pm("rmi", "-af")


def test_stop_start_after_als_restart(
    root: Path, registry: RegistryServer, regconf: Path, tmp_path: Path
) -> None:
    """After als-mount restarts, `podman stop` + `podman start` brings a container back over
    the new store (docs/troubleshooting.md), checked through `podman mount`."""
    layers = lazy_layers("estargz")
    push_image(registry, "m54/restart", "1", layers)
    ref = f"{registry.host}/m54/restart:1"
    name = "m54-loop"
    loop = "trap 'exit 0' TERM; while true; do cat /etc/motd >/dev/null; sleep 0.2; done"
    with shared_dir(tmp_path / "als") as als_root:
        m = ProcessMount(als_root, "--registries-conf", str(regconf), *ALS_ARGS).start()
        try:
            with trixie_podman(root, tmp_path / "pm", als_root, regconf) as p:
                p("pull", "--tls-verify=false", ref)
                p("run", "-d", "--name", name, "--network=none", ref, "sh", "-c", loop)
                assert m.proc is not None
                m.proc.kill()
                m.proc.wait()
                m = ProcessMount(als_root, "--registries-conf", str(regconf), *ALS_ARGS).start()
                p("stop", "-t", "2", name)
                p("start", name)
                merged = p("mount", name).stdout.strip()
                assert p.path(merged).joinpath("etc/motd").read_bytes() == b"upper motd\n"
                assert p.path(merged).joinpath("opt/keep/new.txt").read_bytes() == b"new\n"
                assert "read-failed" not in m.log()
                p("umount", name)
        finally:
            m.stop()


def test_zstd_chunked_pushed_by_podman_itself(
    registry: RegistryServer, als: ProcessMount, pm: TrixiePodman, baseline: str
) -> None:
    """podman 5.4 converts a gzip image to zstd:chunked on push; that image is served lazily."""
    src = f"{registry.host}/m54/plain:1"  # the baseline's gzip image
    dst = f"{registry.host}/m54/podman-made:1"
    pm("pull", "--tls-verify=false", src)
    pm(
        "push",
        "--tls-verify=false",
        "--compression-format",
        "zstd:chunked",
        "--force-compression",
        src,
        dst,
    )
    pm("rmi", "-f", src)
    url = f"{registry.url}/v2/m54/podman-made/manifests/1"  # the local registry, http
    req = urllib.request.Request(url, headers={"Accept": OCI_MANIFEST})  # noqa: S310
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        manifest = json.loads(resp.read())
    layers = manifest["layers"]
    tocs = [toc_digest_of(layer.get("annotations", {})) for layer in layers]
    assert all(tocs), layers  # podman wrote the zstd:chunked annotations
    mark = registry.mark()
    pm("pull", "--tls-verify=false", dst)
    assert pm("run", "--rm", "--network=none", dst, "sh", "-c", CMD).stdout == baseline
    links = set(pm.layer_diff_links().values())
    log = als.log()
    for layer, toc in zip(layers, tocs, strict=True):
        assert pool_path(dst, str(toc)) in links, (toc, links)
        assert f"layer-ready ref={dst} digest={toc} format=zstd-chunked" in log
        assert registry.blob_bytes_sent(layer["digest"], since=mark) < layer["size"]
    pm("rmi", "-f", dst)


def test_a_running_container_reads_through_a_kill_and_a_takeover(
    root: Path, registry: RegistryServer, regconf: Path, tmp_path: Path
) -> None:
    """Issue 15 with podman 5.4: a running container keeps reading its files correctly through
    a kill -9 of the store's server and an upgrade handover, and is never restarted."""
    layers = lazy_layers("estargz")
    push_image(registry, "m54/takeover", "1", layers)
    ref = f"{registry.host}/m54/takeover:1"
    name = "m54-takeover"
    loop = (
        "trap 'exit 0' TERM; while true; do "
        'if [ "$(cat /etc/motd)" = "upper motd" ] && [ "$(cat /opt/keep/new.txt)" = new ]; '
        "then echo OK; else echo BAD; fi; sleep 0.2; done"
    )
    stop = threading.Event()

    def dropper() -> None:  # so that the container's reads keep reaching the store
        while not stop.wait(1.0):
            Path("/proc/sys/vm/drop_caches").write_text("1\n")

    with shared_dir(tmp_path / "als") as als_root:
        m = ProcessMount(als_root, "--registries-conf", str(regconf), *ALS_ARGS).start()
        drops = threading.Thread(target=dropper, daemon=True)
        try:
            with trixie_podman(root, tmp_path / "pm", als_root, regconf) as p:

                def lines() -> list[str]:
                    return p("logs", name).stdout.split()

                def more(n: int) -> None:
                    target = len(lines()) + n
                    wait_until(lambda: len(lines()) >= target, 60)

                p("pull", "--tls-verify=false", ref)
                p("run", "-d", "--name", name, "--network=none", ref, "sh", "-c", loop)
                drops.start()
                more(5)
                os.kill(int(store_status(als_root)["pid"]), signal.SIGKILL)
                wait_until(lambda: server_generation(als_root) == 2, 60)
                more(5)
                handed = takeover(als_root)
                assert handed.returncode == 0, handed.stderr
                assert server_generation(als_root) == 3
                more(5)
                stop.set()
                seen = lines()
                assert seen and set(seen) == {"OK"}, seen
                state = p("inspect", "-f", "{{.RestartCount}} {{.State.Status}}", name)
                assert state.stdout.split() == ["0", "running"]
                reads = store_status(als_root).get("fuse_requests", {})
                assert reads.get("read", 0) > 0, reads  # the last server served reads
                p("rm", "-f", "-t", "0", name)
        finally:
            stop.set()
            m.stop()
