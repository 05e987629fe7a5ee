"""OCI whiteouts in layer tars and the overlayfs forms they take when a layer is shown unpacked.

An OCI layer marks a deleted ``NAME`` with an empty file ``.wh.NAME`` and a directory whose
lower contents are hidden with ``.wh..wh..opq`` inside it. overlayfs wants a character device
0/0 named ``NAME`` and an ``overlay.opaque`` xattr set to ``y`` on the directory.
"""

from __future__ import annotations

WHITEOUT_PREFIX = ".wh."
"""A tar entry ``.wh.NAME`` deletes ``NAME`` of the layers below."""

OPAQUE_MARKER = ".wh..wh..opq"
"""A tar entry with this name makes its directory opaque."""

TRUSTED_OPAQUE_XATTR = "trusted.overlay.opaque"
"""The opaque xattr rootful overlayfs reads."""

USER_OPAQUE_XATTR = "user.overlay.opaque"
"""The opaque xattr overlayfs reads when mounted with ``userxattr`` (rootless)."""

OPAQUE_XATTRS = (TRUSTED_OPAQUE_XATTR, USER_OPAQUE_XATTR)
OPAQUE_VALUE = b"y"

# ".wh." + "" / "." / "..": would name the directory itself or its parent.
_BAD_TARGETS = frozenset({"", ".", ".."})


def is_whiteout_name(name: str) -> bool:
    """True for any ``.wh.``-prefixed name (whiteouts, the opaque marker, aufs metadata)."""
    return name.startswith(WHITEOUT_PREFIX)


def whiteout_target(name: str) -> str | None:
    """The name a whiteout entry deletes, or None if ``name`` is not a usable whiteout.

    The opaque marker, other ``.wh..wh.*`` names (aufs metadata) and whiteouts naming the
    directory itself or its parent are not whiteouts of a file.
    """
    if not name.startswith(WHITEOUT_PREFIX) or name.startswith(WHITEOUT_PREFIX * 2):
        return None
    target = name[len(WHITEOUT_PREFIX) :]
    if target in _BAD_TARGETS:
        return None
    return target


def whiteout_name(target: str) -> str:
    """The tar name that deletes ``target``."""
    return WHITEOUT_PREFIX + target
