"""als.store.config: the options native layers and the opaque marker add."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from als.errors import ConfigError
from als.store.config import StoreConfig


@pytest.mark.parametrize(
    ("mode", "names"),
    [
        ("trusted", ("trusted.overlay.opaque",)),
        ("user", ("user.overlay.opaque",)),
        ("both", ("trusted.overlay.opaque", "user.overlay.opaque")),
        (
            "auto",
            ("trusted.overlay.opaque",) if os.geteuid() == 0 else ("user.overlay.opaque",),
        ),
    ],
)
def test_opaque_xattr_modes(tmp_path: Path, mode: str, names: tuple[str, ...]) -> None:
    conf = tmp_path / "als.toml"
    conf.write_text(f'opaque_xattr = "{mode}"\nnative_layers = false\n')
    cfg = StoreConfig.load(str(conf))
    assert cfg.opaque_xattrs == names
    assert cfg.native_layers is False


def test_an_unknown_opaque_mode_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "als.toml"
    conf.write_text('opaque_xattr = "aufs"\n')
    with pytest.raises(ConfigError, match="opaque_xattr must be one of"):
        StoreConfig.load(str(conf))
