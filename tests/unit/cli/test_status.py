"""``als status``: the blocking client against a real control server, and the table."""

from __future__ import annotations

import argparse
import io
import json
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from als.cli import build_parser, main
from als.cli import status as status_mod
from als.cli.status import (
    BAR_CELLS,
    StatusError,
    fetch_status,
    human_bytes,
    progress_bar,
    render_status,
    short_digest,
    status_main,
)
from als.paths import SOCKET_NAME
from tests.unit.test_control import short_dir, start
from tests.unit.test_metrics import fake_status

__all__ = ["short_dir"]  # a fixture, used by name

GiB = 1 << 30


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def args(root: Path | None, *, json_out: bool = False, watch: float | None = None) -> Any:
    return argparse.Namespace(root=None if root is None else str(root), json=json_out, watch=watch)


# -- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (40 << 20, "40.0 MiB"),
        (int(1.2 * GiB), "1.2 GiB"),
        (10 * GiB, "10.0 GiB"),
        (3 << 40, "3.0 TiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize("percent", [0.0, 4.9, 5.0, 25.0, 33.3, 50.0, 99.9, 100.0])
def test_progress_bar_is_proportional(percent: float) -> None:
    bar = progress_bar(percent)
    assert bar.startswith("[")
    assert bar.endswith("]")
    assert len(bar) == BAR_CELLS + 2
    assert set(bar[1:-1]) <= {"#", "."}
    filled = bar.count("#")
    # filled/cells <= percent/100 < (filled+1)/cells
    assert filled / BAR_CELLS <= percent / 100 < (filled + 1) / BAR_CELLS or filled == BAR_CELLS
    assert bar[1:-1] == "#" * filled + "." * (BAR_CELLS - filled)


def test_progress_bar_clamps() -> None:
    assert progress_bar(-5) == "[" + "." * BAR_CELLS + "]"
    assert progress_bar(250) == "[" + "#" * BAR_CELLS + "]"


def test_short_digest() -> None:
    d = fake_status()["layers"][0]["digest"]
    assert short_digest(d) == d[: len("sha256:") + 12]
    assert short_digest("nocolon") == "nocolon"


# -- the table ------------------------------------------------------------------------------


def _row_for(text: str, layer: Mapping[str, Any]) -> tuple[int, str]:
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(short_digest(layer["digest"]))]
    assert len(hits) == 1, (layer["digest"], text)
    return hits[0], lines[hits[0]]


def test_render_header_lines() -> None:
    status = fake_status()
    text = render_status(status)
    cache = status["cache"]
    first, second = text.splitlines()[:2]
    assert f"pid {status['pid']}" in first
    assert status["root"] in first
    assert f"fetched {human_bytes(status['fetched_bytes'])}" in first
    assert "up 1h02m" in first  # 3725.5 s
    assert second.startswith(
        f"cache {human_bytes(cache['bytes'])} of {human_bytes(cache['limit_bytes'])}, "
        f"memory {human_bytes(cache['memory_bytes'])} of {human_bytes(cache['memory_limit_bytes'])}"
    )
    assert f"hits {cache['hits']}, misses {cache['misses']}" in second
    assert "DEGRADED" not in text


def test_render_degraded() -> None:
    status = fake_status()
    status["cache"]["degraded"] = "disk full: cache writes stopped"
    lines = render_status(status).splitlines()
    assert "DEGRADED: disk full: cache writes stopped" in lines[:4]


def test_render_one_row_per_layer() -> None:
    status = fake_status()
    text = render_status(status)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("LAYER"))
    for name in ("FORMAT", "SIZE", "CACHED", "PROGRESS", "BACKGROUND", "NATIVE", "USES", "REFS"):
        assert name in header
    for layer in status["layers"]:
        _, row = _row_for(text, layer)
        assert layer["format"] in row
        assert human_bytes(layer["size"]) in row
        assert human_bytes(layer["cached_bytes"]) in row
        assert f"{layer['cached_percent']:.1f}" in row
        assert layer["background"] in row
        last = ", ".join(layer["refs"]) if layer["refs"] else str(layer["uses"])
        assert row.endswith(last)
        # Columns line up under their headings (USES is right-aligned).
        assert row.index(layer["background"]) == header.index("BACKGROUND")
        native = "yes" if layer.get("native") else "no"
        assert row[header.index("NATIVE") :].startswith(native)
        uses_end = header.index("USES") + len("USES")
        assert row[:uses_end].endswith(f" {layer['uses']}")
        has_bar = re.search(rf"\[[#.]{{{BAR_CELLS}}}\]", row)
        if layer["background"] in ("running", "paused", "waiting"):
            assert has_bar
            assert has_bar.group(0) == progress_bar(layer["cached_percent"])
        else:
            assert has_bar is None


@pytest.mark.parametrize("state", ["running", "paused", "waiting"])
@pytest.mark.parametrize("percent", [0.0, 10.0, 55.0, 95.0])
def test_bar_cells_follow_percent(state: str, percent: float) -> None:
    status = fake_status()
    layer = status["layers"][0]
    layer["background"] = state
    layer["cached_percent"] = percent
    layer["cached_bytes"] = int(layer["size"] * percent / 100)
    _, row = _row_for(render_status(status), layer)
    bar = re.search(r"\[([#.]+)\]", row)
    assert bar is not None
    assert bar.group(1).count("#") == int(BAR_CELLS * percent / 100)


def test_last_error_on_its_own_line() -> None:
    status = fake_status()
    text = render_status(status)
    lines = text.splitlines()
    for layer in status["layers"]:
        i, _ = _row_for(text, layer)
        if layer["last_error"]:
            assert lines[i + 1] == f"    last error: {layer['last_error']}"
        else:
            assert i + 1 == len(lines) or not lines[i + 1].startswith(" ")


def test_render_no_layers() -> None:
    status = fake_status()
    status["layers"] = []
    assert render_status(status).rstrip().endswith("no layers in use")


def test_render_tolerates_missing_fields() -> None:
    text = render_status({"layers": [{"digest": "sha256:" + "ab" * 32}]})
    assert "sha256:abababababab" in text
    assert "(no limit)" in text


# -- against a real control server ----------------------------------------------------------


async def test_fetch_status_round_trips(nursery: trio.Nursery, short_dir: Path) -> None:
    await start(nursery, short_dir / SOCKET_NAME)
    got = await trio.to_thread.run_sync(fetch_status, short_dir)
    assert got == fake_status()


async def test_status_main_prints_the_table(nursery: trio.Nursery, short_dir: Path) -> None:
    await start(nursery, short_dir / SOCKET_NAME)
    out = io.StringIO()
    rc = await trio.to_thread.run_sync(status_main, args(short_dir), out)
    assert rc == 0
    assert out.getvalue() == render_status(fake_status())


async def test_status_main_json(nursery: trio.Nursery, short_dir: Path) -> None:
    await start(nursery, short_dir / SOCKET_NAME)
    out = io.StringIO()
    rc = await trio.to_thread.run_sync(status_main, args(short_dir, json_out=True), out)
    assert rc == 0
    assert json.loads(out.getvalue()) == fake_status()
    assert out.getvalue().startswith("{\n  ")  # pretty-printed


async def test_server_error_is_reported(
    nursery: trio.Nursery, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("boom")

    await start(nursery, short_dir / SOCKET_NAME, status_fn=broken)
    with pytest.raises(StatusError, match="answered 500"):
        await trio.to_thread.run_sync(fetch_status, short_dir)
    rc = await trio.to_thread.run_sync(status_main, args(short_dir), io.StringIO())
    assert rc == 1
    assert "answered 500" in capsys.readouterr().err


def _watch(monkeypatch: pytest.MonkeyPatch, frames: int, sleeps: list[float]) -> None:
    """Make time.sleep in the command count, and press Ctrl-C after ``frames`` frames."""

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= frames:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_mod, "sleep", fake_sleep)


async def test_watch_redraws_until_ctrl_c(
    nursery: trio.Nursery, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def status_fn() -> Mapping[str, Any]:
        calls.append(1)
        status = fake_status()
        status["cache"]["hits"] = len(calls)
        return status

    await start(nursery, short_dir / SOCKET_NAME, status_fn=status_fn)
    sleeps: list[float] = []
    _watch(monkeypatch, 3, sleeps)
    out = io.StringIO()
    rc = await trio.to_thread.run_sync(status_main, args(short_dir, watch=0.5), out)
    assert rc == 0
    assert sleeps == [0.5, 0.5, 0.5]
    text = out.getvalue()
    assert "\x1b[" not in text  # not a tty: no escape codes, frames one after another
    assert [int(h) for h in re.findall(r"hits (\d+),", text)] == [1, 2, 3]


async def test_watch_clears_the_screen_on_a_tty(
    nursery: trio.Nursery, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start(nursery, short_dir / SOCKET_NAME)
    sleeps: list[float] = []
    _watch(monkeypatch, 2, sleeps)
    out = TtyIO()
    rc = await trio.to_thread.run_sync(status_main, args(short_dir, watch=1.0), out)
    assert rc == 0
    frames = out.getvalue().split("\x1b[H\x1b[2J")
    assert frames[0] == ""
    assert frames[1:] == [render_status(fake_status())] * 2


async def test_watch_keeps_going_when_the_store_goes_away(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    _watch(monkeypatch, 2, sleeps)
    out = io.StringIO()
    async with trio.open_nursery() as nursery:
        await start(nursery, short_dir / SOCKET_NAME)
        real_fetch = status_mod.fetch_status
        fetches = []

        def fetch_then_vanish(root: Path, timeout: float = 5.0) -> dict[str, Any]:
            fetches.append(1)
            if len(fetches) > 1:
                (root / SOCKET_NAME).unlink()
            return real_fetch(root, timeout)

        monkeypatch.setattr(status_mod, "fetch_status", fetch_then_vanish)
        rc = await trio.to_thread.run_sync(status_main, args(short_dir, watch=1.0), out)
        nursery.cancel_scope.cancel()
    assert rc == 0
    assert "no running store" in out.getvalue()
    assert "retrying every 1 s" in out.getvalue()


def test_watch_must_be_positive(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    assert status_main(args(short_dir, watch=0.0), io.StringIO()) == 2
    assert "--watch" in capsys.readouterr().err


# -- no store -------------------------------------------------------------------------------


def test_no_socket(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status_main(args(short_dir), io.StringIO()) == 1
    err = capsys.readouterr().err
    sock = short_dir / SOCKET_NAME
    assert err.startswith(f"als status: no running store at {short_dir} ({sock}: ")
    assert "No such file or directory" in err


def test_stale_socket_is_connection_refused(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(short_dir / SOCKET_NAME))
    s.close()
    assert status_main(args(short_dir), io.StringIO()) == 1
    err = capsys.readouterr().err
    assert f"no running store at {short_dir}" in err
    assert "Connection refused" in err


def test_watch_with_no_store_fails_at_once(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status_main(args(short_dir, watch=1.0), io.StringIO()) == 1
    assert "no running store" in capsys.readouterr().err


def test_not_http(short_dir: Path) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(short_dir / SOCKET_NAME))
    srv.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with srv, client:
        # The answer is queued before the client even asks: no thread needed.
        client.connect(str(short_dir / SOCKET_NAME))
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH\r\n")
            conn.shutdown(socket.SHUT_WR)
            raw = client.recv(4096)
    with pytest.raises(StatusError, match="did not answer HTTP"):
        status_mod._parse_response(raw, short_dir / SOCKET_NAME)


def test_silent_server_times_out(short_dir: Path) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with srv:
        srv.bind(str(short_dir / SOCKET_NAME))
        srv.listen(1)  # accepts into the backlog, never answers
        with pytest.raises(StatusError, match=r"did not answer within 0\.2 s"):
            fetch_status(short_dir, timeout=0.2)


# -- the CLI --------------------------------------------------------------------------------


def test_parser() -> None:
    p = build_parser()
    a = p.parse_args(["status"])
    assert (a.root, a.json, a.watch) == (None, False, None)
    a = p.parse_args(["status", "/srv/als", "--watch"])
    assert (a.root, a.watch) == ("/srv/als", 1.0)
    a = p.parse_args(["status", "--json", "--watch", "2.5", "/srv/als"])
    assert (a.root, a.json, a.watch) == ("/srv/als", True, 2.5)


def test_cli_main_reports_missing_store(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", str(short_dir)]) == 1
    assert "no running store" in capsys.readouterr().err


async def test_cli_main_against_server(
    nursery: trio.Nursery, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await start(nursery, short_dir / SOCKET_NAME)
    rc = await trio.to_thread.run_sync(main, ["status", str(short_dir), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == fake_status()
