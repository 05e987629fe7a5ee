"""Wiring for ``als convert SRC DEST``: the registry client, the source and destination, the
conversion records, and the optimize run before the conversion."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from als.convert.image import Converter, Options, Progress, Result
from als.convert.records import RecordStore, default_record_dir
from als.convert.refs import Location, parse_location
from als.convert.store import (
    ContainersStorageSource,
    Destination,
    OciDestination,
    OciSource,
    RegistryDestination,
    RegistrySource,
    Source,
)
from als.errors import ConfigError
from als.oci import IMAGE_FORMATS

if TYPE_CHECKING:
    from als.registry import RegistryClient


@dataclass
class Request:
    src: str
    dest: str
    fmt: str = "estargz"
    platform: str | None = None
    chunk_size: int | None = None
    record_dir: str | None = None
    no_record: bool = False
    registries_conf: str | None = None
    authfile: str | None = None
    optimize: bool = False
    optimize_seconds: float = 10.0
    optimize_command: Sequence[str] = ()
    optimize_allow_failure: bool = False
    optimize_network: bool = False
    podman_run_args: Sequence[str] = ()
    podman: str = "podman"


def make_client(req: Request) -> RegistryClient:
    from als.registry import CredentialStore, RegistriesConf, RegistryClient

    conf = RegistriesConf.load(req.registries_conf)
    creds = (
        CredentialStore.from_file(req.authfile)
        if req.authfile
        else CredentialStore.from_default_files()
    )
    return RegistryClient(registries_conf=conf, credentials=creds, max_retry_time=60)


def open_source(loc: Location, client: RegistryClient | None, podman: str) -> Source:
    if loc.transport == "docker":
        assert client is not None
        return RegistrySource(client, loc.ref)
    if loc.transport == "oci":
        return OciSource(loc.ref, loc.tag)
    return ContainersStorageSource(loc.ref, podman=podman)


@contextlib.contextmanager
def _records(req: Request) -> Iterator[RecordStore]:
    if not req.no_record:
        yield RecordStore(Path(req.record_dir) if req.record_dir else default_record_dir())
        return
    tmp = tempfile.mkdtemp(prefix="als-convert-")
    try:
        yield RecordStore(Path(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_image(req: Request, progress: Progress | None = None) -> Result:
    """Convert SRC into DEST as ``req`` says; raise an AlsError (DEST untouched) on failure."""
    if req.fmt not in IMAGE_FORMATS:
        raise ConfigError(f"images convert to {', '.join(IMAGE_FORMATS)}, not {req.fmt}")
    if req.optimize_seconds <= 0:
        raise ConfigError("--optimize-seconds must be positive")
    src_loc = parse_location(req.src, source=True)
    dest_loc = parse_location(req.dest, source=False)
    needs_client = "docker" in (src_loc.transport, dest_loc.transport)
    client = make_client(req) if needs_client else None
    try:
        with _records(req) as records:
            src = open_source(src_loc, client, req.podman)
            try:
                prioritized: dict[str, list[str]] = {}
                if req.optimize:
                    from als.convert.optimize import record_profile

                    prioritized = record_profile(src, req, records, progress)
                dest: Destination
                dest_registry = None
                if dest_loc.transport == "docker":
                    assert client is not None
                    rdest = RegistryDestination(client, dest_loc.ref)
                    dest_registry = (rdest.host, rdest.uploader.repository)
                    dest = rdest
                else:
                    dest = OciDestination(dest_loc.ref, dest_loc.tag)
                opts = Options(
                    fmt=req.fmt,
                    platform=req.platform,
                    chunk_size=req.chunk_size,
                    prioritized=prioritized,
                )
                conv = Converter(src, dest, records, opts, progress, dest_registry=dest_registry)
                try:
                    return conv.convert()
                except BaseException:
                    dest.abort()
                    raise
            finally:
                src.close()
    finally:
        if client is not None:
            client.close()
