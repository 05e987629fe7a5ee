"""The one definition of a content digest: ``sha256:<64 lowercase hex>``.

Every layer, blob, TOC and chunk digest als reads or writes goes through these helpers.
Callers turn ``ValueError`` into the error of their own domain (a FormatError for a layer, an
InvalidReference for a reference).
"""

from __future__ import annotations

import hashlib

ALGORITHM = "sha256"
PREFIX = "sha256:"
HEX_LENGTH = 64
LENGTH = len(PREFIX) + HEX_LENGTH  # 71
_HEX = frozenset("0123456789abcdef")


def is_digest(value: object) -> bool:
    """True if ``value`` is a string ``sha256:`` followed by 64 lowercase hex digits."""
    return (
        type(value) is str
        and len(value) == LENGTH
        and value.startswith(PREFIX)
        and _HEX.issuperset(value[len(PREFIX) :])
    )


def validate(value: object) -> str:
    """``value`` if it is a well-formed digest; ValueError naming it otherwise."""
    if not is_digest(value):
        raise ValueError(f"not a {ALGORITHM} digest: {value!r:.90}")
    assert isinstance(value, str)
    return value


def hex_of(value: object) -> str:
    """The 64 hex digits of a digest; ValueError for anything that is not one."""
    return validate(value)[len(PREFIX) :]


def raw_of(value: object) -> bytes:
    """The 32 raw bytes of a digest; ValueError for anything that is not one."""
    return bytes.fromhex(hex_of(value))


def from_hex(hexpart: str) -> str:
    """``sha256:<hexpart>`` (checked)."""
    return validate(PREFIX + hexpart)


def sha256_of(data: bytes | bytearray | memoryview) -> str:
    """The digest of ``data``."""
    return PREFIX + hashlib.sha256(data).hexdigest()
