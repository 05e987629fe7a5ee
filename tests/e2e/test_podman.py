"""End to end: Debian's podman 4.3.1 pulls and runs images through als and a real registry.

Proof that the pull was lazy comes from three places: podman's layer ``diff`` is a symlink into
the store, the registry's access log shows only part of each blob was sent, and the store's
log has a ``layer-ready ... lazy=true`` line per layer.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.layers import FileSpec, make_layer, make_tar
from tests.support.mount import ProcessMount
from tests.support.podman import BUSYBOX, Podman, e2e_marks, write_registries_conf
from tests.support.registry import RegistryServer, push_image

pytestmark = e2e_marks()

APPLETS = ["sh", "cat", "ls", "sha256sum", "head", "wc", "echo"]
rng = random.Random(42)
UNREAD = rng.randbytes(3 * 1024 * 1024)  # incompressible and never read: stays in the registry
READ = rng.randbytes(200 * 1024)
CMD = (
    "cat /etc/motd; cat /etc/os-release; ls /opt; ls /opt/keep; "
    "sha256sum /data/read.bin | head -c 64; echo; ls /usr/lib | wc -l"
)


def base_spec() -> dict[str, bytes | FileSpec]:
    spec: dict[str, bytes | FileSpec] = {
        "bin/busybox": FileSpec(content=Path(BUSYBOX).read_bytes(), mode=0o755),
    }
    for a in APPLETS:
        spec[f"bin/{a}"] = FileSpec(type="symlink", link="busybox")
    spec.update(
        {
            "etc/os-release": b"NAME=als-e2e\n",
            "etc/motd": b"lower motd\n",
            "opt/gone.txt": b"to be whited out\n",
            "opt/keep/old.txt": b"hidden by the opaque dir\n",
            "data/read.bin": READ,
            "data/unread.bin": UNREAD,
        }
    )
    for i in range(20):
        spec[f"usr/lib/lib{i}.so"] = bytes([i]) * 1000
    return spec


UPPER: dict[str, bytes | FileSpec] = {
    "etc/motd": b"upper motd\n",
    "opt/.wh.gone.txt": b"",
    "opt/keep/.wh..wh..opq": b"",
    "opt/keep/new.txt": b"new\n",
    "data/more.bin": rng.randbytes(1024 * 1024),
}


@pytest.fixture(scope="module")
def als(regconf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessMount]:
    root = tmp_path_factory.mktemp("als") / "root"
    with ProcessMount(root, "--registries-conf", str(regconf), "--no-background-fetch") as m:
        yield m


@pytest.fixture(scope="module")
def baseline(
    registry: RegistryServer, regconf: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The expected output: a normal pull of the same image as plain gzip, without als."""
    layers = [make_layer(base_spec(), "gzip"), make_layer(UPPER, "gzip")]
    push_image(registry, "e2e/plain", "1", layers)
    pm = Podman(tmp_path_factory.mktemp("podman-plain"), regconf)
    ref = f"{registry.host}/e2e/plain:1"
    pm.pull(ref)
    out = pm.run(ref, "sh", "-c", CMD).stdout
    pm.reset()
    assert "upper motd" in out
    return out


@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked-1.43", "zstd-chunked", "estargz-zstd"])
def test_lazy_pull_and_run(
    fmt: str,
    registry: RegistryServer,
    regconf: Path,
    als: ProcessMount,
    baseline: str,
    tmp_path: Path,
) -> None:
    prioritized = ["bin/busybox", "bin/sh", "etc/motd", "etc/os-release"]
    kw: dict[str, Any] = {"prioritized": prioritized} if fmt.startswith("estargz") else {}
    layers = [make_layer(base_spec(), fmt, **kw), make_layer(UPPER, fmt)]
    repo = f"e2e/{fmt.replace('.', '-')}"
    push_image(registry, repo, "1", layers)
    ref = f"{registry.host}/{repo}:1"
    mark = registry.mark()
    pm = Podman(tmp_path / "podman", regconf, als_pool=als.pool)
    try:
        pm.pull(ref)
        out = pm.run(ref, "sh", "-c", CMD).stdout
        assert out == baseline
        # podman's layers are the store's: diff is a symlink into the pool, for each layer
        links = pm.layer_diff_links()
        b64ref = base64.b64encode(ref.encode()).decode()
        for layer in layers:
            want = str(als.pool / b64ref / layer.digest / "diff")
            assert want in links.values(), (want, links)
        # the registry sent only part of each blob (the unread data stayed there)
        for layer in layers:
            sent = registry.blob_bytes_sent(layer.digest, since=mark)
            assert sent < 0.5 * layer.size, (fmt, layer.digest, sent, layer.size)
        log = als.log()
        for layer in layers:
            assert f"layer-ready ref={ref} digest={layer.digest} format=" in log
        # podman counted its use of each layer: `use` was created (ENOENT) at least once
        assert f"layer-use ref={ref} digest={layers[0].digest}" in log
        pm("rmi", "-f", ref)
        assert f"layer-release ref={ref} digest={layers[0].digest}" in als.log()
    finally:
        pm.reset()


def test_plain_gzip_falls_back(
    registry: RegistryServer, regconf: Path, als: ProcessMount, baseline: str, tmp_path: Path
) -> None:
    ref = f"{registry.host}/e2e/plain:1"
    pm = Podman(tmp_path / "podman", regconf, als_pool=als.pool)
    try:
        pm.pull(ref)
        assert pm.run(ref, "sh", "-c", CMD).stdout == baseline
        assert pm.layer_diff_links() == {}
        assert f"layer-refused ref={ref}" in als.log()
    finally:
        pm.reset()


def test_podman_pushed_zstd_chunked(tmp_path: Path) -> None:
    """An image that podman 4.3.1 itself pushed as zstd:chunked (containers/storage 1.43)."""
    # A registry of its own: podman reuses (as gzip) any layer the registry already has.
    with RegistryServer(tmp_path / "reg") as reg:
        conf = write_registries_conf(tmp_path / "registries.conf", [reg.host])
        builder = Podman(tmp_path / "builder", conf)
        tar = tmp_path / "rootfs.tar"
        tar.write_bytes(make_tar(base_spec()))
        builder("import", str(tar), "localhost/e2e-src:1")
        ref = f"{reg.host}/e2e/podman-zstd:1"
        builder(
            "push",
            "--tls-verify=false",
            "--compression-format",
            "zstd:chunked",
            "localhost/e2e-src:1",
            ref,
        )
        builder.reset()
        manifest = (
            reg.session()
            .get(
                f"{reg.url}/v2/e2e/podman-zstd/manifests/1",
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                timeout=10,
            )
            .json()
        )
        (desc,) = manifest["layers"]
        assert "io.containers.zstd-chunked.manifest-checksum" in desc["annotations"]
        with ProcessMount(tmp_path / "als2", "--registries-conf", str(conf)) as store:
            pm = Podman(tmp_path / "podman", conf, als_pool=store.pool)
            try:
                mark = reg.mark()
                pm.pull(ref)
                out = pm.run(ref, "sh", "-c", "cat /etc/motd; sha256sum /data/read.bin").stdout
                assert out.startswith("lower motd\n")
                assert hashlib.sha256(READ).hexdigest() in out
                assert len(pm.layer_diff_links()) == 1
                assert reg.blob_bytes_sent(desc["digest"], since=mark) < 0.5 * desc["size"]
                assert f"digest={desc['digest']} format=zstd-chunked lazy=true" in store.log()
            finally:
                pm.reset()
