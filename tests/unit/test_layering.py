"""The architecture's import rules, enforced: only the FUSE layer imports pyfuse3, only the
registry client imports requests, and the format parsers import no async or network code."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def runtime_imports(path: Path) -> set[str]:
    """Full names of the modules ``path`` imports when it runs (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def test_only_the_cli_imports_the_cli() -> None:
    for p in PKG.rglob("*.py"):
        m = str(p.relative_to(PKG.parent))
        if m.startswith("als/cli/") or m == "als/__main__.py":
            continue
        cli = {i for i in runtime_imports(p) if i == "als.cli" or i.startswith("als.cli.")}
        assert not cli, (m, cli)


def test_status_command_needs_only_the_standard_library() -> None:
    imps = runtime_imports(PKG / "cli" / "status.py")
    other = {i for i in imps if i.split(".")[0] not in sys.stdlib_module_names}
    assert other == {"als.paths"}, other


def test_the_parser_imports_no_command() -> None:
    """``als --help`` and ``als status`` start without the formats, the store or the registry."""
    code = "import sys, als.cli; als.cli.build_parser(); print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent
    ).stdout.split()
    als = {m for m in out if m.split(".")[0] == "als"}
    assert als <= {"als", "als.cli", "als.cli.convert", "als.errors", "als.paths"}, als
    heavy = {"zstandard", "isal", "trio", "pyfuse3", "requests", "urllib3", "prometheus_client"}
    assert not heavy & {m.split(".")[0] for m in out}
