"""The registry's public data: what a resolved image is made of, and the client's counters.

Plain data with no network code, so the store and the CLI can import these types without
importing the HTTP client.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from als.registry.reference import ImageRef


@dataclass(frozen=True)
class LayerDescriptor:
    digest: str
    size: int
    media_type: str
    annotations: Mapping[str, str]
    diff_id: str | None


@dataclass(frozen=True)
class ResolvedImage:
    ref: ImageRef
    manifest_digest: str
    manifest: bytes
    config: bytes
    platform: str
    layers: tuple[LayerDescriptor, ...]
    config_digest: str = ""
    source: str = ""  # the endpoint ("host/repo") the manifest came from
    index_digest: str | None = None  # set when the reference named an index / manifest list


class ClientStats:
    """Thread-safe counters: HTTP requests sent, body bytes received, retries, per-host counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_received = 0
        self.retries = 0
        self.multirange_requests = 0
        self.fallbacks = 0  # endpoint/repository fallbacks taken
        self.per_host: dict[str, int] = {}

    def add(
        self,
        *,
        requests: int = 0,
        bytes_received: int = 0,
        retries: int = 0,
        multirange: int = 0,
        fallbacks: int = 0,
        host: str | None = None,
    ) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_received += bytes_received
            self.retries += retries
            self.multirange_requests += multirange
            self.fallbacks += fallbacks
            if host is not None and requests:
                self.per_host[host] = self.per_host.get(host, 0) + requests

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "bytes_received": self.bytes_received,
                "retries": self.retries,
                "multirange_requests": self.multirange_requests,
                "fallbacks": self.fallbacks,
                "per_host": dict(self.per_host),
            }
