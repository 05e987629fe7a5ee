"""``als inspect BLOB``: text and JSON output for every Go-made blob and plain layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from als.cli import main
from tests.unit.conftest import GO_BLOBS, gz, simple_layer, wrap_estargz, zst

FORMATS = {
    "esgz.bin": "estargz",
    "esgz-zstd.bin": "estargz-zstd",
    "zchunked.bin": "zstd-chunked",
    "legacy-stargz-footer47.bin": "stargz-legacy",
}


def _inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    rc = main(["inspect", "--json", *args])
    out = capsys.readouterr().out
    return rc, json.loads(out)


@pytest.mark.parametrize("name", GO_BLOBS)
def test_inspect_json_go_blobs(
    capsys: pytest.CaptureFixture[str], go_made_dir: Path, name: str
) -> None:
    rc, info = _inspect_json(capsys, str(go_made_dir / name))
    assert rc == 0
    assert info["format"] == FORMATS[name] and info["lazy"] is True
    assert info["entries"] == 10
    assert info["regular_files"] == 4 and info["hardlinks"] == 1 and info["whiteouts"] == 1
    assert info["uncompressed_bytes"] == 10006
    assert info["verified"] is True
    assert isinstance(info["toc_digest"], str) and info["toc_digest"].startswith("sha256:")
    landmark = info["landmark"]
    assert isinstance(landmark, dict)
    assert landmark["type"] == (None if name == "zchunked.bin" else "no-prefetch")


def test_inspect_with_annotations_file(
    capsys: pytest.CaptureFixture[str], go_made_dir: Path, tmp_path: Path
) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "annotations": {
                    "io.containers.zstd-chunked.manifest-position": "1105:622:2088:1",
                    "io.containers.zstd-chunked.manifest-checksum": "sha256:"
                    "b4e999a8f34cca36eb013e738c343ac1dac3136f322c4bdc49ace0199b349bdd",
                }
            }
        )
    )
    rc, info = _inspect_json(capsys, str(go_made_dir / "zchunked.bin"), "--annotations", str(ann))
    assert rc == 0 and info["toc_verified_against_annotation"] is True
    assert info["toc_digest"] == (
        "sha256:b4e999a8f34cca36eb013e738c343ac1dac3136f322c4bdc49ace0199b349bdd"
    )


def test_inspect_wrong_annotation_fails_with_one_line(go_made_dir: Path, tmp_path: Path) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "1" * 64}))
    proc = subprocess.run(
        [sys.executable, "-m", "als", "inspect", str(go_made_dir / "esgz.bin"),
         "--annotations", str(ann)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mismatch" in lines[0] and "1111" in lines[0]


def test_inspect_text(capsys: pytest.CaptureFixture[str], go_made_dir: Path) -> None:
    assert main(["inspect", str(go_made_dir / "esgz.bin")]) == 0
    out = capsys.readouterr().out
    assert "estargz (lazy)" in out
    assert "sha256:673b1f2d" in out
    assert "no-prefetch" in out and "verified:      yes" in out


@pytest.mark.parametrize(
    ("data", "fmt"),
    [(gz(b"x" * 100), "gzip"), (zst(b"x" * 100), "zstd"), (None, "tar")],
)
def test_inspect_not_lazy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data: bytes | None, fmt: str
) -> None:
    if data is None:
        t = bytearray(2048)
        t[257:262] = b"ustar"
        data = bytes(t)
    p = tmp_path / "blob"
    p.write_bytes(data)
    rc, info = _inspect_json(capsys, str(p))
    assert rc == 0
    assert info["format"] == fmt and info["lazy"] is False and info["toc_digest"] is None
    assert main(["inspect", str(p)]) == 0
    assert "not lazily pullable" in capsys.readouterr().out


def test_inspect_reports_corruption(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = os.urandom(3000)
    region, toc = simple_layer({"f": data})
    blob = bytearray(wrap_estargz(region, toc))
    blob[toc["entries"][0]["offset"] + 50] ^= 0xFF
    p = tmp_path / "blob"
    p.write_bytes(bytes(blob))
    rc = main(["inspect", "--json", str(p)])
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert rc == 1 and info["verified"] is False and "f" in info["error"]
    assert "als: error:" in captured.err


def test_inspect_garbage_is_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "junk"
    p.write_bytes(b"not a layer" * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "als", "inspect", str(p)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("als: error:") and "unrecognised" in proc.stderr
