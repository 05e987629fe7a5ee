"""Failure handling: a fault-injecting proxy in front of a real docker-registry."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from als.errors import RegistryError, VerifyError
from als.registry import RegistryClient
from tests.integration.conftest import TOKEN_USERS, TokenRegistry
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.registry import (
    RegistryServer,
    SimpleLayer,
    free_port,
    make_tar_layer,
    push_image,
)

pytestmark = pytest.mark.registry


@dataclass
class Setup:
    proxy: FaultProxy
    ref: str
    layer: SimpleLayer
    manifest_digest: str


@pytest.fixture(scope="module")
def setup(registry: RegistryServer) -> Iterator[Setup]:
    rnd = random.Random(42)
    layer = make_tar_layer({"blob.bin": rnd.randbytes(300_000)})
    digest = push_image(registry, "faults/app", "v1", [layer])
    with FaultProxy(registry.url) as proxy:
        yield Setup(proxy, f"{proxy.host}/faults/app:v1", layer, digest)


@pytest.fixture
def fp(setup: Setup) -> Iterator[Setup]:
    setup.proxy.clear()
    setup.proxy.reset_records()
    yield setup
    setup.proxy.clear()
    assert setup.proxy.errors == []  # the proxy itself never failed


def _client(**kw: float) -> RegistryClient:
    opts: dict[str, float] = {
        "backoff_base": 0.01,
        "backoff_cap": 0.1,
        "max_retry_time": 10,
        "read_timeout": 5,
    }
    opts.update(kw)
    return RegistryClient(**opts)  # type: ignore[arg-type]


BLOB = r"GET /v2/faults/app/blobs/sha256:"


def _ranges(layer: SimpleLayer) -> list[tuple[int, int]]:
    return [(1000, 5000), (100_000, 20_000), (250_000, 10_000)]


def _expect(layer: SimpleLayer, ranges: list[tuple[int, int]]) -> list[bytes]:
    return [layer.blob[o : o + n] for o, n in ranges]


@pytest.mark.parametrize(
    ("status", "retry_after"), [(503, "1"), (429, "1"), (500, None), (502, None)]
)
def test_transient_statuses_are_retried(fp: Setup, status: int, retry_after: str | None) -> None:
    with _client(coalesce_gap=0) as c:
        c.resolve(fp.ref)
        fp.proxy.add(Fault("status", match=BLOB, status=status, retry_after=retry_after, times=2))
        t0 = time.monotonic()
        got = c.fetch_ranges(fp.ref, fp.layer.digest, _ranges(fp.layer))
        elapsed = time.monotonic() - t0
        assert got == _expect(fp.layer, _ranges(fp.layer))
        assert c.stats.retries == 2
    if retry_after:
        assert elapsed >= 2 * float(retry_after) - 0.1  # Retry-After was honoured
    # The proxy records a request once its handler thread has finished sending the response,
    # which can be just after the client already has the bytes: wait for the record.
    end = time.monotonic() + 2
    while True:
        ranged = [r.status for r in fp.proxy.requests_for(BLOB) if r.range]
        if len(ranged) >= 3 or time.monotonic() > end:
            break
        time.sleep(0.01)
    assert ranged[:3] == [status, status, 206]


@pytest.mark.parametrize("kind", ["reset", "truncate", "drop"])
def test_broken_bodies_are_retried(fp: Setup, kind: str) -> None:
    with _client(coalesce_gap=0) as c:
        c.resolve(fp.ref)
        fp.proxy.add(Fault(kind, match=BLOB, after_bytes=1000, times=2))
        assert c.fetch_ranges(fp.ref, fp.layer.digest, _ranges(fp.layer)) == _expect(
            fp.layer, _ranges(fp.layer)
        )
        assert c.stats.retries == 2


def test_slow_body_times_out_and_is_retried(fp: Setup) -> None:
    with _client(read_timeout=0.3) as c:
        c.resolve(fp.ref)
        fp.proxy.add(Fault("slow", match=BLOB, delay=0.6, chunk=1000, times=1))
        assert c.fetch_ranges(fp.ref, fp.layer.digest, [(0, 3000)]) == [fp.layer.blob[:3000]]
        assert c.stats.retries == 1


def test_retries_are_bounded_by_the_deadline(fp: Setup) -> None:
    with _client() as c:
        c.resolve(fp.ref)
        fp.proxy.add(Fault("status", match=BLOB, status=503, times=None))
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match="giving up") as info:
            c.fetch_ranges(fp.ref, fp.layer.digest, [(0, 10)], deadline=time.monotonic() + 0.8)
        assert time.monotonic() - t0 < 3.0  # bounded (generous margin for loaded CI hosts)
        assert "503" in str(info.value) and fp.layer.digest in str(info.value)
    with _client(max_retry_time=0.5) as c2, pytest.raises(RegistryError, match="giving up"):
        c2.fetch_ranges(fp.ref, fp.layer.digest, [(0, 10)])


def test_retry_after_beyond_deadline_gives_up_at_once(fp: Setup) -> None:
    with _client() as c:
        c.resolve(fp.ref)
        fp.proxy.add(Fault("status", match=BLOB, status=503, retry_after="30", times=None))
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match="giving up"):
            c.fetch_ranges(fp.ref, fp.layer.digest, [(0, 10)], deadline=time.monotonic() + 6)
        assert time.monotonic() - t0 < 3.0  # did not sleep until the deadline


def test_wrong_bytes_in_manifest_config_and_blob_are_errors(fp: Setup) -> None:
    host = fp.proxy.host
    with _client(max_retry_time=2) as c:
        fp.proxy.add(Fault("corrupt", match=r"/manifests/", corrupt_at=30, times=None))
        with pytest.raises(VerifyError):
            c.resolve(f"{host}/faults/app@{fp.manifest_digest}")
        with pytest.raises(VerifyError, match="says"):  # by tag: Docker-Content-Digest differs
            c.resolve(fp.ref)
        fp.proxy.clear()
        img = c.resolve(fp.ref)
        fp.proxy.add(Fault("corrupt", match=img.config_digest, corrupt_at=5, times=None))
    with _client(max_retry_time=2) as fresh:
        with pytest.raises(VerifyError, match=img.config_digest):
            fresh.resolve(fp.ref)
        fp.proxy.clear()
        fp.proxy.add(Fault("corrupt", match=fp.layer.digest, corrupt_at=12345, times=None))
        with pytest.raises(VerifyError, match="discard"):
            b"".join(fresh.open_blob(fp.ref, fp.layer.digest))
        # Range bytes are not verified here: the format layer checks each chunk's digest, and
        # wrong bytes fail that check.
        [got] = fresh.fetch_ranges(fp.ref, fp.layer.digest, [(12000, 1000)])
        assert hashlib.sha256(got).digest() != hashlib.sha256(fp.layer.blob[12000:13000]).digest()


def test_open_blob_resumes_after_reset(fp: Setup) -> None:
    with _client() as c:
        fp.proxy.add(Fault("reset", match=BLOB, after_bytes=100_000, times=1))
        data = b"".join(c.open_blob(fp.ref, fp.layer.digest, chunk_size=16384))
        assert data == fp.layer.blob
    ranges = [r.range for r in fp.proxy.requests_for(BLOB)]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes=")
    assert int(ranges[-1][6:].rstrip("-")) >= 1


def test_registry_ignoring_range(fp: Setup) -> None:
    with _client(coalesce_gap=0) as c:
        fp.proxy.add(Fault("ignore_range", match=BLOB, times=None))
        assert c.fetch_ranges(fp.ref, fp.layer.digest, _ranges(fp.layer)) == _expect(
            fp.layer, _ranges(fp.layer)
        )
    assert {r.status for r in fp.proxy.requests_for(BLOB)} == {200}


def test_multirange_refused_with_400_falls_back_and_is_remembered(fp: Setup) -> None:
    ranges = _ranges(fp.layer)
    with _client(coalesce_gap=0) as c:
        fp.proxy.add(Fault("refuse_multirange", match=BLOB, times=None))
        assert c.fetch_ranges(fp.ref, fp.layer.digest, ranges) == _expect(fp.layer, ranges)
        assert c.fetch_ranges(fp.ref, fp.layer.digest, ranges) == _expect(fp.layer, ranges)
    recs = fp.proxy.requests_for(BLOB)
    multi = [r for r in recs if r.range and "," in r.range]
    assert len(multi) == 1 and multi[0].status == 400  # asked once, then remembered
    assert len([r for r in recs if r.status == 206]) == 2 * len(ranges)


@pytest.mark.parametrize("kind", ["ignore_multirange", "first_range_only"])
def test_multirange_not_honoured(fp: Setup, kind: str) -> None:
    ranges = _ranges(fp.layer)
    with _client(coalesce_gap=0) as c:
        fp.proxy.add(Fault(kind, match=BLOB, times=None))
        assert c.fetch_ranges(fp.ref, fp.layer.digest, ranges) == _expect(fp.layer, ranges)


# ---- redirects (with a token-auth registry, so that there is an Authorization to leak) -------


@pytest.fixture(scope="module")
def token_proxy(token_registry: TokenRegistry) -> Iterator[tuple[FaultProxy, str, SimpleLayer]]:
    layer = make_tar_layer({"r.bin": random.Random(5).randbytes(100_000)})
    s = token_registry.server.session()
    s.auth = ("bob", TOKEN_USERS["bob"])
    push_image(token_registry.server, "redir/app", "v1", [layer], session=s)
    with FaultProxy(token_registry.server.url) as proxy:
        yield proxy, f"{proxy.host}/redir/app:v1", layer


def test_redirect_does_not_forward_authorization(
    token_proxy: tuple[FaultProxy, str, SimpleLayer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy, ref, layer = token_proxy
    proxy.reset_records()
    proxy.add(Fault("redirect", match=r"GET /v2/redir/app/blobs/", times=None))
    try:
        with _client(coalesce_gap=0) as c:
            c.resolve(ref)
            for off in (0, 5000, 50_000):
                assert c.fetch_ranges(ref, layer.digest, [(off, 100)]) == [
                    layer.blob[off : off + 100]
                ]
            assert b"".join(c.open_blob(ref, layer.digest)) == layer.blob
    finally:
        proxy.clear()
    to_registry = proxy.requests_for(r"GET /v2/redir/app/blobs/", listener="proxy")
    redirected = [r for r in proxy.records if r.listener == "redirect"]
    assert redirected, "the redirect was not followed"
    assert all(r.authorization for r in to_registry if r.status == 307)
    assert not any(r.authorization for r in redirected)
    # The redirected URL is cached: ranges after the first go straight to the storage host.
    assert len([r for r in to_registry if r.range and r.status == 307]) == 1
    assert "secret-" not in caplog.text  # signed URL query strings stay out of the logs


def test_expired_redirect_is_refreshed(token_proxy: tuple[FaultProxy, str, SimpleLayer]) -> None:
    proxy, ref, layer = token_proxy
    proxy.reset_records()
    proxy.add(Fault("redirect", match=r"GET /v2/redir/app/blobs/", times=None, expire_after=1))
    try:
        with _client(coalesce_gap=0) as c:
            for off in (0, 1000, 2000):
                assert c.fetch_ranges(ref, layer.digest, [(off, 10)]) == [
                    layer.blob[off : off + 10]
                ]
    finally:
        proxy.clear()
    redirected = [r.status for r in proxy.records if r.listener == "redirect"]
    assert 403 in redirected and redirected.count(206) == 3


def test_http_proxy_from_environment(
    fp: Setup, registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(k, fp.proxy.url)
    for k in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(k, "example.invalid")
    ref = f"{registry.host}/faults/app:v1"
    with _client() as c:
        assert c.resolve(ref).layers[0].digest == fp.layer.digest
        assert c.fetch_ranges(ref, fp.layer.digest, [(7, 7)]) == [fp.layer.blob[7:14]]
    paths = [r.path for r in fp.proxy.records]
    assert any(p.startswith(f"http://{registry.host}/v2/faults/app/blobs/") for p in paths)
    # ...and NO_PROXY is honoured.
    fp.proxy.reset_records()
    for k in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(k, "127.0.0.1")
    with _client() as c:
        c.resolve(ref)
    assert fp.proxy.records == []


def test_dead_registry_fails_within_the_deadline() -> None:
    dead = f"127.0.0.1:{free_port()}"
    with _client(max_retry_time=30) as c:
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match="giving up"):
            c.resolve(f"{dead}/x/y:z", deadline=time.monotonic() + 1.0)
        assert time.monotonic() - t0 < 3.0  # not max_retry_time (30 s)
