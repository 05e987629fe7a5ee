"""Pure parts of als.registry: references, ranges, multipart bodies, registries.conf, auth keys.

(No registry needed; these live next to the integration tests of the same package.)
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from als.errors import ConfigError
from als.registry import CredentialStore, RegistriesConf, parse_reference
from als.registry.auth import Credential, normalize_key, parse_www_authenticate
from als.registry.ranges import (
    RangeParseError,
    coalesce,
    extract,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
)
from als.registry.reference import InvalidReference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest", "string"),
    [
        (
            "busybox",
            "docker.io",
            "library/busybox",
            "latest",
            None,
            "docker.io/library/busybox:latest",
        ),
        (
            "docker.io/library/busybox:1.36",
            "docker.io",
            "library/busybox",
            "1.36",
            None,
            "docker.io/library/busybox:1.36",
        ),
        (
            "index.docker.io/user/app",
            "docker.io",
            "user/app",
            "latest",
            None,
            "docker.io/user/app:latest",
        ),
        ("user/app:v1", "docker.io", "user/app", "v1", None, "docker.io/user/app:v1"),
        ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
        ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None, "localhost:5000/a/b/c:t"),
        (f"127.0.0.1:5000/app@{D}", "127.0.0.1:5000", "app", None, D, f"127.0.0.1:5000/app@{D}"),
        (f"quay.io/x/y:tag@{D}", "quay.io", "x/y", "tag", D, f"quay.io/x/y:tag@{D}"),
        ("docker://ghcr.io/o/r:1", "ghcr.io", "o/r", "1", None, "ghcr.io/o/r:1"),
    ],
)
def test_parse_reference(
    text: str, registry: str, repo: str, tag: str | None, digest: str | None, string: str
) -> None:
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert str(r) == string
    assert parse_reference(str(r)) == r


def test_api_host() -> None:
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"
    assert parse_reference("127.0.0.1:5000/x").is_loopback
    assert not parse_reference("quay.io/x").is_loopback


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "user/Case",
        "a//b",
        "app:",
        "app:-bad",
        "app@sha256:12",
        "host:port:x/app",
        "app@md5:" + "0" * 32,
        "a" * 300,
    ],
)
def test_parse_reference_rejects(bad: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(bad)


@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 500)), max_size=40),
    st.integers(0, 2000),
)
def test_coalesce_covers_everything(ranges: list[tuple[int, int]], gap: int) -> None:
    regions = coalesce(ranges, max_gap=gap)
    for a, b in itertools.pairwise(regions):
        assert b.start - a.end > gap  # merged whatever was close enough
    for off, n in ranges:
        if n:
            assert any(r.start <= off and off + n <= r.end for r in regions)
    covered = sum(r.length for r in regions)
    assert covered <= sum(n for _, n in ranges) + gap * max(0, len(ranges) - 1)


def test_coalesce_max_size() -> None:
    regions = coalesce([(0, 100), (150, 100), (300, 100)], max_gap=100, max_size=260)
    assert [(r.start, r.end) for r in regions] == [(0, 250), (300, 400)]


def _multipart(parts: list[tuple[int, bytes]], total: int, boundary: str = "XyZ") -> bytes:
    out = b""
    for start, data in parts:
        out += (
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{start + len(data) - 1}/{total}\r\n\r\n"
        ).encode() + data
    return out + f"\r\n--{boundary}--\r\n".encode()


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6))
def test_multipart_roundtrip(datas: list[bytes]) -> None:
    parts = []
    pos = 0
    for d in datas:
        parts.append((pos, d))
        pos += len(d) + 7
    # Data that contains the boundary string must not confuse the parser.
    body = _multipart(parts, pos, boundary="--XyZ")
    assert parse_multipart_byteranges(body, "--XyZ") == parts


def test_multipart_truncated_and_garbage() -> None:
    body = _multipart([(0, b"a" * 100), (200, b"b" * 50)], 1000)
    for cut in (10, 60, 150, len(body) - 8):
        with pytest.raises(RangeParseError) as info:
            parse_multipart_byteranges(body[:cut], "XyZ")
        assert info.value.truncated
    with pytest.raises(RangeParseError):
        parse_multipart_byteranges(body.replace(b"Content-Range", b"X-Range"), "XyZ")
    assert extract([(0, b"abcdef")], 2, 3) == b"cde"
    assert extract([(0, b"abcdef")], 4, 3) is None


def test_content_range_and_boundary() -> None:
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range("bytes 5-5/*") == (5, 6, None)
    for bad in ("bytes 9-0/10", "items 0-1/2", ""):
        with pytest.raises(RangeParseError):
            parse_content_range(bad)
    assert multipart_boundary('multipart/byteranges; boundary="a b"') == "a b"
    assert multipart_boundary("multipart/byteranges; boundary=abc") == "abc"
    assert multipart_boundary("application/octet-stream") is None


def test_www_authenticate() -> None:
    [ch] = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert ch.scheme == "bearer" and ch.realm == "https://auth.example/token"
    assert ch.params["scope"] == "repository:a/b:pull,push"
    chs = parse_www_authenticate('Basic realm="x", Bearer realm="y",service=z')
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[1].params == {"realm": "y", "service": "z"}


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


def test_credential_keys_and_precedence(tmp_path: Path) -> None:
    assert normalize_key("https://index.docker.io/v1/") == "docker.io"
    assert normalize_key("quay.io/org/repo:tag") == "quay.io/org/repo"
    assert normalize_key(f"localhost:5000/r@{D}") == "localhost:5000/r"
    assert normalize_key("localhost:5000") == "localhost:5000"

    def enc(u: str, p: str) -> str:
        return base64.b64encode(f"{u}:{p}".encode()).decode()

    f1 = tmp_path / "a.json"
    f1.write_text(
        json.dumps(
            {
                "auths": {
                    "quay.io": {"auth": enc("host", "p1")},
                    "quay.io/org": {"auth": enc("org", "p2")},
                }
            }
        )
    )
    f2 = tmp_path / "b.json"
    f2.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": enc("hub", "p3")},
                    "quay.io/org/repo": {"auth": enc("never", "p4")},
                }
            }
        )
    )
    store = CredentialStore([str(f1), str(f2)])
    assert store.get("quay.io", "org/repo") == Credential("org", "p2")  # first file wins
    assert store.get("quay.io", "other/x") == Credential("host", "p1")
    assert store.get("docker.io", "library/busybox") == Credential("hub", "p3")
    assert store.get("ghcr.io", "x") is None
    store.set("quay.io/org/repo:latest", "runtime", "p5")
    assert store.get("quay.io", "org/repo") == Credential("runtime", "p5")
    assert "p5" not in repr(store.get("quay.io", "org/repo"))
    store.remove("quay.io/org/repo")
    assert store.get("quay.io", "org/repo") == Credential("org", "p2")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError):
        CredentialStore([str(bad)]).get("x", "y")


def test_auth_file_others_can_read_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-pass"  # noqa: S105 - a test credential
    token = base64.b64encode(f"user:{secret}".encode()).decode()
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"auths": {"reg.example": {"auth": token}}}))
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="als.registry.auth"):
        store = CredentialStore([str(f)])
        cred = store.get("reg.example", "x")
        store.reload()
        store.get("reg.example", "x")
    assert cred is not None and cred.password == secret
    warnings = [r.getMessage() for r in caplog.records if "chmod 600" in r.getMessage()]
    assert len(warnings) == 1 and "644" in warnings[0] and str(f) in warnings[0]
    assert all(secret not in r.getMessage() for r in caplog.records)
    # a private file is not warned about
    caplog.clear()
    g = tmp_path / "private.json"
    g.write_text(f.read_text())
    g.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="als.registry.auth"):
        assert CredentialStore([str(g)]).get("reg.example", "x") is not None
    assert not [r for r in caplog.records if "chmod 600" in r.getMessage()]
