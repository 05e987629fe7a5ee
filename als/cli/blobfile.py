"""A local layer blob for ``als inspect BLOB`` and ``als extract``: reading it, and the
annotations file that may come with it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from als.errors import ConfigError, FormatError
from als.formats.model import ReadRanges


@contextmanager
def open_blob(path: str) -> Iterator[tuple[ReadRanges, int, list[int]]]:
    """A ReadRanges over a local file (pread), its size, and a one-item read-call counter."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"cannot open {path}: {exc.strerror}") from None
    calls = [0]
    try:
        size = os.fstat(fd).st_size

        def read(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            calls[0] += 1
            out = []
            for off, n in ranges:
                if off < 0 or n < 0 or off + n > size:
                    raise FormatError(f"{path}: read [{off}, +{n}) outside the blob ({size} B)")
                b = os.pread(fd, n, off)
                if len(b) != n:
                    raise FormatError(f"{path}: short read at offset {off}")
                out.append(b)
            return out

        yield read, size, calls
    finally:
        os.close(fd)


def load_annotations(path: str | None) -> dict[str, str] | None:
    """A JSON object of annotations, or an OCI descriptor holding one under "annotations"."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read annotations file {path}: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), dict):
        doc = doc["annotations"]
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in doc.items()
    ):
        raise ConfigError(f"annotations file {path}: want a JSON object of strings")
    return doc
