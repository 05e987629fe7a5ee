"""``als-mount ROOT``: mount the store at ROOT/.pool and serve until SIGTERM/SIGINT.

The process around :func:`als.store.daemon.serve`: the flags and the config they override,
logging (journald priorities under systemd), one instance per root (a lock file), the cleanup of
a mount a crashed instance left behind, and malloc tuning. Run it as ``python -m als.cli.mount``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import faulthandler
import fcntl
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from als import __version__
from als.errors import AlsError
from als.libc import function
from als.logsetup import setup_logging
from als.paths import DEFAULT_ROOT, POOL_NAME
from als.store.config import StoreConfig
from als.store.fs.device import DeviceError
from als.store.fs.handoff import Handoff
from als.store.supervisor import (
    TAKEOVER_FILE,
    Supervisor,
    mount_unavailable,
    set_parent_death_signal,
)

# The daemon's logger (as in als.store.daemon): the name is part of every log line.
log = logging.getLogger("als.daemon")


def in_mountinfo(path: Path) -> bool:
    """Whether ``path`` is a mount point in this mount namespace (without touching it)."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                    return True
    except OSError:
        pass
    return False


def is_mountpoint(path: Path) -> bool:
    """True if ``path`` is a mount point (in mountinfo, or a dead FUSE mount)."""
    if in_mountinfo(path.resolve()):
        return True
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def cleanup_stale_mount(pool: Path) -> bool:
    """Unmount what a crashed instance left at ``pool`` (we hold the lock: it is stale)."""
    if not is_mountpoint(pool):
        return False
    log.warning("unmounting a stale mount left at %s", pool)
    for cmd in (["fusermount3", "-u", "-z", str(pool)], ["umount", "-l", str(pool)]):
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
            return True
        except (OSError, subprocess.SubprocessError):
            continue
    raise AlsError(f"cannot unmount the stale mount at {pool}; run: umount -l {pool}")


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[int]:
    """One als-mount per ROOT: an exclusive flock on ROOT/.als.lock, with our pid in it."""
    path = root / ".als.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlsError(
                f"another als-mount (pid {other}) is already serving {root}; stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="als-mount",
        description=f"Mount the als additional layer store at ROOT/{POOL_NAME} (foreground).",
    )
    p.add_argument("root", help=f"store root, e.g. {DEFAULT_ROOT} (created if needed)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (all options have defaults)")
    p.add_argument("--registries-conf", metavar="FILE", help="registries.conf (v2) to use")
    p.add_argument("--authfile", metavar="FILE", help="registry credentials (auth.json)")
    p.add_argument("--platform", help="os/arch[/variant] for multi-platform images")
    p.add_argument("--lookup-timeout", type=float, help="seconds before a lookup answers ENOENT")
    p.add_argument("--read-timeout", type=float, help="seconds before a read answers EIO")
    p.add_argument("--memory-cache-mb", type=int, help="memory for decompressed chunks")
    p.add_argument("--cache-dir", metavar="DIR", help="disk cache (default ROOT/cache)")
    p.add_argument("--cache-limit-mb", type=int, help="disk cache size limit (0: none)")
    p.add_argument(
        "--background-fetch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="download whole layers in the background after start-up (default: on)",
    )
    p.add_argument(
        "--native-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="unpack complete layers into the cache for overlay to read directly (default: on)",
    )
    p.add_argument(
        "--supervise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the FUSE connection in a supervisor process, so that a crashed or upgraded "
        "server is replaced without breaking running containers (default: on)",
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="ask the als-mount serving ROOT to hand over to a server started from the "
        "installed code (an upgrade without downtime), wait until it serves, and exit",
    )
    p.add_argument("--metrics-listen", metavar="ADDR", help="serve /metrics on HOST:PORT too")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--debug-fuse", action="store_true", default=None, help="libfuse debug output")
    p.add_argument("--version", action="version", version=f"als-mount {__version__}")
    return p


def load_config(args: argparse.Namespace) -> StoreConfig:
    """The ``--config`` file (or the defaults), overridden by every flag that was given.

    Each flag of :func:`build_parser` stores to the name of the :class:`StoreConfig` option it
    sets, so the flags are passed on by name, in the options' order, not copied one by one.
    """
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(StoreConfig)
        if hasattr(args, f.name)
    }
    return StoreConfig.load(args.config, overrides)


def tune_malloc() -> None:
    """Keep the daemon's RSS close to what it holds.

    Chunks are short-lived buffers of up to a few MiB, allocated from several worker threads.
    With glibc's defaults each thread may get its own arena, and the threshold above which a
    buffer is mmap()ed (and given back to the system when freed) rises after the first large
    free, so freed chunk buffers stay in the heap. A fixed threshold and two arenas keep the
    RSS near the live data. No-op where mallopt is missing (not glibc).
    """
    mallopt = function("mallopt")
    if mallopt is None:
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 256 * 1024)
    mallopt(m_arena_max, 2)


def takeover(root: Path, timeout: float = 120.0) -> int:
    """``--takeover``: SIGHUP to the supervisor of ``root``, then wait for the new server."""
    from als.cli.status import StatusError, fetch_status

    try:
        before = fetch_status(root).get("server")
        pid = int((root / ".als.lock").read_text().split()[0])
    except (StatusError, OSError, ValueError, IndexError) as exc:
        print(f"als-mount: error: no running store at {root}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(before, dict):
        print(
            f"als-mount: error: the store at {root} runs without a supervisor "
            "(--no-supervise): restart it instead",
            file=sys.stderr,
        )
        return 1
    asked = time.time()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        failure = _takeover_failure(root, asked)
        if failure:
            print(f"als-mount: error: takeover failed: {failure}", file=sys.stderr)
            return 1
        try:
            server = fetch_status(root).get("server")
        except StatusError:
            continue  # between the old server's socket and the new one's
        if isinstance(server, dict) and server.get("generation", 0) > before["generation"]:
            print(f"als-mount: {root}: now served by server generation {server['generation']}")
            return 0
    print(f"als-mount: error: no new server at {root} after {timeout:.0f}s", file=sys.stderr)
    return 1


def _takeover_failure(root: Path, since: float) -> str | None:
    """Why the supervisor's last takeover failed, if it failed after ``since``."""
    try:
        doc = json.loads((root / TAKEOVER_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and doc.get("result") == "failed" and doc.get("time", 0) >= since:
        return str(doc.get("detail") or "see the store's log")
    return None


def serve_handoff(cfg: StoreConfig, handoff: Handoff) -> int:
    """A server started by the supervisor: serve the connection it hands over."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    set_parent_death_signal(signal.SIGTERM)  # the connection dies with the supervisor anyway
    import trio

    from als.store.daemon import make_source, serve

    try:
        source = make_source(cfg)
        if handoff.wait_go:
            handoff.wait_for_go()
        trio.run(functools.partial(serve, cfg, source, handoff=handoff))
    except (AlsError, OSError) as exc:
        log.error("cannot serve %s: %s", cfg.root, exc)
        return 1
    return 0


def supervise(cfg: StoreConfig, argv: Sequence[str], lock_fd: int) -> int | None:
    """Mount and run servers under a supervisor; None if this host does not let us mount
    ourselves (then the caller serves unsupervised, through libfuse).

    Under systemd, a connection the previous supervisor left in the unit's file descriptor
    store is taken over instead of mounting anew.
    """
    sup = Supervisor.adopt(cfg.pool, list(argv), os.environ, in_mountinfo)
    if sup is None:
        cleanup_stale_mount(cfg.pool)  # before touching .pool: a dead mount fails every call
        cfg.pool.mkdir(exist_ok=True)
        sup = Supervisor(cfg.pool, list(argv))
        try:
            sup.mount()
        except DeviceError as exc:
            sup.close()
            if mount_unavailable(exc):
                log.warning(
                    "%s; serving without a supervisor: running containers will not survive a "
                    "restart of als-mount",
                    exc,
                )
                return None
            raise
        sup.store_fds()
    # The supervisor lives as long as the mount: it goes on in a fresh interpreter that loads
    # only what it needs (about 7 MB less than this process, which parsed flags and config).
    sup.watchdog = cfg.watchdog_s
    sup.exec_lean(lock_fd, cfg.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    tune_malloc()
    try:
        cfg = load_config(args)
    except AlsError as exc:
        print(f"als-mount: error: {exc}", file=sys.stderr)
        return 2
    cfg.root = cfg.root.absolute()
    if args.takeover:
        return takeover(cfg.root)
    setup_logging(cfg.log_level)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    handoff = Handoff.from_env(os.environ)
    if handoff is not None:
        return serve_handoff(cfg, handoff)
    try:
        cfg.root.mkdir(parents=True, exist_ok=True)
        with root_lock(cfg.root) as lock_fd:
            if args.supervise:
                code = supervise(cfg, argv, lock_fd)
                if code is not None:
                    return code
            cleanup_stale_mount(cfg.pool)  # before touching .pool: a dead mount fails every call
            cfg.pool.mkdir(exist_ok=True)
            import trio

            from als.store.daemon import make_source, serve

            source = make_source(cfg)
            trio.run(serve, cfg, source)
    except AlsError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot serve %s: %s", cfg.root, exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
