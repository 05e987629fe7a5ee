"""One HTTP exchange, safely: sessions, TLS, the address guard, deadlines, body reading.

The only module of als that imports requests and urllib3. It knows nothing of registries:
``Transport.send`` makes one request (no redirects followed, no retries) and turns network
failures into ``Transient`` for the caller's retry loop.

Guards that hold for every exchange:
- no connection to a link-local (cloud metadata) address, checked before connecting and again
  on the connected socket (DNS rebinding);
- a deadline per exchange: a watchdog thread shuts the socket down when it passes, which ends a
  read blocked on headers or on a body that trickles and never ends;
- signed-URL query strings and userinfo never reach the log.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import ipaddress
import itertools
import logging
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# requests imports a character detection library (chardet or charset_normalizer) for one use:
# guessing the charset of a text body that declares none (Response.text, apparent_encoding).
# als reads every body as bytes, and charset_normalizer's tables and compiled modules are
# about 2.6 MB of the daemon's memory, so requests is imported without them: it then assumes
# UTF-8 where it would have guessed. Neither is hidden if something imported it before.
_CHARSET_LIBS = [m for m in ("chardet", "charset_normalizer") if m not in sys.modules]
for _name in _CHARSET_LIBS:
    sys.modules[_name] = None  # type: ignore[assignment]  # None: ImportError on import
try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unable to find acceptable character detection")
        import requests
finally:
    for _name in _CHARSET_LIBS:
        if _name in sys.modules and sys.modules[_name] is None:
            del sys.modules[_name]
import urllib3  # noqa: E402
from requests.utils import DEFAULT_CA_BUNDLE_PATH  # noqa: E402

from als.errors import RegistryError  # noqa: E402
from als.registry.config import RegistriesConf  # noqa: E402
from als.registry.types import ClientStats  # noqa: E402

log = logging.getLogger(__name__)

Response = requests.Response

TRANSIENT_STATUSES = (408, 425, 429, 500, 502, 503, 504)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)

# What reading a response body raises when the transfer breaks off.
BODY_ERRORS: tuple[type[Exception], ...] = (
    requests.exceptions.ChunkedEncodingError,
    requests.ConnectionError,
    requests.Timeout,
    urllib3.exceptions.HTTPError,
)


# ---- control flow shared with the client (not part of the package's API) ------------------


class Transient(Exception):
    """A failure worth retrying (after a backoff)."""

    def __init__(
        self, message: str, retry_after: float | None = None, host: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.host = host


class TLSFailure(RegistryError):
    """TLS handshake or certificate failure: not retried, but another source may be tried."""


def retry_after(resp: Response) -> float | None:
    """The delay a ``Retry-After`` header asks for, in seconds (None if absent or unusable)."""
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


# ---- log redaction -----------------------------------------------------------------------

_QUERY_RE = re.compile(r"\?[^\s'\")]*")
_USERINFO_RE = re.compile(r"://[^/\s@]+@")


def redact(text: object) -> str:
    """An exception/URL text with query strings (signed URLs) and userinfo removed."""
    s = _USERINFO_RE.sub("://<redacted>@", str(text))
    return _QUERY_RE.sub("?<redacted>", s)


class _RedactFilter(logging.Filter):
    """Keep signed-URL query strings out of urllib3's debug log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "?" in msg or "@" in msg:
            record.msg, record.args = redact(msg), ()
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


# ---- the transport -------------------------------------------------------------------------


class Transport:
    """Per-thread ``requests.Session``s (pooled connections per host) with TLS settings from
    registries.conf and certs.d, the address guard and per-exchange deadlines.

    Thread-safe; ``close`` removes the CA bundles written for certs.d directories."""

    def __init__(
        self,
        conf: RegistriesConf,
        stats: ClientStats,
        *,
        user_agent: str,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.conf = conf
        self.stats = stats
        self.user_agent = user_agent
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._lock = threading.Lock()
        self._local = threading.local()
        self._resolved: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._bundles: dict[str, str | bool] = {}
        self._tmpdir = tempfile.mkdtemp(prefix="als-registry-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)

    def close(self) -> None:
        self._finalizer()

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

    def insecure(self, host: str) -> bool:
        return self.conf.is_insecure(host)

    def _verify(self, host: str) -> str | bool:
        """``verify=`` for requests: False if insecure, a bundle with certs.d CAs, or True."""
        if self.insecure(host):
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
            raise Transient("deadline reached")
        return (
            max(0.05, min(self.connect_timeout, remaining)),
            max(0.05, min(self.read_timeout, remaining)),
        )

    def check_address(self, url: str) -> None:
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

    def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        deadline: float,
        stream: bool = False,
        data: bytes | None = None,
        watch: bool = True,
    ) -> Response:
        """One HTTP exchange, no redirects followed; network failures become Transient.

        Unless ``watch`` is false, the exchange (headers and, for ``stream``, the body) is cut
        off when ``deadline`` passes, however slowly the server keeps sending."""
        parts = urlsplit(url)
        if "@" in parts.netloc:  # user:password@ in a URL (a redirect's): never used, never shown
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
            url = parts.geturl()
        host = parts.netloc
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"refusing {method} {redact(url)}: only http and https are used")
        self.check_address(url)
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
            raise TLSFailure(f"TLS error talking to {host}: {redact(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            if w is not None and time.monotonic() >= w.when:
                raise Transient(
                    f"{method} {host}{parts.path}: no complete answer before the deadline",
                    host=host,
                ) from None
            raise Transient(
                f"{method} {host}{parts.path}: {type(exc).__name__}: {redact(exc)}", host=host
            ) from None
        except requests.RequestException as exc:  # invalid URL or header from a hostile server
            raise RegistryError(
                f"{method} {host}{parts.path}: {type(exc).__name__}: {redact(exc)}"
            ) from None
        finally:
            _CURRENT.watch = None
            if w is not None and not stream:
                w.cancelled = True
        if w is not None and stream and resp.raw is None:
            w.cancelled = True
        return resp

    def read_all(
        self, resp: Response, limit: int, deadline: float, what: str = "response"
    ) -> bytes:
        """The whole body of ``resp``: at most ``limit`` bytes, complete, before ``deadline``."""
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
                    raise Transient(f"{what}: deadline reached while reading the body")
        except BODY_ERRORS as exc:
            raise Transient(
                f"{what}: body broken off after {len(buf)} bytes: {type(exc).__name__}"
            ) from None
        finally:
            self.stats.add(bytes_received=len(buf))
        if cl is not None and cl.isdigit() and len(buf) != int(cl):
            raise Transient(f"{what}: truncated body ({len(buf)} of {cl} bytes)")
        return bytes(buf)
