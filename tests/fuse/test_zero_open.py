"""Zero-message open through a real FUSE mount: with the pyfuse3 of scripts/build-pyfuse3 the
kernel opens files and directories without asking the store and keeps their pages and listings,
so warm walks and reads cost no requests; the store's own directories still list what changed,
writes are still refused, and only the store's owner may enter the pool."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from tests.support.fakesource import FakeSource
from tests.support.layers import make_layer, noise
from tests.support.mount import ThreadMount, b64, needs_fuse, store_status
from tests.support.tarspec import FileSpec

pytestmark = [needs_fuse, pytest.mark.fuse]

patched = pytest.mark.skipif(
    not getattr(pyfuse3, "ZERO_MESSAGE_OPEN", False),
    reason="needs the pyfuse3 of scripts/build-pyfuse3 (scripts/bootstrap builds it)",
)

REF = "registry.test/zero/open:1"
OTHER = "registry.test/zero/other:2"
SPEC: dict[str, bytes | str | FileSpec] = {
    "etc/os-release": b"NAME=zero\n",
    **{
        f"usr/lib/d{i}/f{j}.so": noise(f"{i}/{j}", 20_000 + 997 * j)
        for i in range(6)
        for j in range(5)
    },
    "usr/lib/link": FileSpec("symlink", link="d0/f0.so"),
}


def _walk(root: Path) -> list[tuple[str, int, int]]:
    out = subprocess.run(
        ["find", ".", "-printf", "%p %s %m\n"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return sorted(tuple(line.rsplit(" ", 2)) for line in out.splitlines())  # type: ignore[misc]


def _read_all(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _requests(m: ThreadMount, *ops: str) -> dict[str, int]:
    return {op: int(m.ops.requests[op]) for op in ops}


LAYER = make_layer(SPEC, "estargz")
OTHER_LAYER = make_layer({"x": b"other"}, "zstd-chunked")


@pytest.fixture
def source() -> FakeSource:
    src = FakeSource()
    src.add_image(REF, [LAYER])
    src.add_image(OTHER, [OTHER_LAYER])
    return src


@pytest.fixture
def mount(tmp_path: Path, source: FakeSource) -> Iterator[ThreadMount]:
    with ThreadMount(tmp_path / "als", source, lookup_timeout=5.0, read_timeout=5.0) as m:
        yield m


@patched
def test_warm_walk_and_read_reach_the_store_not_at_all(mount: ThreadMount) -> None:
    root = mount.layer_dir(REF, LAYER.digest) / "diff"
    assert mount.ops.zero_open
    assert store_status(mount.root)["zero_message_open"] is True
    walk, data = _walk(root), _read_all(root)
    assert _walk(root) == walk  # after reads, a stat asks once (see below)
    assert len(walk) == 1 + len(SPEC) + 3 + 6  # ".", the entries, etc usr usr/lib, d0-d5
    ops = ("open", "release", "opendir", "releasedir", "readdir", "read", "lookup", "getattr")
    before = _requests(mount, *ops)
    for _ in range(3):
        assert _walk(root) == walk
    after = _requests(mount, *ops)
    assert after == before, {k: after[k] - before[k] for k in ops}
    for _ in range(3):
        assert _read_all(root) == data
    after = _requests(mount, *ops)
    # A read marks the file's atime stale in the kernel (the mount is not read-only: the
    # protocol's notifications are writes), so the next stat of a read file asks once.
    files = sum(1 for k, v in SPEC.items() if not isinstance(v, FileSpec))
    assert after["getattr"] - before["getattr"] <= 3 * files
    del after["getattr"], before["getattr"]
    assert after == before, {k: after[k] - before[k] for k in after}
    # The first open and opendir were answered ENOSYS; none came after them.
    assert after["open"] == 1 and after["opendir"] == 1
    assert after["release"] == 0 and after["releasedir"] == 0
    # Symlink targets stay in the kernel too.
    link = root / "usr/lib/link"
    assert os.readlink(link) == "d0/f0.so"
    n = mount.ops.requests["readlink"]
    assert [os.readlink(link) for _ in range(3)] == ["d0/f0.so"] * 3
    assert mount.ops.requests["readlink"] == n


@patched
def test_store_directories_list_what_changed(mount: ThreadMount) -> None:
    pool = mount.pool
    assert os.listdir(pool) == []
    os.stat(mount.layer_dir(REF, LAYER.digest))
    assert os.listdir(pool) == [b64(REF)]  # the cached empty listing was dropped at once
    os.stat(mount.layer_dir(OTHER, OTHER_LAYER.digest))
    assert sorted(os.listdir(pool)) == sorted([b64(REF), b64(OTHER)])
    assert os.listdir(pool / b64(OTHER)) == [OTHER_LAYER.digest]


@patched
def test_writes_are_refused_and_never_change_what_is_read(mount: ThreadMount) -> None:
    root = mount.layer_dir(REF, LAYER.digest) / "diff"
    target = root / "etc/os-release"
    assert target.read_bytes() == b"NAME=zero\n"
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND):
        fd = os.open(target, flags)  # the kernel opens without asking the store...
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, b"EVIL")
            assert e.value.errno == errno.EROFS  # ...which refuses the write
        finally:
            os.close(fd)
    for flags in (os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(OSError) as e:  # O_TRUNC reaches the store as a setattr
            os.open(target, flags)
        assert e.value.errno == errno.EROFS
    assert target.read_bytes() == b"NAME=zero\n"
    assert os.stat(target).st_size == len(b"NAME=zero\n")


@patched
def test_only_the_owner_enters_the_pool(mount: ThreadMount) -> None:
    root = mount.layer_dir(REF, LAYER.digest) / "diff"
    st = os.stat(mount.pool)
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.geteuid())
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run(
        [*nobody, "cat", str(root / "etc/os-release")], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stderr
    assert (root / "etc/os-release").read_bytes() == b"NAME=zero\n"


def test_without_zero_message_open_every_open_reaches_the_store(
    tmp_path: Path, source: FakeSource
) -> None:
    with ThreadMount(
        tmp_path / "als", source, lookup_timeout=5.0, read_timeout=5.0, zero_message_open=False
    ) as m:
        assert not m.ops.zero_open
        assert store_status(m.root)["zero_message_open"] is False
        root = m.layer_dir(REF, LAYER.digest) / "diff"
        data = _read_all(root)
        before = _requests(m, "open", "release", "opendir")
        assert _read_all(root) == data
        after = _requests(m, "open", "release", "opendir")
        files = sum(1 for v in SPEC.values() if not isinstance(v, FileSpec))
        assert after["open"] - before["open"] == files
        assert after["opendir"] - before["opendir"] >= 9
        assert (os.stat(m.pool).st_mode & 0o777) == 0o755
        target = root / "etc/os-release"
        with pytest.raises(OSError) as e:
            os.open(target, os.O_WRONLY)  # refused when opened, as before
        assert e.value.errno == errno.EROFS
