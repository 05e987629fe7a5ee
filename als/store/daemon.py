"""Serve the store: wire the layer manager, the FUSE operations, the control socket and metrics
together, mount at ROOT/.pool, and serve until SIGTERM/SIGINT.

The ``als-mount`` command around this (flags, logging, the root lock, stale mounts) is
:mod:`als.cli.mount`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from als import __version__
from als.paths import SOCKET_NAME
from als.sdnotify import notify as sd_notify
from als.store.config import StoreConfig
from als.store.control import serve_control
from als.store.fs.handoff import Handoff
from als.store.fs.journal import Journal, JournalState
from als.store.fs.operations import Operations
from als.store.fs.underlay import Underlay
from als.store.manager import LayerManager
from als.store.metrics import Metrics
from als.store.ports import Source
from als.store.status import StoreStatus

log = logging.getLogger("als.daemon")


def fuse_options(cfg: StoreConfig) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    # The kernel checks permissions against the layer's modes; root (podman) reads everything.
    opts |= {"fsname=als", "subtype=als", "allow_other", "default_permissions"}
    if cfg.debug_fuse:
        opts.add("debug")
    return opts


def make_source(cfg: StoreConfig) -> Source:
    from als.registry import CredentialStore, RegistriesConf, RegistryClient

    creds = (
        CredentialStore([cfg.authfile]) if cfg.authfile else CredentialStore.from_default_files()
    )
    conf = RegistriesConf.load(cfg.registries_conf)
    return RegistryClient(
        registries_conf=conf,
        credentials=creds,
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        auth_realm_hosts=cfg.auth_realm_hosts,
        # One gap for both: the store coalesces chunk ranges with it, and the client then merges
        # nothing further unless a caller hands it ranges of its own.
        coalesce_gap=cfg.coalesce_gap,
    )


async def answer_pings(ctl_fd: int) -> None:
    """Answer the supervisor's pings (its watchdog) for as long as the event loop runs."""
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(ctl_fd)))
    with sock:
        while True:
            data = await sock.recv(64)
            if not data:
                return  # the supervisor is gone (our parent-death signal follows)
            for _ in range(data.count(b"ping")):
                await sock.send(b"pong\n")


async def serve(
    cfg: StoreConfig,
    source: Source,
    *,
    handle_signals: bool = True,
    handoff: Handoff | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount and serve until SIGTERM/SIGINT (or ``pyfuse3.terminate()``), then unmount.

    With a ``handoff`` the mount is the supervisor's (:mod:`als.store.supervisor`): serve the
    connection it hands over, restore what a previous server told the kernel, and leave the
    mount in place at the end.
    """
    manager = LayerManager(source, cfg)
    ops: Operations | None = None

    def status() -> StoreStatus:
        doc = manager.status()
        if ops is not None:
            doc["fuse_requests"] = dict(ops.requests)
            doc["zero_message_open"] = ops.zero_open
        if handoff is not None:
            doc["server"] = {"generation": handoff.generation, "supervisor_pid": os.getppid()}
        return doc

    metrics = manager.metrics = Metrics(status)
    # The cache (layer records, use counts) is open before the mount appears, so that podman's
    # existing links into the pool work from the first lookup after a restart.
    # The walk counting the cache's bytes waits until we serve (a restarting server must be
    # back in well under 2 s, whatever the cache holds).
    await manager.open(scan_later=True)
    # The pool directory beneath the mount keeps native layers reachable when we are gone.
    underlay = Underlay(handoff.underlay_fd) if handoff else Underlay.open(cfg.pool)
    ready = {os.fsdecode(t.tree) for t in manager.native.trees.values()}
    removed = await manager.scheduler.disk_call(lambda: underlay.reconcile(ready))
    if removed:
        log.info("underlay-withdraw paths=%d (their trees are gone)", removed)
    journal: Journal | None = None
    state = JournalState()
    on_init = None
    if handoff is not None:
        journal = Journal(handoff.journal_fd)
        state = journal.load()
        token = trio.lowlevel.current_trio_token()

        def on_init() -> None:
            handoff.take_over(token.run_sync_soon)

    ops = Operations(cfg, manager, underlay, journal=journal, on_init=on_init)
    restorer = ops.begin_restore(state) if state.nodes or state.instances else None
    pyfuse3.init(ops, handoff.mountpoint if handoff else str(cfg.pool), fuse_options(cfg))
    clean = False
    try:
        async with trio.open_nursery() as nursery:

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as recv:
                    async for signum in recv:
                        log.info(
                            "received %s: %s",
                            signal.Signals(signum).name,
                            "unmounting" if handoff is None else "stopping (the mount stays)",
                        )
                        pyfuse3.terminate()
                        return

            if handle_signals:
                nursery.start_soon(signals)
            if restorer is not None:
                nursery.start_soon(restorer.run)
            if handoff is not None:
                nursery.start_soon(answer_pings, handoff.ctl_fd)
            await nursery.start(manager.run)
            await nursery.start(
                functools.partial(
                    serve_control,
                    status,
                    metrics,
                    socket_path=Path(cfg.status_socket or cfg.root / SOCKET_NAME),
                    listen=cfg.metrics_listen,
                )
            )
            if handoff is None:
                log.info("als %s serving %s", __version__, cfg.pool)
                sd_notify("READY=1\nSTATUS=serving " + str(cfg.pool))
            else:
                log.info(
                    "als %s serving %s (server generation %d)",
                    __version__,
                    cfg.pool,
                    handoff.generation,
                )
            if ops.zero_open:
                log.info("zero-message open: the kernel opens files and directories itself")
            elif cfg.zero_message_open:
                log.info(
                    "zero-message open unavailable: it needs the pyfuse3 of "
                    "scripts/build-pyfuse3 and Linux 5.1 or later; every open and opendir "
                    "reaches the store"
                )
            task_status.started(ops)
            await pyfuse3.main()
            clean = True
            with trio.move_on_after(10):
                await manager.flush()
            nursery.cancel_scope.cancel()
    finally:
        if handoff is None:
            sd_notify("STOPPING=1")
        # A supervisor's mount stays: the connection outlives this process.
        pyfuse3.close(unmount=handoff is None)
        manager.close()
        underlay.close()
        if not clean:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await manager.flush()
        if handoff is None:
            log.info("unmounted %s%s", cfg.pool, "" if clean else " after an error")
        else:
            log.info("stopped serving %s%s", cfg.pool, "" if clean else " after an error")
