"""Converting whole images: platforms, layers, config and manifests, then one write to DEST.

Two phases. First every selected platform's layers are converted (or found in the conversion
records, or kept when already in the target format) and verified by reading them back; the
configs and manifests are rewritten. Nothing has been written to DEST then. Second, the blobs
go to DEST (skipped when it has them, mounted across repositories where it can), then the
manifests, the tagged one last (:meth:`Destination.commit`). Any error before the commit
aborts the destination, so DEST is left as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from als.convert.layer import DEFAULT_MAX_TAR, build, drop_format_members, in_format, read_tar
from als.convert.layer import verify as verify_layer
from als.convert.records import Record, RecordStore, record_key
from als.convert.store import MAX_CONFIG, Destination, Doc, Source, parse_doc
from als.digest import is_digest, sha256_of
from als.errors import AlsError, NotFound, VerifyError
from als.oci import (
    ANN_TOC_DIGEST,
    ANN_UNCOMPRESSED_SIZE,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    ZSTD_CHUNKED_LEGACY_PREFIX,
    ZSTD_CHUNKED_PREFIX,
    format_of_descriptor,
    toc_digest_of,
)

MAX_LAYERS = 500
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Options:
    fmt: str = "estargz"
    platform: str | None = None  # os/arch[/variant], "all", or None for this host's
    chunk_size: int | None = None
    prioritized: Mapping[str, Sequence[str]] = field(default_factory=dict)  # by source digest
    max_layer_size: int = DEFAULT_MAX_TAR


@dataclass
class LayerResult:
    source: str
    source_format: str
    digest: str
    size: int
    diff_id: str
    media_type: str
    annotations: dict[str, str]
    action: str  # converted | recorded | kept
    bytes_in: int = 0
    seconds: float = 0.0
    files_verified: int = 0
    prioritized: int = 0
    write: str = ""  # exists | mounted | uploaded
    mount_from: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_format": self.source_format,
            "digest": self.digest,
            "size": self.size,
            "diff_id": self.diff_id,
            "media_type": self.media_type,
            "toc_digest": toc_digest_of(self.annotations),
            "action": self.action,
            "bytes_in": self.bytes_in,
            "bytes_out": self.size if self.action != "kept" else 0,
            "seconds": round(self.seconds, 3),
            "files_verified": self.files_verified,
            "prioritized": self.prioritized,
            "write": self.write,
        }


@dataclass
class ImageResult:
    platform: str
    manifest: Doc
    config: bytes
    config_digest: str
    layers: list[LayerResult]
    record_keys: list[str | None]


@dataclass
class Result:
    source: str
    destination: str
    digest: str
    media_type: str
    fmt: str
    images: list[ImageResult]
    seconds: float
    written_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "digest": self.digest,
            "media_type": self.media_type,
            "format": self.fmt,
            "seconds": round(self.seconds, 3),
            "written_bytes": self.written_bytes,
            "images": [
                {
                    "platform": im.platform,
                    "manifest_digest": im.manifest.digest,
                    "config_digest": im.config_digest,
                    "layers": [ly.as_json() for ly in im.layers],
                }
                for im in self.images
            ],
        }


def _platform_of(p: Mapping[str, Any]) -> str:
    s = f"{p.get('os', '')}/{p.get('architecture', '')}"
    return s + (f"/{p['variant']}" if p.get("variant") else "")


def select_manifests(
    index: Mapping[str, Any], platform: str | None, what: str
) -> list[dict[str, Any]]:
    """The index entries to convert: every image for ``all``, else the one for ``platform``
    (this host's by default). Entries that are not images (attestations) are left out."""
    from als.registry.manifests import host_platform, parse_platform, select_platform

    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    images = [m for m in entries if (m.get("platform") or {}).get("os") not in (None, "unknown")]
    if platform == "all":
        if not images:
            raise NotFound(f"{what}: the index lists no image for any platform")
        return images
    digest, _plat = select_platform(index, parse_platform(platform or host_platform()), what)
    return [next(m for m in images if m.get("digest") == digest)]


def _format_annotations_removed(ann: Mapping[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in ann.items()
        if k not in (ANN_TOC_DIGEST, ANN_UNCOMPRESSED_SIZE)
        and not k.startswith((ZSTD_CHUNKED_PREFIX, ZSTD_CHUNKED_LEGACY_PREFIX))
    }


class Converter:
    def __init__(
        self,
        src: Source,
        dest: Destination,
        records: RecordStore,
        opts: Options,
        progress: Progress | None = None,
        *,
        dest_registry: tuple[str, str] | None = None,
    ) -> None:
        self.src = src
        self.dest = dest
        self.records = records
        self.opts = opts
        self.progress = progress or (lambda _e: None)
        self.dest_registry = dest_registry  # (host, repository) of a registry destination
        self._pending: dict[str, bytes] = {}  # small blobs (configs) to write

    # ---- phase 1 ---------------------------------------------------------------------------
    def convert(self) -> Result:
        start = time.monotonic()
        top = self.src.top()
        doc = parse_doc(top.body, f"{self.src.name}: manifest")
        mtype = str(doc.get("mediaType") or top.media_type)
        images: list[ImageResult] = []
        if mtype in (OCI_INDEX, DOCKER_LIST) or ("manifests" in doc and "layers" not in doc):
            for entry in select_manifests(doc, self.opts.platform, self.src.name):
                child = self.src.manifest(str(entry.get("digest", "")))
                images.append(self._image(child, _platform_of(entry.get("platform") or {})))
            all_ = self.opts.platform == "all"
            out = self._index(doc, images) if all_ else images[0].manifest
        else:
            if self.opts.platform not in (None, "all"):
                self.progress({"event": "note", "message": "not an index: --platform ignored"})
            images.append(self._image(top, ""))
            out = images[0].manifest
        written = self._write(images, out)
        result = Result(
            self.src.name,
            self.dest.name,
            out.digest,
            out.media_type,
            self.opts.fmt,
            images,
            time.monotonic() - start,
            written,
        )
        return result

    def _index(self, doc: Mapping[str, Any], images: list[ImageResult]) -> Doc:
        manifests = []
        for im in images:
            entry: dict[str, Any] = {
                "mediaType": OCI_MANIFEST,
                "digest": im.manifest.digest,
                "size": len(im.manifest.body),
            }
            os_, arch, *var = im.platform.split("/")
            entry["platform"] = {"architecture": arch, "os": os_}
            if var:
                entry["platform"]["variant"] = var[0]
            manifests.append(entry)
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        if doc.get("annotations"):
            out["annotations"] = doc["annotations"]
        body = json.dumps(out, indent=2).encode()
        return Doc(body, sha256_of(body), OCI_INDEX)

    def _image(self, mdoc: Doc, platform: str) -> ImageResult:
        what = f"{self.src.name} ({mdoc.digest})"
        doc = parse_doc(mdoc.body, f"{what}: manifest")
        mtype = str(doc.get("mediaType") or mdoc.media_type)
        if doc.get("schemaVersion") != 2 or mtype not in (OCI_MANIFEST, DOCKER_MANIFEST, ""):
            raise AlsError(f"{what}: not an OCI or Docker schema 2 image manifest ({mtype!r})")
        cdesc = doc.get("config") or {}
        cfg_digest = str(cdesc.get("digest", ""))
        if not is_digest(cfg_digest):
            raise AlsError(f"{what}: invalid config digest")
        config = self.src.blob(cfg_digest, int(cdesc.get("size", -1)), MAX_CONFIG)
        cfg = parse_doc(config, f"{what}: config")
        if not platform:
            platform = _platform_of(
                {
                    "os": cfg.get("os"),
                    "architecture": cfg.get("architecture"),
                    "variant": cfg.get("variant"),
                }
            )
        descs = doc.get("layers")
        if not isinstance(descs, list) or not all(isinstance(d, dict) for d in descs):
            raise AlsError(f"{what}: manifest without a list of layers")
        if len(descs) > MAX_LAYERS:
            raise AlsError(f"{what}: {len(descs)} layers (at most {MAX_LAYERS})")
        rootfs = cfg.get("rootfs") or {}
        old_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(old_ids, list) or len(old_ids) != len(descs):
            raise AlsError(
                f"{what}: the config lists {len(old_ids or [])} DiffIDs for {len(descs)} layers"
            )
        results: list[LayerResult] = []
        keys: list[str | None] = []
        for i, d in enumerate(descs):
            res, key = self._layer(d, str(old_ids[i]), f"{what} layer {i + 1}/{len(descs)}")
            results.append(res)
            keys.append(key)
            self.progress(
                {
                    "event": "layer",
                    "platform": platform,
                    "index": i + 1,
                    "count": len(descs),
                    **res.as_json(),
                }
            )
        new_ids = [r.diff_id for r in results]
        if new_ids != old_ids:
            rootfs["diff_ids"] = new_ids
            config = json.dumps(cfg, separators=(",", ":")).encode()
        cfg_digest = sha256_of(config)
        self._pending[cfg_digest] = config
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(config)},
            "layers": [],
        }
        for d, r in zip(descs, results, strict=True):
            ann = _format_annotations_removed(
                {str(k): str(v) for k, v in (d.get("annotations") or {}).items()}
            )
            ann.update(r.annotations)
            desc: dict[str, Any] = {"mediaType": r.media_type, "digest": r.digest, "size": r.size}
            if ann:
                desc["annotations"] = ann
            manifest["layers"].append(desc)
        if doc.get("annotations"):
            manifest["annotations"] = doc["annotations"]
        body = json.dumps(manifest, indent=2).encode()
        return ImageResult(
            platform, Doc(body, sha256_of(body), OCI_MANIFEST), config, cfg_digest, results, keys
        )

    def _layer(
        self, d: Mapping[str, Any], old_diff_id: str, what: str
    ) -> tuple[LayerResult, str | None]:
        opts = self.opts
        digest = str(d.get("digest", ""))
        if not is_digest(digest):
            raise AlsError(f"{what}: invalid digest {digest!r}")
        size = int(d.get("size", -1))
        mtype = str(d.get("mediaType", ""))
        ann = {str(k): str(v) for k, v in (d.get("annotations") or {}).items()}
        src_fmt = format_of_descriptor(mtype, ann)
        prioritized = list(opts.prioritized.get(digest, ()))
        t0 = time.monotonic()
        if in_format(mtype, ann, opts.fmt) and not prioritized:
            res = LayerResult(digest, src_fmt, digest, size, old_diff_id, mtype, ann, "kept")
            if self.dest.has_blob(digest):
                return res, None
            blob = self.src.blob(digest, size, opts.max_layer_size)
            toc = toc_digest_of(ann) or ""
            res.files_verified = verify_layer(
                blob, ann, toc_digest=toc, diff_id=old_diff_id, layer=digest
            )
            res.bytes_in = len(blob)
            self.records.save_blob(digest, blob)
            res.seconds = time.monotonic() - t0
            return res, None
        key = record_key(digest, opts.fmt, opts.chunk_size, prioritized)
        rec = self.records.get(key)
        if rec is not None and (
            self.records.has_blob(rec.digest) or self.dest.has_blob(rec.digest)
        ):
            res = LayerResult(
                digest,
                src_fmt,
                rec.digest,
                rec.size,
                rec.diff_id,
                rec.media_type,
                dict(rec.annotations),
                "recorded",
                prioritized=len(prioritized),
            )
            res.mount_from = self._mount_sources(rec.pushed_to)
            res.seconds = time.monotonic() - t0
            return res, key
        blob = self.src.blob(digest, size, opts.max_layer_size)
        tar = read_tar(blob, name=what, limit=opts.max_layer_size)
        if src_fmt in ("estargz", "estargz-zstd", "stargz-legacy"):
            tar = drop_format_members(tar)
        built = build(tar, opts.fmt, chunk_size=opts.chunk_size, prioritized=prioritized)
        del tar
        files = verify_layer(
            built.blob,
            built.annotations,
            toc_digest=built.toc_digest,
            diff_id=built.diff_id,
            layer=f"{what} ({built.digest})",
        )
        self.records.save_blob(built.digest, built.blob)
        self.records.put(
            key,
            Record(
                built.digest,
                built.size,
                built.diff_id,
                built.media_type,
                dict(built.annotations),
                built.format,
                built.toc_digest,
            ),
        )
        res = LayerResult(
            digest,
            src_fmt,
            built.digest,
            built.size,
            built.diff_id,
            built.media_type,
            dict(built.annotations),
            "converted",
            bytes_in=len(blob),
            files_verified=files,
            prioritized=len(prioritized),
        )
        res.seconds = time.monotonic() - t0
        return res, key

    def _mount_sources(self, pushed_to: Sequence[str]) -> tuple[str, ...]:
        if self.dest_registry is None:
            return ()
        host = self.dest_registry[0]
        return tuple(p.partition("/")[2] for p in pushed_to if p.partition("/")[0] == host)

    # ---- phase 2 ---------------------------------------------------------------------------
    def _load(self, digest: str) -> Callable[[], bytes]:
        def load() -> bytes:
            if digest in self._pending:
                return self._pending[digest]
            data = self.records.load_blob(digest)
            if data is None:
                raise VerifyError(f"converted blob {digest} is missing or damaged")
            return data

        return load

    def _write(self, images: list[ImageResult], top: Doc) -> int:
        written = 0
        src_mount: tuple[str, ...] = ()
        if (
            self.src.registry
            and self.dest_registry
            and self.src.registry[0] == self.dest_registry[0]
        ):
            src_mount = (self.src.registry[1],)
        try:
            for im in images:
                for r in im.layers:
                    mount = r.mount_from + (src_mount if r.action == "kept" else ())
                    r.write = self.dest.put_blob(r.digest, self._load(r.digest), mount)
                    written += r.size if r.write == "uploaded" else 0
                    self.progress(
                        {"event": "write", "digest": r.digest, "how": r.write, "size": r.size}
                    )
                how = self.dest.put_blob(im.config_digest, self._load(im.config_digest))
                written += len(im.config) if how == "uploaded" else 0
                if im.manifest is not top:
                    self.dest.put_manifest(im.manifest, top=False)
            self.dest.put_manifest(top, top=True)
            self.dest.commit()
        except BaseException:
            self.dest.abort()
            raise
        if self.dest_registry is not None:
            where = "/".join(self.dest_registry)
            for im in images:
                for key in im.record_keys:
                    rec = self.records.get(key) if key else None
                    if rec is not None and where not in rec.pushed_to:
                        rec.pushed_to = [*rec.pushed_to[-7:], where]
                        self.records.put(key or "", rec)
        return written
