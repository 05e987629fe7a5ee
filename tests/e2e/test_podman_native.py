"""End to end with Debian's podman 4.3.1: layers served lazily turn native once complete.

* after the background download, podman's ``diff`` of every layer resolves into the cache's
  unpacked trees, not into the FUSE mount;
* a container started afterwards keeps reading correct files with als-mount killed;
* with als-mount killed and its mount removed, ``podman run`` of the image still works, and a new
  container's root lists exactly what a normal pull of the same files lists (paths, types,
  modes, owners, sizes, times, link targets, devices, xattrs, contents);
* a container started before the layers turned native stays on FUSE and keeps working.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_podman_cache import layer_status, tail, write_config
from tests.support.layers import BuiltLayer, FileSpec, make_layer, noise
from tests.support.mount import ProcessMount, force_unmount
from tests.support.podman import BUSYBOX, RUN_FLAGS, Podman, e2e_marks
from tests.support.registry import RegistryServer, push_image

pytestmark = e2e_marks()

APPLETS = ["sh", "cat", "sleep", "sha256sum", "find", "xargs", "sort"]
T = 1_700_000_000
CHECK = "find /srv /etc/motd /usr -type f | sort | xargs sha256sum"


def base_spec() -> dict[str, bytes | str | FileSpec]:
    spec: dict[str, bytes | str | FileSpec] = {
        "bin/busybox": FileSpec(content=Path(BUSYBOX).read_bytes(), mode=0o755),
        "etc/motd": FileSpec(content=b"native motd\n", mtime=T),
        "etc/shadow": FileSpec(content=b"root:*:1::::::\n", mode=0o640, gid=42),
        "usr/lib/big.bin": noise("big", 3 * 1024 * 1024),
        "usr/lib/libx.so.1": FileSpec(content=noise("lib", 70_000), uid=7, gid=8),
        "usr/lib/libx.so": FileSpec("symlink", link="libx.so.1"),
        "usr/bin/tool": FileSpec(content=noise("tool", 50_000), mode=0o4755),
        # A hardlink header carries its inode's metadata, as tar writers write it (a pull
        # applies the last header's mode to the shared inode).
        "usr/bin/tool2": FileSpec("hardlink", link="usr/bin/tool", mode=0o4755),
        "srv/data/a.txt": b"a\n",
        "srv/old/gone.txt": b"to be deleted\n",
        "srv/opq/lower.txt": b"hidden by the top layer\n",
    }
    for a in APPLETS:
        spec[f"bin/{a}"] = FileSpec(type="symlink", link="busybox")
    return spec


TOP: dict[str, bytes | str | FileSpec] = {
    "srv/old/.wh.gone.txt": b"",
    "srv/opq/.wh..wh..opq": b"",
    "srv/opq/upper.txt": b"upper\n",
    "srv/data/b.txt": FileSpec(content=b"b\n", mode=0o600, uid=1000, gid=1000),
}


def expected_sums() -> str:
    """What CHECK prints for the image: the top layer's changes applied to the base."""
    base, top = base_spec(), TOP
    files: dict[str, bytes] = {}
    for spec in (base, top):
        for path, v in spec.items():
            data = v.encode() if isinstance(v, str) else v
            if isinstance(v, FileSpec):
                if v.type == "hardlink":
                    data = files[v.link]
                elif v.type != "reg":
                    continue
                else:
                    data = v.content
            assert isinstance(data, bytes)
            files[path] = data
    files.pop("srv/old/gone.txt")
    files.pop("srv/opq/lower.txt")
    wanted = sorted(
        p for p in files if (p.startswith(("srv/", "usr/")) or p == "etc/motd") and "/.wh." not in p
    )
    return "".join(f"{hashlib.sha256(files[p]).hexdigest()}  /{p}\n" for p in wanted)


def sums_in(root: Path) -> str:
    """CHECK's output, computed from the host through a container's root."""
    found = [
        str(p.relative_to(root))
        for top in ("srv", "usr")
        for p in (root / top).rglob("*")
        if p.is_file() and not p.is_symlink()
    ]
    found.append("etc/motd")
    return "".join(
        f"{hashlib.sha256((root / p).read_bytes()).hexdigest()}  /{p}\n" for p in sorted(found)
    )


def images(registry: RegistryServer, fmt: str) -> tuple[str, list[BuiltLayer]]:
    layers = [make_layer(base_spec(), fmt), make_layer(TOP, fmt)]
    repo = f"native/{fmt}"
    push_image(registry, repo, "1", layers)
    return f"{registry.host}/{repo}:1", layers


def listing(root: Path) -> dict[str, tuple[Any, ...]]:
    """A container root as the container sees it (symlinks not followed)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            xattrs = sorted(
                (k, os.getxattr(full, k, follow_symlinks=False))
                for k in os.listxattr(full, follow_symlinks=False)
            )
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else None,
                st.st_mtime_ns if kind != stat.S_IFDIR else None,
                os.readlink(full) if kind == stat.S_IFLNK else None,
                xattrs,
                hashlib.sha256(full.read_bytes()).hexdigest() if kind == stat.S_IFREG else None,
            )
    return out


def wait_native(root: Path, m: ProcessMount, digests: list[str], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = [layer_status(root, d) for d in digests]
        if all(s is not None and s.get("native") for s in states):
            return
        assert m.proc is not None and m.proc.poll() is None, f"als-mount exited{tail(m)}"
        time.sleep(0.2)
    raise AssertionError(f"layers not native after {timeout}s: {states}{tail(m)}")


def test_layers_turn_native_and_outlive_the_store(
    registry: RegistryServer, regconf: Path, tmp_path: Path
) -> None:
    ref, layers = images(registry, "estargz")
    plain_ref, _ = images(registry, "gzip")
    root = tmp_path / "als"
    conf = write_config(tmp_path / "als.toml", background_fetch=True, background_delay=0.0)
    m = ProcessMount(root, "--registries-conf", str(regconf), "--config", str(conf)).start()
    pm = Podman(tmp_path / "podman", regconf, als_pool=root / ".pool")
    normal = Podman(tmp_path / "normal", regconf)
    loop = "trap 'exit 0' TERM; while true; do sleep 1; done"
    try:
        pm.pull(ref)
        before = pm("run", "-d", *RUN_FLAGS, ref, "sh", "-c", loop).stdout.strip()
        expected = pm("exec", before, "sh", "-c", CHECK).stdout
        assert expected == expected_sums(), expected
        wait_native(root, m, [x.digest for x in layers])
        # podman's diff links now resolve into the cache's trees, not the FUSE mount.
        links = pm.layer_diff_links()
        assert len(links) == 2, links
        for link in links.values():
            real = os.path.realpath(link)
            assert real.startswith(str(root / "cache" / "native")), (link, real, tail(m))
        after = pm("run", "-d", *RUN_FLAGS, ref, "sh", "-c", loop).stdout.strip()
        assert pm("exec", after, "sh", "-c", CHECK).stdout == expected
        assert pm("exec", before, "sh", "-c", CHECK).stdout == expected  # still on FUSE

        pid = pm("inspect", "-f", "{{.State.Pid}}", after).stdout.strip()
        assert m.proc is not None
        m.proc.kill()
        m.proc.wait()
        # The container started after the switch never touches FUSE: its files read the same
        # through its own root (podman's CLI itself refuses to start while the dead mount is
        # there: containers/storage stats the store's directory first).
        assert sums_in(Path(f"/proc/{pid}/root")) == expected
        # With the daemon gone and its mount removed, podman still finds the native layers.
        force_unmount(root / ".pool")
        assert not os.path.ismount(root / ".pool")
        assert pm.run(ref, "sh", "-c", CHECK).stdout == expected
        created = pm("create", *RUN_FLAGS, ref, "true").stdout.strip()
        merged = Path(pm("mount", created).stdout.strip())
        normal.pull(plain_ref)
        plain = normal("create", *RUN_FLAGS, plain_ref, "true").stdout.strip()
        plain_merged = Path(normal("mount", plain).stdout.strip())
        got, want = listing(merged), listing(plain_merged)
        assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
        diff = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
        assert not diff, diff
        assert "srv/old/gone.txt" not in got and "srv/opq/lower.txt" not in got
        assert got["srv/opq/upper.txt"][-1] == hashlib.sha256(b"upper\n").hexdigest()
        pm("umount", created)
        normal("umount", plain)
    finally:
        m.stop()
        pm("rm", "-a", "-f", "-t", "0", check=False)
        pm.reset()
        normal.reset()


@pytest.fixture(autouse=True)
def _no_stray_mounts(tmp_path: Path) -> Any:
    yield
    force_unmount(tmp_path / "als" / ".pool")
