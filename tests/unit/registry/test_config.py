"""als.registry.config: registries.conf loading, drop-ins and endpoint rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from als.errors import ConfigError
from als.registry import RegistriesConf

D = "sha256:" + "ab" * 32


def test_registries_conf_loading(tmp_path: Path) -> None:
    main = tmp_path / "registries.conf"
    main.write_text(
        'unqualified-search-registries = ["docker.io"]\n'
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
        '[[registry.mirror]]\nlocation = "mirror.local:5000"\n'
        '[[registry.mirror]]\nlocation = "p2p.local:65001/dh"\ninsecure = true\n'
        'pull-from-mirror = "digest-only"\n'
        '[[registry]]\nlocation = "quay.io"\nblocked = true\n'
    )
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "50-quay.conf").write_text(
        'additional-layer-store-auth-helper = "als-auth"\n[[registry]]\nlocation = "quay.io"\n'
    )
    (d / "ignored.txt").write_text("not toml")
    conf = RegistriesConf.load(str(main), certs_dirs=[])
    assert conf.auth_helper == "als-auth"
    assert len(conf.sources) == 2
    by_tag = conf.endpoints("busybox")
    assert [str(e) for e in by_tag] == [
        "mirror.local:5000/library/busybox",
        "registry-1.docker.io/library/busybox",
    ]
    by_digest = conf.endpoints(f"busybox@{D}")
    assert [str(e) for e in by_digest] == [
        "mirror.local:5000/library/busybox",
        "p2p.local:65001/dh/library/busybox",
        "registry-1.docker.io/library/busybox",
    ]
    assert by_digest[1].insecure and by_digest[1].mirror and not by_digest[2].mirror
    assert conf.is_insecure("p2p.local:65001") and not conf.is_insecure("mirror.local:5000")
    # The drop-in replaced the blocked quay.io entry.
    assert [str(e) for e in conf.endpoints("quay.io/a/b")] == ["quay.io/a/b"]


def test_registries_conf_rules() -> None:
    conf = RegistriesConf.from_toml(
        '[[registry]]\nprefix = "*.example.com"\nblocked = true\n'
        '[[registry]]\nprefix = "ok.example.com"\nlocation = "ok.example.com"\n'
        '[[registry]]\nprefix = "r.io/team"\nlocation = "internal:5000/mirror/team"\n'
        'mirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m:1"\n',
        certs_dirs=[],
    )
    with pytest.raises(ConfigError, match="blocked"):
        conf.endpoints("bad.example.com/x")
    assert [str(e) for e in conf.endpoints("ok.example.com/x")] == ["ok.example.com/x"]
    assert [str(e) for e in conf.endpoints("r.io/team/app:1")] == ["internal:5000/mirror/team/app"]
    assert [str(e) for e in conf.endpoints(f"r.io/team/app@{D}")] == [
        "m:1/app",
        "internal:5000/mirror/team/app",
    ]
    # "r.io/teamx" is not under the prefix "r.io/team".
    assert [str(e) for e in conf.endpoints("r.io/teamx/app")] == ["r.io/teamx/app"]
    for bad in (
        '[[registry]]\nprefix = "*.x"\nlocation = "y"\n',
        '[[registry]]\nlocation = "a"\n[[registry.mirror]]\nlocation = "b"\n'
        'pull-from-mirror = "sometimes"\n',
        '[registries.search]\nregistries = ["x"]\n',
        "not = [toml",
    ):
        with pytest.raises(ConfigError):
            RegistriesConf.from_toml(bad)
    with pytest.raises(ConfigError):
        RegistriesConf.load("/nonexistent/registries.conf")
