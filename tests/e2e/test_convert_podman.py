"""End to end: ``als convert`` makes plain gzip images lazy, and podman 4.3.1 pulls them lazily
through als and runs them with the same output; a ``containers-storage:`` source; an
``--optimize`` run whose recorded files end up first in the converted layer."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from als.cli import main
from als.formats import load_index
from als.oci import toc_digest_of
from als.registry import RegistryClient
from tests.e2e.test_podman import READ, UPPER, base_spec
from tests.support.layers import make_layer, make_tar
from tests.support.mount import ProcessMount
from tests.support.podman import RUN_FLAGS, Podman, e2e_marks
from tests.support.registry import RegistryServer, push_image

pytestmark = e2e_marks()

CMD = "cat /etc/motd; sha256sum /data/read.bin | head -c 64; echo; ls /opt/keep"
EXPECTED = f"upper motd\n{hashlib.sha256(READ).hexdigest()}\nnew.txt\n"
RUN_ARGS = [f"--optimize-run-arg={a}" for a in RUN_FLAGS if a not in ("--network", "none")]


@pytest.fixture(scope="module")
def als(regconf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessMount]:
    root = tmp_path_factory.mktemp("als") / "root"
    with ProcessMount(root, "--registries-conf", str(regconf), "--no-background-fetch") as m:
        yield m


@pytest.fixture(scope="module")
def plain(registry: RegistryServer) -> str:
    push_image(registry, "conv/plain", "1", [make_layer(base_spec(), "gzip"),
                                             make_layer(UPPER, "gzip")])  # fmt: skip
    return f"docker://{registry.host}/conv/plain:1"


def _convert(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc = main(["convert", "--json", "--no-record", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result: dict[str, Any] = json.loads(out.out)
    return result


def _lazy_run(ref: str, regconf: Path, als: ProcessMount, base: Path, digests: list[str]) -> str:
    pm = Podman(base, regconf, als_pool=als.pool)
    try:
        pm.pull(ref)
        out = pm.run(ref, "sh", "-c", CMD).stdout
        links = pm.layer_diff_links()
        b64ref = base64.b64encode(ref.encode()).decode()
        for d in digests:
            assert str(als.pool / b64ref / d / "diff") in links.values(), (d, links)
        return out
    finally:
        pm.reset()


@pytest.mark.parametrize("fmt", ["estargz", "zstd-chunked"])
def test_convert_pull_lazily_and_run(
    fmt: str,
    plain: str,
    registry: RegistryServer,
    regconf: Path,
    als: ProcessMount,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dest = f"{registry.host}/conv/{fmt}:1"
    out = _convert(capsys, plain, f"docker://{dest}", "--format", fmt)
    digests = [ly["digest"] for ly in out["images"][0]["layers"]]
    assert _lazy_run(dest, regconf, als, tmp_path / "pm", digests) == EXPECTED
    for d in digests:
        assert f"layer-ready ref={dest} digest={d} format={fmt}" in als.log()


def test_containers_storage_source(
    registry: RegistryServer,
    regconf: Path,
    als: ProcessMount,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builder = Podman(tmp_path / "builder", regconf)
    try:
        tar = tmp_path / "rootfs.tar"
        tar.write_bytes(make_tar({**base_spec(), "etc/motd": b"upper motd\n"}))
        builder("import", str(tar), "localhost/conv-src:1")
        monkeypatch.setenv("CONTAINERS_STORAGE_CONF", builder.env["CONTAINERS_STORAGE_CONF"])
        dest = f"{registry.host}/conv/from-storage:1"
        out = _convert(capsys, "containers-storage:localhost/conv-src:1", f"docker://{dest}")
    finally:
        builder.reset()
    (layer,) = out["images"][0]["layers"]
    assert layer["action"] == "converted"  # podman save writes the layer as it has it
    pm = Podman(tmp_path / "pm", regconf, als_pool=als.pool)
    try:
        pm.pull(dest)
        assert pm.run(dest, "cat", "/etc/motd").stdout == "upper motd\n"
        assert len(pm.layer_diff_links()) == 1
    finally:
        pm.reset()


def test_optimize_puts_the_opened_files_first(
    plain: str,
    registry: RegistryServer,
    regconf: Path,
    als: ProcessMount,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dest = f"{registry.host}/conv/optimized:1"
    run = ["sh", "-c", "cat /etc/motd >/dev/null; cat /data/read.bin >/dev/null; sleep 60"]
    # A command that fails: an error, and nothing at DEST ...
    failing = [plain, f"docker://{dest}", "--optimize", "--optimize-seconds", "4", *RUN_ARGS]
    assert (
        main(["convert", *failing, "--no-record", "--", "sh", "-c", "cat /etc/motd; exit 3"]) == 1
    )
    assert "status 3" in capsys.readouterr().err
    with RegistryClient() as c, pytest.raises(Exception, match="not found"):
        c.manifest(dest)
    # ... unless what was recorded is to be kept.
    kept = _convert(capsys, *failing, "--optimize-allow-failure", "--", "sh", "-c",
                    "cat /etc/motd; exit 3")  # fmt: skip
    assert kept["images"][0]["layers"][1]["prioritized"] >= 1
    out = _convert(capsys, plain, f"docker://{dest}", "--optimize", "--optimize-seconds", "4",
                   *RUN_ARGS, "--", *run)  # fmt: skip
    base, upper = out["images"][0]["layers"]
    assert base["prioritized"] >= 2 and upper["prioritized"] >= 1  # busybox, read.bin; motd
    with RegistryClient() as c:
        img = c.resolve(dest)
        desc = img.layers[0]
        blob = c.fetch_blob(dest, desc.digest, size=desc.size)
    assert toc_digest_of(desc.annotations)

    def read(ranges: Any) -> list[bytes]:
        return [blob[o : o + n] for o, n in ranges]

    ix = load_index(read, len(blob), annotations=dict(desc.annotations))
    assert ix.prefetch_end is not None
    first = {ix.path(i) for i in ix.files_in_order(ix.prefetch_end)}
    assert {"data/read.bin", "bin/busybox"} <= first
    assert "data/unread.bin" not in first
    digests = [ly.digest for ly in img.layers]
    assert _lazy_run(dest, regconf, als, tmp_path / "pm", digests) == EXPECTED
