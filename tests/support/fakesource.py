"""An in-process registry stand-in for store tests and fault injection.

It serves images built with the project's writer from memory, counts what is fetched and can be
told to fail or lie. The real registry (tests/support/registry.py) is the proof that als works;
this fake makes faults deterministic.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from als.errors import NotFound, RegistryError
from als.registry.types import LayerDescriptor


@dataclass(frozen=True)
class FakeImage:
    layers: tuple[LayerDescriptor, ...]


@dataclass
class FakeSource:
    images: dict[str, FakeImage] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: int = 0
    bytes_sent: int = 0
    resolves: int = 0
    fail_fetches: int = 0  # the next N fetches raise RegistryError
    fail_all: bool = False
    corrupt: bool = False  # flip a bit in every range served
    corrupt_next: int = 0  # flip a bit in the next N fetches (every range of each)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_image(self, ref: str, layers: Sequence[Any], *, diff_ids: bool = True) -> FakeImage:
        """``layers``: objects with blob, digest, media_type, annotations, diff_id (BuiltLayer)."""
        descs = []
        for layer in layers:
            self.blobs[layer.digest] = layer.blob
            descs.append(
                LayerDescriptor(
                    digest=layer.digest,
                    size=len(layer.blob),
                    media_type=layer.media_type,
                    annotations=dict(layer.annotations),
                    diff_id=layer.diff_id if diff_ids else None,
                )
            )
        image = FakeImage(layers=tuple(descs))
        self.images[ref] = image
        return image

    def resolve(
        self, ref: Any, *, platform: str | None = None, deadline: float | None = None
    ) -> FakeImage:
        with self._lock:
            self.resolves += 1
            if self.fail_all:
                raise RegistryError("registry unavailable (injected)")
        image = self.images.get(str(ref))
        if image is None:
            raise NotFound(f"manifest unknown: {ref}")
        return image

    def fetch_ranges(
        self,
        ref: Any,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        deadline: float | None = None,
    ) -> list[bytes]:
        with self._lock:
            self.requests += 1
            if self.fail_all:
                raise RegistryError("registry unavailable (injected)")
            if self.fail_fetches > 0:
                self.fail_fetches -= 1
                raise RegistryError("connection reset (injected)")
        blob = self.blobs.get(digest)
        if blob is None:
            raise NotFound(f"blob unknown: {digest}")
        with self._lock:
            corrupt = self.corrupt or self.corrupt_next > 0
            self.corrupt_next = max(self.corrupt_next - 1, 0)
        out = []
        for off, length in ranges:
            if off < 0 or length < 0 or off + length > len(blob):
                raise RegistryError(f"range {off}+{length} outside blob of {len(blob)} bytes")
            data = blob[off : off + length]
            if corrupt and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            out.append(data)
        with self._lock:
            self.bytes_sent += sum(len(d) for d in out)
        return out


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
