"""The C library through ctypes, loaded once for the whole process (standard library only).

``CDLL(None)`` opens the symbols the process already has, the C library among them, without
searching for its file (``ctypes.util.find_library`` runs subprocesses and costs a long-lived
process about a megabyte of imports)."""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library (errno kept for ``ctypes.get_errno``); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def function(name: str) -> Any | None:
    """The C library's function ``name``; None where there is no such function (not glibc)."""
    lib = libc()
    return getattr(lib, name, None) if lib is not None else None
