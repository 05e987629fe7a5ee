"""The status document (als.store.status): what the manager builds has the declared fields,
and ``als status`` reads it without importing the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from als.store.background import BackgroundState
from als.store.config import StoreConfig
from als.store.manager import LayerManager
from als.store.status import CacheStatus, LayerStatus, StoreStatus
from tests.support.fakesource import FakeSource
from tests.support.layers import make_layer

REF = "registry.test/x:1"


async def test_status_has_the_declared_fields(tmp_path: Path) -> None:
    layer = make_layer({"a/f": b"data" * 1000}, "estargz")
    src = FakeSource()
    src.add_image(REF, [layer])
    m = LayerManager(src, StoreConfig(root=tmp_path, background_fetch=False, prefetch=False))
    await m.open()
    await m.lookup(REF, layer.digest)
    status = m.status()
    # Every required field, in order (fuse_requests, zero_message_open and server are added by
    # the daemon).
    required = StoreStatus.__required_keys__
    assert list(status) == [k for k in StoreStatus.__annotations__ if k in required]
    assert StoreStatus.__optional_keys__ == {"fuse_requests", "zero_message_open", "server"}
    assert list(status["cache"]) == list(CacheStatus.__annotations__)
    (row,) = status["layers"]
    assert list(row) == list(LayerStatus.__annotations__)
    assert row["background"] == BackgroundState.OFF
    # JSON carries the state as its plain string
    assert json.loads(json.dumps(status))["layers"][0]["background"] == "off"
    m.close()


def test_status_command_imports_no_store_module() -> None:
    code = (
        "import sys, als.cli.status; "
        "print(sorted(m for m in sys.modules if m.startswith(('als.store', 'trio'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
