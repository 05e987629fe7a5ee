"""Manifests, indexes and image configs: checks and platform selection, on bytes and dicts.

Pure functions; the client fetches the documents and calls these in order. Every digest that
comes out of a document is validated, and every document is checked against the digest it was
asked for, before anything in it is used.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping
from typing import Any

from als.digest import sha256_of
from als.errors import NotFound, RegistryError, VerifyError
from als.oci import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from als.registry.reference import ImageRef, validate_digest
from als.registry.types import LayerDescriptor

MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 32 << 20

Platform = tuple[str, str, str | None]  # os, architecture, variant


# ---- platforms -----------------------------------------------------------------------------


def host_platform() -> str:
    """This host's platform as ``os/arch[/variant]`` in OCI terms."""
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm/v7",
        "armv6l": "arm/v6",
        "i386": "386",
        "i686": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)
    return f"linux/{arch}"


def platform_str(os_: str, arch: str, variant: str | None) -> str:
    return f"{os_}/{arch}/{variant}" if variant else f"{os_}/{arch}"


def parse_platform(s: str) -> Platform:
    parts = s.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RegistryError(f"invalid platform {s!r} (want os/arch[/variant])")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def select_platform(index: Mapping[str, Any], want: Platform, what: str) -> tuple[str, str]:
    """The digest and platform of the first manifest in ``index`` for platform ``want``."""
    w_os, w_arch, w_var = want
    norm = {"arm64": "v8"}
    candidates = []
    available = []
    for m in index.get("manifests") or []:
        p = m.get("platform") or {}
        os_, arch, var = (
            str(p.get("os", "")),
            str(p.get("architecture", "")),
            p.get("variant") or None,
        )
        available.append(platform_str(os_, arch, var))
        if os_ != w_os or arch != w_arch:
            continue
        if w_var is not None and (var or norm.get(arch)) != (w_var or norm.get(arch)):
            continue
        candidates.append((m, platform_str(os_, arch, var)))
    if not candidates:
        raise NotFound(
            f"{what}: no manifest for platform "
            f"{platform_str(w_os, w_arch, w_var)} (available: "
            f"{', '.join(available) or 'none'})"
        )
    m, plat = candidates[0]
    return validate_digest(str(m.get("digest", ""))), plat


# ---- documents ---------------------------------------------------------------------------


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    """``body`` as a JSON object, or RegistryError."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return doc


def manifest_digest(body: bytes, reference: str, header: str | None, what: str) -> str:
    """The digest of manifest ``body``, checked against the digest asked for (when
    ``reference`` is one) and the registry's ``Docker-Content-Digest`` ``header``."""
    digest = sha256_of(body)
    if reference.startswith("sha256:") and digest != reference:
        raise VerifyError(f"{what}: body has digest {digest}, not the one asked for")
    if header and header.startswith("sha256:") and header != digest:
        raise VerifyError(f"{what}: body has digest {digest} but the registry says {header}")
    return digest


def media_type(doc: Mapping[str, Any], content_type: str) -> str:
    """A manifest's media type: its own ``mediaType``, else the response's Content-Type."""
    return str(doc.get("mediaType") or content_type)


def is_index(doc: Mapping[str, Any], mtype: str) -> bool:
    """Whether ``doc`` is an OCI index or a Docker manifest list."""
    return mtype in INDEX_TYPES or ("manifests" in doc and "layers" not in doc)


def check_image_manifest(doc: Mapping[str, Any], mtype: str, ref: ImageRef) -> None:
    """Refuse what is not an image manifest als can use (schema 1, unknown types)."""
    if doc.get("schemaVersion") == 1 or "fsLayers" in doc:
        raise RegistryError(f"{ref}: Docker schema 1 manifests are not supported")
    if mtype not in MANIFEST_TYPES and "layers" not in doc:
        raise RegistryError(f"{ref}: unsupported manifest media type {mtype!r}")


def config_descriptor(doc: Mapping[str, Any]) -> tuple[str, int]:
    """The (validated) digest and the size (-1: not given) of a manifest's config blob."""
    cfg_desc = doc.get("config") or {}
    cfg_digest = validate_digest(str(cfg_desc.get("digest", "")))
    cfg_size = int(cfg_desc.get("size", -1))
    return cfg_digest, cfg_size


def check_blob(data: bytes, digest: str, size: int, what: str) -> None:
    """Refuse blob ``data`` unless it has ``digest`` and (when ``size >= 0``) ``size``."""
    got = sha256_of(data)
    if got != digest:
        raise VerifyError(f"{what}: content has digest {got}")
    if size >= 0 and len(data) != size:
        raise VerifyError(f"{what}: {len(data)} bytes, descriptor says {size}")


def config_platform(cfg: Mapping[str, Any]) -> str:
    """The platform an image config names, as ``os/arch[/variant]``."""
    return platform_str(
        str(cfg.get("os", "")), str(cfg.get("architecture", "")), cfg.get("variant") or None
    )


def layer_descriptors(
    doc: Mapping[str, Any], cfg: Mapping[str, Any]
) -> tuple[LayerDescriptor, ...]:
    """The layers of an image manifest, with their diff IDs from the config when it lists
    exactly one per layer."""
    rootfs = cfg.get("rootfs") or {}
    diff_ids = [str(d) for d in rootfs.get("diff_ids") or []]
    layers = []
    raw_layers = doc.get("layers") or []
    for i, ld in enumerate(raw_layers):
        ann = ld.get("annotations") or {}
        layers.append(
            LayerDescriptor(
                digest=validate_digest(str(ld.get("digest", ""))),
                size=int(ld.get("size", -1)),
                media_type=str(ld.get("mediaType", "")),
                annotations={str(k): str(v) for k, v in ann.items()},
                diff_id=diff_ids[i]
                if i < len(diff_ids) and len(diff_ids) == len(raw_layers)
                else None,
            )
        )
    return tuple(layers)
