"""Restoring what a previous server handed the kernel, after a takeover (issue 15).

The namespace journal (:mod:`als.store.fs.journal`) says which store nodes and layer instances
the kernel may still ask about. Image and annotation directories come back at once; each layer
is looked up again (all at once: from the cache records, or from the registry if they were
evicted) and its nodes and tree come back as soon as it resolves. A request waits only for the
layer it concerns (a listing of a directory above the layers, for all of them). A layer that
cannot be looked up leaves its inodes unknown: the kernel gets ENOENT for them, and the log
says why.

No pyfuse3 here: :mod:`als.store.fs.operations` asks :meth:`Restorer.wait` before each request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from als.errors import AlsError
from als.store.fs.journal import JournalState, Key
from als.store.fs.namespace import Namespace, NodeKind, is_layer_inode, layer_key, split_inode
from als.store.layer import Layer

log = logging.getLogger(__name__)

# Requests that look a name up in their directory (the name is their second argument).
_BY_NAME = frozenset({"lookup", "create", "rmdir"})


class Restorer:
    """Built before the server reads its first request, so nothing is answered from a
    namespace that lacks the journal's directories; :meth:`run` then brings the layers back."""

    def __init__(
        self,
        ns: Namespace,
        state: JournalState,
        lookup: Callable[[str, str], Awaitable[Layer]],
    ) -> None:
        self._ns = ns
        self._state = state
        self._lookup = lookup
        self.keys = {k for k in map(layer_key, state.nodes.values()) if k is not None}
        #: Layers still being looked up; empty once everything that could come back has.
        self.pending: dict[Key, trio.Event] = {key: trio.Event() for key in self.keys}
        self._node_keys: dict[int, Key] = {}
        self._children: dict[tuple[int, bytes], int] = {}
        for inode, rec in state.nodes.items():
            self._children[(rec.parent, rec.name)] = inode
            key = layer_key(rec) if rec.kind != NodeKind.ANN else None
            if key is not None:
                self._node_keys[inode] = key
        self._instance_keys: dict[int, Key] = {}
        self._instances: dict[tuple[int, bytes], int] = {}
        for number, irec in state.instances.items():
            self._instances[(irec.owner, irec.name)] = number
            owner = state.nodes.get(irec.owner)
            key = layer_key(owner) if owner is not None else None
            if key is not None:
                self._instance_keys[number] = key
        self.layers: dict[Key, Layer] = {}
        self.counts = list(ns.restore(state, self.layers))  # the directories that need no layer

    async def run(self) -> None:
        """Look every layer up again, restoring each one's nodes and tree as it resolves."""
        started = time.monotonic()

        async def resolve(key: Key) -> None:
            try:
                self.layers[key] = await self._lookup(*key)
            except (AlsError, trio.TooSlowError) as exc:
                log.warning("takeover: layer %s of %s not restored: %s", key[1], key[0], exc)
            finally:
                nodes, instances = self._ns.restore(self._state, self.layers)
                self.counts[0] += nodes
                self.counts[1] += instances
                event = self.pending.pop(key, None)
                if event is not None:
                    event.set()

        try:
            async with trio.open_nursery() as nursery:
                for key in self.keys:
                    nursery.start_soon(resolve, key)
        finally:
            for event in self.pending.values():
                event.set()
            self.pending = {}
        log.info(
            "takeover-restored nodes=%d instances=%d layers=%d/%d in %.3fs",
            self.counts[0],
            self.counts[1],
            len(self.layers),
            len(self.keys),
            time.monotonic() - started,
        )

    async def wait(self, op: str, target: object = None, name: object = None) -> None:
        """Wait until what request ``op`` needs is restored: ``target`` is its inode (or file
        handle, or parent directory), ``name`` the name it looks up there, if any."""
        if not self.pending or not isinstance(target, int):
            return
        if is_layer_inode(target):
            key = self._instance_keys.get(split_inode(target)[0])
        elif target > self._state.max_inode:
            return  # made by this server
        else:
            key = self._node_keys.get(target)
            if key is None and op in _BY_NAME and isinstance(name, bytes):
                # A name in the root, an image or an annotation directory: wait for what the
                # journal has under that name, if anything.
                child = self._children.get((target, name))
                if child is not None:
                    key = self._node_keys.get(child)  # None: a directory, restored at once
                else:
                    number = self._instances.get((target, name))  # rootfs.<ID>
                    key = self._instance_keys.get(number) if number is not None else None
            elif key is None and op == "readdir":
                # Listing a directory above the layers: what is below may be pending.
                for pending in list(self.pending.values()):
                    await pending.wait()
                return
        event = self.pending.get(key) if key is not None else None
        if event is not None:
            await event.wait()
