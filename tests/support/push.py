"""Pushing blobs and manifests through an als ``RegistryClient`` (tests and demos only).

als never pushes; these helpers exist so that tests can check that a push takes the client's
own path (registries.conf endpoints, TLS, the token flow with ``pull,push`` scopes, retries).
They reach into the client's request machinery on purpose.
"""

from __future__ import annotations

from urllib.parse import urlencode, urljoin, urlsplit

from als.digest import sha256_of
from als.errors import RegistryError
from als.registry import ImageRef, RegistryClient


def push_blob(
    client: RegistryClient, ref: ImageRef | str, data: bytes, *, deadline: float | None = None
) -> str:
    """Upload ``data`` as a blob to the repository of ``ref`` (monolithic upload); return its
    digest. A blob already there is not uploaded again."""
    r = client._ref(ref)
    digest = sha256_of(data)
    ep = client.conf.endpoints(r.with_digest(digest))[-1]
    dl = client._deadline(deadline)
    what = f"push blob {digest} to {ep}"

    def push() -> str:
        resp = client._request(
            ep.host,
            ep.repository,
            "HEAD",
            f"/v2/{ep.repository}/blobs/{digest}",
            deadline=dl,
            actions="pull,push",
            insecure=ep.insecure,
        )
        resp.close()
        if resp.status_code == 200:
            return digest
        resp = client._request(
            ep.host,
            ep.repository,
            "POST",
            f"/v2/{ep.repository}/blobs/uploads/",
            deadline=dl,
            actions="pull,push",
            insecure=ep.insecure,
        )
        client._check_status(resp, what, ep.host)
        resp.close()
        loc = resp.headers.get("Location", "")
        if not loc:
            raise RegistryError(f"{what}: upload started without a Location")
        st = client.auth.host_state(ep.host)
        url = urljoin(f"{st.scheme}://{ep.host}/", loc)
        url += ("&" if "?" in url else "?") + urlencode({"digest": digest})
        parts = urlsplit(url)
        path = parts.path + "?" + parts.query
        resp = client._request(
            parts.netloc,
            ep.repository,
            "PUT",
            path,
            deadline=dl,
            actions="pull,push",
            insecure=ep.insecure,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        client._check_status(resp, what, ep.host)
        resp.close()
        return digest

    return client._retrying(what, dl, push)


def push_manifest(
    client: RegistryClient,
    ref: ImageRef | str,
    manifest: bytes,
    media_type: str,
    *,
    deadline: float | None = None,
) -> str:
    """Put ``manifest`` under the tag of ``ref`` (or its own digest); return its digest."""
    r = client._ref(ref)
    digest = sha256_of(manifest)
    ep = client.conf.endpoints(r)[-1]
    tag = r.tag or digest
    dl = client._deadline(deadline)
    what = f"push manifest {digest} to {ep}:{tag}"

    def push() -> str:
        resp = client._request(
            ep.host,
            ep.repository,
            "PUT",
            f"/v2/{ep.repository}/manifests/{tag}",
            deadline=dl,
            actions="pull,push",
            insecure=ep.insecure,
            data=manifest,
            headers={"Content-Type": media_type},
        )
        client._check_status(resp, what, ep.host)
        resp.close()
        return digest

    return client._retrying(what, dl, push)
