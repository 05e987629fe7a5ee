"""The architecture's import rules, enforced (docs/architecture.md lists them):

- only the FUSE layer imports pyfuse3, only the registry transport imports requests/urllib3,
  only the metrics module imports prometheus_client;
- the format parsers import no async, FUSE, network, store or registry code;
- the shared definitions (als/digest.py, oci.py, ranges.py, overlay.py, paths.py, errors.py,
  fsutil.py, libc.py, logsetup.py, sdnotify.py) import only the standard library and each other;
- the store imports the registry's types, never its client (only the daemon wires one in);
- the registry never imports the store; nothing but the CLI imports the CLI; nothing imports tests;
- image conversion (als/convert/) imports no FUSE or trio code, of the store only its disk-cache
  records, and only the CLI imports it;
- ``als status`` imports only the standard library and als/paths.py;
- the supervisor (``als-mount`` before it starts a server) loads only the standard library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "als"
SHARED = {
    "als",
    "als.digest",
    "als.oci",
    "als.ranges",
    "als.overlay",
    "als.paths",
    "als.errors",
    "als.fsutil",
    "als.libc",
    "als.logsetup",
    "als.sdnotify",
}


def modules() -> dict[str, set[str]]:
    """Every module of the package -> the full names it imports at run time."""
    return {str(p.relative_to(PKG.parent)): runtime_imports(p) for p in PKG.rglob("*.py")}


def users_of(*tops: str) -> set[str]:
    return {m for m, imps in modules().items() if {i.split(".")[0] for i in imps} & set(tops)}


def under(imps: set[str], prefix: str) -> set[str]:
    return {i for i in imps if i == prefix or i.startswith(prefix + ".")}


def test_only_fuse_layer_imports_pyfuse3() -> None:
    users = users_of("pyfuse3")
    assert users <= {"als/store/fs/operations.py", "als/store/daemon.py"}, users
    assert "als/store/fs/operations.py" in users


def test_only_the_transport_imports_requests() -> None:
    assert users_of("requests", "urllib3") == {"als/registry/transport.py"}


def test_only_metrics_imports_prometheus_client() -> None:
    assert users_of("prometheus_client") == {"als/store/metrics.py"}


def test_parsers_are_pure() -> None:
    bad_tops = {"trio", "pyfuse3", "requests", "socket", "urllib3", "prometheus_client"}
    for m, imps in modules().items():
        if m.startswith("als/formats/"):
            bad = {i for i in imps if i.split(".")[0] in bad_tops}
            bad |= under(imps, "als.store") | under(imps, "als.registry") | under(imps, "als.cli")
            assert not bad, (m, bad)


def test_shared_definitions_need_only_the_standard_library() -> None:
    for name in SHARED - {"als"}:
        path = PKG / (name.split(".")[1] + ".py")
        imps = runtime_imports(path)
        other = {i for i in imps if i.split(".")[0] not in sys.stdlib_module_names} - SHARED
        assert not other, (name, other)


def test_the_store_imports_registry_types_not_the_client() -> None:
    for m, imps in modules().items():
        if m.startswith("als/store/") and m != "als/store/daemon.py":
            registry = under(imps, "als.registry") - {"als.registry.types"}
            assert not registry, (m, registry)


def test_the_registry_never_imports_the_store() -> None:
    for m, imps in modules().items():
        if m.startswith("als/registry/"):
            assert not under(imps, "als.store"), m


def test_image_conversion_is_a_library_apart() -> None:
    """als/convert/ uses the registry client, the formats and (for --optimize) the store's
    disk-cache records, never FUSE or trio; nothing but the CLI imports it."""
    for m, imps in modules().items():
        if m.startswith("als/convert/"):
            bad = {i for i in imps if i.split(".")[0] in {"trio", "pyfuse3", "requests"}}
            bad |= under(imps, "als.cli")
            bad |= under(imps, "als.store") - under(imps, "als.store.cache.records")
            assert not bad, (m, bad)
        elif not m.startswith("als/cli/"):
            assert not under(imps, "als.convert"), m


def test_the_package_never_imports_tests() -> None:
    for m, imps in modules().items():
        assert not under(imps, "tests"), m


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
    allowed = {"als", "als.cli", "als.cli.convert", "als.errors", "als.paths", "als.oci"}
    assert als <= allowed | {"als.digest"}, als
    heavy = {"zstandard", "isal", "trio", "pyfuse3", "requests", "urllib3", "prometheus_client"}
    assert not heavy & {m.split(".")[0] for m in out}


def test_the_supervisor_stays_small() -> None:
    """The supervisor process lives as long as the mount: it loads no async, FUSE, network or
    format code (the server it starts does)."""
    code = "import sys, als.cli.mount; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent
    ).stdout.split()
    tops = {m.split(".")[0] for m in out}
    assert tops <= set(sys.stdlib_module_names) | {"als", "__main__", "_distutils_hack"} | {
        t for t in tops if t.startswith("__editable__")
    }, tops
    assert not {m for m in out if m.startswith(("als.formats", "als.registry", "als.convert"))}
    # What it execs into once mounted loads even less: no flags, no config, no CLI.
    code = "import sys, als.store.supervisor, als.logsetup; print(' '.join(sorted(sys.modules)))"
    lean = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent
    ).stdout.split()
    assert not {"argparse", "tomllib", "ctypes.util", "als.cli", "als.store.config"} & set(lean)


def daemon_imports() -> set[str]:
    """The top-level packages a server process (als-mount's child) has imported to serve."""
    code = (
        "import sys, als.cli.mount, als.store.daemon, als.registry; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent
    ).stdout.split()
    return {m.split(".")[0] for m in out}


def test_the_daemon_leaves_out_what_serving_does_not_need() -> None:
    """Every import stays in the daemon's memory for its whole life (docs/performance.md)."""
    tops = daemon_imports()
    assert {"trio", "pyfuse3", "requests"} <= tops
    # requests' character detection (only for text bodies without a charset; als reads bytes).
    assert not {"charset_normalizer", "chardet"} & tops
    # The Prometheus exposition: imported at the first scrape of /metrics.
    assert "prometheus_client" not in tops


def test_requests_still_works_without_character_detection() -> None:
    code = (
        "import als.registry.transport, requests, charset_normalizer\n"
        "r = requests.Response(); r._content = 'é'.encode(); r.encoding = None\n"
        "print(r.text, r.apparent_encoding, charset_normalizer.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PKG.parent,
    ).stdout.split()
    # UTF-8 assumed, no warning, and charset_normalizer can still be imported by others.
    assert out == ["é", "utf-8", "charset_normalizer"]
