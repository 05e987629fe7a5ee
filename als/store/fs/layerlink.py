"""Protocol 1's layer links: ``ROOT/<layer ID>`` -> the layer's tree in the pool.

A protocol-1 lookup of ``.../rootfs.<layer ID>`` both shows the layer's tree and points a
symlink named after the layer ID (in the store's root, beside the pool) at it, which is where
containers/storage looks for the unpacked layer. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def link_layer_id(root: Path, layer_id: str, target: Path) -> None:
    """Point ``root/<layer_id>`` at ``target``, replaced atomically.

    An existing link that already points there is left as is, and so is an existing file that
    is not a symlink (with a warning). ``layer_id`` must be a safe file name
    (:func:`~als.store.fs.protocol.parse_rootfs_name` checks it).
    """
    link = root / layer_id
    try:
        if os.readlink(link) == str(target):
            return
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # exists and is not a symlink: leave it alone
            log.warning("not replacing %s: it exists and is not a symlink", link)
            return
        raise
    tmp = root / f".{layer_id}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    log.info("layer-link id=%s target=%s", layer_id, target)
