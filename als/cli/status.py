"""``als status [ROOT] [--json] [--watch [SECONDS]]``: what the running store is doing.

Asks the daemon's control socket (``ROOT/.als.sock``) for ``GET /status`` over plain blocking
HTTP/1.0 and prints the cache totals and one row per layer. Standard library only, so the
command starts fast and works without the store's dependencies.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from time import sleep
from typing import TYPE_CHECKING, Any, TextIO

from als.paths import DEFAULT_ROOT, SOCKET_NAME

if TYPE_CHECKING:  # standard library only at run time
    from als.store.status import LayerStatus, StoreStatus

TIMEOUT = 5.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
BAR_CELLS = 20
#: Background states in which a layer is still filling up, so a progress bar says something
#: (als.store.background.IN_PROGRESS, as the strings the JSON carries).
_IN_PROGRESS = frozenset({"running", "paused", "waiting"})
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


class StatusError(Exception):
    """The store could not be asked; the message is complete, ready for stderr."""


def human_bytes(n: float | None) -> str:
    """``512 B``, ``1.5 KiB``, ``10.0 GiB``: binary units, one decimal from KiB on."""
    if n is None:
        return "-"
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in _UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def human_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def progress_bar(percent: float, cells: int = BAR_CELLS) -> str:
    """``[#####...............]``: filled cells in proportion to ``percent`` (rounded down)."""
    filled = int(cells * min(max(percent, 0.0), 100.0) / 100.0)
    return "[" + "#" * filled + "." * (cells - filled) + "]"


def short_digest(digest: str) -> str:
    """``sha256:`` plus the first 12 hex digits."""
    algo, sep, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if sep else digest[:19]


def _percent(layer: LayerStatus | Mapping[str, Any]) -> float:
    pct = layer.get("cached_percent")
    if isinstance(pct, int | float):
        return float(pct)
    size, cached = layer.get("size") or 0, layer.get("cached_bytes") or 0
    return 100.0 * cached / size if size else 0.0


def _size(value: Any) -> str:
    return human_bytes(value) if isinstance(value, int | float) else "-"


def render_status(status: StoreStatus | Mapping[str, Any]) -> str:
    """The human-readable report: header lines, then a table of layers. The document is read
    defensively (it comes from another process): a missing field shows as ``?`` or 0."""
    cache: Mapping[str, Any] = status.get("cache") or {}
    lines = [
        f"store {status.get('root', '?')}: als {status.get('version', '?')}, "
        f"pid {status.get('pid', '?')}, up {human_duration(status.get('uptime_s') or 0)}, "
        f"fetched {_size(status.get('fetched_bytes', 0))}"
    ]
    limit = cache.get("limit_bytes")
    disk = f"cache {_size(cache.get('bytes', 0))}" + (
        f" of {_size(limit)}" if limit else " (no limit)"
    )
    mem_limit = cache.get("memory_limit_bytes")
    memory = f"memory {_size(cache.get('memory_bytes', 0))}" + (
        f" of {_size(mem_limit)}" if mem_limit else ""
    )
    lines.append(f"{disk}, {memory}, hits {cache.get('hits', 0)}, misses {cache.get('misses', 0)}")
    if cache.get("degraded") is not None:
        lines.append(f"DEGRADED: {cache['degraded']}")
    lines.append("")

    layers = [la for la in status.get("layers") or [] if isinstance(la, Mapping)]
    if not layers:
        lines.append("no layers in use")
        return "\n".join(lines) + "\n"

    header = [
        "LAYER", "FORMAT", "SIZE", "CACHED", "%", "PROGRESS", "BACKGROUND", "NATIVE", "USES", "REFS"
    ]  # fmt: skip
    right = {2, 3, 4, 8}  # numeric columns
    rows: list[tuple[list[str], str | None]] = []
    for layer in layers:
        pct = _percent(layer)
        background = str(layer.get("background") or "off")
        bar = progress_bar(pct) if background in _IN_PROGRESS else ""
        refs = layer.get("refs") or []
        row = [
            short_digest(str(layer.get("digest", "?"))),
            str(layer.get("format") or "?"),
            _size(layer.get("size")),
            _size(layer.get("cached_bytes")),
            f"{pct:.1f}",
            bar,
            background,
            "yes" if layer.get("native") else "no",
            str(layer.get("uses", 0)),
            ", ".join(str(r) for r in refs) if isinstance(refs, list) else str(refs),
        ]
        error = layer.get("last_error")
        rows.append((row, None if error is None else str(error)))

    widths = [len(h) for h in header]
    for row, _ in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    # The progress column is sized for a full bar even when no row shows one, so a
    # watched table does not jump sideways when a fetch starts.
    widths[5] = max(widths[5], BAR_CELLS + 2)

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i == len(cells) - 1:
                out.append(cell)
            elif i in right:
                out.append(cell.rjust(widths[i]))
            else:
                out.append(cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines.append(fmt(header))
    for row, error in rows:
        lines.append(fmt(row))
        if error is not None:
            lines.append(f"    last error: {error}")
    return "\n".join(lines) + "\n"


def fetch_status(root: Path, timeout: float = TIMEOUT) -> dict[str, Any]:
    """``GET /status`` from the store at ``root``; :class:`StatusError` if that fails."""
    sock_path = root / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(sock_path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise StatusError(
                f"als status: no running store at {root} ({sock_path}: {exc.strerror})"
            ) from exc
        except PermissionError as exc:
            raise StatusError(
                f"als status: cannot connect to {sock_path}: {exc.strerror} "
                "(it is mode 0660: run as root or as a member of its group)"
            ) from exc
        sock.sendall(b"GET /status HTTP/1.0\r\nHost: als\r\n\r\n")
        chunks: list[bytes] = []
        total = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_RESPONSE_BYTES:
                raise StatusError(f"als status: the answer from {sock_path} is too large")
    except TimeoutError as exc:
        raise StatusError(
            f"als status: the store at {root} did not answer within {timeout:g} s"
        ) from exc
    except OSError as exc:
        raise StatusError(f"als status: cannot talk to the store at {root} ({exc})") from exc
    finally:
        sock.close()
    return _parse_response(b"".join(chunks), sock_path)


def _parse_response(raw: bytes, sock_path: Path) -> dict[str, Any]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise StatusError(f"als status: {sock_path} did not answer HTTP ({status_line[:80]!r})")
    if parts[1] != "200":
        detail = body.decode("utf-8", "replace").strip()[:200]
        raise StatusError(f"als status: the store answered {status_line[9:]}: {detail}")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise StatusError(f"als status: the store's answer is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StatusError("als status: the store's answer is not a JSON object")
    return data


def _format(status: StoreStatus | Mapping[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(status, indent=2, sort_keys=False) + "\n"
    return render_status(status)


def status_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point of ``als status``; returns the exit code."""
    stream = out or sys.stdout
    root = Path(getattr(args, "root", None) or DEFAULT_ROOT)
    as_json = bool(getattr(args, "json", False))
    interval: float | None = getattr(args, "watch", None)
    if interval is not None and not interval > 0:
        print("als status: --watch SECONDS must be more than 0", file=sys.stderr)
        return 2
    try:
        status = fetch_status(root)
    except StatusError as exc:
        print(exc, file=sys.stderr)
        return 1
    if interval is None:
        stream.write(_format(status, as_json))
        return 0

    tty = stream.isatty()
    text = _format(status, as_json)
    try:
        while True:
            if tty:
                stream.write("\x1b[H\x1b[2J")  # cursor home, clear screen
            stream.write(text)
            if not tty:
                stream.write("\n")  # frames one after another, a blank line apart
            stream.flush()
            sleep(interval)
            try:
                text = _format(fetch_status(root), as_json)
            except StatusError as exc:
                # The daemon may be restarting: say so and keep watching.
                text = f"{exc}\n(retrying every {interval:g} s)\n"
    except KeyboardInterrupt:
        return 0
