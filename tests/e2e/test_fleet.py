"""A fleet behind one pull-through mirror, simulated on this machine.

Each "node" is what one host runs: its own als root and ``als-mount`` process, its own podman
storage, and a registries.conf that sends the origin registry's name to the mirror (Debian's
docker-registry in proxy mode, in front of another docker-registry: the origin). The image is
always named by the origin (``ORIGIN/fleet/app:1``); podman and als both find the mirror
through registries.conf.

What the origin sends is read from its access log, per layer blob, and set against what N
normal pulls would take (N x the blob size). The figures are printed (``pytest -s``) and kept in
docs/fleet.md.

* ``test_fleet_starts_together_on_a_cold_mirror``: N nodes pull and run at the same moment,
  on an empty mirror. Every node runs, lazily. distribution 2.8's proxy does not merge
  misses: a request for a blob it has not stored yet is answered by a whole-blob fetch of its
  own from the origin (ignoring the Range), besides the one that stores it, so the origin sends
  whole copies of a blob, as many as there were requests before the copy was stored (measured:
  2-8 copies for N = 5). The test checks that every origin transfer is one whole blob.
* ``test_fleet_behind_a_warm_mirror``: one node starts first (a canary), the test waits until
  the mirror has stored the blobs, then N nodes start at the same moment. They cost the origin
  nothing, whatever N is, and read under half of N x the blobs from the mirror (lazily, by
  range); the canary cost the origin whole copies (2-3 measured).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_podman import CMD, READ, UPPER, base_spec
from tests.support.layers import BuiltLayer, make_layer
from tests.support.mount import ProcessMount
from tests.support.podman import Podman, e2e_marks, write_registries_conf
from tests.support.registry import RegistryServer, push_image

pytestmark = e2e_marks()

N = 5
PRIORITIZED = ["bin/busybox", "bin/sh", "etc/motd", "etc/os-release"]


@dataclass
class Node:
    name: str
    store: ProcessMount
    podman: Podman


@dataclass
class Registries:
    origin: RegistryServer
    mirror: RegistryServer
    ref: str
    layers: list[BuiltLayer]


@pytest.fixture
def registries(tmp_path: Path) -> Iterator[Registries]:
    """An origin with the image, and an empty pull-through mirror in front of it."""
    layers = [make_layer(base_spec(), "estargz", prioritized=PRIORITIZED), make_layer(UPPER)]
    with (
        RegistryServer(tmp_path / "origin") as origin,
        RegistryServer(tmp_path / "mirror", proxy_remote=origin.url) as mirror,
    ):
        push_image(origin, "fleet/app", "1", layers)
        yield Registries(origin, mirror, f"{origin.host}/fleet/app:1", layers)


@contextmanager
def nodes(base: Path, names: list[str], regs: Registries) -> Iterator[list[Node]]:
    """One als-mount and one podman storage per name; all removed on the way out."""
    with ExitStack() as stack:
        out = []
        for name in names:
            d = base / name
            d.mkdir(parents=True)
            conf = write_registries_conf(
                d / "registries.conf", [regs.origin.host], {regs.origin.host: regs.mirror.host}
            )
            store = stack.enter_context(
                ProcessMount(d / "als", "--registries-conf", str(conf), "--no-background-fetch")
            )
            pm = Podman(d / "podman", conf, als_pool=store.pool)
            stack.callback(pm.reset)
            out.append(Node(name, store, pm))
        yield out


def expected_output() -> str:
    libs = sum(1 for path in base_spec() if path.startswith("usr/lib/"))
    return f"upper motd\nNAME=als-e2e\nkeep\nnew.txt\n{hashlib.sha256(READ).hexdigest()}\n{libs}\n"


def pull_and_run(fleet: list[Node], ref: str) -> list[str]:
    """Every node pulls and runs ``ref``, all released at the same moment; their outputs."""
    start = threading.Barrier(len(fleet))

    def one(node: Node) -> str:
        start.wait(30)
        node.podman.pull(ref)
        return node.podman.run(ref, "sh", "-c", CMD).stdout

    with ThreadPoolExecutor(len(fleet)) as pool:
        return list(pool.map(one, fleet))


def assert_ran_lazily(fleet: list[Node], regs: Registries, outputs: list[str]) -> None:
    b64ref = base64.b64encode(regs.ref.encode()).decode()
    for node, out in zip(fleet, outputs, strict=True):
        assert out == expected_output(), node.name
        links = set(node.podman.layer_diff_links().values())
        log = node.store.log()
        for layer in regs.layers:
            assert str(node.store.pool / b64ref / layer.digest / "diff") in links, node.name
            assert f"layer-ready ref={regs.ref} digest={layer.digest} format=estargz lazy=true" in (
                log
            ), node.name


def figures(label: str, regs: Registries, n: int, origin_since: int, mirror_since: int) -> None:
    for layer in regs.layers:
        sent = regs.origin.blob_bytes_sent(layer.digest, since=origin_since)
        served = regs.mirror.blob_bytes_sent(layer.digest, since=mirror_since)
        print(
            f"fleet {label}: layer {layer.digest[:19]} size={layer.size} nodes={n} "
            f"N*size={n * layer.size} origin={sent} ({sent / layer.size:.2f}x) "
            f"mirror->nodes={served} ({served / (n * layer.size):.2f} of N*size)"
        )


def mirror_holds(regs: Registries, timeout: float = 20) -> None:
    """Wait until the mirror has stored every layer blob (it stores in the background)."""
    blobs = regs.mirror.workdir / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    end = time.monotonic() + timeout
    for layer in regs.layers:
        hexd = layer.digest.removeprefix("sha256:")
        data = blobs / hexd[:2] / hexd / "data"
        while not (data.exists() and data.stat().st_size == layer.size):
            assert time.monotonic() < end, f"the mirror did not store {layer.digest}"
            time.sleep(0.05)


def assert_whole_blobs(regs: Registries, since: int, *, stored: bool = False) -> None:
    """The origin was asked for each layer's whole blob (200, never a 206 range): the proxy
    fetches blobs, not ranges. A fetch the mirror no longer needs (its client has what it
    asked for) may end early, so a transfer sends at most the blob; with ``stored`` at least
    one sent all of it (the copy the mirror kept)."""
    for layer in regs.layers:
        gets = regs.origin.blob_requests(layer.digest, since=since)
        assert gets, layer.digest
        assert all(e.status == 200 and e.bytes_sent <= layer.size for e in gets), gets
        if stored:
            assert any(e.bytes_sent == layer.size for e in gets), gets


def test_fleet_starts_together_on_a_cold_mirror(registries: Registries, tmp_path: Path) -> None:
    regs = registries
    o_mark, m_mark = regs.origin.mark(), regs.mirror.mark()
    with nodes(tmp_path, [f"node{i}" for i in range(N)], regs) as fleet:
        outputs = pull_and_run(fleet, regs.ref)
        assert_ran_lazily(fleet, regs, outputs)
    figures("cold mirror", regs, N, o_mark, m_mark)
    assert_whole_blobs(regs, o_mark)


def test_fleet_behind_a_warm_mirror(registries: Registries, tmp_path: Path) -> None:
    regs = registries
    o_start, m_start = regs.origin.mark(), regs.mirror.mark()
    with nodes(tmp_path, ["canary"], regs) as canary:
        assert_ran_lazily(canary, regs, pull_and_run(canary, regs.ref))
    mirror_holds(regs)
    o_mark, m_mark = regs.origin.mark(), regs.mirror.mark()
    with nodes(tmp_path, [f"node{i}" for i in range(N)], regs) as fleet:
        outputs = pull_and_run(fleet, regs.ref)
        assert_ran_lazily(fleet, regs, outputs)
    figures("warm mirror", regs, N, o_mark, m_mark)
    figures("canary + fleet", regs, N + 1, o_start, m_start)
    assert_whole_blobs(regs, o_start, stored=True)
    for layer in regs.layers:
        # N nodes at once cost the origin nothing: the mirror answered every range
        assert regs.origin.blob_bytes_sent(layer.digest, since=o_mark) == 0, layer.digest
        served = regs.mirror.blob_bytes_sent(layer.digest, since=m_mark)
        assert served < 0.5 * N * layer.size, (layer.digest, served, layer.size)
