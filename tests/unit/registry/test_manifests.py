"""als.registry.manifests: manifest and config checks and platform selection, without a registry."""

from __future__ import annotations

import json

import pytest

from als.digest import sha256_of
from als.errors import ConfigError, NotFound, RegistryError, VerifyError
from als.oci import DOCKER_LIST, OCI_INDEX, OCI_MANIFEST
from als.registry import parse_reference
from als.registry.manifests import (
    check_blob,
    check_image_manifest,
    config_descriptor,
    config_platform,
    is_index,
    layer_descriptors,
    manifest_digest,
    parse_json,
    parse_platform,
    select_platform,
)

D1 = "sha256:" + "11" * 32
D2 = "sha256:" + "22" * 32
D3 = "sha256:" + "33" * 32


def _index(*platforms: tuple[str, str, str | None, str]) -> dict[str, object]:
    return {
        "mediaType": OCI_INDEX,
        "manifests": [
            {"digest": d, "platform": {"os": o, "architecture": a, **({"variant": v} if v else {})}}
            for o, a, v, d in platforms
        ],
    }


def test_select_platform() -> None:
    index = _index(("linux", "amd64", None, D1), ("linux", "arm64", "v8", D2))
    assert select_platform(index, ("linux", "amd64", None), "x") == (D1, "linux/amd64")
    assert select_platform(index, ("linux", "arm64", None), "x") == (D2, "linux/arm64/v8")
    # arm64 without a variant is v8
    bare = _index(("linux", "arm64", None, D3))
    assert select_platform(bare, ("linux", "arm64", "v8"), "x") == (D3, "linux/arm64")
    with pytest.raises(NotFound, match=r"linux/s390x.*available: linux/amd64, linux/arm64/v8"):
        select_platform(index, ("linux", "s390x", None), "x")
    with pytest.raises(ConfigError):  # an invalid digest in the index is refused
        select_platform(
            _index(("linux", "amd64", None, "sha256:12")), ("linux", "amd64", None), "x"
        )


def test_parse_platform() -> None:
    assert parse_platform("linux/amd64") == ("linux", "amd64", None)
    assert parse_platform("linux/arm/v7") == ("linux", "arm", "v7")
    for bad in ("linux", "linux//x", "a/b/c/d", ""):
        with pytest.raises(RegistryError, match="invalid platform"):
            parse_platform(bad)
    assert config_platform({"os": "linux", "architecture": "arm", "variant": "v6"}) == (
        "linux/arm/v6"
    )
    assert config_platform({"os": "linux", "architecture": "amd64", "variant": ""}) == (
        "linux/amd64"
    )


def test_manifest_digest_is_checked() -> None:
    body = b'{"schemaVersion": 2}'
    d = sha256_of(body)
    assert manifest_digest(body, "latest", None, "m") == d
    assert manifest_digest(body, d, d, "m") == d
    assert manifest_digest(body, "v1", "md5:whatever", "m") == d  # only sha256 headers count
    with pytest.raises(VerifyError, match="not the one asked for"):
        manifest_digest(body, D1, None, "m")
    with pytest.raises(VerifyError, match="registry says"):
        manifest_digest(body, "latest", D1, "m")


def test_document_kinds() -> None:
    assert is_index({}, OCI_INDEX) and is_index({}, DOCKER_LIST)
    assert is_index({"manifests": []}, "")
    assert not is_index({"manifests": [], "layers": []}, "")
    ref = parse_reference("example.com/a:b")
    check_image_manifest({"layers": []}, "", ref)
    check_image_manifest({}, OCI_MANIFEST, ref)
    with pytest.raises(RegistryError, match="schema 1"):
        check_image_manifest({"schemaVersion": 1, "layers": []}, OCI_MANIFEST, ref)
    with pytest.raises(RegistryError, match="unsupported manifest media type"):
        check_image_manifest({}, "text/plain", ref)
    with pytest.raises(RegistryError, match="not valid JSON"):
        parse_json(b"{", "m")
    with pytest.raises(RegistryError, match="not a JSON object"):
        parse_json(b"[]", "m")


def test_config_and_layers() -> None:
    doc = {
        "config": {"digest": D1, "size": 7},
        "layers": [
            {"digest": D2, "size": 10, "mediaType": "t", "annotations": {"k": "v"}},
            {"digest": D3, "size": 20, "mediaType": "t"},
        ],
    }
    assert config_descriptor(doc) == (D1, 7)
    assert config_descriptor({"config": {"digest": D1}}) == (D1, -1)
    with pytest.raises(ConfigError):
        config_descriptor({})
    cfg = {"rootfs": {"diff_ids": ["sha256:a", "sha256:b"]}}
    layers = layer_descriptors(doc, cfg)
    assert [(x.digest, x.size, x.diff_id) for x in layers] == [
        (D2, 10, "sha256:a"),
        (D3, 20, "sha256:b"),
    ]
    assert layers[0].annotations == {"k": "v"} and layers[1].annotations == {}
    # diff IDs are used only when there is exactly one per layer
    assert [x.diff_id for x in layer_descriptors(doc, {"rootfs": {"diff_ids": ["x"]}})] == [
        None,
        None,
    ]
    bad = {"layers": [{"digest": "sha256:nope"}]}
    with pytest.raises(ConfigError):
        layer_descriptors(bad, {})


def test_check_blob() -> None:
    data = json.dumps({"os": "linux"}).encode()
    d = sha256_of(data)
    check_blob(data, d, len(data), "c")
    check_blob(data, d, -1, "c")
    with pytest.raises(VerifyError, match="content has digest"):
        check_blob(data, D1, -1, "c")
    with pytest.raises(VerifyError, match="descriptor says"):
        check_blob(data, d, len(data) + 1, "c")
