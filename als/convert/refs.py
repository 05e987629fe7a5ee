"""Image locations as ``als convert`` takes them: ``docker://REF``, ``oci:DIR[:TAG]``,
``containers-storage:REF`` (source only). Pure parsing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from als.errors import ConfigError

Transport = Literal["docker", "oci", "containers-storage"]
PREFIXES = ("docker://", "oci:", "containers-storage:")


@dataclass(frozen=True)
class Location:
    transport: Transport
    ref: str  # docker/containers-storage: the image reference; oci: the directory
    tag: str | None = None  # oci: the ref.name annotation

    def __str__(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.ref}"
        if self.transport == "oci":
            return f"oci:{self.ref}" + (f":{self.tag}" if self.tag else "")
        return f"containers-storage:{self.ref}"


def is_image_location(text: str) -> bool:
    return text.startswith(PREFIXES)


def parse_location(text: str, *, source: bool) -> Location:
    """Parse SRC (``source``) or DEST; ConfigError names what is accepted."""
    if text.startswith("docker://"):
        ref = text[len("docker://") :]
        if not ref:
            raise ConfigError(f"{text!r}: no image reference after docker://")
        return Location("docker", ref)
    if text.startswith("oci:"):
        rest = text[len("oci:") :]
        path, sep, tag = rest.rpartition(":")
        if not sep or "/" in tag or not path:
            path, tag = rest, ""
        if not path:
            raise ConfigError(f"{text!r}: no directory after oci:")
        return Location("oci", path, tag or None)
    if text.startswith("containers-storage:"):
        if not source:
            raise ConfigError("containers-storage: is a source only; push with podman instead")
        ref = text[len("containers-storage:") :]
        if not ref:
            raise ConfigError(f"{text!r}: no image after containers-storage:")
        return Location("containers-storage", ref)
    what = (
        "docker://REF, oci:DIR[:TAG] or containers-storage:REF"
        if source
        else ("docker://REF or oci:DIR[:TAG]")
    )
    raise ConfigError(f"{text!r} is not an image location ({what})")
