"""``als extract``: the result equals ``tar -x`` of the layer, and nothing escapes DEST."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from als.cli import main
from als.errors import AlsError
from als.extract import extract_index
from als.formats import load_index
from tests.unit.conftest import (
    GO_BLOBS,
    GO_MADE_DIR,
    CountingReader,
    gz,
    sha256,
    simple_layer,
    wrap_estargz,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown, trusted.*)")


def _snapshot(root: Path, *, skip_mtime: set[str]) -> dict[str, dict[str, Any]]:
    """Everything tar -x sets, per relative path; hardlinks as groups of the same inode."""
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            d: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": {
                    k: os.getxattr(p, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(p, follow_symlinks=False))
                },
            }
            if rel not in skip_mtime:
                d["mtime_ns"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                d["content"] = sha256(p.read_bytes())
                first = inodes.setdefault(st.st_ino, rel)
                d["inode_of"] = first
                d["nlink"] = st.st_nlink
            elif stat.S_ISLNK(st.st_mode):
                d["link"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = d
    return out


def _tar_x(tmp_path: Path) -> Path:
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf",
         str(GO_MADE_DIR / "in.tar"), "-C", str(ref)],
        check=True,
    )  # fmt: skip
    return ref


@needs_root
@pytest.mark.parametrize("name", GO_BLOBS)
@pytest.mark.parametrize("whiteouts", ["overlay", "aufs"])
def test_go_blob_extracts_like_tar_x(
    tmp_path: Path, go_made_dir: Path, name: str, whiteouts: str
) -> None:
    ref = _tar_x(tmp_path)
    out = tmp_path / "out"
    rc = main(["extract", str(go_made_dir / name), str(out), f"--whiteouts={whiteouts}"])
    assert rc == 0
    # "dev" is implied (not in in.tar): tar -x gives it the current time, als the epoch.
    want = _snapshot(ref, skip_mtime={"dev"})
    got = _snapshot(out, skip_mtime={"dev"})
    assert "stargz.index.json" not in got
    assert ".no.prefetch.landmark" not in got and ".prefetch.landmark" not in got
    if whiteouts == "overlay":
        wh = want.pop("dir/.wh.gone")
        gone = got.pop("dir/gone")
        assert gone["type"] == stat.S_IFCHR and gone["rdev"] == (0, 0)
        assert (gone["uid"], gone["gid"]) == (wh["uid"], wh["gid"])
        # the whiteout changed dir's listing but its mtime is restored at the end
    assert got == want
    assert got["dir/big.bin"]["xattrs"] == {"user.foo": b"bar\x00baz"}
    assert got["dir/hl"]["inode_of"] == "dir/small.txt" or got["dir/small.txt"]["inode_of"] == (
        "dir/hl"
    )
    assert got["dir/hl"]["nlink"] == 2
    assert got["dev/null"]["rdev"] == (1, 3)
    assert got["dir/sl"]["link"] == "small.txt"


def _layer(entries: list[dict[str, Any]], files: dict[str, bytes] | None = None) -> bytes:
    region, toc = simple_layer(files or {})
    toc["entries"] += entries
    return wrap_estargz(region, toc)


def _extract(blob: bytes, dest: Path, whiteouts: str = "overlay") -> None:
    r = CountingReader(blob)
    ix = load_index(r, len(blob), layer="T")
    extract_index(ix, r, dest, whiteouts=whiteouts)


@needs_root
def test_opaque_whiteout_and_aufs(tmp_path: Path) -> None:
    blob = _layer(
        [{"name": "d/", "type": "dir", "mode": 0o755}, {"name": "d/.wh..wh..opq", "type": "reg"}],
        {"d/keep": b"k"},
    )
    _extract(blob, tmp_path / "ov")
    assert os.getxattr(tmp_path / "ov" / "d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(tmp_path / "ov" / "d")) == ["keep"]
    _extract(blob, tmp_path / "au", "aufs")
    assert sorted(os.listdir(tmp_path / "au" / "d")) == [".wh..wh..opq", "keep"]
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "au" / "d")


def test_preexisting_symlinks_in_dest_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "x").symlink_to(outside)  # a directory symlink where the layer has a directory
    (dest / "f").symlink_to(outside / "victim")  # a file symlink where the layer has a file
    blob = _layer(
        [{"name": "x/", "type": "dir", "mode": 0o755}],
        {"x/victim": b"evil", "f": b"evil"},
    )
    _extract(blob, dest)
    assert (outside / "victim").read_bytes() == b"original"
    assert sorted(os.listdir(outside)) == ["victim"]
    assert not (dest / "x").is_symlink() and (dest / "x" / "victim").read_bytes() == b"evil"
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"evil"


def test_symlinks_in_the_layer_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    blob = _layer(
        [
            {"name": "esc", "type": "symlink", "linkName": str(outside)},
            {"name": "rel", "type": "symlink", "linkName": "../outside/new"},
            {"name": "h", "type": "hardlink", "linkName": "esc"},
        ],
        {"plain": b"p"},
    )
    dest = tmp_path / "dest"
    _extract(blob, dest)
    assert os.readlink(dest / "esc") == str(outside)
    assert os.readlink(dest / "rel") == "../outside/new"
    assert (dest / "h").is_symlink() and os.lstat(dest / "h").st_ino == os.lstat(
        dest / "esc"
    ).st_ino
    assert os.listdir(outside) == []


def test_fifo_modes_and_times(tmp_path: Path) -> None:
    blob = _layer(
        [
            {
                "name": "p",
                "type": "fifo",
                "mode": 0o640,
                "modtime": "2021-01-02T03:04:05.123456789Z",
            },
            {"name": "ro/", "type": "dir", "mode": 0o555, "modtime": "2000-01-01T00:00:00Z"},
            {"name": "ro/sub/", "type": "dir", "mode": 0o700},
        ],
        {"ro/sub/file": b"data", "ro/x": b"x"},
    )
    dest = tmp_path / "d"
    _extract(blob, dest)
    st = os.lstat(dest / "p")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 1609556645_123456789
    st = os.lstat(dest / "ro")
    assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime_ns == 946684800 * 10**9
    assert (dest / "ro" / "sub" / "file").read_bytes() == b"data"


def test_corrupt_file_is_removed_and_cli_fails_with_one_line(tmp_path: Path) -> None:
    data = os.urandom(5000)
    region, toc = simple_layer({"good": b"fine", "bad": data})
    evil = gz(os.urandom(5000))
    bad_entry = next(e for e in toc["entries"] if e["name"] == "bad")
    start = bad_entry["offset"]
    # substitute a validly-compressed member of the same length is not needed: rebuild region
    region2 = region[:start] + evil + gz(b"\0" * 512)
    toc_entries = [e for e in toc["entries"] if e["name"] == "good"] + [bad_entry]
    blob = wrap_estargz(region2, {"version": 1, "entries": toc_entries})
    blob_path = tmp_path / "layer.bin"
    blob_path.write_bytes(blob)
    dest = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "als", "extract", str(blob_path), str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("als: error:")
    assert "bad" in lines[0] and sha256(data) in lines[0]
    assert (dest / "good").read_bytes() == b"fine"
    assert not (dest / "bad").exists()


def test_not_lazy_blob_is_refused_clearly(tmp_path: Path) -> None:
    blob_path = tmp_path / "plain.tar.gz"
    blob_path.write_bytes(gz(b"x" * 1000))
    proc = subprocess.run(
        [sys.executable, "-m", "als", "extract", str(blob_path), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "not lazily pullable" in proc.stderr and "gzip" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_extract_error_is_an_als_error(tmp_path: Path) -> None:
    blob = _layer([], {"f": b"x"})
    dest = tmp_path / "file-not-dir"
    dest.write_bytes(b"")
    with pytest.raises(AlsError, match="destination"):
        _extract(blob, dest)


def test_many_directories_and_distant_hardlinks(tmp_path: Path) -> None:
    # More directories than the fd cache holds, and hardlinks reaching back to early ones.
    files = {f"d{i:03}/sub/f": f"file {i}".encode() for i in range(150)}
    links = [
        {"name": f"links/l{i:03}", "type": "hardlink", "linkName": f"d{i:03}/sub/f"}
        for i in range(0, 150, 7)
    ]
    blob = _layer(links, files)
    dest = tmp_path / "d"
    _extract(blob, dest)
    for i in range(0, 150, 7):
        a = os.lstat(dest / f"d{i:03}" / "sub" / "f")
        b = os.lstat(dest / "links" / f"l{i:03}")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (dest / "d149" / "sub" / "f").read_bytes() == b"file 149"


@needs_root
def test_whiteouts_naming_the_directory_itself_are_dropped(tmp_path: Path) -> None:
    blob = _layer(
        [{"name": n, "type": "reg"} for n in ("d/.wh.", "d/.wh..", "d/.wh...", "d/.wh..wh.plnk")],
        {"d/keep": b"k"},
    )
    _extract(blob, tmp_path / "o")
    assert os.listdir(tmp_path / "o" / "d") == ["keep"]
    assert sorted(os.listdir(tmp_path / "o")) == ["d"]
