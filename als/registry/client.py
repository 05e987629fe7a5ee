"""A synchronous, thread-safe OCI distribution client: resolve images, fetch blob byte ranges.

The store calls it from trio worker threads; every call takes an optional ``deadline`` (an
absolute ``time.monotonic()`` value) that bounds the call, retries included. The HTTP exchanges
themselves (sessions, TLS, the address guard, per-exchange deadlines) are the transport's
(``als.registry.transport``), getting authorized is ``als.registry.authflow``'s, and reading
manifests and configs is ``als.registry.manifests``'s. This module holds the registry protocol
on top: redirects, retries, mirror fan-out, ranges and multipart answers, whole-blob streams.

Failure policy: connection resets, timeouts, truncated bodies, 429 and 5xx are retried with
exponential backoff and jitter (``Retry-After`` honoured) until the deadline. A digest or length
mismatch is an error, never data. 404/401/403 for a blob fall back to other endpoints (mirrors,
then the primary) and to other repositories of the same registry where the digest was seen.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from als import __version__
from als.errors import AuthError, NotFound, RegistryError, VerifyError
from als.registry.auth import (
    DEFAULT_AUTH_REALM_HOSTS,
    CredentialStore,
    RealmPolicy,
    parse_realm_policy,
    parse_www_authenticate,
)
from als.registry.authflow import AuthFlow
from als.registry.config import Endpoint, RegistriesConf
from als.registry.manifests import (
    MANIFEST_ACCEPT,
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Platform,
    check_blob,
    check_image_manifest,
    config_descriptor,
    config_platform,
    host_platform,
    is_index,
    layer_descriptors,
    manifest_digest,
    media_type,
    parse_json,
    parse_platform,
    select_platform,
)
from als.registry.ranges import (
    RangeParseError,
    Region,
    coalesce,
    collect_regions,
    extract,
    parse_content_range,
    partial_content_parts,
    range_header,
)
from als.registry.reference import ImageRef, parse_reference, validate_digest
from als.registry.transport import (
    BODY_ERRORS,
    REDIRECT_STATUSES,
    TRANSIENT_STATUSES,
    Response,
    Transient,
    Transport,
    retry_after,
)
from als.registry.types import ClientStats, ResolvedImage

__all__ = ["RegistryClient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REDIRECTS = 5


class _MultiRangeRefused(Exception):
    """A registry answered a multi-range request with 400: ask for one range at a time."""


class RegistryClient:
    def __init__(
        self,
        *,
        registries_conf: RegistriesConf | None = None,
        credentials: CredentialStore | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_retry_time: float = 60,
        user_agent: str = f"als/{__version__}",
        coalesce_gap: int = 16 << 10,
        max_ranges_per_request: int = 32,
        max_bytes_per_request: int = 64 << 20,
        multirange: bool = True,
        backoff_base: float = 0.25,
        backoff_cap: float = 10.0,
        redirect_ttl: float = 120.0,
        mirror_down_time: float = 30.0,
        auth_realm_hosts: str | RealmPolicy = DEFAULT_AUTH_REALM_HOSTS,
    ) -> None:
        self.conf = registries_conf if registries_conf is not None else RegistriesConf()
        self.credentials = credentials if credentials is not None else CredentialStore()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_retry_time = max_retry_time
        self.user_agent = user_agent
        self.coalesce_gap = coalesce_gap
        self.max_ranges_per_request = max(1, max_ranges_per_request)
        self.max_bytes_per_request = max_bytes_per_request
        self.multirange = multirange
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.redirect_ttl = redirect_ttl
        self.mirror_down_time = mirror_down_time
        self.realm_policy = (
            parse_realm_policy(auth_realm_hosts)
            if isinstance(auth_realm_hosts, str)
            else auth_realm_hosts
        )
        self.stats = ClientStats()
        self._lock = threading.Lock()
        self._redirects: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._seen: dict[tuple[str, str], list[str]] = {}
        self.transport = Transport(
            self.conf,
            self.stats,
            user_agent=user_agent,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self.auth = AuthFlow(self.transport, self.credentials, self.realm_policy)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- core request with auth + redirects ------------------------------------------------
    def _request(
        self,
        ep_host: str,
        repo: str,
        method: str,
        path: str,
        *,
        deadline: float,
        headers: Mapping[str, str] | None = None,
        actions: str = "pull",
        insecure: bool = False,
        stream: bool = False,
        data: bytes | None = None,
        redirect_key: tuple[str, str, str] | None = None,
        watch: bool = True,
    ) -> Response:
        st = self.auth.ping(ep_host, insecure, deadline)
        url = f"{st.scheme}://{ep_host}{path}"
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        auth = self.auth.header(ep_host, repo, actions, deadline)
        if auth:
            hdrs["Authorization"] = auth
        resp = self.transport.send(
            method, url, headers=hdrs, deadline=deadline, stream=stream, data=data, watch=watch
        )
        if resp.status_code == 401:
            chs = parse_www_authenticate(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            if chs:
                ch = next((c for c in chs if c.scheme == "bearer"), chs[0])
                self.auth.set_challenge(st, ch)
            auth = self.auth.header(ep_host, repo, actions, deadline, refresh=True)
            if auth:
                hdrs["Authorization"] = auth
            resp = self.transport.send(
                method, url, headers=hdrs, deadline=deadline, stream=stream, data=data, watch=watch
            )
        hops = 0
        origin = urlsplit(url)
        while resp.status_code in REDIRECT_STATUSES and "Location" in resp.headers:
            hops += 1
            if hops > MAX_REDIRECTS:
                resp.close()
                raise RegistryError(
                    f"{method} {ep_host}{path}: more than {MAX_REDIRECTS} "
                    f"redirects (a loop?), last to {urlsplit(url).netloc}"
                )
            new = urljoin(url, resp.headers["Location"])
            resp.close()
            target = urlsplit(new)
            if target.scheme not in ("http", "https"):
                raise RegistryError(
                    f"{method} {ep_host}{path}: refusing a redirect to a "
                    f"{target.scheme or 'schemeless'}: URL (only http and https "
                    f"are followed)"
                )
            try:
                self.transport.check_address(new)
            except RegistryError as exc:
                raise RegistryError(f"{method} {ep_host}{path}: redirected, {exc}") from None
            if (target.scheme, target.netloc) != (origin.scheme, origin.netloc):
                hdrs.pop("Authorization", None)  # never send registry credentials elsewhere
            if resp.status_code == 303:
                method, data = ("HEAD" if method == "HEAD" else "GET"), None
            url = new
            resp = self.transport.send(
                method, url, headers=hdrs, deadline=deadline, stream=stream, data=data, watch=watch
            )
        if hops and redirect_key is not None and resp.status_code in (200, 206):
            with self._lock:
                self._redirects[redirect_key] = (url, time.monotonic() + self.redirect_ttl)
        return resp

    def _check_status(self, resp: Response, what: str, host: str) -> None:
        """Raise for failure statuses (closing ``resp``); return for 2xx."""
        code = resp.status_code
        if 200 <= code < 300:
            return
        resp.close()
        if code in TRANSIENT_STATUSES:
            raise Transient(f"{what}: HTTP {code} from {host}", retry_after(resp), host)
        if code == 404:
            raise NotFound(f"{what}: not found on {host}")
        if code in (401, 403):
            raise AuthError(f"{what}: access denied by {host} (HTTP {code})")
        if code == 416:
            raise RegistryError(f"{what}: range not satisfiable (HTTP 416 from {host})")
        raise RegistryError(f"{what}: unexpected HTTP {code} from {host}")

    # ---- retry loop ------------------------------------------------------------------------
    def _deadline(self, deadline: float | None) -> float:
        own = time.monotonic() + self.max_retry_time
        return own if deadline is None else min(deadline, own)

    def _retrying(self, what: str, deadline: float, fn: Callable[[], T]) -> T:
        attempt = 0
        start = time.monotonic()
        while True:
            try:
                return fn()
            except Transient as exc:
                attempt += 1
                now = time.monotonic()
                delay = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                if now + delay >= deadline:
                    raise RegistryError(
                        f"{what}: giving up after {attempt} attempt(s) in {now - start:.1f}s: {exc}"
                    ) from None
                level = logging.INFO if attempt < 3 else logging.WARNING
                log.log(level, "%s: %s; retry %d in %.2fs", what, exc, attempt, delay)
                self.stats.add(retries=1)
                time.sleep(delay)

    def _over_sources(
        self, what: str, sources: Sequence[tuple[Endpoint, str]], fn: Callable[[Endpoint, str], T]
    ) -> T:
        """Try ``fn`` on each (endpoint, repository) in order; one pass, no sleeping.

        Non-transient failures (404, denied, bad digest) move on to the next source; if every
        source fails and at least one failure was transient, the whole pass is retried.
        """
        transient: Transient | None = None
        errors: list[Exception] = []
        now = time.monotonic()
        for i, (ep, repo) in enumerate(sources):
            last = i == len(sources) - 1
            st = self.auth.host_state(ep.host)
            if st.down_until > now and not last and ep.mirror:
                continue
            try:
                result = fn(ep, repo)
            except Transient as exc:
                transient = exc
                if ep.mirror and not last:
                    with self._lock:
                        st.down_until = time.monotonic() + self.mirror_down_time
                    log.info("%s: mirror %s failed (%s); trying the next source", what, ep, exc)
                    self.stats.add(fallbacks=1)
                continue
            except (NotFound, RegistryError, VerifyError) as exc:
                errors.append(exc)
                if not last:
                    log.info(
                        "%s: %s failed (%s); trying the next source", what, f"{ep.host}/{repo}", exc
                    )
                    self.stats.add(fallbacks=1)
                continue
            if i:
                log.info("%s: served by %s/%s", what, ep.host, repo)
            return result
        if transient is not None:
            raise transient
        for cls in (VerifyError, AuthError, NotFound):
            for e in errors:
                if isinstance(e, cls):
                    raise e
        if errors:
            raise errors[-1]
        raise RegistryError(f"{what}: no source to try")

    # ---- digests seen -----------------------------------------------------------------------
    def _record_seen(self, host: str, repo: str, digest: str) -> None:
        with self._lock:
            repos = self._seen.setdefault((host, digest), [])
            if repo not in repos:
                repos.append(repo)

    def seen_in(self, digest: str) -> list[str]:
        """``host/repo`` locations where ``digest`` has been found (for diagnostics)."""
        with self._lock:
            return [
                f"{h}/{r}" for (h, d), repos in self._seen.items() if d == digest for r in repos
            ]

    def _blob_sources(self, ref: ImageRef, digest: str) -> list[tuple[Endpoint, str]]:
        out: list[tuple[Endpoint, str]] = []
        for ep in self.conf.endpoints(ref.with_digest(digest)):
            out.append((ep, ep.repository))
            with self._lock:
                others = list(self._seen.get((ep.host, digest), ()))
            out.extend((ep, r) for r in others if r != ep.repository)
        return out

    @staticmethod
    def _ref(ref: ImageRef | str) -> ImageRef:
        return parse_reference(ref) if isinstance(ref, str) else ref

    # ---- resolve ---------------------------------------------------------------------------
    def resolve(
        self, ref: ImageRef | str, *, platform: str | None = None, deadline: float | None = None
    ) -> ResolvedImage:
        r = self._ref(ref)
        want = parse_platform(platform or host_platform())
        dl = self._deadline(deadline)
        sources = [(ep, ep.repository) for ep in self.conf.endpoints(r)]
        what = f"resolving {r}"
        return self._retrying(
            what,
            dl,
            lambda: self._over_sources(
                what, sources, lambda ep, repo: self._resolve_at(r, ep, want, dl)
            ),
        )

    def manifest(
        self, ref: ImageRef | str, *, deadline: float | None = None
    ) -> tuple[bytes, str, str]:
        """The manifest (or index) ``ref`` names, as stored: ``(body, digest, media type)``.

        No platform is selected; the body is checked against the digest asked for (or the
        registry's ``Docker-Content-Digest``) and is at most ``MAX_MANIFEST_SIZE`` bytes."""
        r = self._ref(ref)
        dl = self._deadline(deadline)
        reference = r.digest or r.tag or "latest"
        sources = [(ep, ep.repository) for ep in self.conf.endpoints(r)]
        what = f"manifest of {r}"

        def get(ep: Endpoint, repo: str) -> tuple[bytes, str, str]:
            body, digest, ctype = self._get_manifest(ep, reference, dl)
            mtype = media_type(parse_json(body, f"manifest {ep}:{reference}"), ctype)
            return body, digest, mtype

        return self._retrying(what, dl, lambda: self._over_sources(what, sources, get))

    def fetch_blob(
        self, ref: ImageRef | str, digest: str, *, size: int = -1, max_size: int | None = None
    ) -> bytes:
        """The whole blob ``digest``, verified against its digest (and ``size`` when >= 0).

        A blob larger than ``max_size`` (or than ``size`` when given) is refused as soon as
        that many bytes have arrived."""
        limit = size if size >= 0 else max_size
        what = f"blob {digest} of {self._ref(ref)}"
        buf = bytearray()
        for piece in self.open_blob(ref, digest):
            buf += piece
            if limit is not None and len(buf) > limit:
                raise VerifyError(f"{what}: more than {limit} bytes")
        data = bytes(buf)
        check_blob(data, digest, size, what)
        return data

    def _get_manifest(
        self, ep: Endpoint, reference: str, deadline: float
    ) -> tuple[bytes, str, str]:
        what = (
            f"manifest {ep}:{reference}"
            if not reference.startswith("sha256:")
            else f"manifest {ep}@{reference}"
        )
        resp = self._request(
            ep.host,
            ep.repository,
            "GET",
            f"/v2/{ep.repository}/manifests/{reference}",
            deadline=deadline,
            headers={"Accept": MANIFEST_ACCEPT},
            insecure=ep.insecure,
            stream=True,
        )
        self._check_status(resp, what, ep.host)
        with resp:
            body = self.transport.read_all(resp, MAX_MANIFEST_SIZE, deadline, what)
            digest = manifest_digest(
                body, reference, resp.headers.get("Docker-Content-Digest"), what
            )
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return body, digest, ctype

    def _resolve_at(
        self, ref: ImageRef, ep: Endpoint, want: Platform, deadline: float
    ) -> ResolvedImage:
        reference = ref.digest or ref.tag or "latest"
        body, digest, ctype = self._get_manifest(ep, reference, deadline)
        doc = parse_json(body, f"manifest {ep}:{reference}")
        mtype = media_type(doc, ctype)
        index_digest = None
        plat: str | None = None
        if is_index(doc, mtype):
            index_digest = digest
            child, plat = select_platform(doc, want, f"{ref} ({digest})")
            body, digest, ctype = self._get_manifest(ep, child, deadline)
            doc = parse_json(body, f"manifest {ep}@{child}")
            mtype = media_type(doc, ctype)
        check_image_manifest(doc, mtype, ref)
        cfg_digest, cfg_size = config_descriptor(doc)
        config = self._get_small_blob(ep, cfg_digest, cfg_size, deadline)
        cfg = parse_json(config, f"config {cfg_digest} of {ref}")
        if plat is None:
            plat = config_platform(cfg)
        layers = layer_descriptors(doc, cfg)
        for d in [cfg_digest, *(layer.digest for layer in layers)]:
            self._record_seen(ep.host, ep.repository, d)
        return ResolvedImage(
            ref=ref,
            manifest_digest=digest,
            manifest=body,
            config=config,
            platform=plat,
            layers=layers,
            config_digest=cfg_digest,
            source=str(ep),
            index_digest=index_digest,
        )

    def _get_small_blob(self, ep: Endpoint, digest: str, size: int, deadline: float) -> bytes:
        what = f"blob {digest} in {ep}"
        resp = self._request(
            ep.host,
            ep.repository,
            "GET",
            f"/v2/{ep.repository}/blobs/{digest}",
            deadline=deadline,
            insecure=ep.insecure,
            stream=True,
        )
        self._check_status(resp, what, ep.host)
        with resp:
            data = self.transport.read_all(resp, MAX_CONFIG_SIZE, deadline, what)
        check_blob(data, digest, size, what)
        return data

    # ---- blobs -----------------------------------------------------------------------------
    def blob_size(self, ref: ImageRef | str, digest: str, *, deadline: float | None = None) -> int:
        r = self._ref(ref)
        validate_digest(digest)
        dl = self._deadline(deadline)
        what = f"HEAD blob {digest} of {r}"

        def head(ep: Endpoint, repo: str) -> int:
            resp = self._request(
                ep.host,
                repo,
                "HEAD",
                f"/v2/{repo}/blobs/{digest}",
                deadline=dl,
                insecure=ep.insecure,
            )
            self._check_status(resp, what, ep.host)
            resp.close()
            cl = resp.headers.get("Content-Length", "")
            if not cl.isdigit():
                raise RegistryError(f"{what}: no Content-Length from {ep.host}")
            self._record_seen(ep.host, repo, digest)
            return int(cl)

        return self._retrying(
            what, dl, lambda: self._over_sources(what, self._blob_sources(r, digest), head)
        )

    def fetch_ranges(
        self,
        ref: ImageRef | str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        deadline: float | None = None,
    ) -> list[bytes]:
        """The bytes of each ``(offset, length)`` of blob ``digest``, in order.

        Nearby ranges are coalesced, several ranges go into one multi-range request where the
        registry supports it. The bytes are not verified here (the format layer checks chunk
        digests); lengths and offsets are.
        """
        r = self._ref(ref)
        validate_digest(digest)
        for off, n in ranges:
            if off < 0 or n < 0:
                raise ValueError(f"invalid range ({off}, {n})")
        regions = coalesce(
            ranges, max_gap=self.coalesce_gap, max_size=max(self.max_bytes_per_request, 1)
        )
        if not regions:
            return [b"" for _ in ranges]
        dl = self._deadline(deadline)
        got: dict[Region, bytes] = {}
        what = f"GET blob {digest} of {r}"
        sources = self._blob_sources(r, digest)
        pending = list(regions)
        while pending:
            batch = self._next_batch(pending, sources)
            pending = pending[len(batch) :]
            got.update(self._fetch_with_retries(what, dl, sources, digest, batch))
        out = []
        for off, n in ranges:
            if n == 0:
                out.append(b"")
                continue
            region = next(g for g in got if g.start <= off and off + n <= g.end)
            data = got[region]
            out.append(data[off - region.start : off - region.start + n])
        return out

    def _fetch_with_retries(
        self,
        what: str,
        dl: float,
        sources: Sequence[tuple[Endpoint, str]],
        digest: str,
        batch: Sequence[Region],
    ) -> dict[Region, bytes]:
        def one(ep: Endpoint, repo: str) -> dict[Region, bytes]:
            return self._fetch_batch(ep, repo, digest, batch, dl, what)

        return self._retrying(what, dl, lambda: self._over_sources(what, sources, one))

    def _next_batch(
        self, pending: Sequence[Region], sources: Sequence[tuple[Endpoint, str]]
    ) -> list[Region]:
        host = sources[0][0].host if sources else ""
        multi = self.multirange and self.auth.host_state(host).multirange is not False
        limit = self.max_ranges_per_request if multi else 1
        batch: list[Region] = []
        total = 0
        for reg in pending:
            if batch and (len(batch) >= limit or total + reg.length > self.max_bytes_per_request):
                break
            batch.append(reg)
            total += reg.length
        return batch

    def _fetch_batch(
        self,
        ep: Endpoint,
        repo: str,
        digest: str,
        batch: Sequence[Region],
        deadline: float,
        what: str,
    ) -> dict[Region, bytes]:
        st = self.auth.host_state(ep.host)
        if len(batch) > 1 and (st.multirange is False or not self.multirange):
            out: dict[Region, bytes] = {}
            for reg in batch:
                out.update(self._fetch_batch(ep, repo, digest, [reg], deadline, what))
            return out
        try:
            parts = self._get_ranges(ep, repo, digest, batch, deadline, what)
        except _MultiRangeRefused:
            log.info("%s does not serve multi-range requests; using single ranges", ep.host)
            with self._lock:
                st.multirange = False
            return self._fetch_batch(ep, repo, digest, batch, deadline, what)
        out = {}
        missing = []
        for reg in batch:
            data = extract(parts, reg.start, reg.length)
            if data is None:
                missing.append(reg)
            else:
                out[reg] = data
        if missing:
            if len(batch) > 1:
                log.info(
                    "%s answered a multi-range request with other ranges; using single ranges",
                    ep.host,
                )
                with self._lock:
                    st.multirange = False
                for reg in missing:
                    out.update(self._fetch_batch(ep, repo, digest, [reg], deadline, what))
            else:
                raise Transient(
                    f"{what}: response from {ep.host} does not cover bytes {batch[0].header_spec()}"
                )
        elif len(batch) > 1:
            with self._lock:
                st.multirange = True
        self._record_seen(ep.host, repo, digest)
        return out

    def _get_ranges(
        self,
        ep: Endpoint,
        repo: str,
        digest: str,
        batch: Sequence[Region],
        deadline: float,
        what: str,
    ) -> list[tuple[int, bytes]]:
        key = (ep.host, repo, digest)
        headers = {"Range": range_header(batch)}
        path = f"/v2/{repo}/blobs/{digest}"
        if len(batch) > 1:
            self.stats.add(multirange=1)
        with self._lock:
            cached = self._redirects.get(key)
        resp: Response | None = None
        if cached is not None and cached[1] > time.monotonic():
            resp = self.transport.send(
                "GET",
                cached[0],
                headers={"Accept-Encoding": "identity", **headers},
                deadline=deadline,
                stream=True,
            )
            if resp.status_code in (401, 403, 404, 410) or resp.status_code in REDIRECT_STATUSES:
                log.debug(
                    "redirected URL for %s is stale (HTTP %d); asking %s again",
                    digest,
                    resp.status_code,
                    ep.host,
                )
                resp.close()
                resp = None
                with self._lock:
                    self._redirects.pop(key, None)
        if resp is None:
            resp = self._request(
                ep.host,
                repo,
                "GET",
                path,
                deadline=deadline,
                headers=headers,
                insecure=ep.insecure,
                stream=True,
                redirect_key=key,
            )
        if resp.status_code == 400 and len(batch) > 1:
            resp.close()
            raise _MultiRangeRefused
        self._check_status(resp, what, ep.host)
        with resp:
            if resp.status_code == 200:
                return self._from_full_body(resp, batch, deadline, what)
            if resp.status_code != 206:
                raise RegistryError(f"{what}: unexpected HTTP {resp.status_code}")
            limit = sum(r.length for r in batch) + 4096 * len(batch) + 4096
            body = self.transport.read_all(resp, limit, deadline, what)
            try:
                return partial_content_parts(
                    body,
                    resp.headers.get("Content-Type", ""),
                    resp.headers.get("Content-Range", ""),
                )
            except RangeParseError as exc:
                if exc.truncated:
                    raise Transient(f"{what}: {exc}") from None
                raise RegistryError(f"{what}: bad range response from {ep.host}: {exc}") from None

    def _from_full_body(
        self, resp: Response, batch: Sequence[Region], deadline: float, what: str
    ) -> list[tuple[int, bytes]]:
        """A 200 answer to a range request: stream the blob, keep only what was asked."""
        log.debug("%s: server ignored Range, reading the whole body", what)
        want_end = max(r.end for r in batch)
        bufs = [bytearray() for _ in batch]
        pos = 0
        try:
            for chunk in resp.iter_content(1 << 16):
                collect_regions(batch, bufs, pos, chunk)
                pos += len(chunk)
                self.stats.add(bytes_received=len(chunk))
                if pos >= want_end:
                    break
                if time.monotonic() > deadline:
                    raise Transient(f"{what}: deadline reached while reading the body")
        except BODY_ERRORS as exc:
            raise Transient(
                f"{what}: body broken off at byte {pos}: {type(exc).__name__}"
            ) from None
        if pos < want_end:
            raise Transient(f"{what}: body ended at byte {pos}, before {want_end}")
        return [(reg.start, bytes(buf)) for reg, buf in zip(batch, bufs, strict=True)]

    def open_blob(
        self,
        ref: ImageRef | str,
        digest: str,
        *,
        deadline: float | None = None,
        chunk_size: int = 256 << 10,
    ) -> Iterator[bytes]:
        """Stream the whole blob. Broken transfers resume with a Range request; the digest is
        checked at the end and a mismatch raises VerifyError: consumers must not use (commit)
        the data before the iterator is exhausted without error."""
        r = self._ref(ref)
        validate_digest(digest)
        h = hashlib.sha256()
        offset = 0
        what = f"GET blob {digest} of {r}"
        sources = self._blob_sources(r, digest)
        dl = self._deadline(deadline)
        while True:
            start_offset = offset

            def open_one(
                ep: Endpoint, repo: str, off: int = start_offset, until: float = dl
            ) -> Response:
                headers = {"Range": f"bytes={off}-"} if off else {}
                resp = self._request(
                    ep.host,
                    repo,
                    "GET",
                    f"/v2/{repo}/blobs/{digest}",
                    deadline=until,
                    headers=headers,
                    insecure=ep.insecure,
                    stream=True,
                    watch=False,
                )
                self._check_status(resp, what, ep.host)
                return resp

            resp = self._retrying(what, dl, lambda: self._over_sources(what, sources, open_one))
            skip = offset if resp.status_code == 200 else 0
            if resp.status_code == 206:
                start, _end, _total = parse_content_range(resp.headers.get("Content-Range", ""))
                if start != offset:
                    resp.close()
                    raise RegistryError(f"{what}: resumed at {start}, asked for {offset}")
            try:
                with resp:
                    for raw in resp.iter_content(chunk_size):
                        self.stats.add(bytes_received=len(raw))
                        chunk = raw
                        if skip:
                            drop = min(skip, len(chunk))
                            chunk, skip = chunk[drop:], skip - drop
                            if not chunk:
                                continue
                        h.update(chunk)
                        offset += len(chunk)
                        yield chunk
            except BODY_ERRORS as exc:
                if time.monotonic() >= dl:
                    raise RegistryError(
                        f"{what}: broken off at byte {offset} and out of time: {type(exc).__name__}"
                    ) from None
                log.info(
                    "%s: broken off at byte %d (%s); resuming", what, offset, type(exc).__name__
                )
                self.stats.add(retries=1)
                if offset > start_offset:
                    dl = self._deadline(deadline)  # progress was made: renew the budget
                continue
            break
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise VerifyError(
                f"blob {digest} of {r}: content has digest {got} ({offset} bytes); discard it"
            )
