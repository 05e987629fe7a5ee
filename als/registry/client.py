"""A synchronous, thread-safe OCI distribution client: resolve images, fetch blob byte ranges.

The only module of als that talks HTTP. The store calls it from trio worker threads; every call
takes an optional ``deadline`` (an absolute ``time.monotonic()`` value) that bounds the call,
retries included. Each thread gets its own ``requests.Session`` (pooled connections per host);
shared state (tokens, redirect URLs, what each host supports, where each digest was seen) is
guarded by one lock.

Failure policy: connection resets, timeouts, truncated bodies, 429 and 5xx are retried with
exponential backoff and jitter (``Retry-After`` honoured) until the deadline. A digest or length
mismatch is an error, never data. 404/401/403 for a blob fall back to other endpoints (mirrors,
then the primary) and to other repositories of the same registry where the digest was seen.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import heapq
import ipaddress
import itertools
import json
import logging
import os
import platform as _platform
import random
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from als import __version__
from als.digest import sha256_of
from als.errors import AuthError, NotFound, RegistryError, VerifyError
from als.oci import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from als.registry.auth import (
    DEFAULT_AUTH_REALM_HOSTS,
    Challenge,
    Credential,
    CredentialStore,
    RealmPolicy,
    basic_header,
    parse_realm_policy,
    parse_www_authenticate,
)
from als.registry.config import Endpoint, RegistriesConf
from als.registry.ranges import (
    RangeParseError,
    Region,
    coalesce,
    extract,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
)
from als.registry.reference import ImageRef, is_loopback_host, parse_reference, validate_digest
from als.registry.types import ClientStats, LayerDescriptor, ResolvedImage

__all__ = ["ClientStats", "LayerDescriptor", "RegistryClient", "ResolvedImage"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 32 << 20
MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
TRANSIENT_STATUSES = (408, 425, 429, 500, 502, 503, 504)
_QUERY_RE = re.compile(r"\?[^\s'\")]*")
_USERINFO_RE = re.compile(r"://[^/\s@]+@")


def _safe(text: object) -> str:
    """An exception/URL text with query strings (signed URLs) and userinfo removed."""
    s = _USERINFO_RE.sub("://<redacted>@", str(text))
    return _QUERY_RE.sub("?<redacted>", s)


class _RedactFilter(logging.Filter):
    """Keep signed-URL query strings out of urllib3's debug log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "?" in msg or "@" in msg:
            record.msg, record.args = _safe(msg), ()
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RedactFilter())


# ---- where als never connects, and how long an exchange may last --------------------------

# Link-local addresses (cloud metadata services live there: 169.254.169.254, fd00:ec2::254),
# also in their IPv4-mapped and NAT64 forms. No registry, mirror, redirect target or token
# realm may be there: a hostile registry would otherwise make als fetch metadata credentials.
BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "64:ff9b::a9fe:0/112")
)
_RESOLVE_TTL = 30.0


def blocked_address(addr: str) -> bool:
    """Whether ``addr`` (an IP address text) is one als refuses to talk to."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in BLOCKED_NETWORKS)


class _Watch:
    """A deadline on one HTTP exchange: when it passes, the connection's socket is shut down,
    which ends a read blocked on headers or a body that trickles and never ends."""

    __slots__ = ("cancelled", "conn", "when")

    def __init__(self, when: float) -> None:
        self.when = when
        self.conn: Any = None
        self.cancelled = False

    def fire(self) -> None:
        conn = self.conn
        if self.cancelled or conn is None or getattr(conn, "_als_watch", None) is not self:
            return  # finished, or the connection has moved on to another exchange
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread firing ``_Watch``es at their time."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, w: _Watch) -> None:
        with self._cv:
            heapq.heappush(self._heap, (w.when, next(self._seq), w))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="als-http-watchdog", daemon=True
                )
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        w = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(self._heap[0][0] - now if self._heap else None)
            w.fire()


_WATCHDOG = _Watchdog()
_CURRENT = threading.local()  # the _Watch of the exchange this thread is starting


def _guard_new_conn(conn: Any, sock: socket.socket) -> socket.socket:
    """Refuse a direct connection that ended up at a blocked address (DNS rebinding between
    als's own check and the connect): nothing is sent on it."""
    if getattr(conn, "_tunnel_host", None):
        return sock  # through a proxy: the peer is the proxy
    try:
        peer = str(sock.getpeername()[0])
    except OSError:
        peer = ""
    if blocked_address(peer):
        sock.close()
        raise urllib3.exceptions.NewConnectionError(
            conn,
            f"refusing to talk to {conn.host}: it is at {peer}, a link-local (cloud "
            f"metadata) address",
        )
    return sock


def _guard_request(conn: Any) -> None:
    w: _Watch | None = getattr(_CURRENT, "watch", None)
    conn._als_watch = w
    if w is not None:
        w.conn = conn


class _GuardedHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _guard_new_conn(self, super()._new_conn())

    def request(self, *args: Any, **kwargs: Any) -> None:
        _guard_request(self)
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _guard_new_conn(self, super()._new_conn())

    def request(self, *args: Any, **kwargs: Any) -> None:
        _guard_request(self)
        super().request(*args, **kwargs)


def _disarm(conn: Any) -> None:
    """A connection back in its pool is no exchange's any more: its watch must not fire."""
    if conn is not None:
        conn._als_watch = None


class _GuardedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection

    def _put_conn(self, conn: Any) -> None:
        _disarm(conn)
        super()._put_conn(conn)


class _GuardedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection

    def _put_conn(self, conn: Any) -> None:
        _disarm(conn)
        super()._put_conn(conn)


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def host_platform() -> str:
    """This host's platform as ``os/arch[/variant]`` in OCI terms."""
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm/v7",
        "armv6l": "arm/v6",
        "i386": "386",
        "i686": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)
    return f"linux/{arch}"


def _platform_str(os_: str, arch: str, variant: str | None) -> str:
    return f"{os_}/{arch}/{variant}" if variant else f"{os_}/{arch}"


def _parse_platform(s: str) -> tuple[str, str, str | None]:
    parts = s.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RegistryError(f"invalid platform {s!r} (want os/arch[/variant])")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


# ---- internal control flow ------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying (after a backoff)."""

    def __init__(
        self, message: str, retry_after: float | None = None, host: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.host = host


class _MultiRangeRefused(Exception):
    pass


class _RedirectStale(Exception):
    pass


@dataclass
class _HostState:
    scheme: str | None = None
    challenge: Challenge | None = None
    pinged: bool = False
    multirange: bool | None = None
    down_until: float = 0.0


@dataclass
class _Token:
    header: str = field(repr=False)
    expires: float


def _retry_after(resp: requests.Response) -> float | None:
    v = resp.headers.get("Retry-After")
    if not v:
        return None
    v = v.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RegistryClient:
    def __init__(
        self,
        *,
        registries_conf: RegistriesConf | None = None,
        credentials: CredentialStore | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_retry_time: float = 60,
        user_agent: str = f"als/{__version__}",
        coalesce_gap: int = 16 << 10,
        max_ranges_per_request: int = 32,
        max_bytes_per_request: int = 64 << 20,
        multirange: bool = True,
        backoff_base: float = 0.25,
        backoff_cap: float = 10.0,
        redirect_ttl: float = 120.0,
        mirror_down_time: float = 30.0,
        auth_realm_hosts: str | RealmPolicy = DEFAULT_AUTH_REALM_HOSTS,
    ) -> None:
        self.conf = registries_conf if registries_conf is not None else RegistriesConf()
        self.credentials = credentials if credentials is not None else CredentialStore()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_retry_time = max_retry_time
        self.user_agent = user_agent
        self.coalesce_gap = coalesce_gap
        self.max_ranges_per_request = max(1, max_ranges_per_request)
        self.max_bytes_per_request = max_bytes_per_request
        self.multirange = multirange
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.redirect_ttl = redirect_ttl
        self.mirror_down_time = mirror_down_time
        self.realm_policy = (
            parse_realm_policy(auth_realm_hosts)
            if isinstance(auth_realm_hosts, str)
            else auth_realm_hosts
        )
        self._withheld: set[tuple[str, str]] = set()
        self._resolved: dict[str, tuple[float, tuple[str, ...]]] = {}
        self.stats = ClientStats()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._hosts: dict[str, _HostState] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._redirects: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._seen: dict[tuple[str, str], list[str]] = {}
        self._bundles: dict[str, str | bool] = {}
        self._tmpdir = tempfile.mkdtemp(prefix="als-registry-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- per-thread session, TLS, proxies -----------------------------------------------------
    def _session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # no .netrc credentials; proxies are applied per request below
            adapter = _GuardedAdapter(pool_connections=8, pool_maxsize=16, max_retries=0)
            s.mount("https://", adapter)
            s.mount("http://", adapter)
            s.headers.clear()
            s.headers["User-Agent"] = self.user_agent
            self._local.session = s
        return s

    def _host_state(self, host: str) -> _HostState:
        with self._lock:
            st = self._hosts.get(host)
            if st is None:
                st = self._hosts[host] = _HostState()
            return st

    def _insecure(self, host: str) -> bool:
        return self.conf.is_insecure(host)

    def _verify(self, host: str) -> str | bool:
        """``verify=`` for requests: False if insecure, a bundle with certs.d CAs, or True."""
        if self._insecure(host):
            return False
        with self._lock:
            if host in self._bundles:
                return self._bundles[host]
        d = self.conf.certs_dir(host)
        result: str | bool = True
        if d is not None:
            cas = sorted(d.glob("*.crt"))
            if cas:
                paths = ssl.get_default_verify_paths()
                system = paths.cafile or paths.openssl_cafile
                parts = []
                if system and os.path.isfile(system):
                    parts.append(Path(system).read_text())
                else:
                    parts.append(Path(DEFAULT_CA_BUNDLE_PATH).read_text())
                parts.extend(ca.read_text() for ca in cas)
                fd, bundle = tempfile.mkstemp(dir=self._tmpdir, suffix=".pem")
                with os.fdopen(fd, "w") as f:
                    f.write("\n".join(parts))
                result = bundle
        with self._lock:
            self._bundles[host] = result
        return result

    def _client_cert(self, host: str) -> tuple[str, str] | None:
        d = self.conf.certs_dir(host)
        if d is None:
            return None
        for cert in sorted(d.glob("*.cert")):
            key = cert.with_suffix(".key")
            if key.is_file():
                return str(cert), str(key)
        return None

    def _timeout(self, deadline: float) -> tuple[float, float]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Transient("deadline reached")
        return (
            max(0.05, min(self.connect_timeout, remaining)),
            max(0.05, min(self.read_timeout, remaining)),
        )

    def _check_address(self, url: str) -> None:
        """Refuse (before connecting) a URL whose host is, or resolves to, a blocked address."""
        parts = urlsplit(url)
        name = parts.hostname or ""
        if blocked_address(name):
            raise RegistryError(
                f"refusing to connect to {parts.netloc}: a link-local (cloud "
                f"metadata) address is never a registry"
            )
        now = time.monotonic()
        with self._lock:
            hit = self._resolved.get(name)
        if hit is None or hit[0] < now:
            try:
                infos = socket.getaddrinfo(name, parts.port or 443, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                return  # the connection attempt reports it (and the connect-time check stays)
            addrs = tuple(sorted({str(i[4][0]) for i in infos}))
            with self._lock:
                if len(self._resolved) > 1024:
                    self._resolved.clear()
                self._resolved[name] = (now + _RESOLVE_TTL, addrs)
        else:
            addrs = hit[1]
        bad = next((a for a in addrs if blocked_address(a)), None)
        if bad is not None:
            raise RegistryError(
                f"refusing to connect to {parts.netloc} (it resolves to {bad}): "
                f"a link-local (cloud metadata) address is never a registry"
            )

    def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        deadline: float,
        stream: bool = False,
        data: bytes | None = None,
        watch: bool = True,
    ) -> requests.Response:
        """One HTTP exchange, no redirects followed; network failures become _Transient.

        Unless ``watch`` is false, the exchange (headers and, for ``stream``, the body) is cut
        off when ``deadline`` passes, however slowly the server keeps sending."""
        parts = urlsplit(url)
        if "@" in parts.netloc:  # user:password@ in a URL (a redirect's): never used, never shown
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
            url = parts.geturl()
        host = parts.netloc
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"refusing {method} {_safe(url)}: only http and https are used")
        self._check_address(url)
        kwargs: dict[str, Any] = {}
        if parts.scheme == "https":
            kwargs["verify"] = self._verify(host)
            cert = self._client_cert(host)
            if cert:
                kwargs["cert"] = cert
        proxies = requests.utils.get_environ_proxies(url)
        self.stats.add(requests=1, host=host)
        log.debug("%s %s://%s%s", method, parts.scheme, host, parts.path)
        w = _Watch(deadline) if watch else None
        if w is not None:
            _WATCHDOG.add(w)
        _CURRENT.watch = w
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                resp = self._session().request(
                    method,
                    url,
                    headers=dict(headers),
                    data=data,
                    stream=stream,
                    allow_redirects=False,
                    timeout=self._timeout(deadline),
                    proxies=proxies,
                    **kwargs,
                )
        except requests.exceptions.SSLError as exc:
            raise _TLSFailure(f"TLS error talking to {host}: {_safe(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            if w is not None and time.monotonic() >= w.when:
                raise _Transient(
                    f"{method} {host}{parts.path}: no complete answer before the deadline",
                    host=host,
                ) from None
            raise _Transient(
                f"{method} {host}{parts.path}: {type(exc).__name__}: {_safe(exc)}", host=host
            ) from None
        except requests.RequestException as exc:  # invalid URL or header from a hostile server
            raise RegistryError(
                f"{method} {host}{parts.path}: {type(exc).__name__}: {_safe(exc)}"
            ) from None
        finally:
            _CURRENT.watch = None
            if w is not None and not stream:
                w.cancelled = True
        if w is not None and stream and resp.raw is None:
            w.cancelled = True
        return resp

    # ---- ping, auth --------------------------------------------------------------------------
    def _ping(self, host: str, insecure: bool, deadline: float) -> _HostState:
        st = self._host_state(host)
        if st.pinged:
            return st
        allow_http = insecure or self._insecure(host) or is_loopback_host(host)
        schemes = ["https", "http"] if allow_http else ["https"]
        first_error: Exception | None = None
        transient: _Transient | None = None
        for scheme in schemes:
            try:
                resp = self._send(
                    "GET",
                    f"{scheme}://{host}/v2/",
                    headers={"Accept-Encoding": "identity"},
                    deadline=deadline,
                )
            except _TLSFailure as exc:
                first_error = first_error or exc
                continue
            except _Transient as exc:
                transient = transient or exc
                if first_error is None:
                    first_error = exc
                continue
            with resp:
                if resp.status_code == 400 and scheme == "http" and first_error is not None:
                    continue  # an HTTPS server answering a plain request
                if resp.status_code in TRANSIENT_STATUSES:
                    raise _Transient(
                        f"GET {host}/v2/: HTTP {resp.status_code}", _retry_after(resp), host
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
        if isinstance(first_error, _TLSFailure) and transient is not None:
            raise transient  # TLS refused, plain http ran out of time: worth another try
        if isinstance(first_error, _TLSFailure):
            raise RegistryError(str(first_error))
        assert first_error is not None
        raise first_error

    def _credential(self, host: str, repo: str) -> Credential | None:
        key_host = "docker.io" if host == "registry-1.docker.io" else host
        return self.credentials.get(key_host, repo)

    def _auth_header(
        self, host: str, repo: str, actions: str, deadline: float, *, refresh: bool = False
    ) -> str | None:
        st = self._host_state(host)
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
            tok = self._tokens.get(key)
            if tok is not None and not refresh and tok.expires > now:
                return tok.header
        header, ttl = self._fetch_token(host, repo, ch, scope, deadline)
        with self._lock:
            self._tokens[key] = _Token(header, now + max(1.0, ttl - 10))
        return header

    def _fetch_token(
        self, host: str, repo: str, ch: Challenge, scope: str, deadline: float
    ) -> tuple[str, float]:
        realm = ch.realm
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{host}: bearer challenge with an unusable realm")
        try:
            self._check_address(realm)
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
            resp = self._send(
                "POST", realm, headers=headers, deadline=deadline, data=urlencode(body).encode()
            )
        else:
            if cred is not None:
                headers["Authorization"] = basic_header(cred)
            q = urlencode({k: v for k, v in (("service", service), ("scope", scope)) if v})
            url = realm + ("&" if "?" in realm else "?") + q
            resp = self._send("GET", url, headers=headers, deadline=deadline)
        with resp:
            if resp.status_code in TRANSIENT_STATUSES:
                raise _Transient(
                    f"token server {realm_host}: HTTP {resp.status_code}", _retry_after(resp), host
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
                data = json.loads(self._read_all(resp, 1 << 20, deadline))
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
            return target == reg and self._host_state(host).scheme == "http"
        return self.realm_policy.allows(reg, target)

    # ---- core request with auth + redirects ------------------------------------------------
    def _request(
        self,
        ep_host: str,
        repo: str,
        method: str,
        path: str,
        *,
        deadline: float,
        headers: Mapping[str, str] | None = None,
        actions: str = "pull",
        insecure: bool = False,
        stream: bool = False,
        data: bytes | None = None,
        redirect_key: tuple[str, str, str] | None = None,
        watch: bool = True,
    ) -> requests.Response:
        st = self._ping(ep_host, insecure, deadline)
        url = f"{st.scheme}://{ep_host}{path}"
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        auth = self._auth_header(ep_host, repo, actions, deadline)
        if auth:
            hdrs["Authorization"] = auth
        resp = self._send(
            method, url, headers=hdrs, deadline=deadline, stream=stream, data=data, watch=watch
        )
        if resp.status_code == 401:
            chs = parse_www_authenticate(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            if chs:
                ch = next((c for c in chs if c.scheme == "bearer"), chs[0])
                with self._lock:
                    st.challenge = ch
            auth = self._auth_header(ep_host, repo, actions, deadline, refresh=True)
            if auth:
                hdrs["Authorization"] = auth
            resp = self._send(
                method, url, headers=hdrs, deadline=deadline, stream=stream, data=data, watch=watch
            )
        hops = 0
        origin = urlsplit(url)
        while resp.status_code in REDIRECT_STATUSES and "Location" in resp.headers:
            hops += 1
            if hops > MAX_REDIRECTS:
                resp.close()
                raise RegistryError(
                    f"{method} {ep_host}{path}: more than {MAX_REDIRECTS} "
                    f"redirects (a loop?), last to {urlsplit(url).netloc}"
                )
            new = urljoin(url, resp.headers["Location"])
            resp.close()
            target = urlsplit(new)
            if target.scheme not in ("http", "https"):
                raise RegistryError(
                    f"{method} {ep_host}{path}: refusing a redirect to a "
                    f"{target.scheme or 'schemeless'}: URL (only http and https "
                    f"are followed)"
                )
            try:
                self._check_address(new)
            except RegistryError as exc:
                raise RegistryError(f"{method} {ep_host}{path}: redirected, {exc}") from None
            if (target.scheme, target.netloc) != (origin.scheme, origin.netloc):
                hdrs.pop("Authorization", None)  # never send registry credentials elsewhere
            if resp.status_code == 303:
                method, data = ("HEAD" if method == "HEAD" else "GET"), None
            url = new
            resp = self._send(
                method, url, headers=hdrs, deadline=deadline, stream=stream, data=data, watch=watch
            )
        if hops and redirect_key is not None and resp.status_code in (200, 206):
            with self._lock:
                self._redirects[redirect_key] = (url, time.monotonic() + self.redirect_ttl)
        return resp

    def _check_status(self, resp: requests.Response, what: str, host: str) -> None:
        """Raise for failure statuses (closing ``resp``); return for 2xx."""
        code = resp.status_code
        if 200 <= code < 300:
            return
        resp.close()
        if code in TRANSIENT_STATUSES:
            raise _Transient(f"{what}: HTTP {code} from {host}", _retry_after(resp), host)
        if code == 404:
            raise NotFound(f"{what}: not found on {host}")
        if code in (401, 403):
            raise AuthError(f"{what}: access denied by {host} (HTTP {code})")
        if code == 416:
            raise RegistryError(f"{what}: range not satisfiable (HTTP 416 from {host})")
        raise RegistryError(f"{what}: unexpected HTTP {code} from {host}")

    def _read_all(
        self, resp: requests.Response, limit: int, deadline: float, what: str = "response"
    ) -> bytes:
        cl = resp.headers.get("Content-Length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            resp.close()
            raise RegistryError(f"{what}: {cl} bytes is over the {limit} byte limit")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(1 << 16):
                buf += chunk
                if len(buf) > limit:
                    resp.close()
                    raise RegistryError(f"{what}: more than {limit} bytes")
                if time.monotonic() > deadline:
                    resp.close()
                    raise _Transient(f"{what}: deadline reached while reading the body")
        except (
            requests.exceptions.ChunkedEncodingError,
            requests.ConnectionError,
            requests.Timeout,
            urllib3.exceptions.HTTPError,
        ) as exc:
            raise _Transient(
                f"{what}: body broken off after {len(buf)} bytes: {type(exc).__name__}"
            ) from None
        finally:
            self.stats.add(bytes_received=len(buf))
        if cl is not None and cl.isdigit() and len(buf) != int(cl):
            raise _Transient(f"{what}: truncated body ({len(buf)} of {cl} bytes)")
        return bytes(buf)

    # ---- retry loop ------------------------------------------------------------------------
    def _deadline(self, deadline: float | None) -> float:
        own = time.monotonic() + self.max_retry_time
        return own if deadline is None else min(deadline, own)

    def _retrying(self, what: str, deadline: float, fn: Callable[[], T]) -> T:
        attempt = 0
        start = time.monotonic()
        while True:
            try:
                return fn()
            except _Transient as exc:
                attempt += 1
                now = time.monotonic()
                delay = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                if now + delay >= deadline:
                    raise RegistryError(
                        f"{what}: giving up after {attempt} attempt(s) in {now - start:.1f}s: {exc}"
                    ) from None
                level = logging.INFO if attempt < 3 else logging.WARNING
                log.log(level, "%s: %s; retry %d in %.2fs", what, exc, attempt, delay)
                self.stats.add(retries=1)
                time.sleep(delay)

    def _over_sources(
        self, what: str, sources: Sequence[tuple[Endpoint, str]], fn: Callable[[Endpoint, str], T]
    ) -> T:
        """Try ``fn`` on each (endpoint, repository) in order; one pass, no sleeping.

        Non-transient failures (404, denied, bad digest) move on to the next source; if every
        source fails and at least one failure was transient, the whole pass is retried.
        """
        transient: _Transient | None = None
        errors: list[Exception] = []
        now = time.monotonic()
        for i, (ep, repo) in enumerate(sources):
            last = i == len(sources) - 1
            st = self._host_state(ep.host)
            if st.down_until > now and not last and ep.mirror:
                continue
            try:
                result = fn(ep, repo)
            except _Transient as exc:
                transient = exc
                if ep.mirror and not last:
                    with self._lock:
                        st.down_until = time.monotonic() + self.mirror_down_time
                    log.info("%s: mirror %s failed (%s); trying the next source", what, ep, exc)
                    self.stats.add(fallbacks=1)
                continue
            except (NotFound, RegistryError, VerifyError) as exc:
                errors.append(exc)
                if not last:
                    log.info(
                        "%s: %s failed (%s); trying the next source", what, f"{ep.host}/{repo}", exc
                    )
                    self.stats.add(fallbacks=1)
                continue
            if i:
                log.info("%s: served by %s/%s", what, ep.host, repo)
            return result
        if transient is not None:
            raise transient
        for cls in (VerifyError, AuthError, NotFound):
            for e in errors:
                if isinstance(e, cls):
                    raise e
        if errors:
            raise errors[-1]
        raise RegistryError(f"{what}: no source to try")

    # ---- digests seen -----------------------------------------------------------------------
    def _record_seen(self, host: str, repo: str, digest: str) -> None:
        with self._lock:
            repos = self._seen.setdefault((host, digest), [])
            if repo not in repos:
                repos.append(repo)

    def seen_in(self, digest: str) -> list[str]:
        """``host/repo`` locations where ``digest`` has been found (for diagnostics)."""
        with self._lock:
            return [
                f"{h}/{r}" for (h, d), repos in self._seen.items() if d == digest for r in repos
            ]

    def _blob_sources(self, ref: ImageRef, digest: str) -> list[tuple[Endpoint, str]]:
        out: list[tuple[Endpoint, str]] = []
        for ep in self.conf.endpoints(ref.with_digest(digest)):
            out.append((ep, ep.repository))
            with self._lock:
                others = list(self._seen.get((ep.host, digest), ()))
            out.extend((ep, r) for r in others if r != ep.repository)
        return out

    @staticmethod
    def _ref(ref: ImageRef | str) -> ImageRef:
        return parse_reference(ref) if isinstance(ref, str) else ref

    # ---- resolve ---------------------------------------------------------------------------
    def resolve(
        self, ref: ImageRef | str, *, platform: str | None = None, deadline: float | None = None
    ) -> ResolvedImage:
        r = self._ref(ref)
        want = _parse_platform(platform or host_platform())
        dl = self._deadline(deadline)
        sources = [(ep, ep.repository) for ep in self.conf.endpoints(r)]
        what = f"resolving {r}"
        return self._retrying(
            what,
            dl,
            lambda: self._over_sources(
                what, sources, lambda ep, repo: self._resolve_at(r, ep, want, dl)
            ),
        )

    def _get_manifest(
        self, ep: Endpoint, reference: str, deadline: float
    ) -> tuple[bytes, str, str]:
        what = (
            f"manifest {ep}:{reference}"
            if not reference.startswith("sha256:")
            else f"manifest {ep}@{reference}"
        )
        resp = self._request(
            ep.host,
            ep.repository,
            "GET",
            f"/v2/{ep.repository}/manifests/{reference}",
            deadline=deadline,
            headers={"Accept": MANIFEST_ACCEPT},
            insecure=ep.insecure,
            stream=True,
        )
        self._check_status(resp, what, ep.host)
        with resp:
            body = self._read_all(resp, MAX_MANIFEST_SIZE, deadline, what)
            digest = sha256_of(body)
            if reference.startswith("sha256:") and digest != reference:
                raise VerifyError(f"{what}: body has digest {digest}, not the one asked for")
            header = resp.headers.get("Docker-Content-Digest")
            if header and header.startswith("sha256:") and header != digest:
                raise VerifyError(
                    f"{what}: body has digest {digest} but the registry says {header}"
                )
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return body, digest, ctype

    def _resolve_at(
        self, ref: ImageRef, ep: Endpoint, want: tuple[str, str, str | None], deadline: float
    ) -> ResolvedImage:
        reference = ref.digest or ref.tag or "latest"
        body, digest, ctype = self._get_manifest(ep, reference, deadline)
        doc = self._json(body, f"manifest {ep}:{reference}")
        mtype = str(doc.get("mediaType") or ctype)
        index_digest = None
        plat: str | None = None
        if mtype in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            index_digest = digest
            child, plat = self._select_platform(doc, want, f"{ref} ({digest})")
            body, digest, ctype = self._get_manifest(ep, child, deadline)
            doc = self._json(body, f"manifest {ep}@{child}")
            mtype = str(doc.get("mediaType") or ctype)
        if doc.get("schemaVersion") == 1 or "fsLayers" in doc:
            raise RegistryError(f"{ref}: Docker schema 1 manifests are not supported")
        if mtype not in MANIFEST_TYPES and "layers" not in doc:
            raise RegistryError(f"{ref}: unsupported manifest media type {mtype!r}")
        cfg_desc = doc.get("config") or {}
        cfg_digest = validate_digest(str(cfg_desc.get("digest", "")))
        cfg_size = int(cfg_desc.get("size", -1))
        config = self._get_small_blob(ep, cfg_digest, cfg_size, deadline)
        cfg = self._json(config, f"config {cfg_digest} of {ref}")
        if plat is None:
            plat = _platform_str(
                str(cfg.get("os", "")), str(cfg.get("architecture", "")), cfg.get("variant") or None
            )
        rootfs = cfg.get("rootfs") or {}
        diff_ids = [str(d) for d in rootfs.get("diff_ids") or []]
        layers = []
        raw_layers = doc.get("layers") or []
        for i, ld in enumerate(raw_layers):
            ann = ld.get("annotations") or {}
            layers.append(
                LayerDescriptor(
                    digest=validate_digest(str(ld.get("digest", ""))),
                    size=int(ld.get("size", -1)),
                    media_type=str(ld.get("mediaType", "")),
                    annotations={str(k): str(v) for k, v in ann.items()},
                    diff_id=diff_ids[i]
                    if i < len(diff_ids) and len(diff_ids) == len(raw_layers)
                    else None,
                )
            )
        for d in [cfg_digest, *(layer.digest for layer in layers)]:
            self._record_seen(ep.host, ep.repository, d)
        return ResolvedImage(
            ref=ref,
            manifest_digest=digest,
            manifest=body,
            config=config,
            platform=plat,
            layers=tuple(layers),
            config_digest=cfg_digest,
            source=str(ep),
            index_digest=index_digest,
        )

    @staticmethod
    def _json(body: bytes, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except ValueError:
            raise RegistryError(f"{what} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{what} is not a JSON object")
        return doc

    @staticmethod
    def _select_platform(
        index: Mapping[str, Any], want: tuple[str, str, str | None], what: str
    ) -> tuple[str, str]:
        w_os, w_arch, w_var = want
        norm = {"arm64": "v8"}
        candidates = []
        available = []
        for m in index.get("manifests") or []:
            p = m.get("platform") or {}
            os_, arch, var = (
                str(p.get("os", "")),
                str(p.get("architecture", "")),
                p.get("variant") or None,
            )
            available.append(_platform_str(os_, arch, var))
            if os_ != w_os or arch != w_arch:
                continue
            if w_var is not None and (var or norm.get(arch)) != (w_var or norm.get(arch)):
                continue
            candidates.append((m, _platform_str(os_, arch, var)))
        if not candidates:
            raise NotFound(
                f"{what}: no manifest for platform "
                f"{_platform_str(w_os, w_arch, w_var)} (available: "
                f"{', '.join(available) or 'none'})"
            )
        m, plat = candidates[0]
        return validate_digest(str(m.get("digest", ""))), plat

    def _get_small_blob(self, ep: Endpoint, digest: str, size: int, deadline: float) -> bytes:
        what = f"blob {digest} in {ep}"
        resp = self._request(
            ep.host,
            ep.repository,
            "GET",
            f"/v2/{ep.repository}/blobs/{digest}",
            deadline=deadline,
            insecure=ep.insecure,
            stream=True,
        )
        self._check_status(resp, what, ep.host)
        with resp:
            data = self._read_all(resp, MAX_CONFIG_SIZE, deadline, what)
        got = sha256_of(data)
        if got != digest:
            raise VerifyError(f"{what}: content has digest {got}")
        if size >= 0 and len(data) != size:
            raise VerifyError(f"{what}: {len(data)} bytes, descriptor says {size}")
        return data

    # ---- blobs -----------------------------------------------------------------------------
    def blob_size(self, ref: ImageRef | str, digest: str, *, deadline: float | None = None) -> int:
        r = self._ref(ref)
        validate_digest(digest)
        dl = self._deadline(deadline)
        what = f"HEAD blob {digest} of {r}"

        def head(ep: Endpoint, repo: str) -> int:
            resp = self._request(
                ep.host,
                repo,
                "HEAD",
                f"/v2/{repo}/blobs/{digest}",
                deadline=dl,
                insecure=ep.insecure,
            )
            self._check_status(resp, what, ep.host)
            resp.close()
            cl = resp.headers.get("Content-Length", "")
            if not cl.isdigit():
                raise RegistryError(f"{what}: no Content-Length from {ep.host}")
            self._record_seen(ep.host, repo, digest)
            return int(cl)

        return self._retrying(
            what, dl, lambda: self._over_sources(what, self._blob_sources(r, digest), head)
        )

    def fetch_ranges(
        self,
        ref: ImageRef | str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        deadline: float | None = None,
    ) -> list[bytes]:
        """The bytes of each ``(offset, length)`` of blob ``digest``, in order.

        Nearby ranges are coalesced, several ranges go into one multi-range request where the
        registry supports it. The bytes are not verified here (the format layer checks chunk
        digests); lengths and offsets are.
        """
        r = self._ref(ref)
        validate_digest(digest)
        for off, n in ranges:
            if off < 0 or n < 0:
                raise ValueError(f"invalid range ({off}, {n})")
        regions = coalesce(
            ranges, max_gap=self.coalesce_gap, max_size=max(self.max_bytes_per_request, 1)
        )
        if not regions:
            return [b"" for _ in ranges]
        dl = self._deadline(deadline)
        got: dict[Region, bytes] = {}
        what = f"GET blob {digest} of {r}"
        sources = self._blob_sources(r, digest)
        pending = list(regions)
        while pending:
            batch = self._next_batch(pending, sources)
            pending = pending[len(batch) :]
            got.update(self._fetch_with_retries(what, dl, sources, digest, batch))
        out = []
        for off, n in ranges:
            if n == 0:
                out.append(b"")
                continue
            region = next(g for g in got if g.start <= off and off + n <= g.end)
            data = got[region]
            out.append(data[off - region.start : off - region.start + n])
        return out

    def _fetch_with_retries(
        self,
        what: str,
        dl: float,
        sources: Sequence[tuple[Endpoint, str]],
        digest: str,
        batch: Sequence[Region],
    ) -> dict[Region, bytes]:
        def one(ep: Endpoint, repo: str) -> dict[Region, bytes]:
            return self._fetch_batch(ep, repo, digest, batch, dl, what)

        return self._retrying(what, dl, lambda: self._over_sources(what, sources, one))

    def _next_batch(
        self, pending: Sequence[Region], sources: Sequence[tuple[Endpoint, str]]
    ) -> list[Region]:
        host = sources[0][0].host if sources else ""
        multi = self.multirange and self._host_state(host).multirange is not False
        limit = self.max_ranges_per_request if multi else 1
        batch: list[Region] = []
        total = 0
        for reg in pending:
            if batch and (len(batch) >= limit or total + reg.length > self.max_bytes_per_request):
                break
            batch.append(reg)
            total += reg.length
        return batch

    def _fetch_batch(
        self,
        ep: Endpoint,
        repo: str,
        digest: str,
        batch: Sequence[Region],
        deadline: float,
        what: str,
    ) -> dict[Region, bytes]:
        st = self._host_state(ep.host)
        if len(batch) > 1 and (st.multirange is False or not self.multirange):
            out: dict[Region, bytes] = {}
            for reg in batch:
                out.update(self._fetch_batch(ep, repo, digest, [reg], deadline, what))
            return out
        try:
            parts = self._get_ranges(ep, repo, digest, batch, deadline, what)
        except _MultiRangeRefused:
            log.info("%s does not serve multi-range requests; using single ranges", ep.host)
            with self._lock:
                st.multirange = False
            return self._fetch_batch(ep, repo, digest, batch, deadline, what)
        out = {}
        missing = []
        for reg in batch:
            data = extract(parts, reg.start, reg.length)
            if data is None:
                missing.append(reg)
            else:
                out[reg] = data
        if missing:
            if len(batch) > 1:
                log.info(
                    "%s answered a multi-range request with other ranges; using single ranges",
                    ep.host,
                )
                with self._lock:
                    st.multirange = False
                for reg in missing:
                    out.update(self._fetch_batch(ep, repo, digest, [reg], deadline, what))
            else:
                raise _Transient(
                    f"{what}: response from {ep.host} does not cover bytes {batch[0].header_spec()}"
                )
        elif len(batch) > 1:
            with self._lock:
                st.multirange = True
        self._record_seen(ep.host, repo, digest)
        return out

    def _get_ranges(
        self,
        ep: Endpoint,
        repo: str,
        digest: str,
        batch: Sequence[Region],
        deadline: float,
        what: str,
    ) -> list[tuple[int, bytes]]:
        key = (ep.host, repo, digest)
        headers = {"Range": range_header(batch)}
        path = f"/v2/{repo}/blobs/{digest}"
        if len(batch) > 1:
            self.stats.add(multirange=1)
        with self._lock:
            cached = self._redirects.get(key)
        resp: requests.Response | None = None
        if cached is not None and cached[1] > time.monotonic():
            resp = self._send(
                "GET",
                cached[0],
                headers={"Accept-Encoding": "identity", **headers},
                deadline=deadline,
                stream=True,
            )
            if resp.status_code in (401, 403, 404, 410) or resp.status_code in REDIRECT_STATUSES:
                log.debug(
                    "redirected URL for %s is stale (HTTP %d); asking %s again",
                    digest,
                    resp.status_code,
                    ep.host,
                )
                resp.close()
                resp = None
                with self._lock:
                    self._redirects.pop(key, None)
        if resp is None:
            resp = self._request(
                ep.host,
                repo,
                "GET",
                path,
                deadline=deadline,
                headers=headers,
                insecure=ep.insecure,
                stream=True,
                redirect_key=key,
            )
        if resp.status_code == 400 and len(batch) > 1:
            resp.close()
            raise _MultiRangeRefused
        self._check_status(resp, what, ep.host)
        with resp:
            if resp.status_code == 200:
                return self._from_full_body(resp, batch, deadline, what)
            if resp.status_code != 206:
                raise RegistryError(f"{what}: unexpected HTTP {resp.status_code}")
            limit = sum(r.length for r in batch) + 4096 * len(batch) + 4096
            body = self._read_all(resp, limit, deadline, what)
            ctype = resp.headers.get("Content-Type", "")
            try:
                boundary = multipart_boundary(ctype)
                if boundary is not None:
                    return parse_multipart_byteranges(body, boundary)
                start, end, _total = parse_content_range(resp.headers.get("Content-Range", ""))
            except RangeParseError as exc:
                if exc.truncated:
                    raise _Transient(f"{what}: {exc}") from None
                raise RegistryError(f"{what}: bad range response from {ep.host}: {exc}") from None
            if len(body) != end - start:
                raise _Transient(
                    f"{what}: got {len(body)} bytes for Content-Range {start}-{end - 1}"
                )
            return [(start, body)]

    def _from_full_body(
        self, resp: requests.Response, batch: Sequence[Region], deadline: float, what: str
    ) -> list[tuple[int, bytes]]:
        """A 200 answer to a range request: stream the blob, keep only what was asked."""
        log.debug("%s: server ignored Range, reading the whole body", what)
        want_end = max(r.end for r in batch)
        bufs = [bytearray() for _ in batch]
        pos = 0
        try:
            for chunk in resp.iter_content(1 << 16):
                c_start, c_end = pos, pos + len(chunk)
                for reg, acc in zip(batch, bufs, strict=True):
                    lo, hi = max(reg.start, c_start), min(reg.end, c_end)
                    if lo < hi:
                        acc.extend(chunk[lo - c_start : hi - c_start])
                pos = c_end
                self.stats.add(bytes_received=len(chunk))
                if pos >= want_end:
                    break
                if time.monotonic() > deadline:
                    raise _Transient(f"{what}: deadline reached while reading the body")
        except (
            requests.exceptions.ChunkedEncodingError,
            requests.ConnectionError,
            requests.Timeout,
            urllib3.exceptions.HTTPError,
        ) as exc:
            raise _Transient(
                f"{what}: body broken off at byte {pos}: {type(exc).__name__}"
            ) from None
        if pos < want_end:
            raise _Transient(f"{what}: body ended at byte {pos}, before {want_end}")
        return [(reg.start, bytes(buf)) for reg, buf in zip(batch, bufs, strict=True)]

    def open_blob(
        self,
        ref: ImageRef | str,
        digest: str,
        *,
        deadline: float | None = None,
        chunk_size: int = 256 << 10,
    ) -> Iterator[bytes]:
        """Stream the whole blob. Broken transfers resume with a Range request; the digest is
        checked at the end and a mismatch raises VerifyError: consumers must not use (commit)
        the data before the iterator is exhausted without error."""
        r = self._ref(ref)
        validate_digest(digest)
        h = hashlib.sha256()
        offset = 0
        what = f"GET blob {digest} of {r}"
        sources = self._blob_sources(r, digest)
        dl = self._deadline(deadline)
        while True:
            start_offset = offset

            def open_one(
                ep: Endpoint, repo: str, off: int = start_offset, until: float = dl
            ) -> requests.Response:
                headers = {"Range": f"bytes={off}-"} if off else {}
                resp = self._request(
                    ep.host,
                    repo,
                    "GET",
                    f"/v2/{repo}/blobs/{digest}",
                    deadline=until,
                    headers=headers,
                    insecure=ep.insecure,
                    stream=True,
                    watch=False,
                )
                self._check_status(resp, what, ep.host)
                return resp

            resp = self._retrying(what, dl, lambda: self._over_sources(what, sources, open_one))
            skip = offset if resp.status_code == 200 else 0
            if resp.status_code == 206:
                start, _end, _total = parse_content_range(resp.headers.get("Content-Range", ""))
                if start != offset:
                    resp.close()
                    raise RegistryError(f"{what}: resumed at {start}, asked for {offset}")
            try:
                with resp:
                    for raw in resp.iter_content(chunk_size):
                        self.stats.add(bytes_received=len(raw))
                        chunk = raw
                        if skip:
                            drop = min(skip, len(chunk))
                            chunk, skip = chunk[drop:], skip - drop
                            if not chunk:
                                continue
                        h.update(chunk)
                        offset += len(chunk)
                        yield chunk
            except (
                requests.exceptions.ChunkedEncodingError,
                requests.ConnectionError,
                requests.Timeout,
                urllib3.exceptions.HTTPError,
            ) as exc:
                if time.monotonic() >= dl:
                    raise RegistryError(
                        f"{what}: broken off at byte {offset} and out of time: {type(exc).__name__}"
                    ) from None
                log.info(
                    "%s: broken off at byte %d (%s); resuming", what, offset, type(exc).__name__
                )
                self.stats.add(retries=1)
                if offset > start_offset:
                    dl = self._deadline(deadline)  # progress was made: renew the budget
                continue
            break
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise VerifyError(
                f"blob {digest} of {r}: content has digest {got} ({offset} bytes); discard it"
            )


class _TLSFailure(RegistryError):
    """TLS handshake or certificate failure: not retried, but another source may be tried."""
