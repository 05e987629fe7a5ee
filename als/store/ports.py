"""What the store engine exchanges with the outside: a registry to read from, a metrics sink,
and :class:`LayerInfo`, what it tells the FUSE layer about a layer.

:class:`als.registry.RegistryClient` satisfies :class:`Source`; tests use an in-process fake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from als.registry.types import LayerDescriptor


class ResolvedImageLike(Protocol):
    @property
    def layers(self) -> Sequence[LayerDescriptor]: ...


class Source(Protocol):
    """A registry: image manifests by reference, and byte ranges of blobs."""

    def resolve(
        self, ref: str, *, platform: str | None = None, deadline: float | None = None
    ) -> ResolvedImageLike: ...

    def fetch_ranges(
        self,
        ref: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        deadline: float | None = None,
    ) -> list[bytes]: ...


class MetricsSink(Protocol):
    def observe_fetch(self, kind: str, seconds: float, nbytes: int) -> None: ...

    def observe_read(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class LayerInfo:
    """What the store knows about a layer, enough to answer ``info``."""

    blob_digest: str
    blob_size: int
    diff_id: str | None
    toc_digest: str
    media_type: str
    uncompressed_size: int | None
