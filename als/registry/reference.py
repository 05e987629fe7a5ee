"""Image references, parsed the way containers/image (docker/distribution ``reference``) does.

Pure: no I/O. ``parse_reference("busybox")`` is ``docker.io/library/busybox:latest``;
``parse_reference("127.0.0.1:5000/app@sha256:...")`` keeps the port in the registry name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from als.digest import is_digest
from als.errors import ConfigError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

# The grammar of distribution/reference (reference.go), written out once.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(rf"^{_TAG}$")
_DIGEST_RE = re.compile(rf"^{_DIGEST}$")
_LOOPBACK_RE = re.compile(r"^(?:localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d+)?$")


class InvalidReference(ConfigError):
    """An image reference that cannot be parsed."""


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``registry/repository``: the part registries.conf prefixes are matched against."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] the registry API is served from (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def is_loopback(self) -> bool:
        return bool(_LOOPBACK_RE.match(self.registry))

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def is_loopback_host(host: str) -> bool:
    return bool(_LOOPBACK_RE.match(host))


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed ``sha256:<64 hex>``, else raise InvalidReference."""
    if not is_digest(digest):
        raise InvalidReference(
            f"invalid or unsupported digest {digest[:80]!r} (want sha256:<64 hex>)"
        )
    return digest


def split_domain(name: str) -> tuple[str, str]:
    """Split a (possibly unqualified) name into registry and repository, normalising Docker Hub."""
    i = name.find("/")
    first = name[:i] if i >= 0 else ""
    if i < 0 or (
        not any(c in first for c in ".:") and first != "localhost" and first.lower() == first
    ):
        domain, rest = DOCKER_HUB, name
    else:
        domain, rest = first, name[i + 1 :]
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    return domain, rest


def parse_reference(s: str) -> ImageRef:
    """Parse ``[registry/]repository[:tag][@digest]``; a bare name gets the tag ``latest``.

    A ``docker://`` transport prefix is accepted and dropped.
    """
    text = s.strip()
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    if not text:
        raise InvalidReference("empty image reference")
    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"invalid digest in image reference {s!r}")
        validate_digest(digest)
    tag: str | None = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in image reference {s!r}")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidReference(f"repository name longer than {MAX_NAME_LENGTH} characters: {s!r}")
    registry, repository = split_domain(text)
    if not _DOMAIN_RE.match(registry):
        raise InvalidReference(f"invalid registry name {registry!r} in image reference {s!r}")
    if not _PATH_RE.match(repository):
        hint = " (repository names must be lowercase)" if repository.lower() != repository else ""
        raise InvalidReference(f"invalid repository name {repository!r} in {s!r}{hint}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(registry, repository, tag, digest)
