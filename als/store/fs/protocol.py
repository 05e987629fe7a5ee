"""Pure helpers for the two ALS path protocols and the ``info`` document.

Protocol 2 (containers/storage since 1.29): ``<base64(image ref)>/<digest>/{diff,info,blob,use}``.
Protocol 1 (the original design): path segments that are base64 of ``key=value`` annotations,
ending in ``rootfs.<layer ID>``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from als.digest import is_digest
from als.oci import is_zstd_media_type
from als.store.ports import LayerInfo

ANN_LAYER_DIGEST = "containers/image/target.layerdigest"
ANN_REFERENCE = "containers/image/target.reference"
ROOTFS_PREFIX = "rootfs."

_LAYER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A reference is printable ASCII without spaces; containers/image refs never contain "=".
_REF_RE = re.compile(r"[a-z0-9][A-Za-z0-9._:/@+-]{0,1023}")

# containers/storage pkg/archive Compression values.
COMPRESSION_GZIP = 2
COMPRESSION_ZSTD = 4


def b64decode_segment(name: bytes) -> str | None:
    """Strict standard base64 (with padding) of UTF-8 text, or None."""
    if not name or len(name) > 4096 or len(name) % 4:
        return None
    try:
        raw = base64.b64decode(name, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None
    return text


def b64encode_segment(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def parse_ref_segment(name: bytes) -> str | None:
    """A protocol-2 root segment: base64 of an image reference (no ``=``)."""
    text = b64decode_segment(name)
    if text is None or "=" in text or _REF_RE.fullmatch(text) is None:
        return None
    return text


def parse_annotation_segment(name: bytes) -> tuple[str, str] | None:
    """A protocol-1 segment: base64 of ``key=value``."""
    text = b64decode_segment(name)
    if text is None or "=" not in text:
        return None
    key, _, value = text.partition("=")
    if not key or any(c.isspace() for c in key):
        return None
    # The two annotations the store acts on must be well-formed where they appear, so that a
    # bad digest or reference is ENOENT at its own level instead of a directory to walk into.
    if key == ANN_LAYER_DIGEST and not is_digest(value):
        return None
    if key == ANN_REFERENCE and ("=" in value or _REF_RE.fullmatch(value) is None):
        return None
    return key, value


def parse_rootfs_name(name: bytes) -> str | None:
    """``rootfs.<layer ID>`` -> layer ID (a safe file name), or None."""
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.startswith(ROOTFS_PREFIX):
        return None
    layer_id = text[len(ROOTFS_PREFIX) :]
    if _LAYER_ID_RE.fullmatch(layer_id) is None or layer_id in (".", ".."):
        return None
    return layer_id


def compression_of(media_type: str) -> int:
    return COMPRESSION_ZSTD if is_zstd_media_type(media_type) else COMPRESSION_GZIP


def info_json(info: LayerInfo, path_digest: str) -> bytes:
    """The ``info`` file: a containers/storage ``Layer`` JSON for either dialect.

    ``path_digest`` is the digest podman asked for: the compressed blob digest (podman 3.3 to 5.0,
    which takes ``diff-digest`` as the layer's DiffID) or the TOC digest (podman 5.1+, which
    requires ``toc-digest`` to equal it and reads the DiffID from the flags).
    """
    doc: dict[str, object] = {
        "compressed-diff-digest": info.blob_digest,
        "compressed-size": info.blob_size,
        "compression": compression_of(info.media_type),
    }
    if path_digest == info.blob_digest:
        doc["diff-digest"] = info.diff_id
        doc["diff-size"] = info.uncompressed_size or 0
    else:
        doc["toc-digest"] = info.toc_digest
        doc["diff-size"] = info.uncompressed_size if info.uncompressed_size else -1
        if info.diff_id:
            doc["flags"] = {"expected-layer-diffid": info.diff_id}
    return json.dumps(doc, sort_keys=True).encode()
