"""The project's exception hierarchy.

Every error carries the errno the FUSE layer answers with, so that the one error boundary in
the FUSE operations can translate any ``AlsError`` without knowing where it came from.
"""

from __future__ import annotations

import errno as _errno


class AlsError(Exception):
    """Base class: a clean, expected failure with a message fit for a log line or a CLI."""

    errno: int = _errno.EIO


class NotFound(AlsError):
    errno = _errno.ENOENT


class FormatError(AlsError):
    """A blob or TOC is malformed, hostile or unsupported."""

    errno = _errno.EIO


class NotLazy(FormatError):
    """The blob is a valid layer, but in a format that cannot be read lazily (plain gzip...)."""

    def __init__(self, fmt: str, message: str | None = None) -> None:
        super().__init__(message or f"layer is {fmt}: not lazily pullable")
        self.format = fmt


class VerifyError(AlsError):
    """Bytes did not match their digest. Never serve them."""

    errno = _errno.EIO


class RegistryError(AlsError):
    errno = _errno.EIO


class AuthError(RegistryError):
    errno = _errno.EACCES


class ConfigError(AlsError):
    errno = _errno.EINVAL
