"""als.digest: the one sha256 digest parser and validator."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from als import digest
from als.digest import hex_of

SETTINGS = settings(
    max_examples=int(os.environ.get("ALS_HYPOTHESIS_EXAMPLES", "150")), deadline=None
)


@SETTINGS
@given(st.binary(max_size=64))
def test_hex_of_accepts_real_sha256_digests(data: bytes) -> None:
    h = hashlib.sha256(data).hexdigest()
    assert hex_of("sha256:" + h) == h


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:../x",
        "sha256:../" + "a" * 61,
        "sha256:" + "A" * 64,
        "sha256:" + "ab" * 31 + "aB",
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "a" * 63 + "\n",
        "sha256:" + "a" * 63 + "/",
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 128,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 64,
        "a" * 64,
        "sha256" + "a" * 64,
        "SHA256:" + "a" * 64,
        "",
        "sha256:",
    ],
)
def test_hex_of_rejects_bad_digests(bad: str) -> None:
    with pytest.raises(ValueError, match="not a sha256 digest"):
        hex_of(bad)


def test_the_helpers_agree() -> None:
    d = digest.sha256_of(b"abc")
    assert d == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert digest.is_digest(d) and digest.validate(d) == d
    assert digest.raw_of(d) == hashlib.sha256(b"abc").digest()
    assert digest.from_hex(hex_of(d)) == d
    assert not digest.is_digest(None) and not digest.is_digest(b"sha256:" + b"a" * 64)
    with pytest.raises(ValueError):
        digest.raw_of(" " + d[1:])
