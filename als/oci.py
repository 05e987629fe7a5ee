"""OCI and containers/image facts shared by the readers, the writers, the store and the CLI:
media types, the layer annotations that make a layer lazily pullable, and the layer formats.

Defined once here (as containers/storage keeps them in ``internal/minimal``) so that the code
that writes a layer and the code that serves it cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping

from als import digest

# -- media types --
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# -- layer annotations --
ANN_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
"""eStargz: the digest of the TOC JSON (podman >= 5.1 looks the layer up by it)."""

ANN_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
"""eStargz: the size of the uncompressed tar (containers/image reads it as the diff size)."""

ZSTD_CHUNKED_PREFIX = "io.github.containers.zstd-chunked."
ZSTD_CHUNKED_LEGACY_PREFIX = "io.containers.zstd-chunked."
_ZSTD_PREFIXES = (ZSTD_CHUNKED_PREFIX, ZSTD_CHUNKED_LEGACY_PREFIX)
ANN_MANIFEST_CHECKSUM = ZSTD_CHUNKED_PREFIX + "manifest-checksum"
ANN_MANIFEST_POSITION = ZSTD_CHUNKED_PREFIX + "manifest-position"
ANN_TARSPLIT_POSITION = ZSTD_CHUNKED_PREFIX + "tarsplit-position"
ANN_LEGACY_MANIFEST_CHECKSUM = ZSTD_CHUNKED_LEGACY_PREFIX + "manifest-checksum"
ANN_LEGACY_MANIFEST_POSITION = ZSTD_CHUNKED_LEGACY_PREFIX + "manifest-position"

# Readers accept the current key first, then the one older writers used.
MANIFEST_CHECKSUM_KEYS = tuple(p + "manifest-checksum" for p in _ZSTD_PREFIXES)
MANIFEST_POSITION_KEYS = tuple(p + "manifest-position" for p in _ZSTD_PREFIXES)
TARSPLIT_POSITION_KEYS = tuple(p + "tarsplit-position" for p in _ZSTD_PREFIXES)

TOC_DIGEST_KEYS = (ANN_TOC_DIGEST, *MANIFEST_CHECKSUM_KEYS)
"""Every annotation that declares a layer's TOC digest, in the order they are consulted."""

# -- layer formats --
LAZY_FORMATS = ("estargz", "stargz-legacy", "estargz-zstd", "zstd-chunked")
"""Formats with a table of contents: what als serves lazily."""

FORMATS = (*LAZY_FORMATS, "gzip", "zstd", "tar")
"""Every format als recognises."""

CONVERT_FORMATS = ("estargz", "estargz-zstd", "zstd-chunked", "zstd-chunked-1.43", "gzip", "zstd")
"""What ``als convert`` writes from a layer tar (the parser's choices)."""

IMAGE_FORMATS = ("estargz", "estargz-zstd", "zstd-chunked")
"""What ``als convert`` writes for whole images (lazily pullable, read by podman 4 and 5)."""


def toc_digest_of(annotations: Mapping[str, object]) -> str | None:
    """The TOC digest a layer descriptor declares, or None.

    The keys of ``TOC_DIGEST_KEYS`` are consulted in order; a value that is not a well-formed
    digest is ignored (such a layer is not served lazily, and other layers are unaffected).
    """
    for key in TOC_DIGEST_KEYS:
        value = annotations.get(key)
        if digest.is_digest(value):
            assert isinstance(value, str)
            return value
    return None


def format_of_descriptor(media_type: str, annotations: Mapping[str, object]) -> str:
    """The layer format a manifest's descriptor declares (``unknown`` when it says nothing)."""
    zstd = "zstd" in media_type
    if ANN_TOC_DIGEST in annotations:  # before manifest-checksum: eStargz-zstd carries both
        return "estargz-zstd" if zstd else "estargz"
    if any(k in annotations for k in MANIFEST_CHECKSUM_KEYS):
        return "zstd-chunked"
    if zstd:
        return "zstd"
    if "gzip" in media_type:
        return "gzip"
    if media_type.endswith((".tar", "tar.layer", "rootfs.diff.tar")):
        return "tar"
    return "unknown"


def is_zstd_media_type(media_type: str) -> bool:
    """Whether a layer media type names zstd compression (else gzip, for lazy formats)."""
    return media_type.endswith("zstd")
