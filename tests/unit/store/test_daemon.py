"""The daemon's wiring of the store (als.store.daemon), without FUSE."""

from __future__ import annotations

from typing import Any

from als.store.config import StoreConfig


def test_daemon_passes_the_realm_policy_to_the_client(tmp_path: Any) -> None:
    from als.store.daemon import make_source

    cfg = StoreConfig(root=tmp_path, auth_realm_hosts="reg.example=auth.example")
    client: Any = make_source(cfg)
    assert client.realm_policy.allows("reg.example", "auth.example")
    default: Any = make_source(StoreConfig(root=tmp_path))
    assert not default.realm_policy.allows("reg.example", "auth.example")
