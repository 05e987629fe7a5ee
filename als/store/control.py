"""The store's control socket: a tiny HTTP/1.0 server for ``als status`` and Prometheus.

It always listens on a unix socket (``ROOT/.als.sock``, mode 0660) and, if asked, on one more
address: ``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT`` (every interface) or ``unix:/path``.

Routes: ``GET /status`` answers the manager's ``status()`` as JSON, ``GET /metrics`` the
Prometheus text exposition; any other path is 404 and any other method 405. One request per
connection (``Connection: close``).

Hostile or broken clients cannot hurt the daemon: the request head is capped at
:data:`MAX_HEAD_BYTES`, a connection gets :data:`CONNECTION_TIMEOUT` seconds in total (read,
answer, send), at most :data:`MAX_CONNECTIONS` are served at once (further ones are closed at
once), and every handler catches and logs its own errors, so the server keeps running.
Everything runs on the trio loop: no threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket as _socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from als.errors import ConfigError
from als.store.metrics import Metrics
from als.store.status import StoreStatus

log = logging.getLogger("als.control")

#: The manager's ``status()``; a plain mapping is served as well (it is only JSON-encoded).
StatusFn = Callable[[], StoreStatus | Mapping[str, Any]]

MAX_HEAD_BYTES = 8 * 1024
CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 64
SOCKET_MODE = 0o660
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class ControlAddresses:
    """Where the control server listens; what ``task_status.started()`` reports."""

    socket_path: Path
    #: Every unix socket served, ``socket_path`` first.
    unix: tuple[Path, ...] = ()
    #: The bound ``(host, port)`` of each TCP listener (the real port if 0 was asked for).
    tcp: tuple[tuple[str, int], ...] = field(default=())


@dataclass(frozen=True)
class TcpAddress:
    host: str | None  # None: every interface
    port: int


def parse_listen(spec: str) -> Path | TcpAddress:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``unix:/path`` -> a path or a TCP address."""
    spec = spec.strip()
    if spec.startswith("unix:"):
        path = spec[len("unix:") :]
        if not path:
            raise ConfigError(f"control listen address {spec!r}: empty unix socket path")
        return Path(path)
    if spec.startswith("["):
        host, sep, port_s = spec[1:].partition("]:")
        if not sep or not host:
            raise ConfigError(f"control listen address {spec!r}: expected [V6ADDR]:PORT")
    else:
        host, sep, port_s = spec.rpartition(":")
        if not sep:
            raise ConfigError(f"control listen address {spec!r}: expected HOST:PORT or unix:PATH")
        if ":" in host:
            raise ConfigError(
                f"control listen address {spec!r}: put an IPv6 address in brackets, [ADDR]:PORT"
            )
    if not port_s.isdigit() or int(port_s) > 65535:
        raise ConfigError(f"control listen address {spec!r}: bad port {port_s!r}")
    return TcpAddress(host or None, int(port_s))


async def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left behind by a dead server; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket: not replacing it")
    with trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as probe:
        try:
            with trio.fail_after(1.0):
                await probe.connect(str(path))
        except (OSError, trio.TooSlowError):
            pass  # refused (or not answering): nobody serves it any more
        else:
            raise ConfigError(f"{path}: another server is listening there")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _open_unix_listener(path: Path) -> tuple[trio.SocketListener, int]:
    """Listen on ``path`` with mode 0660; returns the listener and the socket file's inode."""
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ConfigError(f"control socket path {path} is too long for a unix socket")
    await _remove_stale_socket(path)
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        # chmod before listen(): until then nobody can connect, whatever the umask made it.
        # (Setting the umask around bind would race with file creation in worker threads.)
        os.chmod(path, SOCKET_MODE)
        sock.listen(MAX_CONNECTIONS)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock), inode


def _unlink_if_ours(path: Path, inode: int) -> None:
    """Remove our socket file, unless a successor already replaced it."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove control socket %s: %s", path, exc)


class _BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _response(code: int, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.0 {code} {_REASONS.get(code, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _text(code: int, message: str, extra: str = "") -> bytes:
    return _response(code, message.encode() + b"\n", "text/plain; charset=utf-8", extra)


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head up to the blank line; None if the client sent nothing usable."""
    buf = bytearray()
    while True:
        for sep in (b"\r\n\r\n", b"\n\n"):
            end = buf.find(sep)
            if end >= 0:
                if end > MAX_HEAD_BYTES:
                    raise _BadRequest(431, "request head too large")
                return bytes(buf[:end])
        if len(buf) > MAX_HEAD_BYTES:
            raise _BadRequest(431, "request head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            # EOF before the blank line: serve a complete request line, drop anything less.
            return bytes(buf) if b"\n" in buf else None
        buf += chunk


def _parse_request_line(head: bytes) -> tuple[str, str]:
    line = head.split(b"\n", 1)[0].strip().decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest(400, "malformed request line")
    method, target = parts[0], parts[1]
    return method, target.split("?", 1)[0]


class _Handler:
    def __init__(self, status_fn: StatusFn, metrics: Metrics) -> None:
        self._status_fn = status_fn
        self._metrics = metrics
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    def _answer(self, method: str, path: str) -> bytes:
        if method != "GET":
            return _text(405, f"method {method} not allowed", "Allow: GET\r\n")
        if path == "/status":
            try:
                body = json.dumps(self._status_fn(), indent=1).encode() + b"\n"
            except Exception:
                log.exception("control: status() failed")
                return _text(500, "status() failed; see the daemon's log")
            return _response(200, body, "application/json")
        if path == "/metrics":
            try:
                body = self._metrics.render()
            except Exception:
                log.exception("control: rendering metrics failed")
                return _text(500, "metrics failed; see the daemon's log")
            return _response(200, body, self._metrics.content_type)
        return _text(404, f"no such resource {path!r}; try /status or /metrics")

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            log.warning("control: more than %d connections at once; closing one", MAX_CONNECTIONS)
            await stream.aclose()
            return
        try:
            async with stream:
                await self._serve_one(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("control: client went away: %s", exc)
        except Exception:
            log.exception("control: connection handler failed")
        finally:
            self._slots.release()

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(CONNECTION_TIMEOUT) as scope:
            try:
                head = await _read_head(stream)
                if head is None:
                    log.debug("control: client closed before sending a request")
                    return
                method, path = _parse_request_line(head)
            except _BadRequest as exc:
                log.debug("control: bad request: %s", exc)
                await stream.send_all(_text(exc.code, str(exc)))
                return
            log.debug("control: %s %s", method, path)
            await stream.send_all(self._answer(method, path))
        if scope.cancelled_caught:
            log.debug("control: connection timed out after %.0f s", CONNECTION_TIMEOUT)


async def serve_control(
    status_fn: StatusFn,
    metrics: Metrics,
    *,
    socket_path: Path,
    listen: str | None = None,
    task_status: trio.TaskStatus[ControlAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/status`` and ``/metrics`` until cancelled, then remove the socket file(s).

    ``task_status.started()`` gets a :class:`ControlAddresses` once every listener is bound.
    Bad addresses and unusable socket paths raise :class:`~als.errors.ConfigError` before
    that.
    """
    extra = parse_listen(listen) if listen else None
    listeners: list[trio.SocketListener] = []
    owned: list[tuple[Path, int]] = []
    try:
        listener, inode = await _open_unix_listener(socket_path)
        listeners.append(listener)
        owned.append((socket_path, inode))
        tcp: list[tuple[str, int]] = []
        if isinstance(extra, Path):
            listener, inode = await _open_unix_listener(extra)
            listeners.append(listener)
            owned.append((extra, inode))
        elif extra is not None:
            try:
                opened = await trio.open_tcp_listeners(extra.port, host=extra.host)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
            listeners.extend(opened)
            for tcp_listener in opened:
                host, port = tcp_listener.socket.getsockname()[:2]
                tcp.append((host, port))
        addresses = ControlAddresses(
            socket_path=socket_path, unix=tuple(p for p, _ in owned), tcp=tuple(tcp)
        )
        handler = _Handler(status_fn, metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            log.info(
                "control: serving /status and /metrics on %s",
                ", ".join([str(p) for p in addresses.unix] + [f"{h}:{p}" for h, p in tcp]),
            )
            task_status.started(addresses)
    finally:
        for lst in listeners:
            lst.socket.close()
        for path, inode in owned:
            _unlink_if_ours(path, inode)


__all__ = [
    "CONNECTION_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_HEAD_BYTES",
    "ControlAddresses",
    "TcpAddress",
    "parse_listen",
    "serve_control",
]
