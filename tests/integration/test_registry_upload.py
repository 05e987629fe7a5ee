"""The push side of the registry client (als/registry/upload.py) against a real registry:
existence checks, monolithic and chunked uploads, cross-repository mounts, manifests, and the
credentials and TLS of the pull path (basic auth over TLS, bearer tokens with pull,push)."""

from __future__ import annotations

import json
import os

import pytest

from als.digest import sha256_of
from als.errors import AuthError, RegistryError
from als.registry import CredentialStore, RegistriesConf, RegistryClient
from als.registry.upload import Uploader
from tests.integration.conftest import BASIC_USERS, TOKEN_USERS, TLSRegistry, TokenRegistry
from tests.support.registry import OCI_CONFIG, OCI_MANIFEST, RegistryServer


def _manifest(config: bytes, layer: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_of(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256_of(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()


def test_upload_exists_mount_and_manifest(registry: RegistryServer) -> None:
    data = os.urandom(50_000)
    digest = sha256_of(data)
    with RegistryClient() as c:
        up = Uploader(c, f"{registry.host}/upload/one:v1")
        assert up.blob_size(digest) is None
        first = up.push_blob(data)
        assert (first.how, first.digest, first.size) == ("uploaded", digest, len(data))
        assert up.blob_size(digest) == len(data)
        assert up.push_blob(data).how == "exists"
        # Another repository of the same registry gets it by a mount: no bytes sent.
        other = Uploader(c, f"{registry.host}/upload/two:v1")
        mark = registry.mark()
        got = other.push_blob(data, mount_from=("upload/one",))
        assert (got.how, got.source) == ("mounted", "upload/one")
        assert not [e for e in registry.access_log(since=mark) if e.method in ("PUT", "PATCH")]
        assert other.blob_size(digest) == len(data)
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        other.push_blob(config)
        body = _manifest(config, data)
        assert other.put_manifest(body, OCI_MANIFEST) == sha256_of(body)
        assert c.manifest(f"{registry.host}/upload/two:v1") == (body, sha256_of(body), OCI_MANIFEST)
        assert c.fetch_blob(f"{registry.host}/upload/two:v1", digest, size=len(data)) == data


def test_chunked_upload(registry: RegistryServer) -> None:
    data = os.urandom(300_000)
    with RegistryClient() as c:
        up = Uploader(c, f"{registry.host}/upload/chunked:v1", chunk_size=64 << 10)
        mark = registry.mark()
        assert up.upload_blob(data) == sha256_of(data)
        patches = [e for e in registry.access_log(since=mark) if e.method == "PATCH"]
        assert len(patches) == 5  # 300,000 bytes in 64 KiB pieces
        assert c.fetch_blob(f"{registry.host}/upload/chunked:v1", sha256_of(data)) == data


def test_upload_refuses_a_wrong_digest(registry: RegistryServer) -> None:
    with RegistryClient() as c, pytest.raises(RegistryError, match="not sha256"):
        Uploader(c, f"{registry.host}/upload/bad:v1").upload_blob(b"x", "sha256:" + "0" * 64)


def test_upload_with_basic_auth_over_tls(basic_registry: TLSRegistry) -> None:
    host = basic_registry.server.host
    conf = RegistriesConf(certs_dirs=(str(basic_registry.certs_d),))
    data = os.urandom(10_000)
    with RegistryClient(registries_conf=conf, max_retry_time=5) as anon, pytest.raises(AuthError):
        Uploader(anon, f"{host}/basic/push:v1").upload_blob(data)
    creds = CredentialStore()
    user, pw = next(iter(BASIC_USERS.items()))
    creds.set(host, user, pw)
    with RegistryClient(registries_conf=conf, credentials=creds) as c:
        assert Uploader(c, f"{host}/basic/push:v1").push_blob(data).how == "uploaded"
        assert c.fetch_blob(f"{host}/basic/push:v1", sha256_of(data)) == data


def test_upload_with_tokens_asks_for_pull_push(token_registry: TokenRegistry) -> None:
    host = token_registry.server.host
    creds = CredentialStore()
    user, pw = next(iter(TOKEN_USERS.items()))
    creds.set(host, user, pw)
    data = os.urandom(10_000)
    with RegistryClient(credentials=creds) as c:
        assert Uploader(c, f"{host}/tok/upload:v1").push_blob(data).how == "uploaded"
    scopes = [s for r in token_registry.token.requests for s in r.scopes if "tok/upload" in s]
    assert "repository:tok/upload:pull,push" in scopes
