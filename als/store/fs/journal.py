"""The namespace journal: every store node and layer instance the kernel was told about, so that
a server taking over a live FUSE connection answers for the inodes its predecessor handed out.

Layer tree inodes are computed from an instance number and an index entry, and file handles are
inodes, so the whole of what the kernel may hold is: store nodes (inode, parent, name, what they
show) and instances (number, owner node, name). Both are few (a handful per layer), and each is
written here before the reply that reveals it, one JSON line per change, into a descriptor that
the supervisor keeps (a memfd; see :mod:`als.store.supervisor`). A killed server leaves at worst a
torn last line, which is ignored.

Standard library only; pure apart from the descriptor reads and writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

Key = tuple[str, str]  # (image reference, digest): what a layer is looked up by


@dataclass
class NodeRecord:
    inode: int
    kind: str
    parent: int
    name: bytes
    ref: str = ""
    digest: str = ""
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass
class InstanceRecord:
    number: int
    owner: int
    name: bytes


@dataclass
class JournalState:
    """The live nodes and instances after replaying a journal."""

    nodes: dict[int, NodeRecord] = field(default_factory=dict)
    instances: dict[int, InstanceRecord] = field(default_factory=dict)
    max_inode: int = 0
    max_instance: int = 0
    torn: bool = False  # the last line was cut (a server killed while writing it)

    def records(self) -> Iterable[NodeRecord | InstanceRecord]:
        """Parents before children, so that a replay of these rebuilds the same tree."""
        yield from sorted(self.nodes.values(), key=lambda n: n.inode)
        yield from sorted(self.instances.values(), key=lambda i: i.number)


def _name(value: bytes) -> str:
    return value.decode("latin-1")


def encode_node(rec: NodeRecord) -> bytes:
    doc: dict[str, object] = {
        "n": rec.inode,
        "k": rec.kind,
        "p": rec.parent,
        "name": _name(rec.name),
    }
    if rec.ref:
        doc["ref"] = rec.ref
    if rec.digest:
        doc["digest"] = rec.digest
    if rec.annotations:
        doc["ann"] = [list(a) for a in rec.annotations]
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def encode_instance(rec: InstanceRecord) -> bytes:
    doc = {"i": rec.number, "o": rec.owner, "name": _name(rec.name)}
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def encode_drop(*, inode: int | None = None, instance: int | None = None) -> bytes:
    doc = {"dn": inode} if inode is not None else {"di": instance}
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def replay(data: bytes) -> JournalState:
    """The state a journal's bytes describe. Lines that do not parse are skipped; a last line
    without its newline is a torn write and ends the replay."""
    state = JournalState()
    lines = data.split(b"\n")
    if lines and lines[-1]:
        state.torn = True
    for line in lines[:-1]:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        try:
            _apply(state, doc)
        except (KeyError, TypeError, ValueError):
            continue
    return state


def _apply(state: JournalState, doc: dict[str, object]) -> None:
    if "n" in doc:
        ann = doc.get("ann") or []
        assert isinstance(ann, list)
        rec = NodeRecord(
            inode=int(str(doc["n"])),
            kind=str(doc["k"]),
            parent=int(str(doc["p"])),
            name=str(doc["name"]).encode("latin-1"),
            ref=str(doc.get("ref", "")),
            digest=str(doc.get("digest", "")),
            annotations=tuple((str(k), str(v)) for k, v in ann),
        )
        state.nodes[rec.inode] = rec
        state.max_inode = max(state.max_inode, rec.inode)
    elif "i" in doc:
        inst = InstanceRecord(
            number=int(str(doc["i"])),
            owner=int(str(doc["o"])),
            name=str(doc["name"]).encode("latin-1"),
        )
        state.instances[inst.number] = inst
        state.max_instance = max(state.max_instance, inst.number)
    elif "dn" in doc:
        state.nodes.pop(int(str(doc["dn"])), None)
    elif "di" in doc:
        state.instances.pop(int(str(doc["di"])), None)


def read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def compact(fd: int) -> JournalState:
    """Rewrite the journal as its live records only (call it while no server writes)."""
    state = replay(read_all(fd))
    out = bytearray()
    for rec in state.records():
        out += encode_node(rec) if isinstance(rec, NodeRecord) else encode_instance(rec)
    os.pwrite(fd, bytes(out), 0)
    os.ftruncate(fd, len(out))
    return state


class Journal:
    """The writing end, held by the serving process (one writer at a time)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = os.fstat(fd).st_size
        self.records = 0

    def load(self) -> JournalState:
        """Replay what is there, dropping a torn last line so that appends start clean."""
        data = read_all(self.fd)
        state = replay(data)
        if state.torn:
            self.offset = data.rfind(b"\n") + 1
            os.ftruncate(self.fd, self.offset)
        else:
            self.offset = len(data)
        return state

    def _write(self, line: bytes) -> None:
        os.pwrite(self.fd, line, self.offset)
        self.offset += len(line)
        self.records += 1

    def node(self, rec: NodeRecord) -> None:
        self._write(encode_node(rec))

    def instance(self, rec: InstanceRecord) -> None:
        self._write(encode_instance(rec))

    def drop_node(self, inode: int) -> None:
        self._write(encode_drop(inode=inode))

    def drop_instance(self, number: int) -> None:
        self._write(encode_drop(instance=number))
