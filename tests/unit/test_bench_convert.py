"""The pure parts of the ``als convert`` benchmark (scripts/bench_convert.py): arguments, the
commands it runs, the check of podman's push, and the rows with their targets. No timings."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

# The scripts are not a package: import them by name.
bc = importlib.import_module("bench_convert")

from als.oci import ANN_MANIFEST_CHECKSUM, ANN_TOC_DIGEST  # noqa: E402


def test_parse_args_quick_full_and_errors() -> None:
    q = bc.parse_args(["--quick", "--repeat", "5"])
    assert q.repeat == 1 and q.workloads == ["small"]
    assert q.optimize_seconds == bc.QUICK_OPTIMIZE_SECONDS and q.out.name == "convert-quick"
    full = bc.parse_args(["--out", "/x", "--repeat", "0", "--optimize-seconds", "4"])
    assert full.workloads == ["large"] and full.repeat == 1 and full.optimize_seconds == 4.0
    assert str(full.out) == "/x"
    assert bc.parse_args([]).optimize_seconds == bc.OPTIMIZE_SECONDS
    for bad in (["--workloads", "huge"], ["--optimize-seconds", "0"]):
        with pytest.raises(SystemExit):
            bc.parse_args(bad)


def test_convert_argv_plain_and_optimized() -> None:
    conf, rec = Path("/c/registries.conf"), Path("/w/records-1")
    plain = bc.convert_argv("h:1/bench/large:gzip", "h:1/bench/large-als1:estargz", conf, rec)
    assert plain[1:4] == ["-m", "als", "convert"]
    assert plain[-4:] == [
        "docker://h:1/bench/large:gzip",
        "docker://h:1/bench/large-als1:estargz",
        "--format",
        "estargz",
    ]
    assert {"--json", str(conf), str(rec)} <= set(plain)
    assert "--optimize" not in plain and "--" not in plain
    cmd = ["python3", "-c", "import numpy"]
    opt = bc.convert_argv("s", "d", conf, rec, 10.0, cmd, ["--runtime", "runc"])
    cut = opt.index("--")
    assert opt[cut + 1 :] == cmd
    assert opt[opt.index("--optimize-seconds") + 1] == "10"
    assert "--optimize-run-arg=--runtime" in opt[:cut] and "--optimize-run-arg=runc" in opt
    assert "--network" not in bc.optimize_run_args()


def test_podman_push_must_be_zstd_chunked() -> None:
    zstd = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
        "digest": "sha256:aa",
        "annotations": {ANN_MANIFEST_CHECKSUM: "sha256:x"},
    }
    gz = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:bb"}
    esgz = {**gz, "digest": "sha256:cc", "annotations": {ANN_TOC_DIGEST: "sha256:t"}}
    assert bc.not_zstd_chunked([zstd]) == []
    assert bc.not_zstd_chunked([zstd, gz, esgz]) == ["sha256:bb", "sha256:cc"]


def test_podman_runs_with_a_private_blob_info_cache() -> None:
    argv = bc.private_cache_argv(Path("/w/bic-3"), ["podman", "push", "a", "docker://b"])
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[4:6] == ["sh", "-c"]
    script = argv[6]
    assert f'mount --bind "$0" {bc.HOST_CACHE}' in script and script.endswith('exec "$@"')
    assert argv[7:] == ["/w/bic-3", "podman", "push", "a", "docker://b"]


def test_result_layers_of_one_image() -> None:
    result = {"images": [{"layers": [{"digest": "sha256:a", "size": 3}]}]}
    assert bc.result_layers(result) == [{"digest": "sha256:a", "size": 3}]
    with pytest.raises(ValueError):
        bc.result_layers({"images": []})


def test_convert_rows_judge_the_time_against_podman() -> None:
    rows = bc.convert_rows(
        "small", [3.0, 9.0, 4.0], [3.0, 2.0, 3.0], 20.0, 5.0, 10, 12, 7, layer_seconds=[1.0]
    )
    conv, opt = rows
    assert conv.variant == bc.ALS and conv.ratio == pytest.approx(4.0 / 3.0)
    assert conv.met is True and conv.target and conv.json()["baseline_runs"] == [3.0, 2.0, 3.0]
    assert conv.json()["layer_seconds"] == [1.0] and "layer_seconds" not in opt.json()
    assert (
        opt.target is None
        and opt.met is None
        and "--optimize-seconds 5," in opt.note
        and "7 files" in opt.note
    )
    slow = bc.convert_rows("large", [5.0], [3.0], 20.0, 10.0, 10, 12, 0)[0]
    assert slow.met is False


def test_lazy_rows_compare_the_optimized_image_with_each_other() -> None:
    runs = {
        bc.PRIO: [(2.0, 100, 110), (2.2, 100, 110)],
        bc.OPT: [(2.0, 90, 95), (2.1, 92, 95)],
        bc.ALS: [(3.0, 150, 160), (3.0, 150, 160)],
        bc.PODMAN: [(4.2, 170, 180), (4.2, 170, 180)],
    }
    sizes = {bc.PRIO: 1000, bc.OPT: 1001, bc.ALS: 999, bc.PODMAN: 1100}
    rows = bc.lazy_rows("large", runs, sizes)
    by = {(r.variant, r.metric): r for r in rows}
    prio = by[bc.OPT, "lazy.vs_prio.seconds"]
    assert prio.value == pytest.approx(2.05) and prio.baseline == pytest.approx(2.1)
    assert prio.met is True and prio.target
    assert by[bc.OPT, "lazy.vs_zstd_chunked.seconds"].ratio == pytest.approx(2.05 / 4.2)
    assert by[bc.OPT, "lazy.vs_estargz.seconds"].target is None
    assert by[bc.PODMAN, "lazy.registry_bytes"].ratio == pytest.approx(170 / 1100)
    assert len(rows) == 3 + 4
    # 1.05x is judged on the large workload only (as bench_perf's lazy targets)
    slower = {**runs, bc.OPT: [(2.5, 90, 95)]}
    assert bc.lazy_rows("large", slower, sizes)[0].met is False
    assert bc.lazy_rows("small", slower, sizes)[0].met is None
