"""Where images come from and go to: a registry (through als's client), an OCI layout, and
(as a source) podman's local storage.

Sources hand out documents (manifests, indexes) and blobs, each checked against its digest and
bounded in size. Destinations receive blobs, then manifests, and make them visible only in
:meth:`Destination.commit`: a registry gets the tag last (blobs pushed before it are invisible
to a pull), an OCI layout is written beside the directory and moved into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from als.digest import hex_of, sha256_of
from als.errors import AlsError, ConfigError, NotFound, VerifyError
from als.fsutil import write_atomic
from als.oci import OCI_INDEX

if TYPE_CHECKING:
    from als.registry import RegistryClient
    from als.registry.upload import Uploader

MAX_DOCUMENT = 4 << 20  # manifests and indexes (as the registry client's MAX_MANIFEST_SIZE)
MAX_CONFIG = 32 << 20
REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


@dataclass(frozen=True)
class Doc:
    """A manifest or index as stored: its bytes, digest and media type."""

    body: bytes
    digest: str
    media_type: str


def parse_doc(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise AlsError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise AlsError(f"{what} is not a JSON object")
    return doc


class Source(Protocol):
    name: str
    registry: tuple[str, str] | None  # (host, repository) when blobs could be mounted from it

    def top(self) -> Doc: ...
    def manifest(self, digest: str) -> Doc: ...
    def blob(self, digest: str, size: int, limit: int) -> bytes: ...
    def close(self) -> None: ...


class Destination(Protocol):
    name: str

    def has_blob(self, digest: str) -> bool: ...
    def put_blob(
        self, digest: str, load: Callable[[], bytes], mount_from: tuple[str, ...] = ()
    ) -> str: ...
    def put_manifest(self, doc: Doc, *, top: bool) -> None: ...
    def commit(self) -> str: ...
    def abort(self) -> None: ...


# ---- registry ------------------------------------------------------------------------------


class RegistrySource:
    def __init__(self, client: RegistryClient, ref: str) -> None:
        from als.registry import parse_reference

        self.client = client
        self.ref = parse_reference(ref)
        self.name = f"docker://{self.ref}"
        ep = client.conf.endpoints(self.ref)[-1]
        self.registry: tuple[str, str] | None = (ep.host, ep.repository)

    def top(self) -> Doc:
        return Doc(*self.client.manifest(self.ref))

    def manifest(self, digest: str) -> Doc:
        return Doc(*self.client.manifest(self.ref.with_digest(digest)))

    def blob(self, digest: str, size: int, limit: int) -> bytes:
        if size > limit:
            raise AlsError(f"{self.name}: blob {digest} of {size} bytes is over the limit")
        return self.client.fetch_blob(self.ref, digest, size=size, max_size=limit)

    def close(self) -> None:
        pass


class RegistryDestination:
    """Blobs go up as they come (invisible without a manifest); the manifest with the tag is
    pushed by :meth:`commit`, after every other document."""

    def __init__(self, client: RegistryClient, ref: str) -> None:
        from als.registry import parse_reference
        from als.registry.upload import Uploader

        r = parse_reference(ref)
        if r.digest:
            raise ConfigError(f"docker://{ref}: push to a tag, not a digest")
        self.uploader: Uploader = Uploader(client, r)
        self.name = f"docker://{r}"
        self.host = self.uploader.endpoint.host
        self._children: list[Doc] = []
        self._top: Doc | None = None

    def has_blob(self, digest: str) -> bool:
        return self.uploader.blob_size(digest) is not None

    def put_blob(
        self, digest: str, load: Callable[[], bytes], mount_from: tuple[str, ...] = ()
    ) -> str:
        """Nothing when the registry has the blob, a mount when one of ``mount_from`` (other
        repositories of this registry) lends it, else an upload of ``load()``."""
        up = self.uploader
        if up.blob_size(digest) is not None:
            return "exists"
        for repo in mount_from:
            if repo != up.repository and up.mount_blob(digest, repo):
                return "mounted"
        up.upload_blob(load(), digest)
        return "uploaded"

    def put_manifest(self, doc: Doc, *, top: bool) -> None:
        if top:
            self._top = doc
        else:
            self._children.append(doc)

    def commit(self) -> str:
        assert self._top is not None
        for child in self._children:
            self.uploader.put_manifest(child.body, child.media_type, child.digest)
        return self.uploader.put_manifest(self._top.body, self._top.media_type)

    def abort(self) -> None:
        pass  # uploaded blobs without a manifest are the registry's garbage to collect


# ---- OCI layout -----------------------------------------------------------------------------


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise NotFound(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise AlsError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise AlsError(f"{what}: {path} is larger than {limit} bytes")
    return data


class OciSource:
    def __init__(self, directory: str, tag: str | None, *, name: str | None = None) -> None:
        self.dir = Path(directory)
        self.tag = tag
        self.name = name or f"oci:{directory}" + (f":{tag}" if tag else "")
        self.registry: tuple[str, str] | None = None
        if not (self.dir / "index.json").is_file():
            raise NotFound(f"{self.name}: not an OCI layout (no index.json)")

    def _blob_path(self, digest: str) -> Path:
        return self.dir / "blobs" / "sha256" / hex_of(digest)

    def top(self) -> Doc:
        body = _read_capped(self.dir / "index.json", MAX_DOCUMENT, self.name)
        index = parse_doc(body, f"{self.name}: index.json")
        entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
        if self.tag is not None:
            entries = [m for m in entries if (m.get("annotations") or {}).get(REF_NAME) == self.tag]
            if not entries:
                raise NotFound(f"{self.name}: no image tagged {self.tag!r}")
        elif len(entries) != 1:
            raise ConfigError(f"{self.name}: {len(entries)} images in the layout; name a :TAG")
        desc = entries[0]
        digest = str(desc.get("digest", ""))
        doc = self.manifest(digest)
        return Doc(doc.body, doc.digest, str(desc.get("mediaType") or doc.media_type))

    def manifest(self, digest: str) -> Doc:
        body = self.blob(digest, -1, MAX_DOCUMENT)
        doc = parse_doc(body, f"{self.name}: manifest {digest}")
        return Doc(body, digest, str(doc.get("mediaType", "")))

    def blob(self, digest: str, size: int, limit: int) -> bytes:
        if size > limit:
            raise AlsError(f"{self.name}: blob {digest} of {size} bytes is over the limit")
        data = _read_capped(self._blob_path(digest), limit, self.name)
        got = sha256_of(data)
        if got != digest:
            raise VerifyError(f"{self.name}: blob {digest} has digest {got}")
        if size >= 0 and len(data) != size:
            raise VerifyError(f"{self.name}: blob {digest} is {len(data)} bytes, not {size}")
        return data

    def close(self) -> None:
        pass


class OciDestination:
    """Writes into a staging directory next to DIR; :meth:`commit` moves it into place (a new
    layout is renamed; into an existing one the blobs are moved, then index.json replaced)."""

    def __init__(self, directory: str, tag: str | None) -> None:
        self.dir = Path(directory).absolute()
        self.tag = tag
        self.name = f"oci:{directory}" + (f":{tag}" if tag else "")
        if self.dir.exists() and not (self.dir / "oci-layout").is_file():
            raise ConfigError(f"{self.name}: {self.dir} exists and is not an OCI layout")
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}.als-", dir=self.dir.parent))
        (self.stage / "blobs" / "sha256").mkdir(parents=True)
        self._top: Doc | None = None

    def _path(self, root: Path, digest: str) -> Path:
        return root / "blobs" / "sha256" / hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self._path(self.dir, digest).is_file() or self._path(self.stage, digest).is_file()

    def put_blob(
        self, digest: str, load: Callable[[], bytes], mount_from: tuple[str, ...] = ()
    ) -> str:
        if self.has_blob(digest):
            return "exists"
        data = load()
        if sha256_of(data) != digest:
            raise VerifyError(f"{self.name}: blob {digest} to write has another digest")
        self._path(self.stage, digest).write_bytes(data)
        return "uploaded"

    def put_manifest(self, doc: Doc, *, top: bool) -> None:
        self.put_blob(doc.digest, lambda: doc.body)
        if top:
            self._top = doc

    def commit(self) -> str:
        assert self._top is not None
        top = self._top
        desc: dict[str, Any] = {
            "mediaType": top.media_type,
            "digest": top.digest,
            "size": len(top.body),
        }
        if self.tag:
            desc["annotations"] = {REF_NAME: self.tag}
        if not self.dir.exists():
            fresh = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}
            (self.stage / "oci-layout").write_bytes(OCI_LAYOUT)
            (self.stage / "index.json").write_bytes(json.dumps(fresh).encode())
            os.rename(self.stage, self.dir)
            return top.digest
        body = _read_capped(self.dir / "index.json", MAX_DOCUMENT, self.name)
        index = parse_doc(body, f"{self.name}: index.json")
        kept = [
            m
            for m in index.get("manifests") or []
            if not self.tag or (m.get("annotations") or {}).get(REF_NAME) != self.tag
        ]
        index["manifests"] = [*kept, desc]
        blobs = self.dir / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for p in (self.stage / "blobs" / "sha256").iterdir():
            os.replace(p, blobs / p.name)
        write_atomic(self.dir / "index.json", json.dumps(index).encode())
        shutil.rmtree(self.stage, ignore_errors=True)
        return top.digest

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


# ---- podman's local storage ------------------------------------------------------------------


class ContainersStorageSource(OciSource):
    """An image of the local podman store, saved by ``podman save --format oci-dir`` into a
    temporary directory and read from there."""

    def __init__(self, ref: str, *, podman: str = "podman", timeout: float = 1800) -> None:
        self._tmp = tempfile.mkdtemp(prefix="als-convert-cs-")
        out = os.path.join(self._tmp, "oci")
        try:
            p = subprocess.run(
                [podman, "save", "--format", "oci-dir", "-o", out, ref],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except FileNotFoundError:
            self.close()
            raise ConfigError("containers-storage: needs podman, which is not installed") from None
        except subprocess.TimeoutExpired:
            self.close()
            raise AlsError(f"podman save {ref} took more than {timeout:.0f}s") from None
        if p.returncode != 0:
            self.close()
            msg = (p.stderr.strip().splitlines() or ["no message"])[-1]
            raise NotFound(f"containers-storage:{ref}: podman save failed: {msg}")
        super().__init__(out, None, name=f"containers-storage:{ref}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self._tmp)
