"""The architecture's import rules, enforced: only the FUSE layer imports pyfuse3, only the
registry client imports requests, and the format parsers import no async or network code."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "als"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PKG.parent)): imports(p) for p in PKG.rglob("*.py")}


def test_only_fuse_layer_imports_pyfuse3() -> None:
    users = {m for m, imps in modules().items() if "pyfuse3" in imps}
    assert users <= {"als/store/fs/operations.py", "als/store/daemon.py"}, users
    assert "als/store/fs/operations.py" in users


def test_only_registry_imports_requests() -> None:
    users = {m for m, imps in modules().items() if imps & {"requests", "urllib3"}}
    assert users and all(m.startswith("als/registry/") for m in users), users


def test_parsers_are_pure() -> None:
    for m, imps in modules().items():
        if m.startswith("als/formats/"):
            bad = imps & {"trio", "pyfuse3", "requests", "socket", "urllib3", "als.store"}
            assert not bad, (m, bad)
