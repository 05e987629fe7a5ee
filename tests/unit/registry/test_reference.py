"""als.registry.reference: parsing image references."""

from __future__ import annotations

import pytest

from als.registry import parse_reference
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
