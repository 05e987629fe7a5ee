"""``als convert``: formats, compressed input, prioritized files, annotations file, errors."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard

from als.cli import main
from als.formats import load_index, read_file
from tests.support.layers import make_tar
from tests.support.tarspec import FileSpec

TOOL = bytes(range(256)) * 40
SPEC: dict[str, bytes | str | FileSpec] = {
    "etc/hostname": b"box\n",
    "usr/bin/tool": TOOL,
    "usr/bin/alias": FileSpec(type="symlink", link="tool"),
}


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize(
    ("fmt", "lazy"),
    [
        ("estargz", "estargz"),
        ("estargz-zstd", "estargz-zstd"),
        ("zstd-chunked", "zstd-chunked"),
        ("zstd-chunked-1.43", "zstd-chunked"),
    ],
)
@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
def test_convert_writes_a_readable_blob_and_describes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, lazy: str, compress: str
) -> None:
    tar = make_tar(SPEC)
    src = tmp_path / "in"
    if compress == "gzip":
        src.write_bytes(gzip.compress(tar))
    elif compress == "zstd":
        src.write_bytes(zstandard.ZstdCompressor().compress(tar))
    else:
        src.write_bytes(tar)
    dest = tmp_path / "out.blob"
    ann = tmp_path / "ann.json"
    rc = main(
        ["convert", str(src), str(dest), "--format", fmt, "--chunk-size", "4096",
         "--annotations-out", str(ann)]
    )  # fmt: skip
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    blob = dest.read_bytes()
    assert info["digest"] == sha(blob) and info["size"] == len(blob)
    assert info["format"] == lazy
    annotations = json.loads(ann.read_text())
    assert annotations == info["annotations"] and annotations
    assert set(info) == {
        "format", "digest", "size", "diff_id", "toc_digest", "media_type", "annotations",
    }  # fmt: skip

    def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [blob[o : o + n] for o, n in ranges]

    index = load_index(read, len(blob), annotations=annotations)
    assert index.toc_digest == info["toc_digest"]
    tool = index.lookup("usr/bin/tool")
    assert tool is not None and read_file(index, tool, read) == TOOL
    if fmt.startswith("zstd-chunked"):
        assert info["diff_id"] == sha(tar)
        assert len(index.chunks(tool)) == 3  # fixed 4096-byte chunks of 10240 bytes


def test_convert_prioritize_file_and_plain_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.tar"
    src.write_bytes(make_tar(SPEC))
    plist = tmp_path / "prio"
    plist.write_text("usr/bin/tool\n\n")
    dest = tmp_path / "out"
    argv = ["convert", str(src), str(dest), "--prioritize-file", str(plist)]
    assert main([*argv, "--prioritize", "etc/hostname"]) == 0
    info = json.loads(capsys.readouterr().out)
    blob = dest.read_bytes()
    index = load_index(lambda rs: [blob[o : o + n] for o, n in rs], len(blob))
    assert index.prefetch_end is not None
    assert info["media_type"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    for fmt, media in (("gzip", "tar+gzip"), ("zstd", "tar+zstd")):
        assert main(["convert", str(src), str(dest), "--format", fmt]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["toc_digest"] == "" and info["annotations"] == {}
        assert info["media_type"].endswith(media) and info["diff_id"] == sha(src.read_bytes())


def test_convert_errors_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("als: error: cannot read") and err.count("\n") == 1
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x01" * 1024)
    assert main(["convert", str(bad), str(tmp_path / "o")]) == 1
    assert "checksum" in capsys.readouterr().err
    src = tmp_path / "in.tar"
    src.write_bytes(make_tar(SPEC))
    args = ["convert", str(src), str(tmp_path / "o"), "--format", "zstd-chunked"]
    assert main([*args, "--prioritize", "x"]) == 1
    assert "eStargz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``als inspect BLOB | head``: no traceback when the reader has gone."""
    import subprocess
    import sys

    from tests.support.layers import make_layer

    blob = tmp_path / "layer"
    blob.write_bytes(make_layer(SPEC, "estargz").blob)
    proc = subprocess.Popen(
        [sys.executable, "-m", "als", "inspect", str(blob)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has started: the reader is gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""
