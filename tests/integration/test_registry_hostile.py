"""Hostile registry answers: oversized or lying manifests, redirect loops, redirects to other
schemes and to link-local (cloud metadata) addresses, token realms on other hosts, answers that
never end, and lying range responses. Every failure is a clean error naming the host, bounded
in time, and never carries credentials.

The malicious cases use a small scripted HTTP server of the test's own (``Hostile``) on
loopback; where a real registry can show the case, the real docker-registry sits behind the
project's fault proxy.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from als.errors import AlsError, AuthError, ConfigError, RegistryError, VerifyError
from als.registry import CredentialStore, RegistryClient
from als.registry.auth import parse_realm_policy
from als.registry.client import MAX_REDIRECTS
from als.registry.manifests import MAX_MANIFEST_SIZE
from als.registry.transport import blocked_address
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.registry import RegistryServer, make_tar_layer, push_image

USER, PASSWORD = "alice", "Hostile-S3cret-pw!"
SECRETS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
REPO = "hostile/app"
SERVER_CAP = 20.0  # no scripted answer lasts longer than this, whatever the client does

Responder = Callable[["_Handler"], None]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


CONFIG = json.dumps(
    {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
).encode()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _sha(CONFIG),
            "size": len(CONFIG),
        },
        "layers": [],
    }
).encode()
BLOB = bytes(random.Random(7).randbytes(1000))
BLOB_DIGEST = _sha(BLOB)


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _dispatch(self) -> None:
        self.server.owner.seen.append(
            Seen(self.command, self.path, self.headers.get("Authorization"))
        )
        for rx, fn in self.server.owner.routes:
            if rx.search(f"{self.command} {self.path}"):
                try:
                    fn(self)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True
                return
        if self.path == "/v2/":
            self.answer(200, b"{}")
        else:
            self.answer(404, b'{"errors":[{"code":"NOT_FOUND"}]}')

    do_GET = do_HEAD = do_POST = _dispatch

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def forever(self, piece: bytes, every: float) -> None:
        """Write ``piece`` every ``every`` seconds until the client goes (or SERVER_CAP)."""
        end = time.monotonic() + SERVER_CAP
        while time.monotonic() < end:
            self.wfile.write(piece)
            self.wfile.flush()
            time.sleep(every)
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: Hostile


@dataclass
class Hostile:
    """A registry-shaped HTTP server whose answers the test scripts with ``route``."""

    bind: str = "127.0.0.1"
    routes: list[tuple[re.Pattern[str], Responder]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._srv = _Server((self.bind, 0), _Handler)
        self._srv.owner = self
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"{self.bind}:{self._srv.server_address[1]}"

    def route(self, pattern: str, fn: Responder) -> None:
        self.routes.insert(0, (re.compile(pattern), fn))

    def reset(self) -> None:
        self.routes.clear()
        self.seen.clear()

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Hostile, Hostile]]:
    """The hostile registry on 127.0.0.1 and a second host on 127.0.0.2."""
    a, b = Hostile("127.0.0.1"), Hostile("127.0.0.2")
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def srv(servers: tuple[Hostile, Hostile]) -> Iterator[Hostile]:
    for s in servers:
        s.reset()
    yield servers[0]


@pytest.fixture
def other(servers: tuple[Hostile, Hostile], srv: Hostile) -> Hostile:
    return servers[1]


@pytest.fixture
def authfile(tmp_path: Path, srv: Hostile) -> str:
    p = tmp_path / "auth.json"
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    p.write_text(json.dumps({"auths": {srv.host: {"auth": auth}}}))
    p.chmod(0o600)
    return str(p)


def _client(authfile: str | None = None, **kw: Any) -> RegistryClient:
    opts: dict[str, Any] = {
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
        "max_retry_time": 2.0,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
    }
    opts.update(kw)
    creds = CredentialStore([authfile]) if authfile else CredentialStore([])
    return RegistryClient(credentials=creds, **opts)


def _fails(
    fn: Callable[[], object], exc: type[Exception] = RegistryError, within: float = 5.0
) -> AlsError:
    t = time.monotonic()
    with pytest.raises(exc) as e:
        fn()
    took = time.monotonic() - t
    assert took < within, f"took {took:.1f}s: {e.value}"
    assert isinstance(e.value, AlsError)
    for secret in SECRETS:
        assert secret not in str(e.value)
    return e.value


def _serve_image(srv: Hostile) -> None:
    srv.route(
        rf"GET /v2/{REPO}/manifests/",
        lambda h: h.answer(
            200, MANIFEST, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        ),
    )
    srv.route(rf"GET /v2/{REPO}/blobs/{_sha(CONFIG)}", lambda h: h.answer(200, CONFIG))


# ---- manifests -------------------------------------------------------------------------------


def test_a_well_behaved_answer_resolves(srv: Hostile) -> None:
    """The control: the scripted server serves an image the client accepts."""
    _serve_image(srv)
    with _client() as c:
        img = c.resolve(f"{srv.host}/{REPO}:v1")
    assert img.manifest_digest == _sha(MANIFEST)


def _big_with_length(h: _Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(MAX_MANIFEST_SIZE + 1))
    h.end_headers()
    h.forever(b"{" * 65536, 0.0)


def _big_chunked(h: _Handler) -> None:
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.forever(b"10000\r\n" + b" " * 65536 + b"\r\n", 0.0)


@pytest.mark.parametrize(
    "responder", [_big_with_length, _big_chunked], ids=["content-length", "chunked-endless"]
)
def test_oversized_manifest_is_refused(srv: Hostile, responder: Responder) -> None:
    srv.route(rf"GET /v2/{REPO}/manifests/", responder)
    with _client() as c:
        err = _fails(lambda: c.resolve(f"{srv.host}/{REPO}:v1"))
        assert c.stats.bytes_received <= MAX_MANIFEST_SIZE + (1 << 17)
    assert srv.host in str(err) and str(MAX_MANIFEST_SIZE) in str(err)
    assert len([s for s in srv.seen if "/manifests/" in s.path]) == 1  # not retried


def test_manifest_bytes_must_match_the_digest_asked_for(srv: Hostile) -> None:
    _serve_image(srv)
    wanted = _sha(MANIFEST.replace(b'"layers": []', b'"layers": [] '))
    with _client() as c:
        err = _fails(lambda: c.resolve(f"{srv.host}/{REPO}@{wanted}"), VerifyError)
    assert wanted in str(err) and srv.host in str(err)


def test_manifest_digest_header_must_match_the_body(srv: Hostile) -> None:
    srv.route(
        rf"GET /v2/{REPO}/manifests/",
        lambda h: h.answer(
            200,
            MANIFEST,
            {
                "Docker-Content-Digest": _sha(b"other"),
                "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            },
        ),
    )
    with _client() as c:
        err = _fails(lambda: c.resolve(f"{srv.host}/{REPO}:v1"), VerifyError)
    assert srv.host in str(err)


def test_real_registry_manifest_corrupted_in_transit(registry: RegistryServer) -> None:
    layer = make_tar_layer({"a": b"x" * 1000})
    digest = push_image(registry, "hostile/real", "v1", [layer])
    with FaultProxy(registry.url) as proxy:
        proxy.add(
            Fault("corrupt", match=r"GET /v2/hostile/real/manifests/", corrupt_at=10, times=None)
        )
        with _client() as c:
            err = _fails(lambda: c.resolve(f"{proxy.host}/hostile/real@{digest}"), VerifyError)
        assert digest in str(err) and proxy.host in str(err)
        proxy.clear()
        with _client() as c:
            assert c.resolve(f"{proxy.host}/hostile/real@{digest}").manifest_digest == digest


# ---- redirects -------------------------------------------------------------------------------


def _redirect(location: str, status: int = 307) -> Responder:
    return lambda h: h.answer(status, b"", {"Location": location})


def test_redirect_loop_is_bounded(srv: Hostile) -> None:
    srv.route(r"GET /loop/a", _redirect("/loop/b", 302))
    srv.route(r"GET /loop/b", _redirect("/loop/a", 301))
    srv.route(rf"GET /v2/{REPO}/manifests/", _redirect("/loop/a"))
    with _client() as c:
        err = _fails(lambda: c.resolve(f"{srv.host}/{REPO}:v1"))
    assert "redirects" in str(err) and srv.host in str(err)
    assert len([s for s in srv.seen if s.path.startswith("/loop/")]) == MAX_REDIRECTS


@pytest.mark.parametrize(
    "location",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "gopher://127.0.0.1:70/_x",
        "data:,hello",
        "javascript:alert(1)",
        "unix:///run/docker.sock",
    ],
)
def test_redirect_to_another_scheme_is_refused(srv: Hostile, location: str) -> None:
    srv.route(rf"GET /v2/{REPO}/blobs/", _redirect(location))
    with _client() as c:
        err = _fails(
            lambda: c.fetch_ranges(f"{srv.host}/{REPO}:v1", BLOB_DIGEST, [(0, 10)]), within=3.0
        )
    scheme = location.split(":", maxsplit=1)[0]
    assert f"{scheme}:" in str(err) and srv.host in str(err)
    assert len([s for s in srv.seen if "/blobs/" in s.path]) == 1  # refused, not retried


METADATA = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://169.254.1.1:8080/x",
    "http://[fe80::1]/x",
    "http://[fe80::a:b:c:d%25lo]/x",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/x",
    "http://[64:ff9b::a9fe:a9fe]/x",
    "https://metadata.hostile.test/computeMetadata/v1/",  # a name that resolves there
]


@pytest.fixture
def metadata_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``*.hostile.test`` resolve to 169.254.169.254 (and fail loudly if als connected)."""
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".hostile.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        assert not blocked_address(str(address[0])), f"connected to {address}"
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.mark.parametrize("location", METADATA)
def test_redirect_to_link_local_is_refused_without_connecting(
    srv: Hostile, metadata_dns: None, location: str
) -> None:
    srv.route(rf"GET /v2/{REPO}/blobs/", _redirect(location))
    with _client() as c:
        err = _fails(
            lambda: c.fetch_ranges(f"{srv.host}/{REPO}:v1", BLOB_DIGEST, [(0, 10)]), within=3.0
        )
        assert set(c.stats.per_host) == {srv.host}  # nothing was sent anywhere else
    assert "link-local" in str(err) and "refusing to connect" in str(err)
    assert "security-credentials" not in str(err)


@pytest.mark.parametrize("host", ["169.254.169.254", "[fd00:ec2::254]", "metadata.hostile.test"])
def test_registry_or_token_realm_at_link_local_is_refused(
    srv: Hostile, metadata_dns: None, host: str
) -> None:
    with _client() as c:
        err = _fails(lambda: c.resolve(f"{host}/{REPO}:v1"), within=3.0)
        assert "link-local" in str(err) and c.stats.requests == 0
    srv.route(
        r"GET /v2/",
        lambda h: h.answer(
            401, b"", {"WWW-Authenticate": f'Bearer realm="http://{host}/token",service="x"'}
        ),
    )
    with _client() as c:
        err = _fails(lambda: c.resolve(f"{srv.host}/{REPO}:v1"), within=3.0)
        assert "link-local" in str(err) and set(c.stats.per_host) == {srv.host}


def test_blocked_address_forms() -> None:
    for a in (
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
    ):
        assert blocked_address(a), a
    for a in (
        "127.0.0.1",
        "10.0.0.1",
        "169.253.255.255",
        "169.255.0.0",
        "::1",
        "fd00:ec2::253",
        "2001:db8::1",
        "registry.example",
        "",
    ):
        assert not blocked_address(a), a


def test_credentials_are_not_sent_across_a_redirect(
    srv: Hostile, other: Hostile, authfile: str
) -> None:
    srv.route(
        r"GET /v2/",
        lambda h: h.answer(
            200 if h.headers.get("Authorization") else 401,
            b"{}",
            {"WWW-Authenticate": 'Basic realm="hostile"'},
        ),
    )
    srv.route(rf"GET /v2/{REPO}/blobs/", _redirect(f"http://{other.host}/signed/blob"))
    other.route(
        r"GET /signed/blob",
        lambda h: h.answer(206, BLOB[:10], {"Content-Range": f"bytes 0-9/{len(BLOB)}"}),
    )
    with _client(authfile) as c:
        assert c.fetch_ranges(f"{srv.host}/{REPO}:v1", BLOB_DIGEST, [(0, 10)]) == [BLOB[:10]]
    assert any(s.authorization for s in srv.seen)
    assert [s.authorization for s in other.seen] == [None]


# ---- token realms ------------------------------------------------------------------------------


def _bearer_registry(srv: Hostile, token_host: str) -> None:
    """Manifests only for the token the realm gives to alice."""

    def guarded(h: _Handler) -> None:
        if h.headers.get("Authorization") == "Bearer tok-alice":
            h.answer(200, MANIFEST, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        else:
            h.answer(
                401,
                b"",
                {"WWW-Authenticate": f'Bearer realm="http://{token_host}/token",service="hostile"'},
            )

    srv.route(
        r"GET /v2/$",
        lambda h: h.answer(
            401,
            b"",
            {"WWW-Authenticate": f'Bearer realm="http://{token_host}/token",service="hostile"'},
        ),
    )
    srv.route(rf"GET /v2/{REPO}/manifests/", guarded)
    srv.route(rf"GET /v2/{REPO}/blobs/{_sha(CONFIG)}", lambda h: h.answer(200, CONFIG))


def _token_server(t: Hostile) -> None:
    def token(h: _Handler) -> None:
        ok = h.headers.get("Authorization") == "Basic " + SECRETS[1]
        h.answer(
            200,
            json.dumps({"token": "tok-alice" if ok else "tok-anon"}).encode(),
            {"Content-Type": "application/json"},
        )

    t.route(r"GET /token", token)


def test_token_realm_on_another_host_gets_no_credentials_by_default(
    srv: Hostile, other: Hostile, authfile: str, caplog: pytest.LogCaptureFixture
) -> None:
    _bearer_registry(srv, other.host)
    _token_server(other)
    caplog.set_level(logging.DEBUG)
    with _client(authfile) as c:
        err = _fails(lambda: c.resolve(f"{srv.host}/{REPO}:v1"), AuthError)
    assert srv.host in str(err)
    assert other.seen and all(s.authorization is None for s in other.seen)
    warned = [r.getMessage() for r in caplog.records if "auth_realm_hosts" in r.getMessage()]
    assert len(warned) == 1 and srv.host in warned[0] and other.host in warned[0]


def test_token_realm_on_another_host_gets_credentials_where_the_policy_allows(
    srv: Hostile, other: Hostile, authfile: str
) -> None:
    _bearer_registry(srv, other.host)
    _token_server(other)
    with _client(authfile, auth_realm_hosts="127.0.0.1=127.0.0.2") as c:
        assert c.resolve(f"{srv.host}/{REPO}:v1").manifest_digest == _sha(MANIFEST)
    assert all(s.authorization == "Basic " + SECRETS[1] for s in other.seen)
    other.seen.clear()
    with _client(authfile, auth_realm_hosts="127.0.0.1=auth.example.com") as c:
        _fails(lambda: c.resolve(f"{srv.host}/{REPO}:v1"), AuthError)
    assert other.seen and all(s.authorization is None for s in other.seen)


def test_token_realm_on_the_same_host_gets_credentials(srv: Hostile, authfile: str) -> None:
    _bearer_registry(srv, srv.host)
    _token_server(srv)
    with _client(authfile) as c:
        assert c.resolve(f"{srv.host}/{REPO}:v1").manifest_digest == _sha(MANIFEST)


def test_realm_policy_syntax() -> None:
    p = parse_realm_policy("registry-1.docker.io=auth.docker.io, reg.example=*  *=tok.example")
    assert p.allows("registry-1.docker.io", "auth.docker.io")
    assert p.allows("reg.example", "anything.example")
    assert p.allows("x.example", "tok.example") and p.allows("x.example", "x.example")
    assert not p.allows("registry-1.docker.io", "evil.example")
    assert not parse_realm_policy("").allows("a.example", "b.example")
    for bad in ("noequals", "a=b=c", "a b=c", "=x", "x="):
        with pytest.raises(ConfigError):
            parse_realm_policy(bad)


# ---- answers that never end ------------------------------------------------------------------


def _trickle_body(h: _Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    h.forever(b"{", 0.05)


def _trickle_headers(h: _Handler) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    h.forever(b"X-Slow: 1\r\n", 0.05)


def _trickle_one_header(h: _Handler) -> None:
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    h.forever(b"a", 0.05)


def _trickle_status(h: _Handler) -> None:
    h.forever(b"H", 0.05)


def _trickle_range(h: _Handler) -> None:
    h.send_response(206)
    h.send_header("Content-Range", f"bytes 0-99/{len(BLOB)}")
    h.send_header("Content-Length", "100")
    h.end_headers()
    h.forever(b"\0", 0.05)


NEVER_ENDING = [_trickle_body, _trickle_headers, _trickle_one_header, _trickle_status]


@pytest.mark.parametrize("responder", NEVER_ENDING, ids=lambda f: f.__name__[1:])
def test_manifest_answers_that_never_end_are_cut_at_the_deadline(
    srv: Hostile, responder: Responder
) -> None:
    srv.route(rf"GET /v2/{REPO}/manifests/", responder)
    with _client(max_retry_time=2.0) as c:
        err = _fails(lambda: c.resolve(f"{srv.host}/{REPO}:v1"), within=2.0 + 2.5)
    assert srv.host in str(err)


@pytest.mark.parametrize("responder", [*NEVER_ENDING, _trickle_range], ids=lambda f: f.__name__[1:])
def test_blob_answers_that_never_end_are_cut_at_the_callers_deadline(
    srv: Hostile, responder: Responder
) -> None:
    srv.route(rf"GET /v2/{REPO}/blobs/", responder)
    with _client(max_retry_time=30.0) as c:
        err = _fails(
            lambda: c.fetch_ranges(
                f"{srv.host}/{REPO}:v1", BLOB_DIGEST, [(0, 100)], deadline=time.monotonic() + 1.5
            ),
            within=1.5 + 2.5,
        )
    assert srv.host in str(err)


def test_real_registry_trickling_blob_is_cut_at_the_deadline(registry: RegistryServer) -> None:
    layer = make_tar_layer({"big": random.Random(3).randbytes(200_000)})
    push_image(registry, "hostile/slow", "v1", [layer])
    with FaultProxy(registry.url) as proxy:
        proxy.add(
            Fault(
                "slow",
                match=r"GET /v2/hostile/slow/blobs/",
                chunk=64,
                delay=0.05,
                times=None,
                only_ranged=True,
            )
        )
        with _client(max_retry_time=30.0) as c:
            ref = f"{proxy.host}/hostile/slow:v1"
            c.resolve(ref)
            err = _fails(
                lambda: c.fetch_ranges(
                    ref, layer.digest, [(0, 150_000)], deadline=time.monotonic() + 1.5
                ),
                within=4.0,
            )
            assert proxy.host in str(err)
            proxy.clear()
            assert c.fetch_ranges(ref, layer.digest, [(0, 1000)]) == [layer.blob[:1000]]


# ---- lying range answers ---------------------------------------------------------------------


def _range_answer(status: int, body: bytes, headers: dict[str, str]) -> Responder:
    return lambda h: h.answer(status, body, headers)


def test_huge_content_length_on_a_range_is_refused_at_once(srv: Hostile) -> None:
    def huge(h: _Handler) -> None:
        h.send_response(206)
        h.send_header("Content-Range", f"bytes 0-99/{len(BLOB)}")
        h.send_header("Content-Length", str(10**15))
        h.end_headers()
        h.forever(b"\0" * 65536, 0.0)

    srv.route(rf"GET /v2/{REPO}/blobs/", huge)
    with _client() as c:
        err = _fails(
            lambda: c.fetch_ranges(f"{srv.host}/{REPO}:v1", BLOB_DIGEST, [(0, 100)]), within=3.0
        )
        assert c.stats.bytes_received < 1 << 20
    assert str(10**15) in str(err) and srv.host in str(err)


@pytest.mark.parametrize(
    ("content_range", "body"),
    [
        (f"bytes 0-99/{len(BLOB)}", BLOB[:100]),  # other bytes than asked for
        (f"bytes 150-249/{len(BLOB)}", BLOB[150:250]),  # overlaps, does not cover
        (f"bytes 100-199/{len(BLOB)}", BLOB[100:150]),  # right range, short body
        ("bytes 100-99/1000", b""),  # nonsense
        ("bytes */1000", BLOB[100:200]),
        ("items 100-199/1000", BLOB[100:200]),
        ("", BLOB[100:200]),
    ],
)
def test_206_that_does_not_match_the_request_is_never_data(
    srv: Hostile, content_range: str, body: bytes
) -> None:
    headers = {"Content-Range": content_range} if content_range else {}
    srv.route(rf"GET /v2/{REPO}/blobs/", _range_answer(206, body, headers))
    with _client(max_retry_time=1.0) as c:
        err = _fails(
            lambda: c.fetch_ranges(f"{srv.host}/{REPO}:v1", BLOB_DIGEST, [(100, 100)]), within=3.5
        )
    assert srv.host in str(err)


def test_206_that_matches_is_data(srv: Hostile) -> None:
    """The control for the case above: the same server, telling the truth."""
    srv.route(
        rf"GET /v2/{REPO}/blobs/",
        _range_answer(206, BLOB[100:200], {"Content-Range": f"bytes 100-199/{len(BLOB)}"}),
    )
    with _client() as c:
        assert c.fetch_ranges(f"{srv.host}/{REPO}:v1", BLOB_DIGEST, [(100, 100)]) == [BLOB[100:200]]


# ---- credentials never in errors or logs -------------------------------------------------------


def test_no_credentials_in_any_error_or_log_line(
    srv: Hostile, other: Hostile, authfile: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def ping(h: _Handler) -> None:
        h.answer(
            200 if h.headers.get("Authorization") else 401,
            b"{}",
            {"WWW-Authenticate": 'Basic realm="hostile"'},
        )

    basic: tuple[str, Responder] = (r"GET /v2/$", ping)
    scenarios: list[list[tuple[str, Responder]]] = [
        [basic, (r"/manifests/", lambda h: h.answer(403, b"denied"))],
        [basic, (r"/manifests/", _redirect(f"http://{USER}:{PASSWORD}@{other.host}/x"))],
        [basic, (r"/manifests/", _redirect("http://169.254.169.254/x"))],
        [basic, (r"/manifests/", _redirect("/loop"))],
        [basic, (r"/manifests/", _big_with_length)],
        [basic, (r"/manifests/", _trickle_headers)],
        [
            (
                r"GET /v2/$",
                lambda h: h.answer(
                    401, b"", {"WWW-Authenticate": f'Bearer realm="http://{other.host}/token"'}
                ),
            )
        ],
        [
            (
                r"GET /v2/$",
                lambda h: h.answer(
                    401, b"", {"WWW-Authenticate": f'Bearer realm="http://{srv.host}/token"'}
                ),
            ),
            (r"GET /token", lambda h: h.answer(401, b"no")),
        ],
    ]
    errors: list[str] = []
    for routes in scenarios:
        srv.reset()
        other.reset()
        for pattern, fn in routes:
            srv.route(pattern, fn)
        with _client(authfile) as c:
            resolve = functools.partial(c.resolve, f"{srv.host}/{REPO}:v1")
            errors.append(str(_fails(resolve, AlsError, within=3.5)))
    text = "\n".join(errors + [r.getMessage() for r in caplog.records])
    for secret in SECRETS:
        assert secret not in text
    for e in errors:
        assert srv.host in e or other.host in e, e
