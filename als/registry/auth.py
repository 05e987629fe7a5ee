"""Credentials (auth files, credential helpers, runtime-set) and ``WWW-Authenticate`` parsing.

Nothing here ever puts a secret into a log line, an exception message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import stat
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from als.errors import AuthError, ConfigError

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 15.0


@dataclass(frozen=True)
class Credential:
    username: str
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # never show secrets, even in debugging output
        return f"Credential(username={self.username!r}, secret=***)"


def normalize_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``host/repo:tag`` -> ``host/repo``."""
    k = key.strip()
    for scheme in ("https://", "http://"):
        if k.startswith(scheme):
            k = k[len(scheme) :]
            # Legacy docker keys are URLs: only the host part counts.
            k = k.split("/", 1)[0]
            break
    k = k.rstrip("/")
    if "@" in k:
        k = k.split("@", 1)[0]
    if "/" in k:
        head, _, last = k.rpartition("/")
        if ":" in last:
            k = f"{head}/{last.split(':', 1)[0]}"
    host, sep, rest = k.partition("/")
    if host in ("index.docker.io", "registry-1.docker.io"):
        host = "docker.io"
    return host + sep + rest


def lookup_keys(host: str, repository: str) -> Iterator[str]:
    """Most specific first: host/a/b/c, host/a/b, host/a, host."""
    host = normalize_key(host)
    parts = repository.split("/") if repository else []
    for i in range(len(parts), 0, -1):
        yield host + "/" + "/".join(parts[:i])
    yield host


def _decode_auth_entry(entry: Mapping[str, Any], where: str) -> Credential | None:
    token = entry.get("identitytoken") or None
    auth = entry.get("auth")
    if auth:
        try:
            user, sep, password = base64.b64decode(str(auth)).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"{where}: an 'auth' entry is not base64 user:password") from None
        if not sep:
            raise ConfigError(f"{where}: an 'auth' entry is not base64 user:password")
        return Credential(user, password, token)
    if entry.get("username"):
        return Credential(str(entry["username"]), entry.get("password"), token)
    if token:
        return Credential("<token>", None, str(token))
    return None


def call_credential_helper(helper: str, server: str) -> Credential | None:
    """Run ``docker-credential-<helper> get`` for ``server``; None if it has no credentials."""
    try:
        proc = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("credential helper %s failed for %s: %s", helper, server, type(exc).__name__)
        return None
    if proc.returncode != 0:
        out = proc.stdout.decode(errors="replace").strip()
        if "credentials not found" not in out.lower():
            log.warning(
                "credential helper %s failed for %s (exit %d)", helper, server, proc.returncode
            )
        return None
    try:
        data = json.loads(proc.stdout)
        user, secret = str(data.get("Username", "")), str(data.get("Secret", ""))
    except (ValueError, AttributeError):
        log.warning("credential helper %s returned unparseable output for %s", helper, server)
        return None
    if user == "<token>":
        return Credential(user, None, secret)
    return Credential(user, secret)


@dataclass
class _AuthFile:
    path: str
    auths: dict[str, Credential]
    cred_helpers: dict[str, str]
    creds_store: str | None


_WARNED_EXPOSED: set[str] = set()


def _warn_if_exposed(path: str) -> None:
    """Say once per file when credentials are readable or writable by other users."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077 and path not in _WARNED_EXPOSED:
        _WARNED_EXPOSED.add(path)
        log.warning(
            "auth file %s holds credentials and other users may access it (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )


def _load_auth_file(path: str) -> _AuthFile | None:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read auth file %s: %s", path, exc.strerror)
        return None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        raise ConfigError(f"auth file {path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"auth file {path} is not a JSON object")
    auths: dict[str, Credential] = {}
    raw_auths = data.get("auths", {})
    if not isinstance(raw_auths, dict):
        raise ConfigError(f"auth file {path}: 'auths' is not an object")
    if raw_auths:
        _warn_if_exposed(path)
    for key, entry in raw_auths.items():
        if isinstance(entry, dict):
            cred = _decode_auth_entry(entry, f"auth file {path}")
            if cred is not None:
                auths[normalize_key(key)] = cred
    helpers = {normalize_key(k): str(v) for k, v in dict(data.get("credHelpers", {})).items()}
    store = data.get("credsStore") or None
    return _AuthFile(path, auths, helpers, str(store) if store else None)


def default_auth_files() -> list[str]:
    """The files podman and docker read, in containers-auth.json(5) order."""
    files: list[str] = []
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        files.append(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        files.append(os.path.join(xdg, "containers", "auth.json"))
    if os.geteuid() == 0:
        files.append("/run/containers/0/auth.json")
    home = os.path.expanduser("~")
    files.append(os.path.join(home, ".config", "containers", "auth.json"))
    docker_config = os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    files.append(os.path.join(docker_config, "config.json"))
    return files


class CredentialStore:
    """Credentials by ``host[:port][/repo...]`` key, looked up most-specific first.

    Credentials set at run time (``set``, e.g. from podman's additional-layer-store-auth-helper)
    win over auth files; auth files are read in order and the first that has a match wins (as in
    containers/image). Thread-safe.
    """

    def __init__(self, files: Sequence[str] = ()) -> None:
        self._lock = threading.Lock()
        self._runtime: dict[str, Credential] = {}
        self._files = list(files)
        self._loaded: list[_AuthFile] | None = None

    def __repr__(self) -> str:
        return f"CredentialStore(files={self._files!r}, runtime_keys={sorted(self._runtime)!r})"

    @classmethod
    def from_default_files(cls) -> CredentialStore:
        return cls(default_auth_files())

    @classmethod
    def from_file(cls, path: str) -> CredentialStore:
        if not os.path.exists(path):
            raise ConfigError(f"auth file {path} does not exist")
        return cls([path])

    def set(
        self,
        key: str,
        username: str,
        password: str | None = None,
        identity_token: str | None = None,
    ) -> None:
        if not username and not identity_token:
            raise ValueError("a credential needs a username or an identity token")
        with self._lock:
            self._runtime[normalize_key(key)] = Credential(username, password, identity_token)

    def remove(self, key: str) -> None:
        with self._lock:
            self._runtime.pop(normalize_key(key), None)

    def set_from_auth_helper_json(self, data: Mapping[str, Any]) -> int:
        """Take podman's auth-helper payload ``{"<repo>{:tag|@digest}": {username,...}}``."""
        n = 0
        for key, entry in data.items():
            if not isinstance(entry, Mapping):
                continue
            user = str(entry.get("username") or "")
            password = entry.get("password") or None
            token = entry.get("identityToken") or entry.get("identitytoken") or None
            if user or token:
                self.set(key, user or "<token>", password, token)
                n += 1
        return n

    def _files_loaded(self) -> list[_AuthFile]:
        with self._lock:
            if self._loaded is None:
                loaded = []
                for f in self._files:
                    af = _load_auth_file(f)
                    if af is not None:
                        loaded.append(af)
                self._loaded = loaded
            return self._loaded

    def reload(self) -> None:
        with self._lock:
            self._loaded = None

    def get(self, host: str, repository: str = "") -> Credential | None:
        keys = list(lookup_keys(host, repository))
        with self._lock:
            for k in keys:
                if k in self._runtime:
                    return self._runtime[k]
        for af in self._files_loaded():
            for k in keys:
                if k in af.auths:
                    return af.auths[k]
            hostkey = keys[-1]
            helper = af.cred_helpers.get(hostkey) or af.creds_store
            if helper:
                cred = call_credential_helper(helper, hostkey)
                if cred is not None:
                    return cred
        return None


# ---- WWW-Authenticate ------------------------------------------------------------------------

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic" (lowercase)
    params: Mapping[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges (handles several schemes)."""
    out: list[Challenge] = []
    rest = value.strip()
    while rest:
        m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
        if not m:
            break
        scheme = m.group(1).lower()
        rest = rest[m.end() :]
        params: dict[str, str] = {}
        while True:
            pm = _PARAM_RE.match(rest)
            if not pm:
                break
            # A bare word followed by '=' is a param; a new scheme name is not followed by '='.
            params[pm.group(1).lower()] = (
                re.sub(r"\\(.)", r"\1", pm.group(2)) if pm.group(2) is not None else pm.group(3)
            )
            rest = rest[pm.end() :]
        out.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return out


def basic_header(cred: Credential) -> str:
    if cred.password is None:
        raise AuthError(f"credentials for user {cred.username!r} have no password for basic auth")
    raw = f"{cred.username}:{cred.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


# ---- which token realms may receive a registry's credentials ---------------------------------

# Docker Hub's registry hands out tokens from auth.docker.io: its credentials go there.
DEFAULT_AUTH_REALM_HOSTS = "registry-1.docker.io=auth.docker.io"
_HOST_RE = re.compile(r"\*|[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")


@dataclass(frozen=True)
class RealmPolicy:
    """Token realms on other hosts that may receive a registry's credentials.

    A registry's credentials always go to a realm on the registry's own host name; to another
    host only where ``pairs`` maps the registry host (or ``*``) to the realm host (or ``*``).
    """

    pairs: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def allows(self, registry_host: str, realm_host: str) -> bool:
        reg, realm = registry_host.lower(), realm_host.lower()
        if reg == realm:
            return True
        allowed = self.pairs.get(reg, frozenset()) | self.pairs.get("*", frozenset())
        return realm in allowed or "*" in allowed


def parse_realm_policy(text: str) -> RealmPolicy:
    """``"registry=realm, registry=realm"`` (host names without ports, ``*`` for any)."""
    pairs: dict[str, set[str]] = {}
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        reg, sep, realm = item.lower().partition("=")
        if not sep or not _HOST_RE.fullmatch(reg) or not _HOST_RE.fullmatch(realm):
            raise ConfigError(f"auth_realm_hosts: {item!r} is not registry-host=realm-host")
        pairs.setdefault(reg, set()).add(realm)
    return RealmPolicy({k: frozenset(v) for k, v in pairs.items()})
