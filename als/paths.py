"""Where things live under a store root: names shared by the daemon and its clients.

Standard library only, so that ``als status`` can import it without the store's dependencies.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = "/var/lib/als"
"""The store root ``als-mount`` and ``als status`` use when none is given."""

POOL_NAME = ".pool"
"""The FUSE mount point under the root (what storage.conf's ``additionallayerstores`` names)."""

SOCKET_NAME = ".als.sock"
"""The control socket under the root: ``GET /status`` and ``GET /metrics``."""

CACHE_NAME = "cache"
"""The disk cache under the root, unless ``cache_dir`` puts it elsewhere."""


def pool_dir(root: Path) -> Path:
    return root / POOL_NAME


def socket_path(root: Path) -> Path:
    return root / SOCKET_NAME
