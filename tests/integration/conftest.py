"""Fixtures for the registry integration tests: real docker-registry instances on loopback.

Each registry variant starts once per module (module scope) to keep the suite fast; tests use
their own repository names so they do not disturb each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.registry import RegistryServer, TLSMaterial, TokenServer, registry_available

BASIC_USERS = {"alice": "alice-S3cret-pw"}
TOKEN_USERS = {"bob": "bob-S3cret-pw"}


@pytest.fixture(scope="session", autouse=True)
def _no_proxy_for_loopback() -> Iterator[None]:
    """Make sure a proxy configured in the environment is never used for loopback."""
    old = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    extra = "127.0.0.1,127.0.0.2,localhost"
    for k, v in old.items():
        os.environ[k] = f"{v},{extra}" if v else extra
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _need_registry() -> None:
    if not registry_available():
        pytest.skip("docker-registry (distribution) is not installed")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A plain-http registry."""
    _need_registry()
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@dataclass
class TLSRegistry:
    server: RegistryServer
    tls: TLSMaterial
    certs_d: Path  # a certs.d root holding <host>/ca.crt


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRegistry]:
    """An HTTPS registry with a CA made for the test, written into a certs.d directory."""
    _need_registry()
    d = tmp_path_factory.mktemp("tls-registry")
    tls = TLSMaterial.create(d / "tls")
    with RegistryServer(d / "reg", tls=tls) as reg:
        certs_d = d / "certs.d"
        tls.write_certs_d(certs_d, reg.host)
        yield TLSRegistry(reg, tls, certs_d)


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRegistry]:
    """HTTPS + htpasswd (bcrypt) basic auth; the users are ``BASIC_USERS``."""
    _need_registry()
    d = tmp_path_factory.mktemp("basic-registry")
    tls = TLSMaterial.create(d / "tls")
    with RegistryServer(d / "reg", tls=tls, htpasswd=BASIC_USERS) as reg:
        certs_d = d / "certs.d"
        tls.write_certs_d(certs_d, reg.host)
        yield TLSRegistry(reg, tls, certs_d)


@dataclass
class TokenRegistry:
    server: RegistryServer
    token: TokenServer


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """Plain http + bearer-token auth from a TokenServer; anonymous pull allowed,
    ``TOKEN_USERS`` may push; identity token ``idtok-bob`` refreshes to bob."""
    _need_registry()
    d = tmp_path_factory.mktemp("token-registry")
    with (
        TokenServer(d / "token", users=TOKEN_USERS, identity_tokens={"idtok-bob": "bob"}) as ts,
        RegistryServer(d / "reg", token=ts) as reg,
    ):
        yield TokenRegistry(reg, ts)


@dataclass
class MirrorPair:
    upstream: RegistryServer
    mirror: RegistryServer  # distribution in proxy mode, pulling through from ``upstream``


@pytest.fixture(scope="module")
def mirror_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirrorPair]:
    _need_registry()
    d = tmp_path_factory.mktemp("mirror")
    with (
        RegistryServer(d / "upstream") as up,
        RegistryServer(d / "mirror", proxy_remote=up.url) as mirror,
    ):
        yield MirrorPair(up, mirror)
