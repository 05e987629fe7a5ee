"""End to end: Debian 12's buildah 1.28 builds on a lazily served image, podman runs the result.

buildah and podman share one private storage (the Podman helper's storage.conf, whose
``additionallayerstores`` names a real als-mount). ``buildah from`` pulls an eStargz image from
the local registry through the store; ``buildah run`` runs a command in the working container,
once with the OCI isolation (runc, buildah's default here) and once with ``chroot`` (the
isolation buildah uses inside containers and unprivileged builds); ``buildah commit`` makes an
image of it, and ``podman run`` runs that image.

The pull was lazy: the layers' ``diff`` links into the pool, the store logged ``layer-ready
... lazy=true`` for each, and the registry sent less than half of each blob by the end (the
3 MiB of data nobody reads stays there, through the run and the commit too).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_podman import READ, UPPER, base_spec
from tests.support.layers import make_layer
from tests.support.mount import ProcessMount
from tests.support.podman import Podman, e2e_marks
from tests.support.registry import RegistryServer, push_image

BUILDAH = shutil.which("buildah")
pytestmark = [
    *e2e_marks(),
    pytest.mark.skipif(BUILDAH is None, reason="buildah not installed (scripts/bootstrap)"),
]

PRIORITIZED = ["bin/busybox", "bin/sh", "etc/motd", "etc/os-release"]
BUILD_CMD = "cat /etc/motd; ls /opt/keep; sha256sum /data/read.bin | head -c 64; echo; " + (
    "echo built by buildah > /built.txt"
)


@pytest.fixture
def als(regconf: Path, tmp_path: Path) -> Iterator[ProcessMount]:
    """A store of its own per test: nothing cached from another test hides a fetch."""
    with ProcessMount(
        tmp_path / "als", "--registries-conf", str(regconf), "--no-background-fetch"
    ) as m:
        yield m


def buildah(pm: Podman, *args: str) -> str:
    """buildah with the same storage.conf and registries.conf as ``pm``; stdout."""
    assert BUILDAH is not None
    p = subprocess.run(
        [BUILDAH, *args],
        env=pm.env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if p.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


@pytest.mark.parametrize("isolation", ["oci", "chroot"])
def test_from_run_commit_on_a_lazy_image(
    isolation: str, registry: RegistryServer, regconf: Path, als: ProcessMount, tmp_path: Path
) -> None:
    layers = [make_layer(base_spec(), "estargz", prioritized=PRIORITIZED), make_layer(UPPER)]
    repo = f"buildah/{isolation}"
    push_image(registry, repo, "1", layers)
    ref = f"{registry.host}/{repo}:1"
    built = f"localhost/als-buildah-{isolation}:1"
    mark = registry.mark()
    pm = Podman(tmp_path / "podman", regconf, als_pool=als.pool)
    try:
        ctr = buildah(pm, "from", "--tls-verify=false", ref).strip()
        # buildah's pull went through the store: each layer's diff links into the pool
        links = set(pm.layer_diff_links().values())
        b64ref = base64.b64encode(ref.encode()).decode()
        for layer in layers:
            assert str(als.pool / b64ref / layer.digest / "diff") in links, (layer.digest, links)
            assert f"layer-ready ref={ref} digest={layer.digest} format=estargz lazy=true" in (
                als.log()
            )

        # oci: runc, with no network at all; chroot shares the host's network (buildah refuses
        # any other) and needs no runtime
        how = ["--runtime", "runc", "--network", "none"] if isolation == "oci" else []
        out = buildah(pm, "run", "--isolation", isolation, *how, ctr, "--", "sh", "-c", BUILD_CMD)
        assert out == f"upper motd\nnew.txt\n{hashlib.sha256(READ).hexdigest()}\n"

        before_commit = {layer.digest: registry.blob_bytes_sent(layer.digest) for layer in layers}
        buildah(pm, "commit", ctr, built)
        # the commit reused the store's layers: no copy of them, no download
        assert set(pm.layer_diff_links().values()) == links
        after_commit = {layer.digest: registry.blob_bytes_sent(layer.digest) for layer in layers}
        assert after_commit == before_commit
        diff_ids = pm("image", "inspect", "--format", "{{json .RootFS.Layers}}", built).stdout
        for layer in layers:
            assert layer.diff_id in diff_ids
        assert diff_ids.count("sha256:") == len(layers) + 1  # buildah's layer on top

        out = pm.run(built, "sh", "-c", "cat /built.txt /etc/motd; ls /opt").stdout
        assert out == "built by buildah\nupper motd\nkeep\n"

        for layer in layers:
            sent = registry.blob_bytes_sent(layer.digest, since=mark)
            assert sent < 0.5 * layer.size, (layer.digest, sent, layer.size)
    finally:
        subprocess.run(
            [BUILDAH or "buildah", "rm", "--all"],
            env=pm.env,
            capture_output=True,
            check=False,
            timeout=60,
        )
        pm("rmi", "--all", "--force", check=False)
        pm.reset()
