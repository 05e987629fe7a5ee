"""Pushing to a registry: blob existence checks, uploads, cross-repository mounts, manifests.

Built on the client's request path (``RegistryClient._request``): the same TLS settings,
certificates, address guard, credentials and token flow as a pull, with the scope
``repository:<repo>:pull,push``. Pushes always go to the primary location of a reference
(``registries.conf`` rewrites apply, mirrors are for pulls only). Every call has a deadline:
the client's ``max_retry_time``, stretched for large blobs by ``min_rate`` bytes per second.
Transient failures (resets, timeouts, 429, 5xx) restart the exchange that failed; an upload
that breaks off is started again from its first byte.

A blob is uploaded in one ``PUT`` (monolithic) when it is at most ``chunk_size`` bytes, else
in ``PATCH`` pieces of ``chunk_size`` bytes followed by a closing ``PUT``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode, urljoin, urlsplit

from als.digest import sha256_of
from als.errors import NotFound, RegistryError
from als.registry.client import RegistryClient
from als.registry.config import Endpoint
from als.registry.reference import ImageRef, parse_reference, validate_digest
from als.registry.transport import Response

__all__ = ["BlobPush", "Uploader"]

log = logging.getLogger(__name__)

PUSH_ACTIONS = "pull,push"
DEFAULT_CHUNK_SIZE = 32 << 20
MIN_RATE = 1 << 20  # bytes per second assumed when stretching a deadline for a large body


@dataclass(frozen=True)
class BlobPush:
    """What pushing one blob took: ``exists`` (nothing sent), ``mounted`` (cross-repository
    mount from ``source``) or ``uploaded`` (``size`` bytes sent)."""

    digest: str
    size: int
    how: Literal["exists", "mounted", "uploaded"]
    source: str = ""


class Uploader:
    """Pushes blobs and manifests to the repository of ``ref`` through ``client``."""

    def __init__(
        self,
        client: RegistryClient,
        ref: ImageRef | str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        min_rate: int = MIN_RATE,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.client = client
        self.ref = parse_reference(ref) if isinstance(ref, str) else ref
        self.chunk_size = chunk_size
        self.min_rate = max(1, min_rate)
        self.endpoint: Endpoint = client.conf.endpoints(self.ref)[-1]

    @property
    def repository(self) -> str:
        return self.endpoint.repository

    def __str__(self) -> str:
        return str(self.endpoint)

    # ---- plumbing ----------------------------------------------------------------------------
    def _deadline(self, size: int = 0) -> float:
        return time.monotonic() + self.client.max_retry_time + size / self.min_rate

    def _send(
        self,
        method: str,
        path: str,
        deadline: float,
        *,
        host: str | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        ep = self.endpoint
        return self.client._request(
            host or ep.host,
            ep.repository,
            method,
            path,
            deadline=deadline,
            headers=headers,
            actions=PUSH_ACTIONS,
            insecure=ep.insecure,
            data=data,
        )

    def _check(self, resp: Response, what: str) -> None:
        self.client._check_status(resp, what, self.endpoint.host)

    def _upload_url(self, resp: Response, what: str) -> tuple[str, str]:
        """(host, path?query) of the upload session a 202 answer's Location names."""
        loc = resp.headers.get("Location", "")
        if not loc:
            raise RegistryError(f"{what}: the registry started an upload without a Location")
        st = self.client.auth.host_state(self.endpoint.host)
        parts = urlsplit(urljoin(f"{st.scheme}://{self.endpoint.host}/", loc))
        if parts.scheme != st.scheme or not parts.netloc:
            raise RegistryError(f"{what}: refusing upload location {parts.scheme}://{parts.netloc}")
        return parts.netloc, parts.path + ("?" + parts.query if parts.query else "")

    # ---- blobs -------------------------------------------------------------------------------
    def blob_size(self, digest: str) -> int | None:
        """The size of ``digest`` in this repository, or None when the registry lacks it."""
        validate_digest(digest)
        what = f"HEAD blob {digest} in {self}"
        dl = self._deadline()

        def head() -> int | None:
            resp = self._send("HEAD", f"/v2/{self.repository}/blobs/{digest}", dl)
            if resp.status_code == 404:
                resp.close()
                return None
            self._check(resp, what)
            resp.close()
            length = resp.headers.get("Content-Length", "")
            return int(length) if length.isdigit() else -1

        return self.client._retrying(what, dl, head)

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        """Ask the registry to link ``digest`` from another repository of the same registry.

        True when it did (201); False when it would not (it then opened an upload session,
        which is abandoned: the registry expires it)."""
        validate_digest(digest)
        what = f"mount blob {digest} from {from_repository} into {self}"
        dl = self._deadline()
        query = urlencode({"mount": digest, "from": from_repository})

        def mount() -> bool:
            resp = self._send("POST", f"/v2/{self.repository}/blobs/uploads/?{query}", dl)
            self._check(resp, what)
            resp.close()
            return resp.status_code == 201

        try:
            return self.client._retrying(what, dl, mount)
        except (NotFound, RegistryError) as exc:
            log.info("%s: %s", what, exc)
            return False

    def upload_blob(self, data: bytes, digest: str | None = None) -> str:
        """Upload ``data`` (monolithic, or in chunks when larger than ``chunk_size``); return its
        digest. ``digest``, when given, must be the digest of ``data``."""
        got = sha256_of(data)
        if digest is not None and digest != got:
            raise RegistryError(f"upload to {self}: data has digest {got}, not {digest}")
        what = f"upload blob {got} ({len(data)} bytes) to {self}"
        dl = self._deadline(len(data))

        def upload() -> str:
            resp = self._send("POST", f"/v2/{self.repository}/blobs/uploads/", dl)
            self._check(resp, what)
            resp.close()
            host, path = self._upload_url(resp, what)
            body = data
            if len(data) > self.chunk_size:
                body = b""
                for start in range(0, len(data), self.chunk_size):
                    piece = data[start : start + self.chunk_size]
                    headers = {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(piece) - 1}",
                    }
                    resp = self._send("PATCH", path, dl, host=host, data=piece, headers=headers)
                    self._check(resp, what)
                    resp.close()
                    host, path = self._upload_url(resp, what)
            sep = "&" if "?" in path else "?"
            path += sep + urlencode({"digest": got})
            headers = {"Content-Type": "application/octet-stream"}
            resp = self._send("PUT", path, dl, host=host, data=body, headers=headers)
            self._check(resp, what)
            resp.close()
            if resp.status_code != 201:
                raise RegistryError(f"{what}: HTTP {resp.status_code} instead of 201")
            return got

        return self.client._retrying(what, dl, upload)

    def push_blob(
        self, data: bytes, digest: str | None = None, *, mount_from: tuple[str, ...] = ()
    ) -> BlobPush:
        """Make ``data`` present in this repository the cheapest way: nothing when the
        registry has it, a cross-repository mount from one of ``mount_from`` (repositories of
        the same registry), else an upload."""
        digest = digest or sha256_of(data)
        if self.blob_size(digest) is not None:
            return BlobPush(digest, len(data), "exists")
        for repo in mount_from:
            if repo != self.repository and self.mount_blob(digest, repo):
                return BlobPush(digest, len(data), "mounted", repo)
        self.upload_blob(data, digest)
        return BlobPush(digest, len(data), "uploaded")

    # ---- manifests ---------------------------------------------------------------------------
    def put_manifest(self, body: bytes, media_type: str, reference: str | None = None) -> str:
        """Store manifest ``body`` under ``reference`` (default: the reference's tag, else the
        manifest's own digest); return its digest."""
        digest = sha256_of(body)
        tag = reference or self.ref.tag or digest
        what = f"push manifest {digest} to {self}:{tag}"
        dl = self._deadline(len(body))

        def put() -> str:
            resp = self._send(
                "PUT",
                f"/v2/{self.repository}/manifests/{tag}",
                dl,
                data=body,
                headers={"Content-Type": media_type},
            )
            self._check(resp, what)
            resp.close()
            said = resp.headers.get("Docker-Content-Digest", "")
            if said.startswith("sha256:") and said != digest:
                raise RegistryError(f"{what}: the registry stored it as {said}")
            return digest

        return self.client._retrying(what, dl, put)
