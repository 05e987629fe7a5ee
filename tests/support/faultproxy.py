"""A fault-injecting HTTP proxy to put in front of a real registry (or any HTTP server).

``FaultProxy(upstream_url)`` listens on 127.0.0.1:<free port> and forwards every request to the
upstream, recording method, path, Range header, status, bytes sent and whether an Authorization
header came along (``records``). Faults are queued with ``add(Fault(...))``; each applies to the
requests that match it (regex on ``"METHOD /path"``), ``times`` times (``None``: forever):

=====================  ======================================================================
kind                   effect
=====================  ======================================================================
``status``             answer ``status`` (e.g. 500/503/429) with optional ``Retry-After``
``drop``               close the connection without answering
``reset``              send headers and ``after_bytes`` of the body, then a TCP RST
``truncate``           send headers (full Content-Length) and ``after_bytes``, then close
``slow``               send the body in ``chunk``-byte pieces, ``delay`` seconds apart
``corrupt``            flip the byte at ``corrupt_at`` of the body
``ignore_range``       drop the Range header upstream: 200 and the whole body
``refuse_multirange``  400 for a Range with several ranges
``ignore_multirange``  drop a multi-range Range header upstream (200, whole body)
``first_range_only``   forward only the first range of a multi-range request (206, one part)
``redirect``           307 to a second listener (``redirect_host``, default 127.0.0.2) that
                       serves the same upstream path, like object storage behind a signed URL;
                       after ``expire_after`` uses a redirect URL answers 403
``stall``              wait ``delay`` seconds before answering at all (then answer normally)
=====================  ======================================================================

``probability`` (default 1) makes a fault apply to a matching request only that often (drawn
from the proxy's own ``random.Random(seed)``); requests it skips do not count towards ``times``.
``random_offset`` makes ``reset``/``truncate`` cut, and ``corrupt`` flip, at a random offset of
the body instead of ``after_bytes``/``corrupt_at``. ``remove(fault)`` takes one fault out again.

``set_reachable(False)`` makes the proxy unreachable: its listener is closed (connections are
refused) and every connection it holds is shut down; ``set_reachable(True)`` listens again on
the same port. ``unreachable_for(seconds)`` does both, the second from a timer thread.

``Schedule`` runs ``Phase``s in turns (faults added for the phase's duration, or the proxy
unreachable, or an action called at its start) and records when each phase really started and
ended, so that a harness can tell which fault was active at a given moment.

Reused by the reliability tests: keep it general (no registry specifics beyond Location rewrite).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
KINDS = {
    "status",
    "drop",
    "reset",
    "truncate",
    "slow",
    "corrupt",
    "ignore_range",
    "refuse_multirange",
    "ignore_multirange",
    "first_range_only",
    "redirect",
    "stall",
}


@dataclass
class Fault:
    kind: str
    match: str = ""  # regex searched in "METHOD /path?query"
    times: int | None = 1
    status: int = 503
    retry_after: str | None = None
    after_bytes: int = 0
    delay: float = 0.0
    chunk: int = 4096
    corrupt_at: int = 0
    only_ranged: bool = False  # only requests that carry a Range header
    expire_after: int | None = None  # redirect: uses before the redirected URL answers 403
    probability: float = 1.0  # applies to a matching request this often
    random_offset: bool = False  # reset/truncate/corrupt at a random offset of the body
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} is not within [0, 1]")


@dataclass
class Record:
    listener: str  # "proxy" or "redirect"
    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int
    authorization: bool
    fault: str | None = None


@dataclass
class _Ticket:
    path: str
    headers: dict[str, str] = field(repr=False)
    uses: int = 0
    expire_after: int | None = None


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        redirect_host: str = "127.0.0.2",
        upstream_ssl: ssl.SSLContext | None = None,
        seed: int | None = None,
    ) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.upstream_scheme = u.scheme
        self.upstream_netloc = u.netloc
        self.upstream_ssl = upstream_ssl
        self.bind_host = host
        self.redirect_bind = redirect_host
        self.faults: list[Fault] = []
        self.records: list[Record] = []
        self.errors: list[str] = []  # unexpected exceptions in the proxy's handlers
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._random = random.Random(seed)
        self._reachable = True
        self._conns: set[socket.socket] = set()  # client connections of the proxy listener
        self._timers: list[threading.Timer] = []
        self.port = 0
        self.redirect_port = 0

    # ---- public API ------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def redirect_url(self) -> str:
        return f"http://{self.redirect_bind}:{self.redirect_port}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            self.faults = [f for f in self.faults if f is not fault]

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    @property
    def reachable(self) -> bool:
        return self._reachable

    def set_reachable(self, up: bool) -> None:
        """Close the proxy listener and its connections (``False``), or listen again on the
        same port (``True``). The redirect listener is left alone."""
        with self._lock:
            if up == self._reachable or not self._servers:
                return
            self._reachable = up
        if not up:
            srv = self._servers[0]
            srv.shutdown()
            srv.server_close()
            with self._lock:
                conns = list(self._conns)
                self._conns.clear()
            for c in conns:
                with contextlib.suppress(OSError):  # already closed by its handler
                    c.shutdown(socket.SHUT_RDWR)
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                self._servers[0] = self._serve(self.bind_host, "proxy", self.port)
                return
            except OSError:  # the port is briefly busy after the close; it frees up at once
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def unreachable_for(self, seconds: float) -> None:
        """Unreachable now, reachable again after ``seconds`` (from a timer thread)."""
        self.set_reachable(False)
        t = threading.Timer(seconds, self.set_reachable, args=(True,))
        t.daemon = True
        self._timers.append(t)
        t.start()

    def reset_records(self) -> None:
        with self._lock:
            self.records.clear()

    def requests_for(self, pattern: str, listener: str | None = None) -> list[Record]:
        rx = re.compile(pattern)
        with self._lock:
            return [
                r
                for r in self.records
                if rx.search(f"{r.method} {r.path}")
                and (listener is None or r.listener == listener)
            ]

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.records)

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return sum(r.bytes_sent for r in self.records)

    def start(self) -> FaultProxy:
        self._servers.append(self._serve(self.bind_host, "proxy"))
        self.port = self._servers[0].server_address[1]
        self._servers.append(self._serve(self.redirect_bind, "redirect"))
        self.redirect_port = self._servers[1].server_address[1]
        return self

    def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        for i, s in enumerate(self._servers):
            if i == 0 and not self._reachable:
                continue  # already closed
            s.shutdown()
            s.server_close()
        self._servers.clear()
        self._reachable = True

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals -------------------------------------------------------------------------
    def _serve(self, host: str, listener: str, port: int = 0) -> ThreadingHTTPServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                if listener == "proxy":
                    with outer._lock:
                        outer._conns.add(self.connection)

            def finish(self) -> None:
                with outer._lock:
                    outer._conns.discard(self.connection)
                with contextlib.suppress(OSError):  # shut down under us (unreachable)
                    super().finish()

            def _any(self) -> None:
                if listener == "proxy" and not outer._reachable:
                    self.close_connection = True
                    return
                try:
                    outer._handle(self, listener)
                except OSError:  # the client hung up (as clients do on faulty responses)
                    self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                # Clients hanging up on a faulty response are expected; keep anything else.
                import sys

                exc = sys.exc_info()[1]
                if not isinstance(exc, OSError):
                    with outer._lock:
                        outer.errors.append(repr(exc))

        srv = Server((host, port), Handler)
        threading.Thread(
            target=srv.serve_forever, daemon=True, name=f"faultproxy-{listener}"
        ).start()
        return srv

    def _pick(self, method: str, path: str, has_range: bool) -> Fault | None:
        key = f"{method} {path}"
        with self._lock:
            for f in self.faults:
                if f.times is not None and f.hits >= f.times:
                    continue
                if f.only_ranged and not has_range:
                    continue
                if f.match and not re.search(f.match, key):
                    continue
                if f.probability < 1.0 and self._random.random() >= f.probability:
                    continue
                f.hits += 1
                return f
        return None

    def _offset(self, fault: Fault, fixed: int, size: int) -> int:
        if not fault.random_offset or size <= 0:
            return fixed
        with self._lock:
            return self._random.randrange(size)

    def _upstream(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn: http.client.HTTPConnection
        if self.upstream_scheme == "https":
            conn = http.client.HTTPSConnection(
                self.upstream_netloc, timeout=60, context=self.upstream_ssl
            )
        else:
            conn = http.client.HTTPConnection(self.upstream_netloc, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _handle(self, h: BaseHTTPRequestHandler, listener: str) -> None:
        method = h.command
        path = h.path
        rng = h.headers.get("Range")
        auth = h.headers.get("Authorization") is not None
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fwd: dict[str, str] = {}
        for k, v in h.headers.items():  # repeated headers (podman sends several Accept) join
            if k.lower() not in HOP_HEADERS:
                fwd[k] = f"{fwd[k]}, {v}" if k in fwd else v
        fwd["Host"] = self.upstream_netloc

        if listener == "redirect":
            ticket_id = urllib.parse.urlsplit(path).path.rsplit("/", 1)[-1]
            with self._lock:
                ticket = self._tickets.get(ticket_id)
                if ticket is not None:
                    ticket.uses += 1
            if ticket is None or (
                ticket.expire_after is not None and ticket.uses > ticket.expire_after
            ):
                self._respond(h, listener, method, path, rng, auth, 403, [], b"expired", None)
                return
            up_headers = {k: v for k, v in fwd.items() if k.lower() != "authorization"}
            up_headers.update(ticket.headers)
            status, _reason, headers, data = self._upstream(method, ticket.path, up_headers, None)
            self._respond(h, listener, method, path, rng, auth, status, headers, data, None)
            return

        fault = self._pick(method, path, rng is not None)
        kind = fault.kind if fault else None
        if kind == "stall" and fault is not None:
            time.sleep(fault.delay)
        if fault is not None and kind == "status":
            extra = [("Retry-After", fault.retry_after)] if fault.retry_after else []
            self._respond(h, listener, method, path, rng, auth, fault.status, extra, b"", kind)
            return
        if kind == "drop":
            self._record(listener, method, path, rng, 0, 0, auth, kind)
            h.close_connection = True
            return
        if kind == "refuse_multirange" and rng and "," in rng:
            self._respond(h, listener, method, path, rng, auth, 400, [], b"no multi-range", kind)
            return
        if kind == "redirect" and fault is not None:
            ticket_id = f"t{time.monotonic_ns()}{len(self._tickets)}"
            saved = {k: v for k, v in fwd.items() if k.lower() == "authorization"}
            with self._lock:
                self._tickets[ticket_id] = _Ticket(path, saved, expire_after=fault.expire_after)
            loc = f"{self.redirect_url}/blobstore/{ticket_id}?X-Signature=secret-{ticket_id}"
            self._respond(h, listener, method, path, rng, auth, 307, [("Location", loc)], b"", kind)
            return
        if kind == "ignore_range" or (kind == "ignore_multirange" and rng and "," in rng):
            fwd.pop("Range", None)
        if kind == "first_range_only" and rng and "," in rng:
            fwd["Range"] = rng.split(",", 1)[0]
        status, _reason, headers, data = self._upstream(method, path, fwd, body)
        headers = [
            (k, v.replace(f"{self.upstream_scheme}://{self.upstream_netloc}", self.url))
            if k.lower() == "location"
            else (k, v)
            for k, v in headers
        ]
        if kind == "corrupt" and fault is not None and data:
            i = min(self._offset(fault, fault.corrupt_at, len(data)), len(data) - 1)
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        self._respond(
            h, listener, method, path, rng, auth, status, headers, data, kind, fault=fault
        )

    def _record(
        self,
        listener: str,
        method: str,
        path: str,
        rng: str | None,
        status: int,
        sent: int,
        auth: bool,
        kind: str | None,
    ) -> None:
        with self._lock:
            self.records.append(Record(listener, method, path, rng, status, sent, auth, kind))

    def _respond(
        self,
        h: BaseHTTPRequestHandler,
        listener: str,
        method: str,
        path: str,
        rng: str | None,
        auth: bool,
        status: int,
        headers: list[tuple[str, str]],
        data: bytes,
        kind: str | None,
        fault: Fault | None = None,
    ) -> None:
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_HEADERS:
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        payload = b"" if method == "HEAD" else data
        sent = 0
        if kind in ("reset", "truncate") and fault is not None:
            part = payload[: self._offset(fault, fault.after_bytes, len(payload))]
            h.wfile.write(part)
            h.wfile.flush()
            sent = len(part)
            self._record(listener, method, path, rng, status, sent, auth, kind)
            h.close_connection = True
            if kind == "reset":
                h.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            return
        if kind == "slow" and fault is not None:
            for i in range(0, len(payload), fault.chunk):
                h.wfile.write(payload[i : i + fault.chunk])
                h.wfile.flush()
                sent += len(payload[i : i + fault.chunk])
                time.sleep(fault.delay)
        else:
            h.wfile.write(payload)
            sent = len(payload)
        self._record(listener, method, path, rng, status, sent, auth, kind)


@dataclass
class Phase:
    """One turn of a ``Schedule``: ``faults`` active (or the proxy unreachable) for
    ``duration`` seconds; ``action`` (if any) is called when the phase starts, before the wait.
    ``started``/``ended`` are wall-clock times (``time.time()``) filled in by the schedule."""

    name: str
    duration: float
    faults: Sequence[Fault] = ()
    unreachable: bool = False
    action: Callable[[], object] | None = None
    started: float | None = None
    ended: float | None = None
    hits: int = 0  # requests the phase's faults applied to

    def active_at(self, t: float, before: float = 0.0, after: float = 0.0) -> bool:
        """Was the phase running at ``t`` (its window widened by ``before``/``after``)?"""
        if self.started is None:
            return False
        end = self.ended if self.ended is not None else time.time()
        return self.started - before <= t <= end + after


class Schedule:
    """Phases applied to a proxy in turns, each for its duration; ``run`` blocks until the last
    one ended (or ``stop()`` was called from another thread) and always leaves the proxy clean:
    reachable, with none of the schedule's faults."""

    def __init__(self, proxy: FaultProxy, phases: Sequence[Phase]) -> None:
        self.proxy = proxy
        self.phases = list(phases)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self, on_phase: Callable[[Phase], object] | None = None) -> list[Phase]:
        for ph in self.phases:
            if self._stop.is_set():
                break
            ph.started = time.time()
            if on_phase is not None:
                on_phase(ph)
            added = [self.proxy.add(f) for f in ph.faults]
            try:
                if ph.unreachable:
                    self.proxy.set_reachable(False)
                if ph.action is not None:
                    ph.action()
                remaining = ph.started + ph.duration - time.time()
                if remaining > 0:
                    self._stop.wait(remaining)
            finally:
                for f in added:
                    self.proxy.remove(f)
                if ph.unreachable:
                    self.proxy.set_reachable(True)
                ph.hits = sum(f.hits for f in added)
                ph.ended = time.time()
        return self.phases
