"""Pushing blobs and manifests through an als ``RegistryClient`` (tests and demos).

Thin wrappers over the public upload API (:class:`als.registry.upload.Uploader`), kept with the
signatures the tests use: a push takes the client's own path (registries.conf endpoints, TLS,
the token flow with ``pull,push`` scopes, retries).
"""

from __future__ import annotations

from als.registry import ImageRef, RegistryClient
from als.registry.upload import Uploader


def push_blob(client: RegistryClient, ref: ImageRef | str, data: bytes) -> str:
    """Upload ``data`` as a blob to the repository of ``ref``; return its digest. A blob
    already there is not uploaded again."""
    return Uploader(client, ref).push_blob(data).digest


def push_manifest(
    client: RegistryClient,
    ref: ImageRef | str,
    manifest: bytes,
    media_type: str,
) -> str:
    """Put ``manifest`` under the tag of ``ref`` (or its own digest); return its digest."""
    return Uploader(client, ref).put_manifest(manifest, media_type)
