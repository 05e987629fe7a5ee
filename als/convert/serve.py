"""A read-only OCI distribution endpoint on loopback, for the ``--optimize`` run.

It serves one converted image (manifests by tag and digest, blobs with single byte ranges) so
that podman and a temporary als store can pull it lazily whatever the source was (a registry,
an OCI layout, podman's storage). Multi-range requests are answered with 400, which als's
client understands as "one range at a time". Bound to 127.0.0.1 on a free port; a thread.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from als.convert.store import Doc

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class LocalRegistry:
    """Serve ``manifests`` (tag or digest -> Doc) and ``blobs`` (digest -> file or bytes)."""

    def __init__(self) -> None:
        self.manifests: dict[str, Doc] = {}
        self.blobs: dict[str, Path | bytes] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_manifest(self, doc: Doc, tag: str | None = None) -> None:
        self.manifests[doc.digest] = doc
        if tag:
            self.manifests[tag] = doc

    def start(self) -> str:
        """Start serving; return ``127.0.0.1:PORT``."""
        handler = _handler(self.manifests, self.blobs)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="als-optimize-registry", daemon=True
        )
        self._thread.start()
        return f"127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _handler(
    manifests: dict[str, Doc], blobs: dict[str, Path | bytes]
) -> Callable[..., BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            path = self.path.split("?")[0]
            if path in ("/v2", "/v2/"):
                return self._send(200, b"{}", {"Content-Type": "application/json"}, head)
            m = re.match(r"^/v2/(.+)/(manifests|blobs)/([^/]+)$", path)
            if m is None:
                return self._send(404, b"", {}, head)
            kind, ref = m.group(2), m.group(3)
            if kind == "manifests":
                doc = manifests.get(ref)
                if doc is None:
                    return self._send(404, b"", {}, head)
                headers = {"Content-Type": doc.media_type, "Docker-Content-Digest": doc.digest}
                return self._send(200, doc.body, headers, head)
            src = blobs.get(ref)
            if src is None:
                return self._send(404, b"", {}, head)
            data = src.read_bytes() if isinstance(src, Path) else src
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                       "Docker-Content-Digest": ref}  # fmt: skip
            rng = self.headers.get("Range")
            if rng is None:
                return self._send(200, data, headers, head)
            rm = _RANGE.match(rng.strip())
            if rm is None:
                return self._send(400, b"", {}, head)  # multi-range: ask for one at a time
            start = int(rm.group(1))
            end = min(int(rm.group(2)) + 1 if rm.group(2) else len(data), len(data))
            if start >= len(data) or end <= start:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return self._send(206, data[start:end], headers, head)

        def do_GET(self) -> None:
            self._serve(False)

        def do_HEAD(self) -> None:
            self._serve(True)

    return Handler
