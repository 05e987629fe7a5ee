"""als.store.control: the HTTP/1.0 control server on a unix socket (and optionally TCP)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from als.errors import ConfigError
from als.store import control
from als.store.control import ControlAddresses, TcpAddress, parse_listen, serve_control
from als.store.metrics import Metrics
from tests.unit.test_metrics import fake_status

StatusFn = Callable[[], Mapping[str, Any]]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="als-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def start(
    nursery: trio.Nursery,
    sock: Path,
    status_fn: StatusFn = fake_status,
    listen: str | None = None,
    metrics: Metrics | None = None,
) -> ControlAddresses:
    async def run(task_status: trio.TaskStatus[ControlAddresses]) -> None:
        await serve_control(
            status_fn,
            metrics or Metrics(status_fn),
            socket_path=sock,
            listen=listen,
            task_status=task_status,
        )

    addresses: ControlAddresses = await nursery.start(run)
    return addresses


@pytest.fixture
async def server(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[ControlAddresses]:
    yield await start(nursery, short_dir / "als.sock")


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    lines = head.decode("latin-1").split("\r\n")
    version, code, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.0"
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(code), headers, body


async def request(sock: Path, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        await stream.send_all(raw)
        with trio.fail_after(5):
            return parse(await read_all(stream))


async def get(sock: Path, path: str) -> tuple[int, dict[str, str], bytes]:
    return await request(sock, f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())


async def test_status_json_round_trips(server: ControlAddresses) -> None:
    code, headers, body = await get(server.socket_path, "/status")
    assert code == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == fake_status()


async def test_metrics_endpoint(server: ControlAddresses) -> None:
    code, headers, body = await get(server.socket_path, "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    layer = fake_status()["layers"][0]
    line = f'als_layer_cached_bytes{{digest="{layer["digest"]}"}} {float(layer["cached_bytes"])}'
    assert line in body.decode().splitlines()
    assert b"als_registry_fetch_seconds_bucket" in body


async def test_metrics_reflect_observations(nursery: trio.Nursery, short_dir: Path) -> None:
    metrics = Metrics(fake_status)
    addrs = await start(nursery, short_dir / "s", metrics=metrics)
    metrics.observe_fetch("prefetch", 0.5, 12345)
    _, _, body = await get(addrs.socket_path, "/metrics")
    assert 'als_registry_fetched_bytes_total{kind="prefetch"} 12345.0' in body.decode()


async def test_query_string_is_ignored(server: ControlAddresses) -> None:
    code, _, body = await get(server.socket_path, "/status?pretty=1")
    assert code == 200
    assert json.loads(body)["pid"] == fake_status()["pid"]


async def test_unknown_path_is_404(server: ControlAddresses) -> None:
    code, _, body = await get(server.socket_path, "/nope")
    assert code == 404
    assert b"/nope" in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_other_methods_are_405(server: ControlAddresses, method: str) -> None:
    code, headers, _ = await request(
        server.socket_path, f"{method} /status HTTP/1.0\r\n\r\n".encode()
    )
    assert code == 405
    assert headers["allow"] == "GET"


async def test_malformed_request_line_is_400(server: ControlAddresses) -> None:
    code, _, _ = await request(server.socket_path, b"hello there\r\n\r\n")
    assert code == 400
    code, _, _ = await get(server.socket_path, "/status")
    assert code == 200


async def test_request_line_then_eof_is_served(server: ControlAddresses) -> None:
    stream = await trio.open_unix_socket(str(server.socket_path))
    async with stream:
        await stream.send_all(b"GET /status HTTP/1.0\n")
        await stream.send_eof()
        code, _, body = parse(await read_all(stream))
    assert code == 200
    assert json.loads(body) == fake_status()


async def test_oversized_head_is_431(server: ControlAddresses) -> None:
    head = b"GET /status HTTP/1.0\r\nX-Junk: "
    head += b"a" * (control.MAX_HEAD_BYTES + 100 - len(head))
    stream = await trio.open_unix_socket(str(server.socket_path))
    async with stream:
        await stream.send_all(head)  # no blank line, ever
        with trio.fail_after(5):
            code, _, body = parse(await read_all(stream))
    assert code == 431
    assert b"too large" in body
    code, _, body = await get(server.socket_path, "/status")
    assert code == 200
    assert json.loads(body) == fake_status()


async def test_flood_is_dropped_and_server_keeps_going(server: ControlAddresses) -> None:
    stream = await trio.open_unix_socket(str(server.socket_path))
    async with stream:
        junk = b"GET /status HTTP/1.0\r\n" + b"X-Junk: " + b"a" * (control.MAX_HEAD_BYTES * 64)
        with trio.fail_after(5):
            try:
                await stream.send_all(junk)
                raw = await read_all(stream)
            except trio.BrokenResourceError:
                raw = b""  # the server closes on us while we are still sending: expected
    if raw:
        assert parse(raw)[0] == 431
    code, _, body = await get(server.socket_path, "/status")
    assert code == 200
    assert json.loads(body) == fake_status()


async def test_unfinished_request_times_out_without_blocking_others(
    nursery: trio.Nursery, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "CONNECTION_TIMEOUT", 0.3)
    addrs = await start(nursery, short_dir / "s")
    slow = await trio.open_unix_socket(str(addrs.socket_path))
    async with slow:
        await slow.send_all(b"GET /sta")
        # Others are served while the slow client dawdles.
        code, _, _ = await get(addrs.socket_path, "/status")
        assert code == 200
        with trio.fail_after(3):
            start_t = trio.current_time()
            assert await read_all(slow) == b""  # dropped, with no answer
            assert trio.current_time() - start_t < 3
    code, _, _ = await get(addrs.socket_path, "/metrics")
    assert code == 200


async def test_client_that_hangs_up_at_once(server: ControlAddresses) -> None:
    for _ in range(3):
        s = await trio.open_unix_socket(str(server.socket_path))
        await s.aclose()
    code, _, _ = await get(server.socket_path, "/status")
    assert code == 200


async def test_connection_limit(
    nursery: trio.Nursery, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 2)
    addrs = await start(nursery, short_dir / "s")
    idle = [await trio.open_unix_socket(str(addrs.socket_path)) for _ in range(2)]
    await trio.sleep(0.2)  # let the server accept both
    extra = await trio.open_unix_socket(str(addrs.socket_path))
    async with extra:
        await extra.send_all(b"GET /status HTTP/1.0\r\n\r\n")
        with trio.fail_after(3):
            with contextlib.suppress(trio.BrokenResourceError):
                assert await read_all(extra) == b""  # closed without an answer
    for s in idle:
        await s.aclose()
    await trio.sleep(0.1)
    code, _, _ = await get(addrs.socket_path, "/status")
    assert code == 200


async def test_failing_status_fn_is_500_and_server_survives(
    nursery: trio.Nursery, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fail = [True]

    def status_fn() -> Mapping[str, Any]:
        if fail[0]:
            raise RuntimeError("boom")
        return fake_status()

    addrs = await start(nursery, short_dir / "s", status_fn=status_fn)
    with caplog.at_level(logging.ERROR, logger="als.control"):
        code, _, _ = await get(addrs.socket_path, "/status")
    assert code == 500
    assert any("status() failed" in r.getMessage() and r.exc_info for r in caplog.records)
    fail[0] = False
    code, _, body = await get(addrs.socket_path, "/status")
    assert code == 200
    assert json.loads(body) == fake_status()


async def test_unserialisable_status_is_500(nursery: trio.Nursery, short_dir: Path) -> None:
    addrs = await start(nursery, short_dir / "s", status_fn=lambda: {"x": object()})
    code, _, _ = await get(addrs.socket_path, "/status")
    assert code == 500


async def test_socket_mode_is_0660(server: ControlAddresses) -> None:
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


async def test_socket_is_removed_on_exit(short_dir: Path) -> None:
    sock = short_dir / "s"
    async with trio.open_nursery() as nursery:
        addrs = await start(nursery, sock)
        assert addrs.unix == (sock,)
        assert sock.exists()
        nursery.cancel_scope.cancel()
    assert not sock.exists()


def _dead_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays: a stale socket, nobody listening


async def test_stale_socket_is_replaced(nursery: trio.Nursery, short_dir: Path) -> None:
    sock = short_dir / "s"
    _dead_socket(sock)
    addrs = await start(nursery, sock)
    code, _, _ = await get(addrs.socket_path, "/status")
    assert code == 200


async def test_regular_file_is_not_replaced(nursery: trio.Nursery, short_dir: Path) -> None:
    sock = short_dir / "s"
    sock.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await start(nursery, sock)
    assert sock.read_bytes() == b"precious"


async def test_live_socket_is_not_stolen(nursery: trio.Nursery, short_dir: Path) -> None:
    sock = short_dir / "s"
    await start(nursery, sock)
    with pytest.raises(ConfigError, match="another server"):
        await start(nursery, sock)
    code, _, _ = await get(sock, "/status")
    assert code == 200


async def test_socket_path_too_long(nursery: trio.Nursery, short_dir: Path) -> None:
    with pytest.raises(ConfigError, match="too long"):
        await start(nursery, short_dir / ("x" * 120))


async def test_tcp_listener_on_port_zero(nursery: trio.Nursery, short_dir: Path) -> None:
    addrs = await start(nursery, short_dir / "s", listen="127.0.0.1:0")
    assert len(addrs.tcp) == 1
    host, port = addrs.tcp[0]
    assert host == "127.0.0.1"
    assert port > 0
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"GET /status HTTP/1.0\r\n\r\n")
        code, _, body = parse(await read_all(stream))
    assert code == 200
    assert json.loads(body) == fake_status()
    # The unix socket is served as well.
    assert (await get(addrs.socket_path, "/metrics"))[0] == 200


async def test_second_unix_listener(short_dir: Path) -> None:
    main_sock, extra = short_dir / "a", short_dir / "b"
    async with trio.open_nursery() as nursery:
        addrs = await start(nursery, main_sock, listen=f"unix:{extra}")
        assert addrs.unix == (main_sock, extra)
        assert stat.S_IMODE(os.stat(extra).st_mode) == 0o660
        code, _, body = await get(extra, "/status")
        assert code == 200
        assert json.loads(body) == fake_status()
        nursery.cancel_scope.cancel()
    assert not main_sock.exists()
    assert not extra.exists()


async def test_bad_listen_address_fails_before_start(
    nursery: trio.Nursery, short_dir: Path
) -> None:
    with pytest.raises(ConfigError, match="bad port"):
        await start(nursery, short_dir / "s", listen="127.0.0.1:http")
    assert not (short_dir / "s").exists()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:9100", TcpAddress("127.0.0.1", 9100)),
        ("localhost:0", TcpAddress("localhost", 0)),
        (":9100", TcpAddress(None, 9100)),
        ("[::1]:9100", TcpAddress("::1", 9100)),
        ("unix:/run/als/metrics.sock", Path("/run/als/metrics.sock")),
    ],
)
def test_parse_listen(spec: str, expected: object) -> None:
    assert parse_listen(spec) == expected


@pytest.mark.parametrize("spec", ["9100", "::1:9100", "[::1]9100", "host:", "h:70000", "unix:"])
def test_parse_listen_rejects(spec: str) -> None:
    with pytest.raises(ConfigError, match="control listen address"):
        parse_listen(spec)
