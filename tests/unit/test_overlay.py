"""als.overlay: OCI whiteout names and what they delete."""

from __future__ import annotations

import pytest

from als.overlay import OPAQUE_MARKER, is_whiteout_name, whiteout_name, whiteout_target


@pytest.mark.parametrize(
    ("name", "target"),
    [
        (".wh.foo", "foo"),
        (".wh..hidden", ".hidden"),
        (OPAQUE_MARKER, None),
        (".wh..wh.plnk", None),  # aufs metadata
        (".wh.", None),
        (".wh..", None),
        (".wh...", None),
        ("foo", None),
        ("a.wh.b", None),
    ],
)
def test_whiteout_target(name: str, target: str | None) -> None:
    assert whiteout_target(name) == target
    assert is_whiteout_name(name) == name.startswith(".wh.")


def test_whiteout_name_round_trips() -> None:
    assert whiteout_target(whiteout_name("x")) == "x"
