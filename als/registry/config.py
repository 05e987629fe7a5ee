"""``registries.conf`` (containers-registries.conf(5), version 2 TOML) and certs.d lookup.

Only what a puller needs: ``[[registry]]`` prefix/location rewrites, ``insecure``, ``blocked``,
``[[registry.mirror]]`` with ``pull-from-mirror``, the legacy ``mirror-by-digest-only`` and the
``additional-layer-store-auth-helper`` setting. Files in ``registries.conf.d/`` (``*.conf``, in
name order) are merged on top of the main file: a later ``[[registry]]`` with the same prefix
replaces an earlier one, and a later top-level key overrides an earlier one.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from als.errors import ConfigError
from als.registry.reference import ImageRef, parse_reference

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/containers/registries.conf"
DEFAULT_CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
_WILDCARD_RE = re.compile(r"^\*(?:\.[A-Za-z0-9-]+)+$")


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class RegistryEntry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """One place to pull an image from: a mirror or the primary location, after rewriting."""

    host: str  # host[:port] of the registry API
    repository: str
    insecure: bool  # from registries.conf: plain http or unverified TLS allowed
    mirror: bool

    def __str__(self) -> str:
        return f"{self.host}/{self.repository}"


def _split_location(location: str) -> tuple[str, str]:
    host, _, path = location.partition("/")
    return host, path


def _api_host(host: str) -> str:
    return "registry-1.docker.io" if host in ("docker.io", "index.docker.io") else host


@dataclass
class RegistriesConf:
    registries: list[RegistryEntry] = field(default_factory=list)
    auth_helper: str | None = None
    credential_helpers: tuple[str, ...] = ()
    certs_dirs: tuple[str, ...] = DEFAULT_CERTS_DIRS
    sources: tuple[str, ...] = ()

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: str | None = None, *, certs_dirs: Sequence[str] | None = None
    ) -> RegistriesConf:
        """Load ``path`` and the ``registries.conf.d`` directory next to it.

        ``path`` defaults to ``$CONTAINERS_REGISTRIES_CONF`` or /etc/containers/registries.conf;
        a missing default file is an empty config."""
        explicit = path is not None
        p = Path(path or os.environ.get("CONTAINERS_REGISTRIES_CONF") or DEFAULT_PATH)
        conf = cls(certs_dirs=tuple(certs_dirs) if certs_dirs is not None else DEFAULT_CERTS_DIRS)
        files: list[Path] = []
        if p.is_file():
            files.append(p)
        elif explicit:
            raise ConfigError(f"registries.conf {p} does not exist")
        d = p.parent / "registries.conf.d"
        if d.is_dir():
            files.extend(sorted(f for f in d.iterdir() if f.suffix == ".conf" and f.is_file()))
        for f in files:
            try:
                data = tomllib.loads(f.read_text())
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read registries config {f}: {exc}") from None
            conf._merge(data, str(f))
        conf.sources = tuple(str(f) for f in files)
        return conf

    @classmethod
    def from_toml(cls, text: str, *, certs_dirs: Sequence[str] | None = None) -> RegistriesConf:
        conf = cls(certs_dirs=tuple(certs_dirs) if certs_dirs is not None else DEFAULT_CERTS_DIRS)
        try:
            conf._merge(tomllib.loads(text), "<string>")
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid registries.conf: {exc}") from None
        return conf

    def _merge(self, data: Mapping[str, Any], source: str) -> None:
        if "registries" in data and isinstance(data["registries"], Mapping):
            raise ConfigError(f"{source}: registries.conf version 1 format is not supported")
        if "additional-layer-store-auth-helper" in data:
            self.auth_helper = str(data["additional-layer-store-auth-helper"]) or None
        if "credential-helpers" in data:
            self.credential_helpers = tuple(str(h) for h in data["credential-helpers"])
        for raw in data.get("registry", []):
            entry = _parse_entry(raw, source)
            self.registries = [r for r in self.registries if r.prefix != entry.prefix]
            self.registries.append(entry)

    # ---- queries -------------------------------------------------------------------------
    def find(self, ref: ImageRef) -> RegistryEntry | None:
        """The entry whose prefix matches ``ref`` most specifically (longest prefix wins)."""
        name = ref.name
        best: RegistryEntry | None = None
        best_len = -1
        for entry in self.registries:
            n = _match_len(entry.prefix, name)
            if n > best_len:
                best, best_len = entry, n
        return best

    def endpoints(self, ref: ImageRef | str) -> list[Endpoint]:
        """Where to pull ``ref`` from, in order: eligible mirrors, then the primary location.

        Raises ConfigError if the registry is blocked.
        """
        if isinstance(ref, str):
            ref = parse_reference(ref)
        entry = self.find(ref)
        if entry is None:
            return [Endpoint(_api_host(ref.registry), ref.repository, False, False)]
        if entry.blocked:
            raise ConfigError(
                f"registry {ref.registry} is blocked in registries.conf "
                f"(prefix {entry.prefix!r}): refusing to pull {ref}"
            )
        by_digest = ref.digest is not None
        out: list[Endpoint] = []
        for m in entry.mirrors:
            mode = "digest-only" if entry.mirror_by_digest_only else m.pull_from_mirror
            if (mode == "digest-only" and not by_digest) or (mode == "tag-only" and by_digest):
                continue
            out.append(_rewrite(entry.prefix, m.location, ref, m.insecure, mirror=True))
        out.append(_rewrite(entry.prefix, entry.location, ref, entry.insecure, mirror=False))
        return out

    def is_insecure(self, host: str) -> bool:
        """Whether ``host`` (an endpoint host) may be used without TLS verification."""
        for entry in self.registries:
            if _split_location(entry.location)[0] == host and entry.insecure:
                return True
            for m in entry.mirrors:
                if _split_location(m.location)[0] == host and m.insecure:
                    return True
        return False

    def certs_dir(self, host: str) -> Path | None:
        """The certs.d directory for ``host[:port]``, if any exists."""
        for root in self.certs_dirs:
            d = Path(root) / host
            if d.is_dir():
                return d
        return None


def _parse_entry(raw: Mapping[str, Any], source: str) -> RegistryEntry:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [[registry]] must be a table")
    location = str(raw.get("location", "")).rstrip("/")
    prefix = str(raw.get("prefix", "") or location).rstrip("/")
    if not prefix:
        raise ConfigError(f"{source}: [[registry]] needs a location or a prefix")
    if prefix.startswith("*"):
        if not _WILDCARD_RE.match(prefix):
            raise ConfigError(f"{source}: invalid wildcard prefix {prefix!r}")
        if location:
            raise ConfigError(f"{source}: a wildcard prefix {prefix!r} cannot have a location")
    mirrors = []
    for m in raw.get("mirror", []):
        mloc = str(m.get("location", "")).rstrip("/")
        if not mloc:
            raise ConfigError(f"{source}: mirror of {prefix!r} without a location")
        mode = str(m.get("pull-from-mirror", "all") or "all")
        if mode not in PULL_FROM_MIRROR:
            raise ConfigError(
                f"{source}: mirror {mloc!r}: pull-from-mirror must be one of "
                f"{', '.join(PULL_FROM_MIRROR)}, not {mode!r}"
            )
        mirrors.append(Mirror(mloc, bool(m.get("insecure", False)), mode))
    return RegistryEntry(
        prefix=prefix,
        location=location,
        insecure=bool(raw.get("insecure", False)),
        blocked=bool(raw.get("blocked", False)),
        mirror_by_digest_only=bool(raw.get("mirror-by-digest-only", False)),
        mirrors=tuple(mirrors),
    )


def _match_len(prefix: str, name: str) -> int:
    """Length of the match of ``prefix`` against the image name, or -1."""
    if prefix.startswith("*."):
        host = name.split("/", 1)[0]
        return len(prefix) if host.endswith(prefix[1:]) else -1
    if name == prefix or (name.startswith(prefix) and name[len(prefix)] in "/:@"):
        return len(prefix)
    return -1


def _rewrite(
    prefix: str, location: str, ref: ImageRef, insecure: bool, *, mirror: bool
) -> Endpoint:
    name = ref.name
    new = name if prefix.startswith("*.") or not location else location + name[len(prefix) :]
    host, _, repo = new.partition("/")
    if not repo:
        raise ConfigError(f"rewriting {name} with location {location!r} leaves no repository")
    return Endpoint(_api_host(host), repo, insecure, mirror)
