"""The supervisor: the process that owns the FUSE mount, so that running containers survive
the death, restart or upgrade of the process that serves it.

``als-mount ROOT`` mounts ``ROOT/.pool`` itself (:mod:`als.store.fs.device`), keeps the
connection's descriptor and its FUSE_INIT, and runs the store in a child process (a *server*,
``als-mount`` again with :data:`als.store.fs.handoff.ENV` set). The kernel queues requests while
no server reads them, so:

- a server that dies (crash, OOM, ``kill -9``) is replaced at once; readers pause, and the
  requests it had read and not answered are resent by the kernel (Linux 6.9+);
- ``SIGHUP`` (``als-mount --takeover ROOT``) starts a server from the installed code, waits until
  it is ready, stops the old one and lets the new one serve: a package upgrade without
  downtime;
- ``SIGTERM``/``SIGINT`` stop the server, then unmount.

Each server inherits: the connection, a socket holding a copy of the INIT (libfuse's
mountpoint ``/dev/fd/N``), the namespace journal (a memfd, :mod:`als.store.fs.journal`), the
pool directory beneath the mount (:mod:`als.store.fs.underlay`) and a control socket. Servers die
with the supervisor (a parent-death signal): if the supervisor itself is killed, the connection
ends and everything behaves as without it (the next ``als-mount`` cleans the stale mount).

Standard library only, single-threaded, blocking: it spends its life in ``select``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from als.fsutil import write_atomic
from als.libc import function
from als.sdnotify import notify
from als.store.fs import device, journal
from als.store.fs.handoff import ENV, Handoff

log = logging.getLogger("als.supervisor")

#: How long a stopping server may take to answer what it holds before it is killed (what it
#: leaves is resent to the next one).
STOP_TIMEOUT = 10.0
#: Beside the pool (in ROOT): the outcome of the last takeover, for ``als-mount --takeover``.
TAKEOVER_FILE = ".als.takeover"
#: What systemd's file descriptor store holds for us (FDNAME=).
FDNAMES = ("als-fuse", "als-init", "als-journal", "als-underlay")
#: How often the serving server is pinged (at most: three pings per watchdog period).
PING_EVERY = 10.0
#: A server that dies sooner than this after its start counts as a crash loop: back off.
QUICK_DEATH = 5.0
MAX_BACKOFF = 10.0


def sd_notify(message: str) -> None:
    """Tell systemd (if it runs us); a notification that cannot be sent is not fatal."""
    try:
        notify(message)
    except OSError as exc:
        log.debug("sd_notify: %s", exc)


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): get ``sig`` when the parent dies (servers call this)."""
    pr_set_pdeathsig = 1
    prctl = function("prctl")
    if prctl is not None:
        prctl(pr_set_pdeathsig, sig, 0, 0, 0)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    ctl: socket.socket
    generation: int
    started: float
    state: str = "starting"  # -> prepared -> serving
    buf: bytes = b""
    stop_sent: float | None = None
    answered: float = 0.0  # when it last answered a ping (or said it serves)
    pinged: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Supervisor:
    pool: Path
    server_argv: Sequence[str]
    stop_timeout: float = STOP_TIMEOUT
    watchdog: float = 0.0  # seconds a serving server may leave pings unanswered (0: no watchdog)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    fuse_fd: int = -1
    underlay_fd: int = -1
    journal_fd: int = -1
    init_fd: int = -1  # a memfd with the INIT, for systemd's store
    init: device.InitRequest | None = None
    generation: int = 0
    current: Server | None = None
    pending: Server | None = None  # a takeover's new server, until the old one is gone
    _signals: list[int] = field(default_factory=list)
    _deaths: list[float] = field(default_factory=list)
    _respawn_at: float | None = None
    _takeover_started: float | None = None
    _lost_at: float | None = None
    _stopping: bool = False
    _first: int = 1  # generation of this supervisor's first server
    _ready: bool = False
    _stored: bool = False  # our descriptors are in systemd's store

    # -- set-up -----------------------------------------------------------------------------------

    def mount(self) -> None:
        """Open the pool beneath the mount, mount, and take the INIT (raises DeviceError)."""
        self.underlay_fd = os.open(
            self.pool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        self.fuse_fd = device.open_device()
        device.mount(self.fuse_fd, self.pool, device.MountOptions())
        try:
            self.init = device.read_init(self.fuse_fd, timeout=10)
        except OSError:
            device.unmount(self.pool)
            raise
        self.journal_fd = os.memfd_create("als-namespace", os.MFD_CLOEXEC)
        log.info(
            "mounted %s (FUSE %d.%d; the kernel %s resend unanswered requests to a new server)",
            self.pool,
            self.init.major,
            self.init.minor,
            "can" if self.init.supports_resend else "cannot",
        )

    def close(self) -> None:
        """Unmount and let go of the connection (also from systemd's store)."""
        if self._stored:
            for name in FDNAMES:
                sd_notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
            self._stored = False
        with contextlib.suppress(OSError):
            device.unmount(self.pool)
        for fd in (self.fuse_fd, self.underlay_fd, self.journal_fd, self.init_fd):
            if fd >= 0:
                os.close(fd)
        self.fuse_fd = self.underlay_fd = self.journal_fd = self.init_fd = -1

    # -- systemd's file descriptor store -----------------------------------------------------------

    def _fds(self) -> dict[str, int]:
        """The connection and what a successor needs with it, by :data:`FDNAMES` name (the
        INIT written into a memfd the first time)."""
        assert self.init is not None
        if self.init_fd < 0:
            self.init_fd = os.memfd_create("als-init", os.MFD_CLOEXEC)
            os.pwrite(self.init_fd, self.init.raw, 0)
        mine = (self.fuse_fd, self.init_fd, self.journal_fd, self.underlay_fd)
        return dict(zip(FDNAMES, mine, strict=True))

    def store_fds(self) -> bool:
        """Give systemd a copy of the connection and what a successor needs with it
        (``FileDescriptorStoreMax=``), so that a restarted unit takes the mount over even
        after the supervisor itself died. False without systemd."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return False
        try:
            for name, fd in self._fds().items():
                notify(f"FDSTORE=1\nFDNAME={name}", [fd])
        except OSError as exc:
            log.warning("cannot store the FUSE connection with systemd: %s", exc)
            return False
        self._stored = True
        log.info("the FUSE connection is kept in systemd's file descriptor store too")
        return True

    @classmethod
    def from_fds(cls, pool: Path, server_argv: Sequence[str], fds: Mapping[str, int]) -> Supervisor:
        """A supervisor for a live connection given as descriptors named :data:`FDNAMES`
        (each checked for what it must be); DeviceError if they are not usable."""
        if set(fds) != set(FDNAMES):
            raise device.DeviceError(errno.EBADF, f"need the descriptors {', '.join(FDNAMES)}")
        sup = cls(pool, server_argv)
        sup.fuse_fd, sup.init_fd = fds["als-fuse"], fds["als-init"]
        sup.journal_fd, sup.underlay_fd = fds["als-journal"], fds["als-underlay"]
        for fd in fds.values():
            os.set_inheritable(fd, False)
        kinds = {"als-fuse": stat.S_ISCHR, "als-underlay": stat.S_ISDIR}
        for name, fd in fds.items():
            if not kinds.get(name, stat.S_ISREG)(os.fstat(fd).st_mode):
                raise device.DeviceError(errno.EBADF, f"{name} is not what it should be")
        sup.init = device.InitRequest.parse(journal.read_all(sup.init_fd))
        return sup

    @classmethod
    def adopt(
        cls,
        pool: Path,
        server_argv: Sequence[str],
        environ: Mapping[str, str],
        mounted: Callable[[Path], bool],
    ) -> Supervisor | None:
        """A supervisor for the connection systemd hands back (LISTEN_FDS, names
        :data:`FDNAMES`) after the previous supervisor died; None if there is none to take.

        ``mounted(pool)`` must not touch the mount itself (no server answers it yet).
        """
        if environ.get("LISTEN_PID") != str(os.getpid()):
            return None
        try:
            count = int(environ.get("LISTEN_FDS", "0"))
        except ValueError:
            return None
        names = environ.get("LISTEN_FDNAMES", "").split(":")
        got = {name: 3 + i for i, name in enumerate(names[:count]) if name in FDNAMES}
        try:
            sup = cls.from_fds(pool, server_argv, got)
        except OSError as exc:
            log.warning("systemd handed back an unusable FUSE connection (%s): mounting anew", exc)
            for fd in got.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            return None
        sup._stored = True
        if not mounted(pool):
            log.warning("systemd handed back a FUSE connection whose mount is gone: mounting anew")
            sup.close()
            return None
        # The kernel's INIT was answered long ago: the first server here is a takeover.
        sup.generation, sup._first = 1, 2
        log.info("took over the FUSE connection of %s from systemd's store", pool)
        return sup

    def exec_lean(self, lock_fd: int, log_level: str) -> NoReturn:
        """Go on as ``python -m als.store.supervisor`` (this process, a fresh interpreter that
        loads only this module and what it needs), keeping the descriptors and the root lock."""
        fds = self._fds()
        for fd in (*fds.values(), lock_fd):
            os.set_inheritable(fd, True)
        state = {
            "pool": str(self.pool),
            "argv": list(self.server_argv),
            "fds": fds,
            "lock": lock_fd,
            "log_level": log_level,
            "generation": self.generation,
            "first": self._first,
            "stored": self._stored,
            "watchdog": self.watchdog,
        }
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # No shell: the interpreter itself, with our state as one argument.
        # The trailing words are for ps and pgrep only ("als-mount ROOT", as before the exec).
        argv = [sys.executable, "-m", "als.store.supervisor", json.dumps(state), "--"]
        argv += ["als-mount", str(self.pool.parent)]
        os.execv(sys.executable, argv)  # noqa: S606

    # -- servers ----------------------------------------------------------------------------------

    def spawn(self, *, wait_go: bool) -> Server:
        assert self.init is not None
        self.generation += 1
        init_sup, init_srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctl_sup, ctl_srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            init_sup.send(self.init.raw)
            handoff = Handoff(
                fuse_fd=self.fuse_fd,
                init_fd=init_srv.fileno(),
                journal_fd=self.journal_fd,
                ctl_fd=ctl_srv.fileno(),
                underlay_fd=self.underlay_fd,
                generation=self.generation,
                resend=self.init.supports_resend,
                wait_go=wait_go,
            )
            env = dict(self.env)
            env[ENV] = handoff.to_env()
            for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(name, None)  # the supervisor speaks to systemd
            proc = subprocess.Popen(
                [sys.executable, "-m", "als.cli.mount", *self.server_argv],
                pass_fds=(
                    self.fuse_fd,
                    init_srv.fileno(),
                    self.journal_fd,
                    ctl_srv.fileno(),
                    self.underlay_fd,
                ),
                env=env,
            )
        finally:
            init_sup.close()
            init_srv.close()
            ctl_srv.close()
        ctl_sup.setblocking(False)
        log.info("server-start generation=%d pid=%d", self.generation, proc.pid)
        return Server(proc, ctl_sup, self.generation, time.monotonic())

    def _messages(self, server: Server) -> list[str]:
        try:
            chunk = server.ctl.recv(4096)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b""
        if not chunk:
            return []
        server.buf += chunk
        *lines, server.buf = server.buf.split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def _on_message(self, server: Server, message: str) -> None:
        now = time.monotonic()
        if message == "prepared":
            server.state = "prepared"
            if server is self.pending:
                self._stop_current_for_takeover()
        elif message == "pong":
            server.answered = now
        elif message == "serving":
            server.state = "serving"
            server.answered = now
            if not self._ready:
                self._ready = True
                sd_notify(f"READY=1\nSTATUS=serving {self.pool}\nMAINPID={os.getpid()}")
                log.info("serving %s (server pid %d)", self.pool, server.pid)
            elif self._takeover_started is not None:
                log.info(
                    "takeover-done generation=%d pid=%d pause=%.3fs",
                    server.generation,
                    server.pid,
                    now - self._takeover_started,
                )
                self._takeover_started = None
                self._report_takeover("done", f"server generation {server.generation}")
                sd_notify(f"STATUS=serving {self.pool} (server generation {server.generation})")
            else:
                lost = self._lost_at if self._lost_at is not None else server.started
                log.info(
                    "restart-done generation=%d pid=%d spawn_to_serving=%.3fs since_loss=%.3fs",
                    server.generation,
                    server.pid,
                    now - server.started,
                    now - lost,
                )
                self._lost_at = None
                sd_notify(f"STATUS=serving {self.pool} (server generation {server.generation})")

    def _report_takeover(self, result: str, detail: str = "") -> None:
        """Leave the outcome of the last takeover in ROOT/.als.takeover (what ``als-mount
        --takeover`` waits for), written whole through a rename."""
        path = self.pool.parent / TAKEOVER_FILE
        doc = {"time": time.time(), "result": result, "detail": detail, "pid": os.getpid()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}")
        try:
            write_atomic(path, json.dumps(doc).encode() + b"\n", tmp=tmp)
        except OSError as exc:
            log.debug("cannot write %s: %s", path, exc)

    def _stop_current_for_takeover(self) -> None:
        cur = self.current
        if cur is None:
            self._go_pending()
            return
        log.info("takeover: stopping server pid %d", cur.pid)
        self._takeover_started = time.monotonic()
        self._terminate(cur)

    def _terminate(self, server: Server) -> None:
        if server.stop_sent is None:
            server.stop_sent = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                server.proc.send_signal(signal.SIGTERM)

    def _go_pending(self) -> None:
        new = self.pending
        if new is None:
            return
        state = journal.compact(self.journal_fd)
        log.debug("journal: %d nodes, %d instances", len(state.nodes), len(state.instances))
        try:
            new.ctl.sendall(b"go\n")
        except OSError as exc:
            log.error("takeover: cannot reach the new server: %s", exc)
        self.current, self.pending = new, None

    def _reap(self) -> None:
        for server in [s for s in (self.current, self.pending) if s is not None]:
            code = server.proc.poll()
            if code is None:
                continue
            server.ctl.close()
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if server is self.pending:
                self.pending = None
                log.error(
                    "takeover failed: the new server (pid %d) exited with %s before it was "
                    "ready; the running server goes on",
                    server.pid,
                    how,
                )
                self._takeover_started = None
                self._report_takeover(
                    "failed", f"the new server exited with {how} before it was ready (see the log)"
                )
                continue
            self.current = None
            if self._stopping:
                log.info("server pid %d stopped (%s)", server.pid, how)
                continue
            if self.pending is not None and server.stop_sent is not None:
                log.info("takeover: old server pid %d stopped (%s)", server.pid, how)
                self._go_pending()
                continue
            if server.generation == self._first and server.state != "serving":
                raise SystemExit(
                    f"the server exited with {how} before it served (see its log above)"
                )
            now = time.monotonic()
            self._lost_at = now
            # A crash loop (a server that fails before it serves, or fails soon after, again
            # and again) backs off; a server that served and was killed (kill -9, the OOM
            # killer) is replaced at once, however often.
            self._deaths = [t for t in self._deaths if now - t < 60]
            killed = code == -signal.SIGKILL and server.state == "serving"
            if not killed and (server.state != "serving" or now - server.started < QUICK_DEATH):
                self._deaths.append(now)
            delay = 0.0
            if len(self._deaths) > 2:
                delay = min(0.5 * 2 ** (len(self._deaths) - 3), MAX_BACKOFF)
            log.warning(
                "server pid %d (generation %d) died with %s; starting a new one%s",
                server.pid,
                server.generation,
                how,
                f" in {delay:.1f}s" if delay else "",
            )
            self._respawn_at = now + delay

    # -- the loop ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT. The mount must be made (:meth:`mount`)."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handled: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous: dict[int, Callable[..., object] | int | None] = {}
        for sig in handled:
            previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self.current = self.spawn(wait_go=False)
            while self.current is not None or self.pending is not None or not self._stopping:
                self._step(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
        return 0

    def _watch(self, now: float) -> None:
        """Ping the serving server; kill it if it has not answered for ``watchdog`` seconds (a
        hung server holds every container's reads; a new one takes over)."""
        server = self.current
        if not self.watchdog or server is None or server.state != "serving" or server.stop_sent:
            return
        if now - server.answered > self.watchdog:
            log.error(
                "server pid %d has not answered for %.0fs: killing it (a new one takes over)",
                server.pid,
                now - server.answered,
            )
            server.stop_sent = now
            server.proc.kill()
            return
        if now - server.pinged >= min(PING_EVERY, self.watchdog / 3):
            server.pinged = now
            with contextlib.suppress(OSError):
                server.ctl.send(b"ping\n")

    def _step(self, wake_r: int) -> None:
        now = time.monotonic()
        self._watch(now)
        timeout = 1.0 if not self.watchdog else min(1.0, self.watchdog / 3)
        if self._respawn_at is not None:
            timeout = max(0.0, min(timeout, self._respawn_at - now))
        servers = [s for s in (self.current, self.pending) if s is not None]
        fds: list[int | socket.socket] = [wake_r, *(s.ctl for s in servers)]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            readable = []
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        for server in servers:
            if server.ctl in readable:
                for message in self._messages(server):
                    self._on_message(server, message)
        signals, self._signals = self._signals, []
        for signum in signals:
            self._handle_signal(signum)
        self._reap()
        now = time.monotonic()
        if (
            self._respawn_at is not None
            and now >= self._respawn_at
            and self.current is None
            and not self._stopping
        ):
            self._respawn_at = None
            journal.compact(self.journal_fd)  # nobody writes it now: its writer is dead
            self.current = self.spawn(wait_go=False)
        for srv in (self.current, self.pending):
            if (
                srv is not None
                and srv.stop_sent is not None
                and now - srv.stop_sent > self.stop_timeout
                and srv.proc.poll() is None
            ):
                log.warning("server pid %d did not stop in time: killing it", srv.pid)
                srv.proc.kill()

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return
        if signum == signal.SIGHUP:
            if self._stopping:
                return
            if self.pending is not None:
                log.info("takeover already under way (pid %d)", self.pending.pid)
                return
            if self.current is None:
                log.info("takeover asked while no server runs: one is being started")
                return
            log.info("takeover asked: starting a server from the installed code")
            self._report_takeover("started")
            self.pending = self.spawn(wait_go=True)
            return
        log.info("received %s: stopping", signal.Signals(signum).name)
        sd_notify("STOPPING=1")
        self._stopping = True
        self._respawn_at = None
        for server in (self.current, self.pending):
            if server is not None:
                self._terminate(server)


def mount_unavailable(exc: OSError) -> bool:
    """Whether mounting failed for want of privilege (then als-mount serves unsupervised, as
    libfuse and fusermount3 allow) rather than for a real fault."""
    return exc.errno in (errno.EPERM, errno.EACCES)


def main(argv: Sequence[str]) -> int:
    """The lean supervisor (see :meth:`Supervisor.exec_lean`): one JSON argument, its state."""
    from als.logsetup import setup_logging

    state = json.loads(argv[0])
    setup_logging(state["log_level"])
    fds = {str(k): int(v) for k, v in state["fds"].items()}
    pool = Path(state["pool"])
    try:
        sup = Supervisor.from_fds(pool, [str(a) for a in state["argv"]], fds)
    except OSError as exc:
        log.error("cannot take the FUSE connection over: %s", exc)
        with contextlib.suppress(OSError):
            device.unmount(pool)
        return 1
    os.set_inheritable(int(state["lock"]), False)  # held, not handed to servers
    sup.generation, sup._first, sup._stored = state["generation"], state["first"], state["stored"]
    sup.watchdog = float(state.get("watchdog", 0.0))
    try:
        return sup.run()
    finally:
        sup.close()
        log.info("unmounted %s", pool)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
