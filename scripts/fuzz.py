"""Long fuzzing runs of the format parsers, by hand: ``scripts/fuzz [SECONDS] [TARGET...]``.

With atheris installed (``.venv/bin/pip install atheris``) every target of tests/fuzz/targets.py
runs under libFuzzer with coverage feedback, in its own process, for its share of SECONDS,
seeded with the writer-made and Go-made inputs, with a memory limit and a per-input timeout.
Without atheris the hypothesis fuzz tests (tests/fuzz) run with SECONDS as their budget.

Prints one line per target and a summary; exits 1 when anything was found (the crashing inputs
are kept under the output directory, ``--out``, default a new temporary directory).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RSS_LIMIT_MB = 2048
INPUT_TIMEOUT_S = 10


def _child(target_name: str, seconds: int, workdir: Path) -> None:
    """Run one target under atheris (in this process; exits when done or on a finding)."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # optional, untyped

    sys.path.insert(0, str(REPO))
    with atheris.instrument_imports(include=["als"]):
        import als.formats.builder  # instrumented for coverage feedback
        import als.formats.decode
        import als.formats.detect
        import als.formats.model
        import als.formats.tarsplit
        import als.formats.toc  # noqa: F401
    from tests.fuzz.targets import MAX_INPUT, TARGETS

    target = TARGETS[target_name]
    corpus = workdir / f"corpus-{target_name}"
    corpus.mkdir(parents=True, exist_ok=True)
    for n, seed in enumerate(target.seeds()):
        (corpus / f"seed-{n}").write_bytes(seed[:MAX_INPUT])
    artifacts = workdir / f"found-{target_name}-"

    def one(data: bytes) -> None:
        target.run(data)

    args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-timeout={INPUT_TIMEOUT_S}",
        f"-max_len={MAX_INPUT}",
        f"-artifact_prefix={artifacts}",
        "-print_final_stats=1",
    ]
    atheris.Setup(args, one)
    atheris.Fuzz()


def _run_atheris(names: list[str], seconds: float, out: Path) -> int:
    share = max(5, int(seconds / len(names)))
    found = []
    for name in names:
        t = time.monotonic()
        log = out / f"{name}.log"
        with log.open("wb") as f:
            rc = subprocess.call(
                [sys.executable, __file__, "--child", name, "--seconds", str(share),
                 "--out", str(out)],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )  # fmt: skip
        text = log.read_text(errors="replace")
        execs = next(
            (ln.split()[-1] for ln in text.splitlines() if "stat::number_of_executed_units" in ln),
            "?",
        )
        status = "ok" if rc == 0 else f"FOUND (exit {rc}), see {log}"
        print(f"{name:14} {time.monotonic() - t:6.0f} s {execs:>9} inputs  {status}", flush=True)
        if rc != 0:
            found.append(name)
    return _summary(names, found)


def _run_hypothesis(names: list[str], seconds: float) -> int:
    env = {**os.environ, "ALS_FUZZ_SECONDS": str(seconds)}
    # every target has a random-bytes and a mutated-seeds test; the budget is for all of them
    selected = " or ".join(f"[{n}]" for n in names)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz",
           "-k", f"fuzz_ and ({selected})"]  # fmt: skip
    rc = subprocess.call(cmd, env=env, cwd=REPO)
    return _summary(names, [] if rc == 0 else ["(see the pytest output above)"])


def _summary(names: list[str], found: list[str]) -> int:
    print(f"fuzz: {len(names)} targets, {len(found)} with findings {' '.join(found)}".rstrip())
    return 1 if found else 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        # before anything imports als: atheris instruments it on import
        _child(sys.argv[2], int(sys.argv[4]), Path(sys.argv[6]))
        return 0
    sys.path.insert(0, str(REPO))
    from tests.fuzz.targets import TARGETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("seconds", nargs="?", type=float, default=600.0, help="total time budget")
    p.add_argument("targets", nargs="*", help=f"default: all of {', '.join(sorted(TARGETS))}")
    p.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    p.add_argument("--out", type=Path, help="directory for logs and findings")
    a = p.parse_args()
    names = a.targets or sorted(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {sorted(TARGETS)}")
    engine = a.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
    print(f"fuzz: {engine}, {a.seconds:.0f} s over {len(names)} targets", flush=True)
    if engine == "hypothesis":
        return _run_hypothesis(names, a.seconds)
    out = a.out or Path(tempfile.mkdtemp(prefix="als-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"fuzz: logs and findings in {out}", flush=True)
    return _run_atheris(names, a.seconds, out)


if __name__ == "__main__":
    sys.exit(main())
