"""The on-disk cache: content-addressed, shared safely between processes, bounded in size.

Layout under the cache directory (see docs/cache.md)::

    blobs/sha256/<hex>          complete compressed blobs, verified against their digest
    ingest/<hex>/data           a blob being downloaded (sparse), plus
    ingest/<hex>/ranges         the byte ranges of ``data`` that were written (JSON)
    ingest/<hex>/lock           flock held by the one process that writes this download
    chunks/sha256/<ab>/<hex>    decompressed file chunks, named by their chunk digest
    layers/<hex>/layer.json     what a lookup resolved: digests, DiffID, size, references
    layers/<hex>/toc            the blob bytes the TOC was read from (to rebuild the index)
    layers/<hex>/profile.json   the files readers opened first (learned prefetch)
    uses.json                   podman's use counts, per (reference, digest)
    tmp/                        files being written; renamed into place when complete

Every file is written under ``tmp/`` and renamed into place, so no reader ever sees a partial
file. Nothing read back is trusted: chunks are hashed on every read, partial downloads are
verified chunk by chunk when decoded and as a whole before they move to ``blobs/``, and the
TOC is verified against its digest whenever the index is rebuilt.

Everything here is blocking; the store calls it from worker threads behind its ``disk`` limiter.

- :mod:`.disk`: :class:`DiskCache`, the directory, its accounting, eviction and degraded mode;
- :mod:`.ingest`: :class:`Ingest`, one partial download and its ranges record;
- :mod:`.records`: :class:`LayerRecord` and the formats of the other files under ``layers/``
  and of ``uses.json``.
"""

from als.store.cache.disk import DiskCache, EvictReport
from als.store.cache.ingest import Ingest
from als.store.cache.records import LayerRecord

__all__ = ["DiskCache", "EvictReport", "Ingest", "LayerRecord"]
