"""TLS, basic auth, bearer tokens and credential sources against real registries."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import requests

from als.errors import AuthError, RegistryError
from als.registry import CredentialStore, RegistriesConf, RegistryClient
from tests.integration.conftest import BASIC_USERS, TOKEN_USERS, TLSRegistry, TokenRegistry
from tests.support.push import push_blob
from tests.support.registry import RegistryServer, TLSMaterial, make_tar_layer, push_image

pytestmark = pytest.mark.registry

ALICE_PW = BASIC_USERS["alice"]
BOB_PW = TOKEN_USERS["bob"]


def _conf(certs_d: Path, toml: str = "") -> RegistriesConf:
    return RegistriesConf.from_toml(toml, certs_dirs=[str(certs_d)])


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_image(tls_registry: TLSRegistry) -> tuple[str, str]:
    layer = make_tar_layer({"f": b"tls" * 1000})
    push_image(tls_registry.server, "tls/app", "v1", [layer])
    return f"{tls_registry.server.host}/tls/app:v1", layer.digest


def test_tls_with_certs_d_ca(tls_registry: TLSRegistry, tls_image: tuple[str, str]) -> None:
    ref, digest = tls_image
    with RegistryClient(registries_conf=_conf(tls_registry.certs_d)) as c:
        img = c.resolve(ref)
        assert img.layers[0].digest == digest
        assert c.fetch_ranges(ref, digest, [(0, 4)])[0] == _blob_head(tls_registry, digest)


def _blob_head(reg: TLSRegistry, digest: str) -> bytes:
    s = reg.server.session()
    r = s.get(
        f"{reg.server.url}/v2/tls/app/blobs/{digest}", headers={"Range": "bytes=0-3"}, timeout=10
    )
    return r.content


def test_tls_unknown_ca_is_refused(
    tls_registry: TLSRegistry, tls_image: tuple[str, str], tmp_path: Path
) -> None:
    ref, _ = tls_image
    # Not loopback-by-name fallback to http either: the server only speaks TLS.
    with (
        RegistryClient(registries_conf=_conf(tmp_path / "empty-certs.d"), max_retry_time=3) as c,
        pytest.raises(RegistryError, match=r"(?i)certificate|TLS"),
    ):
        c.resolve(ref)


def test_tls_insecure_skips_verification(
    tls_registry: TLSRegistry, tls_image: tuple[str, str], tmp_path: Path
) -> None:
    ref, _ = tls_image
    conf = _conf(
        tmp_path, f'[[registry]]\nlocation = "{tls_registry.server.host}"\ninsecure = true\n'
    )
    with RegistryClient(registries_conf=conf) as c:
        assert c.resolve(ref).layers


# ---- basic auth ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_image(basic_registry: TLSRegistry) -> tuple[str, str]:
    layer = make_tar_layer({"f": b"basic" * 1000})
    push_image(basic_registry.server, "private/app", "v1", [layer])
    return f"{basic_registry.server.host}/private/app:v1", layer.digest


def test_basic_auth_runtime_credentials(
    basic_registry: TLSRegistry, basic_image: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ref, digest = basic_image
    creds = CredentialStore()
    creds.set(f"{basic_registry.server.host}/private", "alice", ALICE_PW)
    with RegistryClient(registries_conf=_conf(basic_registry.certs_d), credentials=creds) as c:
        assert c.resolve(ref).layers[0].digest == digest
        assert len(c.fetch_ranges(ref, digest, [(0, 100)])[0]) == 100
    assert ALICE_PW not in caplog.text
    assert base64.b64encode(f"alice:{ALICE_PW}".encode()).decode() not in caplog.text
    assert ALICE_PW not in repr(creds)


def test_basic_auth_without_or_with_wrong_credentials(
    basic_registry: TLSRegistry, basic_image: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ref, _ = basic_image
    with (
        RegistryClient(registries_conf=_conf(basic_registry.certs_d), max_retry_time=3) as c,
        pytest.raises(AuthError, match="credentials"),
    ):
        c.resolve(ref)
    bad = CredentialStore()
    wrong = "wrong-Pa55word-xyz"
    bad.set(basic_registry.server.host, "alice", wrong)
    with (
        RegistryClient(
            registries_conf=_conf(basic_registry.certs_d), credentials=bad, max_retry_time=3
        ) as c,
        pytest.raises(AuthError) as info,
    ):
        c.resolve(ref)
    assert wrong not in str(info.value)
    assert wrong not in caplog.text


def test_auth_file_most_specific_key(
    basic_registry: TLSRegistry, basic_image: tuple[str, str], tmp_path: Path
) -> None:
    ref, digest = basic_image
    host = basic_registry.server.host

    def enc(u: str, p: str) -> str:
        return base64.b64encode(f"{u}:{p}".encode()).decode()

    auth = {
        "auths": {
            host: {"auth": enc("alice", "not-this-one")},
            f"{host}/private": {"auth": enc("alice", ALICE_PW)},
            f"{host}/other": {"auth": enc("alice", "nor-this")},
        }
    }
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(auth))
    with RegistryClient(
        registries_conf=_conf(basic_registry.certs_d),
        credentials=CredentialStore.from_file(str(path)),
    ) as c:
        assert c.resolve(ref).layers[0].digest == digest


def test_default_files_and_credential_helper(
    basic_registry: TLSRegistry,
    basic_image: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref, digest = basic_image
    host = basic_registry.server.host
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-alstest"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        f'[ "$server" = "{host}" ] || {{ echo "credentials not found"; exit 1; }}\n'
        f"echo '{json.dumps({'Username': 'alice', 'Secret': ALICE_PW})}'\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"credHelpers": {host: "alstest"}}))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    with RegistryClient(
        registries_conf=_conf(basic_registry.certs_d),
        credentials=CredentialStore.from_default_files(),
    ) as c:
        assert c.resolve(ref).layers[0].digest == digest


def test_auth_helper_payload(basic_registry: TLSRegistry, basic_image: tuple[str, str]) -> None:
    ref, digest = basic_image
    creds = CredentialStore()
    # What podman's additional-layer-store-auth-helper sends: keyed by repo:tag.
    n = creds.set_from_auth_helper_json(
        {
            f"{basic_registry.server.host}/private/app:v1": {
                "username": "alice",
                "password": ALICE_PW,
            }
        }
    )
    assert n == 1
    with RegistryClient(registries_conf=_conf(basic_registry.certs_d), credentials=creds) as c:
        assert c.resolve(ref).layers[0].digest == digest


# ---- bearer tokens ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_image(token_registry: TokenRegistry) -> tuple[str, str]:
    layer = make_tar_layer({"f": b"token" * 1000})
    s = token_registry.server.session()
    s.auth = ("bob", BOB_PW)
    push_image(token_registry.server, "tok/app", "v1", [layer], session=s)
    return f"{token_registry.server.host}/tok/app:v1", layer.digest


def test_anonymous_token_is_cached(
    token_registry: TokenRegistry, token_image: tuple[str, str]
) -> None:
    ref, digest = token_image
    before = len(token_registry.token.requests)
    with RegistryClient() as c:
        c.resolve(ref)
        for i in range(5):
            c.fetch_ranges(ref, digest, [(i, 10)])
    reqs = token_registry.token.requests[before:]
    assert len(reqs) == 1
    assert reqs[0].user is None and reqs[0].scopes == ["repository:tok/app:pull"]


def test_token_refresh_on_401(token_registry: TokenRegistry, token_image: tuple[str, str]) -> None:
    ref, digest = token_image
    before = len(token_registry.token.requests)
    with RegistryClient() as c:
        c.resolve(ref)
        # The registry stops accepting the cached token (as when it expires early).
        for tok in c.auth.tokens.values():
            tok.header = "Bearer not-a-valid-token"
        assert len(c.fetch_ranges(ref, digest, [(0, 10)])[0]) == 10
    assert len(token_registry.token.requests) - before == 2


def test_token_with_credentials_and_push(
    token_registry: TokenRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host = token_registry.server.host
    creds = CredentialStore()
    creds.set(host, "bob", BOB_PW)
    layer = make_tar_layer({"pushed": b"by the client"})
    with RegistryClient(credentials=creds) as c:
        digest = push_image(c, "tok/pushed", "v1", [layer], registry_host=host)
        assert c.resolve(f"{host}/tok/pushed:v1").manifest_digest == digest
    users = {r.user for r in token_registry.token.requests if "tok/pushed" in str(r.scopes)}
    assert users == {"bob"}
    assert BOB_PW not in caplog.text
    # Anonymous clients may pull but not push.
    with RegistryClient(max_retry_time=3) as anon, pytest.raises(AuthError):
        push_blob(anon, f"{host}/tok/denied", b"nope")


def test_identity_token(token_registry: TokenRegistry, token_image: tuple[str, str]) -> None:
    ref, digest = token_image
    creds = CredentialStore()
    creds.set(token_registry.server.host, "<token>", identity_token="idtok-bob")  # noqa: S106 (test token)
    with RegistryClient(credentials=creds) as c:
        assert c.resolve(ref).layers[0].digest == digest
    assert any(r.method == "POST" and r.user == "bob" for r in token_registry.token.requests)


def test_wrong_token_credentials(
    token_registry: TokenRegistry, token_image: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ref, _ = token_image
    creds = CredentialStore()
    wrong = "definitely-Wrong-pw-123"
    creds.set(token_registry.server.host, "bob", wrong)
    with (
        RegistryClient(credentials=creds, max_retry_time=3) as c,
        pytest.raises(AuthError, match="refused") as info,
    ):
        c.resolve(ref)
    assert wrong not in str(info.value) and wrong not in caplog.text


def test_token_server_hiccup_is_retried(
    token_registry: TokenRegistry, token_image: tuple[str, str]
) -> None:
    ref, digest = token_image
    token_registry.token.fail_next.extend([503, 500])
    with RegistryClient(backoff_base=0.01) as c:
        assert c.resolve(ref).layers[0].digest == digest
        assert c.stats.retries >= 2


def test_registry_token_direct_check(token_registry: TokenRegistry) -> None:
    """The test token server's JWTs are accepted by distribution itself."""
    ts = token_registry.token
    tok = ts.issue(None, ["repository:tok/app:pull"])
    r = requests.get(
        f"{token_registry.server.url}/v2/tok/app/tags/list",
        headers={"Authorization": f"Bearer {tok}"},
        timeout=10,
    )
    assert r.status_code in (200, 404)


def test_mutual_tls_client_certificate(tmp_path: Path) -> None:
    from tests.support.registry import registry_available

    if not registry_available():
        pytest.skip("docker-registry (distribution) is not installed")
    tls = TLSMaterial.create(tmp_path / "tls")
    with RegistryServer(tmp_path / "reg", tls=tls, client_certs=True) as reg:
        layer = make_tar_layer({"m": b"mtls"})
        push_image(reg, "mtls/app", "v1", [layer])
        ref = f"{reg.host}/mtls/app:v1"
        only_ca = tmp_path / "only-ca"
        tls.write_certs_d(only_ca, reg.host)
        with (
            RegistryClient(registries_conf=_conf(only_ca), max_retry_time=2) as c,
            pytest.raises(RegistryError),
        ):
            c.resolve(ref)
        with_client = tmp_path / "with-client"
        tls.write_certs_d(with_client, reg.host, client_cert=True)
        with RegistryClient(registries_conf=_conf(with_client)) as c:
            assert c.resolve(ref).layers[0].digest == layer.digest
