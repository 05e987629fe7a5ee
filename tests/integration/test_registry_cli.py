"""``als inspect REF`` against a real registry, with layers built by the project's writers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from als.cli import main
from tests.support.registry import RegistryServer, make_tar_layer, push_image

pytestmark = pytest.mark.registry

layers_mod = pytest.importorskip("tests.support.layers")


@pytest.fixture(scope="module")
def mixed_image(registry: RegistryServer) -> tuple[str, list[Any]]:
    files = {"etc/os-release": b"ID=test\n", "usr/bin/tool": os.urandom(50_000)}
    layers = [
        layers_mod.make_layer(files, "estargz"),
        layers_mod.make_layer(files, "zstd-chunked"),
        make_tar_layer({"plain.txt": b"plain gzip\n"}),
    ]
    push_image(registry, "cli/mixed", "v1", layers)
    return f"{registry.host}/cli/mixed:v1", layers


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().out


def test_inspect_json(
    mixed_image: tuple[str, list[Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref, layers = mixed_image
    empty = tmp_path / "registries.conf"
    empty.write_text("")
    rc, out = _run(["inspect", ref, "--json", "--registries-conf", str(empty)], capsys)
    assert rc == 0
    doc = json.loads(out)
    got = doc["layers"]
    assert [g["digest"] for g in got] == [la.digest for la in layers]
    assert [g["format"] for g in got] == ["estargz", "zstd-chunked", "gzip"]
    assert [g["lazy"] for g in got] == [True, True, False]
    assert got[0]["toc_digest"] == layers[0].toc_digest
    assert [g["diff_id"] for g in got] == [la.diff_id for la in layers]


def test_inspect_probe_text(
    mixed_image: tuple[str, list[Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref, layers = mixed_image
    empty = tmp_path / "registries.conf"
    empty.write_text("")
    rc, out = _run(["inspect", ref, "--probe", "--registries-conf", str(empty)], capsys)
    assert rc == 0
    assert out.count("(from probe)") == 3
    assert "estargz (from probe)" in out and "zstd-chunked (from probe)" in out
    assert "gzip (from probe)" in out
    assert "3 (2 lazily pullable)" in out
    assert layers[1].toc_digest in out


def test_inspect_missing_image(
    registry: RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "registries.conf"
    empty.write_text("")
    rc = main(["inspect", f"{registry.host}/cli/nothing:here", "--registries-conf", str(empty)])
    assert rc == 1
    assert "not found" in capsys.readouterr().err
