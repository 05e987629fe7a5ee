"""Real registries for tests: Debian's ``docker-registry`` (distribution 2.8) on loopback.

Plain functions and classes, usable from any test directory (``tests/integration/conftest.py``
builds pytest fixtures on them):

* ``RegistryServer``: a context manager that runs ``docker-registry serve`` with a config in a
  temp dir on a free 127.0.0.1 port. Variants: plain http, TLS (``TLSMaterial``), htpasswd basic
  auth (needs TLS), token auth (``TokenServer``), and pull-through proxy mode (``proxy_remote=``).
  ``access_log()`` parses distribution's combined-format access log (method, path, status,
  bytes sent) so that tests can count requests and bytes per blob. Range headers are not in that
  log: put ``tests.support.faultproxy.FaultProxy`` in front to see them.
* ``TokenServer``: a small bearer-token server issuing RS256 JWTs that distribution verifies.
* ``push_image`` / ``push_index`` / ``make_tar_layer``: put images into a registry.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import requests

if TYPE_CHECKING:  # pushing through an als client is optional: als is imported only then
    from als.registry import RegistryClient

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"


def registry_available() -> bool:
    return os.access(REGISTRY_BIN, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_os_arch() -> tuple[str, str, str | None]:
    m = platform.machine().lower()
    arch, variant = {
        "x86_64": ("amd64", None),
        "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"),
        "armv7l": ("arm", "v7"),
        "i686": ("386", None),
    }.get(m, (m, None))
    return "linux", arch, variant


# ---- TLS ------------------------------------------------------------------------------------


@dataclass
class TLSMaterial:
    """A CA made for the test and a server certificate for 127.0.0.1/localhost."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    client_cert: Path  # a client certificate from the same CA, for mutual TLS
    client_key: Path

    @classmethod
    def create(
        cls, directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")
    ) -> TLSMaterial:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert(*hosts)
        ca_pem = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        cert_pem = directory / "server.pem"
        key_pem = directory / "server.key"
        # The server certificate file holds the chain (leaf first), as Go expects.
        cert_pem.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_pem))
        client = ca.issue_cert("als-test-client")
        client_cert = directory / "client.cert"
        client_key = directory / "client.key"
        client.cert_chain_pems[0].write_to_path(str(client_cert))
        client.private_key_pem.write_to_path(str(client_key))
        return cls(ca_pem, cert_pem, key_pem, client_cert, client_key)

    def write_certs_d(self, root: Path, host: str, *, client_cert: bool = False) -> Path:
        """``root/<host>/ca.crt`` (and ``client.cert``/``client.key``), as in
        containers-certs.d(5)."""
        d = root / host
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.ca_pem, d / "ca.crt")
        if client_cert:
            shutil.copyfile(self.client_cert, d / "client.cert")
            shutil.copyfile(self.client_key, d / "client.key")
        return d


def make_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    lines = []
    for user, password in users.items():
        out = subprocess.run(
            ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
        ).stdout.strip()
        lines.append(out)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- token server ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_der: bytes) -> str:
    """The ``kid`` distribution expects: libtrust's fingerprint of a SubjectPublicKeyInfo."""
    raw = base64.b32encode(hashlib.sha256(public_der).digest()[:30]).decode()
    return ":".join(raw[i : i + 4] for i in range(0, len(raw), 4))


@dataclass
class TokenRequest:
    method: str
    user: str | None
    scopes: list[str]
    status: int
    authorization_present: bool


class TokenServer:
    """Bearer tokens for a distribution registry configured with ``auth: token``.

    ``users`` maps usernames to passwords (basic auth on the token request); ``identity_tokens``
    maps refresh tokens to usernames (OAuth2 ``grant_type=refresh_token`` POSTs). Anonymous
    requests get ``pull`` if ``anonymous_pull``; users get what they ask for. Every token request
    is recorded in ``requests``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        identity_tokens: Mapping[str, str] | None = None,
        anonymous_pull: bool = True,
        service: str = "test-registry",
        issuer: str = "test-token-issuer",
        ttl: int = 300,
    ) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users or {})
        self.identity_tokens = dict(identity_tokens or {})
        self.anonymous_pull = anonymous_pull
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.requests: list[TokenRequest] = []
        self.fail_next: list[int] = []  # statuses to answer with before working normally
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "als test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = libtrust_key_id(der)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, claims: Mapping[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def issue(self, user: str | None, scopes: Sequence[str]) -> str:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) != 3 or parts[0] != "repository":
                continue
            wanted = parts[2].split(",")
            granted = (
                wanted
                if user is not None
                else (["pull"] if self.anonymous_pull and "pull" in wanted else [])
            )
            if granted:
                access.append({"type": "repository", "name": parts[1], "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        return self.sign(claims)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        q = urllib.parse.parse_qs(parsed.query)
        auth = h.headers.get("Authorization")
        user: str | None = None
        status = 200
        scopes = q.get("scope", [])
        if method == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(h.rfile.read(length).decode())
            scopes = form.get("scope", [])
            refresh = form.get("refresh_token", [""])[0]
            user = self.identity_tokens.get(refresh)
            if user is None:
                status = 401
        elif auth:
            try:
                u, _, p = base64.b64decode(auth.split(" ", 1)[1]).decode().partition(":")
            except (ValueError, IndexError):
                u, p = "", ""
            if self.users.get(u) == p and u:
                user = u
            else:
                status = 401
        elif not self.anonymous_pull:
            status = 401
        with self._lock:
            if self.fail_next:
                status = self.fail_next.pop(0)
            self.requests.append(TokenRequest(method, user, list(scopes), status, bool(auth)))
        if status != 200:
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        token = self.issue(user, scopes)
        body = json.dumps(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.ttl,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def start(self) -> TokenServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer._handle(self, "GET")

            def do_POST(self) -> None:
                outer._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="token-server"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the registry ---------------------------------------------------------------------------

_ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<ua>[^"]*)"'
)


@dataclass(frozen=True)
class AccessEntry:
    method: str
    path: str
    status: int
    bytes_sent: int
    user_agent: str
    remote: str


def parse_access_log(text: str) -> list[AccessEntry]:
    out = []
    for line in text.splitlines():
        m = _ACCESS_RE.match(line)
        if m:
            size = m.group("size")
            out.append(
                AccessEntry(
                    m.group("method"),
                    m.group("path"),
                    int(m.group("status")),
                    0 if size == "-" else int(size),
                    m.group("ua"),
                    m.group("remote"),
                )
            )
    return out


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:<free port> with its own storage dir.

    ``tls`` turns on HTTPS (``client_certs=True``: and requires client certificates signed by
    the test CA); ``htpasswd`` (user -> password, needs ``tls``) turns on basic auth;
    ``token`` (a started ``TokenServer``) turns on bearer-token auth; ``proxy_remote`` (a URL)
    makes it a pull-through cache of another registry.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        tls: TLSMaterial | None = None,
        htpasswd: Mapping[str, str] | None = None,
        token: TokenServer | None = None,
        proxy_remote: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        startup_timeout: float = 20.0,
        client_certs: bool = False,
    ) -> None:
        if htpasswd and tls is None:
            raise ValueError("htpasswd auth needs TLS")
        self._own_dir = workdir is None
        self.workdir = (
            Path(workdir)
            if workdir is not None
            else Path(tempfile.mkdtemp(prefix="als-test-registry-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.client_certs = client_certs
        self.htpasswd = dict(htpasswd or {})
        self.token = token
        self.proxy_remote = proxy_remote
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_log_path = self.workdir / "access.log"
        self.log_path = self.workdir / "registry.log"
        self._marks: dict[str, int] = {}

    # -- addresses
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    # -- lifecycle
    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.workdir / "data")},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": os.urandom(16).hex(),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.tls:
            cfg["http"]["tls"] = {
                "certificate": str(self.tls.cert_pem),
                "key": str(self.tls.key_pem),
            }
            if self.client_certs:
                cfg["http"]["tls"]["clientcas"] = [str(self.tls.ca_pem)]
        if self.htpasswd:
            path = make_htpasswd(self.workdir / "htpasswd", self.htpasswd)
            cfg["auth"] = {"htpasswd": {"realm": "als-test", "path": str(path)}}
        elif self.token:
            cfg["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.cert_path),
                }
            }
        if self.proxy_remote:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote}
            if self.proxy_username:
                proxy["username"] = self.proxy_username
                proxy["password"] = self.proxy_password or ""
            cfg["proxy"] = proxy
        return cfg

    def start(self) -> RegistryServer:
        last = ""
        for attempt in range(3):
            if self.port == 0 or attempt > 0:  # keep the port when started again after stop()
                self.port = free_port()
            cfg_path = self.workdir / "config.yml"
            cfg_path.write_text(json.dumps(self._config(), indent=1))  # JSON is YAML
            with open(self.access_log_path, "ab") as out, open(self.log_path, "ab") as err:
                self.proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(cfg_path)],
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready():
                return self
            last = self.log_path.read_text(errors="replace")[-2000:]
            self._kill()
        raise RuntimeError(f"docker-registry did not start on {self.host}:\n{last}")

    def _wait_ready(self) -> bool:
        end = time.monotonic() + self.startup_timeout
        verify: str | bool = str(self.tls.ca_pem) if self.tls else False
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                r = requests.get(
                    f"{self.url}/v2/",
                    timeout=1,
                    verify=verify,
                    proxies={"http": "", "https": ""},
                    cert=self._cert(),
                )
                if r.status_code in (200, 401):
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        """Stop the process (the storage and port are kept: ``start()`` again to restart)."""
        self._kill()

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        cfg_path = self.workdir / "config.yml"
        with open(self.access_log_path, "ab") as out, open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(cfg_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        if not self._wait_ready():
            raise RuntimeError(f"docker-registry did not restart on {self.host}")

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- direct HTTP access for test setup
    def _cert(self) -> tuple[str, str] | None:
        if self.tls and self.client_certs:
            return str(self.tls.client_cert), str(self.tls.client_key)
        return None

    def session(self) -> requests.Session:
        """A requests session that can talk to this registry directly (auth, CA, no proxy)."""
        s = requests.Session()
        s.trust_env = False
        if self.tls:
            s.verify = str(self.tls.ca_pem)
            s.cert = self._cert()
        if self.htpasswd:
            user, password = next(iter(self.htpasswd.items()))
            s.auth = (user, password)
        return s

    # -- access log
    def access_log(self, *, since: int = 0, settle: float = 0.05) -> list[AccessEntry]:
        """Parsed access-log entries (after the byte offset ``since``, see ``mark()``).

        The registry writes a line after each response completes, so this waits until the log
        has stopped growing for ``settle`` seconds (at most 2 s).
        """
        end = time.monotonic() + 2.0
        size = -1
        while time.monotonic() < end:
            new = self.access_log_path.stat().st_size if self.access_log_path.exists() else 0
            if new == size:
                break
            size = new
            time.sleep(settle)
        with open(self.access_log_path, "rb") as f:
            f.seek(since)
            return parse_access_log(f.read().decode(errors="replace"))

    def access_log_lines(self) -> list[str]:
        """The raw access-log lines (combined log format), after letting the log settle."""
        self.access_log()
        return self.access_log_path.read_text(errors="replace").splitlines()

    def mark(self) -> int:
        """The current end of the access log: pass it as ``since=`` to see only newer entries."""
        self.access_log()
        return self.access_log_path.stat().st_size if self.access_log_path.exists() else 0

    def blob_requests(
        self, digest: str, *, since: int = 0, method: str | None = "GET"
    ) -> list[AccessEntry]:
        return [
            e
            for e in self.access_log(since=since)
            if f"/blobs/{digest}" in e.path and (method is None or e.method == method)
        ]

    def blob_bytes_sent(self, digest: str, *, since: int = 0) -> int:
        return sum(e.bytes_sent for e in self.blob_requests(digest, since=since))


# ---- pushing images -------------------------------------------------------------------------


class LayerLike(Protocol):
    """What ``push_image`` needs from a layer (``als.formats.writer.BuiltLayer`` fits)."""

    @property
    def blob(self) -> bytes: ...
    @property
    def digest(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def media_type(self) -> str: ...
    @property
    def annotations(self) -> Mapping[str, str]: ...
    @property
    def diff_id(self) -> str: ...


@dataclass(frozen=True)
class SimpleLayer:
    blob: bytes
    digest: str
    size: int
    diff_id: str
    media_type: str = OCI_LAYER_GZIP
    annotations: Mapping[str, str] = field(default_factory=dict)
    toc_digest: str | None = None
    format: str = "gzip"


def make_tar_layer(files: Mapping[str, bytes], *, mtime: int = 1_700_000_000) -> SimpleLayer:
    """A plain gzip tar layer holding ``files`` (path -> content); deterministic."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = mtime
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(content))
    tar = raw.getvalue()
    blob = gzip.compress(tar, mtime=0)
    return SimpleLayer(
        blob=blob, digest=sha256_digest(blob), size=len(blob), diff_id=sha256_digest(tar)
    )


class _ClientTarget:
    """Push through an als RegistryClient (its auth, TLS and registries.conf handling)."""

    def __init__(self, client: RegistryClient, registry_host: str) -> None:
        self.client = client
        self.host = registry_host

    def blob(self, repo: str, data: bytes) -> str:
        from tests.support.push import push_blob

        return push_blob(self.client, f"{self.host}/{repo}", data)

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        from tests.support.push import push_manifest

        sep = "@" if ref.startswith("sha256:") else ":"
        return push_manifest(self.client, f"{self.host}/{repo}{sep}{ref}", body, media_type)


def _target(
    target: RegistryServer | str | RegistryClient,
    session: requests.Session | None,
    registry_host: str | None,
) -> _Target | _ClientTarget:
    if isinstance(target, RegistryServer | str):
        return _Target(target, session)
    if registry_host is None:
        raise ValueError("pushing through a client needs registry_host='host:port'")
    return _ClientTarget(target, registry_host)


class _Target:
    """Where to push: a base URL plus a requests session (auth, CA)."""

    def __init__(self, target: RegistryServer | str, session: requests.Session | None) -> None:
        if isinstance(target, RegistryServer):
            self.base = target.url
            self.s = session or target.session()
        else:
            self.base = target.rstrip("/")
            if "://" not in self.base:
                self.base = "http://" + self.base
            self.s = session or requests.Session()
            self.s.trust_env = False

    def _auth_retry(self, method: str, url: str, repo: str, **kw: Any) -> requests.Response:
        r = self.s.request(method, url, timeout=30, **kw)
        if r.status_code == 401 and "bearer" in r.headers.get("WWW-Authenticate", "").lower():
            ch = r.headers["WWW-Authenticate"]
            params = dict(re.findall(r'(\w+)="([^"]*)"', ch))
            tr = self.s.get(
                params["realm"],
                params={
                    "service": params.get("service", ""),
                    "scope": f"repository:{repo}:pull,push",
                },
                timeout=30,
            )
            tr.raise_for_status()
            tok = tr.json()["token"]
            self.s.auth = None
            self.s.headers["Authorization"] = f"Bearer {tok}"
            r = self.s.request(method, url, timeout=30, **kw)
        return r

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256_digest(data)
        r = self._auth_retry("HEAD", f"{self.base}/v2/{repo}/blobs/{digest}", repo)
        if r.status_code == 200:
            return digest
        r = self._auth_retry("POST", f"{self.base}/v2/{repo}/blobs/uploads/", repo)
        if r.status_code != 202:
            raise RuntimeError(f"starting upload to {repo}: HTTP {r.status_code} {r.text[:200]}")
        loc = urllib.parse.urljoin(self.base + "/", r.headers["Location"])
        loc += ("&" if "?" in loc else "?") + urllib.parse.urlencode({"digest": digest})
        r = self._auth_retry(
            "PUT", loc, repo, data=data, headers={"Content-Type": "application/octet-stream"}
        )
        if r.status_code != 201:
            raise RuntimeError(f"uploading {digest} to {repo}: HTTP {r.status_code}")
        return digest

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self._auth_retry(
            "PUT",
            f"{self.base}/v2/{repo}/manifests/{ref}",
            repo,
            data=body,
            headers={"Content-Type": media_type},
        )
        if r.status_code != 201:
            raise RuntimeError(
                f"pushing manifest {repo}:{ref}: HTTP {r.status_code} {r.text[:300]}"
            )
        return sha256_digest(body)


def image_config(
    diff_ids: Sequence[str],
    *,
    os_: str | None = None,
    arch: str | None = None,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> bytes:
    h_os, h_arch, h_var = host_os_arch()
    cfg: dict[str, Any] = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch or h_arch,
        "os": os_ or h_os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": "als test"} for _ in diff_ids
        ],
    }
    v = variant if variant is not None else (h_var if arch is None else None)
    if v:
        cfg["variant"] = v
    if overrides:
        cfg.update(overrides)
    return json.dumps(cfg, sort_keys=True).encode()


@dataclass(frozen=True)
class PushedImage:
    digest: str  # manifest digest
    manifest: bytes
    config: bytes
    config_digest: str
    size: int


def push_image_full(
    target: RegistryServer | str | RegistryClient,
    repo: str,
    tag: str | None,
    layers: Sequence[LayerLike],
    *,
    config_overrides: Mapping[str, Any] | None = None,
    os_: str | None = None,
    arch: str | None = None,
    variant: str | None = None,
    manifest_annotations: Mapping[str, str] | None = None,
    docker_media_types: bool = False,
    session: requests.Session | None = None,
    registry_host: str | None = None,
) -> PushedImage:
    """Push layers + config + manifest (see ``push_image``); return all that was pushed."""
    t = _target(target, session, registry_host)
    config = image_config(
        [layer.diff_id for layer in layers],
        os_=os_,
        arch=arch,
        variant=variant,
        overrides=config_overrides,
    )
    cfg_digest = t.blob(repo, config)
    for layer in layers:
        got = t.blob(repo, layer.blob)
        if got != layer.digest:
            raise ValueError(f"layer digest {layer.digest} does not match its blob ({got})")
    mtype = DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": {
            "mediaType": DOCKER_CONFIG if docker_media_types else OCI_CONFIG,
            "digest": cfg_digest,
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                **({"annotations": dict(layer.annotations)} if layer.annotations else {}),
            }
            for layer in layers
        ],
    }
    if manifest_annotations:
        manifest["annotations"] = dict(manifest_annotations)
    body = json.dumps(manifest, indent=2).encode()
    digest = t.manifest(repo, tag or sha256_digest(body), body, mtype)
    return PushedImage(digest, body, config, cfg_digest, len(body))


def push_image(
    target: RegistryServer | str | RegistryClient,
    repo: str,
    tag: str | None,
    layers: Sequence[LayerLike],
    **kwargs: Any,
) -> str:
    """Push layers + an OCI config (rootfs.diff_ids, host os/arch) + manifest; return the
    manifest digest.

    ``target`` is a RegistryServer, a base URL (``http://host:port``), or a RegistryClient
    together with ``registry_host="host:port"``. Keyword arguments: ``config_overrides``,
    ``os_``/``arch``/``variant``, ``manifest_annotations``, ``docker_media_types``, ``session``.
    ``tag=None`` pushes by digest only."""
    return push_image_full(target, repo, tag, layers, **kwargs).digest


def push_index(
    target: RegistryServer | str | RegistryClient,
    repo: str,
    tag: str,
    manifests: Sequence[tuple[PushedImage, str]],
    *,
    docker_media_types: bool = False,
    session: requests.Session | None = None,
    registry_host: str | None = None,
) -> str:
    """Push an OCI index (or Docker manifest list) of (image, "os/arch[/variant]") pairs."""
    t = _target(target, session, registry_host)
    entries = []
    for img, plat in manifests:
        parts = plat.split("/")
        p: dict[str, str] = {"os": parts[0], "architecture": parts[1]}
        if len(parts) > 2:
            p["variant"] = parts[2]
        entries.append(
            {
                "mediaType": DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST,
                "digest": img.digest,
                "size": img.size,
                "platform": p,
            }
        )
    mtype = DOCKER_LIST if docker_media_types else OCI_INDEX
    body = json.dumps({"schemaVersion": 2, "mediaType": mtype, "manifests": entries}).encode()
    return t.manifest(repo, tag, body, mtype)


def push_blob(
    target: RegistryServer | str | RegistryClient,
    repo: str,
    data: bytes,
    session: requests.Session | None = None,
    registry_host: str | None = None,
) -> str:
    return _target(target, session, registry_host).blob(repo, data)
