"""scripts/bench_toc.py keeps working, and the index stays under 300 bytes per entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "bench_toc.py"


def test_bench_toc_quick_output_and_memory_budget() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--entries", "10000", "--repeat", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_metric = {r["metric"]: r for r in rows}
    for r in rows:
        assert set(r) >= {"bench", "metric", "value", "unit", "baseline", "ratio"}
        assert r["bench"] == "toc"
    assert by_metric["entries"]["value"] > 10000
    # memory held by the index is deterministic: hold it to the 300 B/entry budget
    assert by_metric["index_bytes_per_entry"]["value"] < 300
    assert by_metric["parse_build_seconds"]["value"] > 0
    assert "| metric |" in proc.stderr
