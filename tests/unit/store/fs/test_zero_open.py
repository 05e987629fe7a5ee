"""Zero-message open is used only where the kernel supports it for directories too."""

from __future__ import annotations

import pytest

from als.store.fs.operations import kernel_has_no_opendir


@pytest.mark.parametrize(
    ("release", "ok"),
    [
        ("6.18.0-1-amd64", True),
        ("6.1.0-26-cloud-amd64", True),
        ("5.1.0", True),
        ("5.10.0-30-amd64", True),
        ("5.0.21", False),  # ENOSYS from opendir fails the opendir there
        ("4.19.0-27-amd64", False),
        ("3.10.0-1160.el7.x86_64", False),
        ("6", False),
        ("", False),
        ("x.y", False),
        ("5.4rc1", True),
    ],
)
def test_kernel_release(release: str, ok: bool) -> None:
    assert kernel_has_no_opendir(release) is ok
