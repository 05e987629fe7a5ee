"""systemd's notification protocol (sd_notify(3)), standard library only: a datagram to the
socket named by NOTIFY_SOCKET, optionally carrying file descriptors (FDSTORE=1)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence


def notify(message: str, fds: Sequence[int] = ()) -> bool:
    """Send ``message`` (with ``fds``) to systemd; False if NOTIFY_SOCKET is not set (not run
    by systemd). Raises OSError if the socket cannot be reached."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        if fds:
            socket.send_fds(sock, [message.encode()], list(fds))
        else:
            sock.sendall(message.encode())
    return True
