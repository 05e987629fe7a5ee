"""The serving end of a kept FUSE connection: what the supervisor hands a server it starts, and
how the server takes the connection over.

libfuse 3 serves a descriptor given as the mountpoint ``/dev/fd/N``, but it insists on a
FUSE_INIT as the first request, and the kernel sends that only once per connection. So the
supervisor gives each server a socket ``N`` holding a copy of the connection's INIT (read at
mount, :mod:`als.store.fs.device`) and, beside it, the connection's descriptor. libfuse reads
the INIT from the socket and calls the filesystem's ``init()``; there :meth:`Handoff.take_over`
puts the connection's descriptor in place of the socket (dup2), so the INIT reply and every
request after it go to the kernel. The first server's reply completes the kernel's handshake;
a later server's reply is for a request the kernel no longer has and is dropped (ENOENT, which
libfuse ignores). A later server then asks the kernel to resend what its predecessor read and
did not answer (Linux 6.9+).

The supervisor's half is :mod:`als.store.supervisor`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from als.store.fs import device

log = logging.getLogger(__name__)

ENV = "ALS_HANDOFF"
_FIELDS = ("fuse", "init", "journal", "ctl", "underlay", "generation", "resend", "wait")


@dataclass(frozen=True)
class Handoff:
    fuse_fd: int  # the connection (/dev/fuse)
    init_fd: int  # a socket with the INIT request: libfuse's mountpoint is /dev/fd/<init_fd>
    journal_fd: int  # the namespace journal (als.store.fs.journal)
    ctl_fd: int  # a socket to the supervisor: "prepared", "serving" out; "go" in
    underlay_fd: int  # the pool directory beneath the mount (als.store.fs.underlay)
    generation: int  # 1 for the server that completes the mount's handshake
    resend: bool  # the kernel resends unanswered requests (FUSE_HAS_RESEND)
    wait_go: bool = False  # a takeover: prepare, then wait for the old server to stop

    def to_env(self) -> str:
        values = (
            self.fuse_fd,
            self.init_fd,
            self.journal_fd,
            self.ctl_fd,
            self.underlay_fd,
            self.generation,
            int(self.resend),
            int(self.wait_go),
        )
        return ",".join(f"{k}={v}" for k, v in zip(_FIELDS, values, strict=True))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Handoff | None:
        raw = environ.get(ENV)
        if not raw:
            return None
        try:
            fields = dict(item.split("=", 1) for item in raw.split(","))
            v = {k: int(fields[k]) for k in _FIELDS}
        except (KeyError, ValueError):
            raise ValueError(f"malformed {ENV}: {raw!r}") from None
        return cls(
            v["fuse"],
            v["init"],
            v["journal"],
            v["ctl"],
            v["underlay"],
            v["generation"],
            bool(v["resend"]),
            bool(v["wait"]),
        )

    @property
    def mountpoint(self) -> str:
        return f"/dev/fd/{self.init_fd}"

    def tell(self, message: str) -> None:
        """A line to the supervisor (ignored if it is gone: our parent-death signal follows)."""
        try:
            os.write(self.ctl_fd, message.encode() + b"\n")
        except OSError as exc:
            log.debug("supervisor channel: %s", exc)

    def wait_for_go(self) -> None:
        """Say we are ready, then block until the supervisor says ``go`` (its previous server
        has stopped reading the connection)."""
        self.tell("prepared")
        with socket.socket(fileno=os.dup(self.ctl_fd)) as sock:
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionError("the supervisor went away before saying go")
                buf += chunk
        if buf.split(b"\n", 1)[0] != b"go":
            raise ConnectionError(f"unexpected word from the supervisor: {buf!r}")

    def take_over(self, schedule: Callable[[Callable[[], object]], object]) -> None:
        """Called from the filesystem's ``init()``, before libfuse sends the INIT reply.

        ``schedule`` runs a callback after the current one returns (the event loop's
        ``run_sync_soon``): the resend must come after the reply, or the kernel would resend
        the INIT of the first handshake itself.
        """
        os.dup2(self.fuse_fd, self.init_fd, inheritable=False)
        os.close(self.fuse_fd)
        if self.generation > 1:
            if self.resend:
                schedule(self._resend)
            else:
                log.warning(
                    "takeover: this kernel cannot resend the requests the previous server had "
                    "read (FUSE_NOTIFY_RESEND, Linux 6.9+); the calls they belong to wait "
                    "until killed"
                )
        self.tell("serving")

    def _resend(self) -> None:
        try:
            ok = device.notify_resend(self.init_fd)
        except OSError as exc:
            log.warning("takeover: resend notification failed: %s", exc)
            return
        log.info("takeover generation=%d resend=%s", self.generation, ok)
