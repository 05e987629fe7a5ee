"""RegistryClient against a real docker-registry (distribution 2.8): resolve, ranges, blobs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

import pytest

from als.errors import NotFound, RegistryError
from als.registry import RegistryClient
from als.registry.manifests import host_platform
from tests.support.registry import (
    RegistryServer,
    SimpleLayer,
    make_tar_layer,
    push_blob,
    push_image,
    push_image_full,
    push_index,
    sha256_digest,
)

pytestmark = pytest.mark.registry


def _random_layer(size: int, seed: int) -> SimpleLayer:
    rnd = random.Random(seed)
    return make_tar_layer({"data.bin": rnd.randbytes(size), "small.txt": b"hello\n"})


@pytest.fixture(scope="module")
def image(registry: RegistryServer) -> tuple[str, list[SimpleLayer], str]:
    layers = [_random_layer(200_000, 1), _random_layer(50_000, 2)]
    digest = push_image(registry, "client/app", "v1", layers)
    return f"{registry.host}/client/app:v1", layers, digest


def test_resolve_by_tag_and_digest(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    ref, layers, digest = image
    with RegistryClient() as c:
        img = c.resolve(ref)
        assert img.manifest_digest == digest
        assert img.platform.startswith(host_platform())
        assert [ld.digest for ld in img.layers] == [layer.digest for layer in layers]
        assert [ld.diff_id for ld in img.layers] == [layer.diff_id for layer in layers]
        assert [ld.size for ld in img.layers] == [layer.size for layer in layers]
        assert sha256_digest(img.config) == img.config_digest
        by_digest = c.resolve(f"{registry.host}/client/app@{digest}")
        assert by_digest.manifest == img.manifest
        assert by_digest.ref.digest == digest


def test_resolve_index_selects_platform(registry: RegistryServer) -> None:
    amd = push_image_full(
        registry, "client/multi", None, [_random_layer(1000, 3)], os_="linux", arch="amd64"
    )
    arm = push_image_full(
        registry,
        "client/multi",
        None,
        [_random_layer(1000, 4)],
        os_="linux",
        arch="arm64",
        variant="v8",
    )
    push_index(registry, "client/multi", "latest", [(amd, "linux/amd64"), (arm, "linux/arm64/v8")])
    push_index(
        registry,
        "client/multi",
        "dockerlist",
        [(amd, "linux/amd64"), (arm, "linux/arm64/v8")],
        docker_media_types=True,
    )
    with RegistryClient() as c:
        for tag in ("latest", "dockerlist"):
            a = c.resolve(f"{registry.host}/client/multi:{tag}", platform="linux/amd64")
            assert a.manifest_digest == amd.digest
            assert a.platform == "linux/amd64"
            assert a.index_digest is not None
            b = c.resolve(f"{registry.host}/client/multi:{tag}", platform="linux/arm64")
            assert b.manifest_digest == arm.digest
            assert b.platform == "linux/arm64/v8"
        with pytest.raises(NotFound, match="s390x"):
            c.resolve(f"{registry.host}/client/multi", platform="linux/s390x")


def test_docker_media_types(registry: RegistryServer) -> None:
    layer = _random_layer(5000, 5)
    pushed = push_image_full(registry, "client/docker", "v2s2", [layer], docker_media_types=True)
    with RegistryClient() as c:
        img = c.resolve(f"{registry.host}/client/docker:v2s2")
        assert img.manifest_digest == pushed.digest
        assert json.loads(img.manifest)["mediaType"].startswith("application/vnd.docker")
        assert img.layers[0].diff_id == layer.diff_id


def test_pull_by_wrong_digest_is_an_error(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    with RegistryClient(max_retry_time=2) as c:
        missing = "sha256:" + "0" * 64
        with pytest.raises(NotFound):
            c.resolve(f"{registry.host}/client/app@{missing}")


def test_fetch_ranges_single_and_multi(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    ref, layers, _ = image
    blob = layers[0].blob
    rnd = random.Random(7)
    ranges = [(rnd.randrange(0, len(blob) - 5000), rnd.randrange(1, 5000)) for _ in range(40)]
    ranges += [(0, 1), (len(blob) - 1, 1), (100, 0)]
    mark = registry.mark()
    with RegistryClient(coalesce_gap=0) as c:
        got = c.fetch_ranges(ref, layers[0].digest, ranges)
        assert got == [blob[o : o + n] for o, n in ranges]
        assert c.stats.multirange_requests >= 1
    entries = registry.blob_requests(layers[0].digest, since=mark)
    # 40 random ranges in batches of at most 32 per request: a couple of requests, not 40.
    assert 1 <= len(entries) <= 4
    assert all(e.status == 206 for e in entries)
    assert sum(e.bytes_sent for e in entries) < len(blob)


def test_coalescing_reduces_requests(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    ref, layers, _ = image
    blob = layers[0].blob
    ranges = [(i * 1000, 100) for i in range(50)]
    mark = registry.mark()
    with RegistryClient(coalesce_gap=4096, multirange=False) as c:
        assert c.fetch_ranges(ref, layers[0].digest, ranges) == [blob[o : o + n] for o, n in ranges]
    entries = registry.blob_requests(layers[0].digest, since=mark)
    assert len(entries) == 1
    assert entries[0].bytes_sent == 49 * 1000 + 100


def test_single_range_mode(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    ref, layers, _ = image
    blob = layers[1].blob
    ranges = [(0, 10), (20_000, 10), (40_000, 10)]
    mark = registry.mark()
    with RegistryClient(coalesce_gap=0, multirange=False) as c:
        assert c.fetch_ranges(ref, layers[1].digest, ranges) == [blob[o : o + n] for o, n in ranges]
    entries = registry.blob_requests(layers[1].digest, since=mark)
    assert [e.bytes_sent for e in entries] == [10, 10, 10]


def test_range_beyond_blob_is_an_error(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    ref, layers, _ = image
    with RegistryClient(max_retry_time=2) as c, pytest.raises(RegistryError, match=r"416|satisf"):
        c.fetch_ranges(ref, layers[1].digest, [(layers[1].size + 10, 5)])


def test_open_blob_and_blob_size(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    ref, layers, _ = image
    with RegistryClient() as c:
        data = b"".join(c.open_blob(ref, layers[0].digest, chunk_size=4096))
        assert data == layers[0].blob
        assert c.blob_size(ref, layers[0].digest) == layers[0].size
        with pytest.raises(NotFound):
            c.blob_size(ref, "sha256:" + "1" * 64)


def test_open_blob_missing_digest(registry: RegistryServer) -> None:
    # (Wrong bytes under a digest are exercised through the fault proxy.)
    data = os.urandom(3000)
    digest = push_blob(registry, "client/raw", data)
    with RegistryClient() as c:
        assert b"".join(c.open_blob(f"{registry.host}/client/raw", digest)) == data
        with pytest.raises(NotFound):
            list(c.open_blob(f"{registry.host}/client/raw", sha256_digest(data + b"x")))


def test_cross_repository_fallback(registry: RegistryServer) -> None:
    layer = _random_layer(10_000, 11)
    push_image(registry, "cross/one", "v1", [layer])
    with RegistryClient() as c:
        c.resolve(f"{registry.host}/cross/one:v1")
        # "cross/two" never had this blob: the client falls back to where it was seen.
        got = c.fetch_ranges(f"{registry.host}/cross/two:v1", layer.digest, [(5, 50)])
        assert got == [layer.blob[5:55]]
        assert f"{registry.host}/cross/one" in c.seen_in(layer.digest)
        assert c.stats.fallbacks >= 1
    with RegistryClient() as fresh, pytest.raises(NotFound, match="cross/two"):
        fresh.fetch_ranges(f"{registry.host}/cross/two:v1", layer.digest, [(5, 50)])


def test_concurrent_threads_share_one_client(
    registry: RegistryServer, image: tuple[str, list[SimpleLayer], str]
) -> None:
    ref, layers, _ = image
    blob = layers[0].blob
    errors: list[BaseException] = []
    with RegistryClient() as c:

        def work(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                for _ in range(10):
                    off = rnd.randrange(0, len(blob) - 1000)
                    [got] = c.fetch_ranges(ref, layers[0].digest, [(off, 1000)])
                    assert got == blob[off : off + 1000]
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert c.stats.requests >= 80


def test_push_helpers_of_the_client(registry: RegistryServer) -> None:
    layer = _random_layer(2000, 12)
    with RegistryClient() as c:
        digest = push_image(c, "client/pushed", "v1", [layer], registry_host=registry.host)
        img = c.resolve(f"{registry.host}/client/pushed:v1")
        assert img.manifest_digest == digest
        assert hashlib.sha256(img.manifest).hexdigest() == digest.split(":")[1]
