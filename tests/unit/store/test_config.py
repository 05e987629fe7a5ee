"""als.store.config: the options native layers and the opaque marker add."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from als.errors import ConfigError
from als.store import config
from als.store.config import StoreConfig, host_root


@pytest.mark.parametrize(
    ("mode", "names"),
    [
        ("trusted", ("trusted.overlay.opaque",)),
        ("user", ("user.overlay.opaque",)),
        ("both", ("trusted.overlay.opaque", "user.overlay.opaque")),
        (
            "auto",
            ("trusted.overlay.opaque",) if host_root() else ("user.overlay.opaque",),
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


@pytest.mark.parametrize(
    ("euid", "uid_map", "expected"),
    [
        (0, "         0          0 4294967295\n", True),
        # root in rootless podman's user namespace (podman unshare): the user and its subuids
        (0, "         0       1001          1\n         1     100000      65536\n", False),
        (1001, "         0          0 4294967295\n", False),
    ],
)
def test_host_root_is_root_in_the_initial_user_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, euid: int, uid_map: str, expected: bool
) -> None:
    path = tmp_path / "uid_map"
    path.write_text(uid_map)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert host_root(str(path)) is expected


def test_auto_answers_the_user_xattr_in_a_user_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "host_root", lambda: False)
    assert StoreConfig().opaque_xattrs == ("user.overlay.opaque",)
    monkeypatch.setattr(config, "host_root", lambda: True)
    assert StoreConfig().opaque_xattrs == ("trusted.overlay.opaque",)
