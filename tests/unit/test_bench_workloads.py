"""The pure helpers of the issue-6 benchmark (scripts/bench_perf.py, scripts/bench_workloads.py):
strace parsing, layer differences and whiteouts, the layer cache, the byte accounting of the
access log, targets, and the outputs. No timings are asserted."""

from __future__ import annotations

import importlib
import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

# The scripts are not a package (nor on mypy's path): import them by name.
bp = importlib.import_module("bench_perf")
bw = importlib.import_module("bench_workloads")

from als.formats.tarsplit import scan_tar  # noqa: E402
from als.formats.writer import build_estargz  # noqa: E402
from tests.support.registry import AccessEntry  # noqa: E402
from tests.support.tarspec import FileSpec, tar_from_spec  # noqa: E402


def test_parse_strace_keeps_successful_opens_after_chroot_in_order() -> None:
    text = "\n".join(
        [
            # the host's, before the chroot
            '100 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3',
            '100 chroot("/srv/root") = 0',
            '100 execve("/usr/bin/python3", ["python3", "-c", "..."], 0x7ff /* 3 vars */) = 0',
            '100 openat(AT_FDCWD, "/usr/lib/libm.so.6", O_RDONLY|O_CLOEXEC) = 3',
            '100 openat(AT_FDCWD, "/usr/lib/missing.so", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such)',
            '101 open("/usr/lib/libm.so.6", O_RDONLY) = 4',
            '101 openat(AT_FDCWD, "/usr/lib/python3/numpy", O_RDONLY|O_DIRECTORY) = 5',
            "101 +++ exited with 0 +++",
        ]
    )
    files = {"/usr/bin/python3": "usr/bin/python3.11", "/usr/lib/libm.so.6": "usr/lib/libm.so.6"}
    got = bw.parse_strace(text, files.get)
    assert got == ["usr/bin/python3.11", "usr/lib/libm.so.6"]


def test_resolve_in_follows_links_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3.11").write_bytes(b"\x7fELF")
    (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin/abs").symlink_to("/usr/bin/python3")  # absolute: inside the root
    assert bw._resolve_in(root, "/bin/python3") == "usr/bin/python3.11"
    assert bw._resolve_in(root, "/usr/bin/abs") == "usr/bin/python3.11"
    assert bw._resolve_in(root, "/usr/bin/../bin/python3.11") == "usr/bin/python3.11"
    assert bw._resolve_in(root, "/usr/bin") is None  # a directory
    assert bw._resolve_in(root, "/nope") is None
    (root / "loop").symlink_to("loop")
    assert bw._resolve_in(root, "/loop") is None


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


def test_layer_diff_adds_changes_with_parents_and_whites_out_removals(tmp_path: Path) -> None:
    lower_root, upper_root = tmp_path / "lower", tmp_path / "upper"
    common = {
        "etc/keep": b"same",
        "etc/edit": b"old",
        "var/gone/a": b"1",
        "var/gone/b": b"2",
        "usr/old": b"x",
    }
    _tree(lower_root, common)
    _tree(
        upper_root,
        {k: v for k, v in common.items() if not k.startswith("var/gone") and k != "usr/old"},
    )
    _tree(upper_root, {"etc/edit": b"new!", "usr/lib/new/mod.py": b"print()"})
    (upper_root / "var").mkdir(exist_ok=True)
    lower, upper = bw.snapshot(lower_root), bw.snapshot(upper_root)
    paths, whiteouts = bw.layer_diff(lower, upper)
    assert "etc/edit" in paths and "usr/lib/new/mod.py" in paths
    assert {"usr", "usr/lib", "usr/lib/new", "etc"} <= set(paths)
    assert "etc/keep" not in paths
    # parents come before children
    assert paths.index("usr/lib") < paths.index("usr/lib/new/mod.py")
    # one whiteout for the removed directory, none for its children
    assert sorted(whiteouts) == ["usr/.wh.old", "var/.wh.gone"]


def test_tar_tree_is_read_by_the_writers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root, {"usr/bin/tool": b"#!/bin/sh\necho hi\n", "etc/conf": b"a=1\n"})
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "etc/conf", root / "etc/conf.hard")
    (root / "usr/bin/link").symlink_to("tool")
    os.mkfifo(root / "etc/fifo")
    snap = bw.snapshot(root)
    out = tmp_path / "layer.tar"
    bw.tar_tree(root, bw.tree_paths(snap), ["etc/.wh.old"], out)
    tar = out.read_bytes()
    names = [m.name for m in scan_tar(tar).members]
    assert {
        "usr/bin/tool",
        "etc/conf",
        "etc/conf.hard",
        "usr/bin/link",
        "etc/fifo",
        "etc/.wh.old",
    } <= set(names)
    with tarfile.open(out) as tf:
        assert tf.getmember("etc/conf.hard").islnk() or tf.getmember("etc/conf").islnk()
        assert tf.getmember("usr/bin/link").issym()
        assert tf.getmember("etc/fifo").isfifo()
        assert stat.S_IMODE(tf.getmember("usr/bin/tool").mode) == 0o755
        assert tf.getmember("usr/bin/tool").uname == ""
    layer = build_estargz(tar, prioritized=["usr/bin/tool"])
    assert layer.size == len(layer.blob) and layer.toc_digest
    assert bw.tar_entries(tar) == len(names)


def test_saved_layers_load_back_and_a_truncated_blob_is_rebuilt(tmp_path: Path) -> None:
    tar = tar_from_spec({"bin/x": FileSpec(content=b"x" * 5000, mode=0o755)})
    built = bw.build_variant("estargz-prio", tar, ["bin/x", "not/in/layer"])
    p = tmp_path / "v" / "layer-0"
    p.parent.mkdir()
    bw.save_layer(built, p)
    assert bw.load_layer(p) == built
    p.with_suffix(".blob").write_bytes(built.blob[:-1])
    assert bw.load_layer(p) is None
    with pytest.raises(ValueError, match="unknown variant"):
        bw.build_variant("tar.bz2", tar, [])


def test_cached_layers_build_once(tmp_path: Path) -> None:
    tars = [tar_from_spec({"a": b"1"}), tar_from_spec({"b": b"2" * 100})]
    first = bw.cached_layers(tmp_path, tars, [], ["gzip", "estargz"])
    mtime = (tmp_path / "gzip" / "layer-1.blob").stat().st_mtime_ns
    again = bw.cached_layers(tmp_path, tars, [], ["gzip", "estargz"])
    assert again == first
    assert (tmp_path / "gzip" / "layer-1.blob").stat().st_mtime_ns == mtime
    assert [x.format for x in first["estargz"]] == ["estargz", "estargz"]


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bw.cache_root() == tmp_path / "als-bench" / bw.VERSION


def _entry(method: str, path: str, sent: int) -> AccessEntry:
    return AccessEntry(method, path, 200, sent, "test", "127.0.0.1")


def test_layer_bytes_sent_counts_gets_of_the_named_blobs_only() -> None:
    log = [
        _entry("GET", "/v2/bench/large/blobs/sha256:aa", 100),
        _entry("GET", "/v2/bench/large/blobs/sha256:aa", 50),
        _entry("HEAD", "/v2/bench/large/blobs/sha256:aa", 0),
        _entry("GET", "/v2/bench/large/blobs/sha256:bb", 7),
        _entry("GET", "/v2/bench/large/blobs/sha256:cfg", 999),
        _entry("GET", "/v2/bench/large/manifests/estargz", 888),
    ]
    assert bp.layer_bytes_sent(log, ["sha256:aa", "sha256:bb"]) == 157
    assert bp.layer_bytes_sent(log, []) == 0


def test_targets_are_judged_on_ratio_or_absolute_value() -> None:
    fast = bp.make_row("lazy", "large", "estargz-prio", "lazy.bg_off.seconds", 2.0, "s", 10.0)
    assert fast.ratio == pytest.approx(0.2) and fast.met is True and fast.target
    slow = bp.make_row("lazy", "large", "estargz-prio", "lazy.bg_off.seconds", 5.0, "s", 10.0)
    assert slow.met is False
    other = bp.make_row("lazy", "large", "estargz", "lazy.bg_off.seconds", 5.0, "s", 10.0)
    assert other.target is None and other.met is None
    speed = bp.make_row(
        "fs", "small", "estargz", "fs.largest_warm.throughput", 900.0, "MB/s", 3000.0
    )
    assert speed.met is False  # absolute: 900 MB/s < 1 GB/s, whatever the tmpfs ratio
    mem = bp.make_row("memory", "large", "estargz", "memory.rss_walked", 79.0, "MB")
    assert mem.met is True and mem.ratio is None
    assert bp.make_row("memory", "small", "estargz", "memory.rss_walked", 90.0, "MB").met is None


def test_rows_as_json_and_markdown() -> None:
    rows = [
        bp.make_row(
            "lazy",
            "large",
            "gzip",
            "baseline.seconds",
            12.3456,
            "s",
            note="normal pull",
            runs=[12.0, 12.3456],
        ),
        bp.make_row(
            "lazy",
            "large",
            "estargz-prio",
            "lazy.bg_off.registry_bytes",
            3_000_000,
            "B",
            80_000_000,
            "image's compressed layers",
        ),
    ]
    d = rows[1].json()
    assert {
        "bench",
        "workload",
        "variant",
        "metric",
        "value",
        "unit",
        "baseline",
        "ratio",
        "target",
        "met",
    } <= set(d)
    assert d["ratio"] == pytest.approx(3 / 80, abs=1e-4) and d["met"] is True
    assert rows[0].json()["runs"] == [12.0, 12.3456]
    json.dumps([r.json() for r in rows])
    md = bp.markdown(rows, "### title\n")
    lines = md.splitlines()
    assert lines[0] == "### title" and lines[1] == "" and lines[2].startswith("| workload |")
    assert len(lines) == 4 + len(rows)
    assert "| 12.3 s |" in md and "3.00 MB" in md and "80.00 MB" in md and "| met |" in md


def test_chart_draws_the_lazy_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [
        bp.make_row("lazy", "small", "gzip", "baseline.seconds", 4.0, "s"),
        bp.make_row("lazy", "small", "estargz", "lazy.bg_off.seconds", 1.0, "s", 4.0),
        bp.make_row("lazy", "small", "estargz", "lazy.bg_on.seconds", 1.2, "s", 4.0),
    ]
    path = tmp_path / "c.png"
    assert bp.chart(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not bp.chart(rows[:0], tmp_path / "none.png")


def test_parse_args_quick_and_defaults() -> None:
    q = bp.parse_args(["--quick"])
    assert (
        q.repeat == 1 and q.workloads == ["small"] and q.only == ["lazy", "fs", "memory", "steady"]
    )
    assert q.out.name == "quick"
    full = bp.parse_args(["--out", "/x", "--only", "fs", "--repeat", "0"])
    assert full.workloads == ["small", "large"] and full.only == ["fs"] and full.repeat == 1
    assert str(full.out) == "/x"
    with pytest.raises(SystemExit):
        bp.parse_args(["--workloads", "huge"])


def test_netem_filters_only_the_registry_port() -> None:
    cmds = bp.Netem(5123).commands()
    flat = [" ".join(c) for c in cmds]
    assert any("netem delay 20ms rate 200mbit" in c for c in flat)
    assert sum("5123 0xffff flowid 1:4" in c for c in flat) == 2
    assert all(c[2:4] == ["dev", "lo"] for c in cmds)


def test_largest_file_of_a_tar(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name, n in (("a", 10), ("big", 300), ("c", 20)):
            info = tarfile.TarInfo(name)
            info.size = n
            tf.addfile(info, io.BytesIO(b"z" * n))
    p = tmp_path / "t.tar"
    p.write_bytes(raw.getvalue())
    assert bp.largest_file(p) == ("big", 300)
