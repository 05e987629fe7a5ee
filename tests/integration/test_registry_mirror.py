"""registries.conf against real registries: mirrors (distribution in proxy mode), fallback to
the primary, pull-from-mirror, prefix/location rewrites, blocked registries."""

from __future__ import annotations

import random

import pytest

from als.errors import ConfigError
from als.registry import RegistriesConf, RegistryClient
from tests.integration.conftest import MirrorPair
from tests.support.registry import (
    RegistryServer,
    SimpleLayer,
    free_port,
    make_tar_layer,
    push_image,
)

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def upstream_image(mirror_pair: MirrorPair) -> tuple[SimpleLayer, str]:
    layer = make_tar_layer({"m.bin": random.Random(9).randbytes(150_000)})
    digest = push_image(mirror_pair.upstream, "mir/app", "v1", [layer])
    return layer, digest


def _conf(upstream: str, mirror: str, extra: str = "") -> RegistriesConf:
    return RegistriesConf.from_toml(
        f'[[registry]]\nlocation = "{upstream}"\n{extra}\n'
        f'[[registry.mirror]]\nlocation = "{mirror}"\n',
        certs_dirs=[],
    )


def test_pull_through_mirror_is_used(
    mirror_pair: MirrorPair, upstream_image: tuple[SimpleLayer, str]
) -> None:
    layer, digest = upstream_image
    up, mirror = mirror_pair.upstream, mirror_pair.mirror
    ref = f"{up.host}/mir/app:v1"
    m_mark = mirror.mark()
    with RegistryClient(registries_conf=_conf(up.host, mirror.host)) as c:
        img = c.resolve(ref)
        assert img.manifest_digest == digest
        assert img.source == f"{mirror.host}/mir/app"
        ranges = [(0, 100), (100_000, 1000)]
        assert c.fetch_ranges(ref, layer.digest, ranges) == [
            layer.blob[o : o + n] for o, n in ranges
        ]
        hosts = c.stats.snapshot()["per_host"]
        assert up.host not in hosts  # the client never talked to the primary itself
    log = mirror.access_log(since=m_mark)
    assert any("/manifests/v1" in e.path and e.status == 200 for e in log)
    assert any(layer.digest in e.path and e.status in (200, 206) for e in log)
    # The mirror pulled through from the upstream.
    assert any("/manifests/" in e.path for e in up.access_log())


def test_mirror_down_falls_back_to_primary(
    mirror_pair: MirrorPair, upstream_image: tuple[SimpleLayer, str]
) -> None:
    layer, digest = upstream_image
    up = mirror_pair.upstream
    dead = f"127.0.0.1:{free_port()}"
    with RegistryClient(registries_conf=_conf(up.host, dead), connect_timeout=1) as c:
        img = c.resolve(f"{up.host}/mir/app:v1")
        assert img.manifest_digest == digest
        assert img.source == f"{up.host}/mir/app"
        assert c.fetch_ranges(img.ref, layer.digest, [(10, 10)]) == [layer.blob[10:20]]
        assert c.stats.fallbacks >= 1
        assert c.stats.retries == 0  # a dead mirror is skipped, not retried with backoff


def test_digest_only_mirror(
    mirror_pair: MirrorPair, upstream_image: tuple[SimpleLayer, str]
) -> None:
    _layer, digest = upstream_image
    up, mirror = mirror_pair.upstream, mirror_pair.mirror
    conf = RegistriesConf.from_toml(
        f'[[registry]]\nlocation = "{up.host}"\n[[registry.mirror]]\n'
        f'location = "{mirror.host}"\npull-from-mirror = "digest-only"\n',
        certs_dirs=[],
    )
    with RegistryClient(registries_conf=conf) as c:
        by_tag = c.resolve(f"{up.host}/mir/app:v1")
        assert by_tag.source == f"{up.host}/mir/app"
        by_digest = c.resolve(f"{up.host}/mir/app@{digest}")
        assert by_digest.source == f"{mirror.host}/mir/app"


def test_prefix_location_rewrite(
    mirror_pair: MirrorPair, upstream_image: tuple[SimpleLayer, str]
) -> None:
    _layer, digest = upstream_image
    up = mirror_pair.upstream
    conf = RegistriesConf.from_toml(
        f'[[registry]]\nprefix = "images.example.invalid/team"\nlocation = "{up.host}/mir"\n',
        certs_dirs=[],
    )
    with RegistryClient(registries_conf=conf) as c:
        img = c.resolve("images.example.invalid/team/app:v1")
        assert img.manifest_digest == digest
        assert img.source == f"{up.host}/mir/app"


def test_blocked_registry(mirror_pair: MirrorPair) -> None:
    up = mirror_pair.upstream
    conf = RegistriesConf.from_toml(
        f'[[registry]]\nlocation = "{up.host}"\nblocked = true\n', certs_dirs=[]
    )
    with RegistryClient(registries_conf=conf) as c, pytest.raises(ConfigError, match="blocked"):
        c.resolve(f"{up.host}/mir/app:v1")


def test_mirror_without_the_image_falls_back(
    mirror_pair: MirrorPair, registry: RegistryServer, upstream_image: tuple[SimpleLayer, str]
) -> None:
    """A plain registry configured as a mirror that does not have the image answers 404."""
    layer, digest = upstream_image
    up = mirror_pair.upstream
    mark = registry.mark()
    with RegistryClient(registries_conf=_conf(up.host, registry.host)) as c:
        img = c.resolve(f"{up.host}/mir/app:v1")
        assert img.manifest_digest == digest and img.source == f"{up.host}/mir/app"
        assert c.fetch_ranges(img.ref, layer.digest, [(3, 3)]) == [layer.blob[3:6]]
    assert {e.status for e in registry.access_log(since=mark) if "/mir/app/" in e.path} == {404}
