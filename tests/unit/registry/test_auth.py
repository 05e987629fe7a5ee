"""als.registry.auth: WWW-Authenticate challenges, credential keys and files."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from als.errors import ConfigError
from als.registry import CredentialStore
from als.registry.auth import Credential, normalize_key, parse_www_authenticate

D = "sha256:" + "ab" * 32


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
