"""Getting authorized by a registry host: the ``/v2/`` ping, challenges, bearer tokens.

``AuthFlow`` pings each host once (finding its scheme and its challenge), answers basic
challenges from the credential store and bearer challenges with tokens from the realm, which it
caches per (host, scope). Credentials go to a token realm on another host only when the realm
policy (``auth_realm_hosts``) allows it. The parsing of challenges and credential files lives in
``als.registry.auth``; this module is the part that talks, through the transport.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from als.errors import AuthError, RegistryError
from als.registry.auth import (
    Challenge,
    Credential,
    CredentialStore,
    RealmPolicy,
    basic_header,
    parse_www_authenticate,
)
from als.registry.reference import is_loopback_host
from als.registry.transport import (
    TRANSIENT_STATUSES,
    TLSFailure,
    Transient,
    Transport,
    retry_after,
)

log = logging.getLogger(__name__)


@dataclass
class HostState:
    """What is known of one registry host: its scheme and challenge (from the ping), whether it
    serves multi-range requests, and until when it counts as down (as a mirror)."""

    scheme: str | None = None
    challenge: Challenge | None = None
    pinged: bool = False
    multirange: bool | None = None
    down_until: float = 0.0


@dataclass
class Token:
    header: str = field(repr=False)
    expires: float


class AuthFlow:
    """Per-host state and the ``Authorization`` header for each request. Thread-safe."""

    def __init__(
        self, transport: Transport, credentials: CredentialStore, realm_policy: RealmPolicy
    ) -> None:
        self.transport = transport
        self.credentials = credentials
        self.realm_policy = realm_policy
        self._lock = threading.Lock()
        self._hosts: dict[str, HostState] = {}
        self.tokens: dict[tuple[str, str], Token] = {}
        self._withheld: set[tuple[str, str]] = set()

    def host_state(self, host: str) -> HostState:
        with self._lock:
            st = self._hosts.get(host)
            if st is None:
                st = self._hosts[host] = HostState()
            return st

    def set_challenge(self, st: HostState, challenge: Challenge) -> None:
        with self._lock:
            st.challenge = challenge

    # ---- ping --------------------------------------------------------------------------------
    def ping(self, host: str, insecure: bool, deadline: float) -> HostState:
        st = self.host_state(host)
        if st.pinged:
            return st
        allow_http = insecure or self.transport.insecure(host) or is_loopback_host(host)
        schemes = ["https", "http"] if allow_http else ["https"]
        first_error: Exception | None = None
        transient: Transient | None = None
        for scheme in schemes:
            try:
                resp = self.transport.send(
                    "GET",
                    f"{scheme}://{host}/v2/",
                    headers={"Accept-Encoding": "identity"},
                    deadline=deadline,
                )
            except TLSFailure as exc:
                first_error = first_error or exc
                continue
            except Transient as exc:
                transient = transient or exc
                if first_error is None:
                    first_error = exc
                continue
            with resp:
                if resp.status_code == 400 and scheme == "http" and first_error is not None:
                    continue  # an HTTPS server answering a plain request
                if resp.status_code in TRANSIENT_STATUSES:
                    raise Transient(
                        f"GET {host}/v2/: HTTP {resp.status_code}", retry_after(resp), host
                    )
                challenge = None
                if resp.status_code == 401:
                    chs = parse_www_authenticate(resp.headers.get("WWW-Authenticate", ""))
                    challenge = next((c for c in chs if c.scheme == "bearer"), None) or (
                        chs[0] if chs else None
                    )
                elif resp.status_code not in (200, 404):
                    # 404: a registry that does not serve /v2/ itself; keep going.
                    first_error = RegistryError(
                        f"{host} does not look like a registry (GET /v2/: HTTP {resp.status_code})"
                    )
                    continue
            with self._lock:
                st.scheme, st.challenge, st.pinged = scheme, challenge, True
            return st
        if isinstance(first_error, TLSFailure) and transient is not None:
            raise transient  # TLS refused, plain http ran out of time: worth another try
        if isinstance(first_error, TLSFailure):
            raise RegistryError(str(first_error))
        assert first_error is not None
        raise first_error

    # ---- authorization -----------------------------------------------------------------------
    def _credential(self, host: str, repo: str) -> Credential | None:
        key_host = "docker.io" if host == "registry-1.docker.io" else host
        return self.credentials.get(key_host, repo)

    def header(
        self, host: str, repo: str, actions: str, deadline: float, *, refresh: bool = False
    ) -> str | None:
        """The ``Authorization`` value for ``actions`` on ``repo`` of ``host`` (None: none)."""
        st = self.host_state(host)
        ch = st.challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            cred = self._credential(host, repo)
            if cred is None:
                raise AuthError(f"{host} requires credentials (basic auth) for {repo}; none found")
            return basic_header(cred)
        if ch.scheme != "bearer":
            raise AuthError(f"{host}: unsupported authentication scheme {ch.scheme!r}")
        scope = f"repository:{repo}:{actions}"
        key = (host, scope)
        now = time.monotonic()
        with self._lock:
            tok = self.tokens.get(key)
            if tok is not None and not refresh and tok.expires > now:
                return tok.header
        header, ttl = self._fetch_token(host, repo, ch, scope, deadline)
        with self._lock:
            self.tokens[key] = Token(header, now + max(1.0, ttl - 10))
        return header

    def _fetch_token(
        self, host: str, repo: str, ch: Challenge, scope: str, deadline: float
    ) -> tuple[str, float]:
        realm = ch.realm
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{host}: bearer challenge with an unusable realm")
        try:
            self.transport.check_address(realm)
        except RegistryError as exc:
            raise AuthError(f"{host}: token realm refused, {exc}") from None
        cred = self._credential(host, repo)
        realm_host = urlsplit(realm).netloc.rpartition("@")[2]
        withheld = False
        if cred is not None and not self._realm_allowed(host, realm):
            withheld, cred = True, None
            with self._lock:
                first = (host, realm_host) not in self._withheld
                self._withheld.add((host, realm_host))
            if first:
                log.warning(
                    "not sending the credentials for %s to its token realm %s (another "
                    "host; allow it with auth_realm_hosts); asking anonymously",
                    host,
                    realm_host,
                )
        service = ch.params.get("service", "")
        headers = {"Accept-Encoding": "identity"}
        if cred is not None and cred.identity_token:
            body = {
                "grant_type": "refresh_token",
                "refresh_token": cred.identity_token,
                "scope": scope,
                "service": service,
                "client_id": "als",
            }
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            resp = self.transport.send(
                "POST", realm, headers=headers, deadline=deadline, data=urlencode(body).encode()
            )
        else:
            if cred is not None:
                headers["Authorization"] = basic_header(cred)
            q = urlencode({k: v for k, v in (("service", service), ("scope", scope)) if v})
            url = realm + ("&" if "?" in realm else "?") + q
            resp = self.transport.send("GET", url, headers=headers, deadline=deadline)
        with resp:
            if resp.status_code in TRANSIENT_STATUSES:
                raise Transient(
                    f"token server {realm_host}: HTTP {resp.status_code}", retry_after(resp), host
                )
            if resp.status_code in (401, 403):
                who = f"as {cred.username!r}" if cred else "anonymously"
                why = (
                    f"; the credentials for {host} were withheld from this realm on another "
                    f"host (auth_realm_hosts)"
                    if withheld
                    else ""
                )
                raise AuthError(
                    f"token server {realm_host} refused a token for {scope} of "
                    f"{host} {who} (HTTP {resp.status_code}){why}"
                )
            if resp.status_code != 200:
                raise AuthError(f"token server {realm_host}: HTTP {resp.status_code} for {scope}")
            try:
                data = json.loads(self.transport.read_all(resp, 1 << 20, deadline))
                token = data.get("token") or data.get("access_token")
                ttl = float(data.get("expires_in") or 60)
            except (ValueError, AttributeError, TypeError):
                raise AuthError(f"token server {realm_host} sent an unparseable answer") from None
        if not token:
            raise AuthError(f"token server {realm_host} sent no token for {scope}")
        return f"Bearer {token}", ttl

    def _realm_allowed(self, host: str, realm: str) -> bool:
        """Whether the credentials for registry ``host`` may be sent to token ``realm``."""
        reg = (urlsplit(f"//{host}").hostname or "").lower()
        parts = urlsplit(realm)
        target = (parts.hostname or "").lower()
        if parts.scheme != "https" and not is_loopback_host(target):
            # plain http only back to the registry's own host, when that is reached over http
            return target == reg and self.host_state(host).scheme == "http"
        return self.realm_policy.allows(reg, target)
