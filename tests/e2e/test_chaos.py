"""End to end: the CI variant of the chaos run (``scripts/chaos --quick``).

Three lazily pulled images, one container each checksumming its tree in a loop, while the fault
proxy between als-mount and the registry resets, fails, stalls, truncates and corrupts
responses, the registry becomes unreachable, and the store's server is killed with -9 twice
(als-mount's supervisor starts a new one on the same FUSE connection; the containers are left
running), under a cache limit small enough that eviction runs all along. The run's own bar is
asserted here from its JSON summary: zero wrong reads, zero failed reads that no fault
explains and none at all in the kill phases, each kill recovered within 10 s, zero unplanned
crashes, every layer pulled lazily, eviction seen, and every container passing a whole checksum
round after the faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.podman import e2e_marks

pytestmark = [*e2e_marks(), pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def test_chaos_quick(tmp_path: Path) -> None:
    summary_path = tmp_path / "chaos.json"
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "chaos.py"),
            "--quick",
            "--summary",
            str(summary_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    report = f"\n--- stdout ---\n{p.stdout[-6000:]}\n--- stderr ---\n{p.stderr[-6000:]}"
    assert summary_path.exists(), f"no summary (exit {p.returncode}){report}"
    s = json.loads(summary_path.read_text())
    reads = s["reads"]
    assert reads["wrong"] == 0, report
    assert reads["eio_unexplained"] == 0 and reads["other_unexplained"] == 0, (
        s["problems"],
        report,
    )
    assert reads["correct"] > 1000, report  # the containers did read, a lot
    # the kills do not show in the containers: not one failed read while a kill phase ran
    assert reads["failed_in_kill_phases"] == 0, (s["problems"], report)
    assert reads["in_kill_phases"] > 100, report
    daemon = s["daemon"]
    assert daemon["unplanned_crashes"] == 0, report
    assert daemon["tracebacks"] == 0 and daemon["internal_errors"] == 0, report
    assert daemon["induced_kills"] == 2 and daemon["exit_codes_of_killed"] == [-9, -9], report
    assert daemon["servers_started"] == 3 and daemon["unplanned_server_deaths"] == [], report
    assert daemon.get("exit_status") == 0, report
    assert s["final_checksum"] and all(v["pass"] for v in s["final_checksum"].values()), (
        s["final_checksum"],
        report,
    )
    lazy = s["lazy_pull"]
    assert lazy["lazy"] == lazy["layers"] == 6, report
    assert lazy["pull_bytes"] < lazy["blob_bytes"] / 2, report
    assert s["cache"]["evictions"] > 0, report
    # every kind of fault was really applied
    assert {"reset", "status", "stall", "truncate", "corrupt"} <= set(
        s["proxy"]["faults_applied"]
    ), report
    # each kill: a new server served (the supervisor's restart-done), and every container read
    # a file correctly again within 10 s of the kill
    assert len(s["server_kills"]) == 2, report
    for kill in s["server_kills"]:
        assert kill["new_generation"] == kill["killed_generation"] + 1, (kill, report)
        assert kill["restart_done_s"] is not None and kill["spawn_to_serving_s"] is not None, (
            kill,
            report,
        )
        assert kill["layers_restored"] == "6/6", (kill, report)  # every layer, before reads go on
        assert kill["recover_seconds"] is not None and kill["recover_seconds"] < 10, (kill, report)
        assert kill["longest_pause_s"] is not None and kill["longest_pause_s"] < 10, (kill, report)
    assert "passed" in p.stdout and p.returncode == 0, report
    # the tally lines are printed as "N passed, N failed"
    assert all(" passed, 0 failed" in line for line in s["lines"]), (s["lines"], report)
