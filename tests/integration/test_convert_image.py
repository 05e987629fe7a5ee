"""``als convert SRC DEST`` for whole images against a real registry (plain and token-auth):
formats, DiffIDs, config and annotations kept, platforms, records and mounts, OCI layouts, and
failures that leave DEST untouched."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from als.cli import main
from als.convert.layer import read_tar
from als.formats import EntryType, load_index, read_file
from als.oci import OCI_INDEX, OCI_MANIFEST, format_of_descriptor, toc_digest_of
from als.registry import RegistryClient
from tests.integration.conftest import TOKEN_USERS, TokenRegistry
from tests.support.registry import (
    PushedImage,
    RegistryServer,
    SimpleLayer,
    make_tar_layer,
    push_image,
    push_image_full,
    push_index,
)

LABELS = {"org.example.label": "kept"}


def _convert(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc = main(["convert", *argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result: dict[str, Any] = json.loads(out.out)
    return result


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["convert", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("als: error: "), err
    return err


def _files(blob: bytes, annotations: dict[str, str]) -> dict[str, bytes]:
    def read(ranges: Any) -> list[bytes]:
        return [blob[o : o + n] for o, n in ranges]

    ix = load_index(read, len(blob), annotations=annotations)
    return {
        ix.path(i): read_file(ix, i, read)
        for i in ix.iter_ids()
        if ix.type(i) == EntryType.REG and not ix.path(i).startswith(".")
    }


def _image(client: RegistryClient, ref: str) -> tuple[dict[str, Any], dict[str, Any]]:
    img = client.resolve(ref)
    return json.loads(img.manifest), json.loads(img.config)


def _check_converted(client: RegistryClient, ref: str, fmt: str, source: list[SimpleLayer]) -> None:
    """Every layer in ``fmt`` with its TOC annotations, its DiffID the digest of its
    decompressed stream, the same files as the source, config history and labels kept."""
    manifest, config = _image(client, ref)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["annotations"] == {"org.example.manifest": "yes"}
    assert config["config"]["Labels"] == LABELS
    assert len(config["history"]) == len(source)
    diff_ids = config["rootfs"]["diff_ids"]
    for desc, src, diff_id in zip(manifest["layers"], source, diff_ids, strict=True):
        ann = desc["annotations"]
        assert format_of_descriptor(desc["mediaType"], ann) == fmt
        assert toc_digest_of(ann) is not None
        blob = client.fetch_blob(ref, desc["digest"], size=desc["size"])
        tar = read_tar(blob)
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        if fmt.startswith("estargz"):
            assert int(ann["io.containers.estargz.uncompressed-size"]) == len(tar)
        want = _files(*_plain(src))
        assert _files(blob, ann) == want


def _plain(layer: SimpleLayer) -> tuple[bytes, dict[str, str]]:
    """A lazily readable copy of a plain gzip layer's files, to compare contents with."""
    from als.formats.writer import build_estargz

    built = build_estargz(gzip.decompress(layer.blob))
    return built.blob, built.annotations


def _push_source(registry: RegistryServer, repo: str, layers: list[SimpleLayer]) -> PushedImage:
    return push_image_full(
        registry,
        repo,
        "v1",
        layers,
        config_overrides={
            "config": {"Labels": LABELS, "Cmd": ["/bin/sh"]},
            "history": [{"created_by": f"step {i}"} for i in range(len(layers))],
        },
        manifest_annotations={"org.example.manifest": "yes"},
    )


BASE = make_tar_layer({"etc/base.txt": os.urandom(3000).hex().encode(), "bin/tool": b"#!x\n"})


@pytest.mark.parametrize("fmt", ["estargz", "estargz-zstd", "zstd-chunked"])
def test_registry_to_registry(
    registry: RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    top = make_tar_layer({"app/main.py": b"print('hi')\n" * 100, "app/data": os.urandom(20000)})
    _push_source(registry, f"conv/src-{fmt}", [BASE, top])
    src, dest = (
        f"docker://{registry.host}/conv/src-{fmt}:v1",
        f"docker://{registry.host}/conv/{fmt}:lazy",
    )
    out = _convert(capsys, src, dest, "--format", fmt, "--record-dir", str(tmp_path))
    assert [ly["action"] for ly in out["images"][0]["layers"]] == ["converted", "converted"]
    assert all(ly["files_verified"] >= 1 for ly in out["images"][0]["layers"])
    with RegistryClient() as c:
        assert c.resolve(dest[9:]).manifest_digest == out["digest"]
        _check_converted(c, dest[9:], fmt, [BASE, top])
        # Converting the converted image keeps every layer as it is.
        again = _convert(capsys, dest, dest.replace(":lazy", ":again"), "--format", fmt,
                         "--record-dir", str(tmp_path))  # fmt: skip
        assert [ly["action"] for ly in again["images"][0]["layers"]] == ["kept", "kept"]
        assert again["images"][0]["config_digest"] == out["images"][0]["config_digest"]


def test_shared_base_converts_once_and_is_not_uploaded_again(
    registry: RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = make_tar_layer({"one": b"1" * 5000})
    two = make_tar_layer({"two": b"2" * 5000})
    _push_source(registry, "share/one", [BASE, one])
    _push_source(registry, "share/two", [BASE, two])
    rec = ["--record-dir", str(tmp_path)]
    first = _convert(capsys, f"docker://{registry.host}/share/one:v1",
                     f"docker://{registry.host}/lazy/one:v1", *rec)  # fmt: skip
    base_digest = first["images"][0]["layers"][0]["digest"]
    mark = registry.mark()
    second = _convert(capsys, f"docker://{registry.host}/share/two:v1",
                      f"docker://{registry.host}/lazy/two:v1", *rec)  # fmt: skip
    layers = second["images"][0]["layers"]
    assert [ly["action"] for ly in layers] == ["recorded", "converted"]
    assert layers[0]["digest"] == base_digest
    assert layers[0]["write"] == "mounted"
    uploads = [e for e in registry.access_log(since=mark) if e.method in ("PUT", "PATCH")]
    assert not [e for e in uploads if base_digest in e.path]
    # The base blob was not read from the source again either.
    assert not registry.blob_requests(BASE.digest, since=mark)


def test_multi_platform_index(
    registry: RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.registry import host_os_arch

    h_os, h_arch, _ = host_os_arch()
    other = "arm64" if h_arch != "arm64" else "amd64"
    a = push_image_full(registry, "multi/src", None, [make_tar_layer({"a": b"host"})])
    b = push_image_full(registry, "multi/src", None, [make_tar_layer({"b": b"other"})],
                        os_="linux", arch=other)  # fmt: skip
    push_index(registry, "multi/src", "v1", [(a, f"{h_os}/{h_arch}"), (b, f"linux/{other}")])
    src = f"docker://{registry.host}/multi/src:v1"
    rec = ["--record-dir", str(tmp_path)]
    out = _convert(capsys, src, f"docker://{registry.host}/multi/all:v1", "--platform", "all", *rec)
    assert out["media_type"] == OCI_INDEX
    assert [im["platform"] for im in out["images"]] == [f"{h_os}/{h_arch}", f"linux/{other}"]
    with RegistryClient() as c:
        body, _digest, mtype = c.manifest(f"{registry.host}/multi/all:v1")
        assert mtype == OCI_INDEX
        entries = json.loads(body)["manifests"]
        assert [e["platform"]["architecture"] for e in entries] == [h_arch, other]
        for plat in (f"{h_os}/{h_arch}", f"linux/{other}"):
            img = c.resolve(f"{registry.host}/multi/all:v1", platform=plat)
            assert all(toc_digest_of(ly.annotations) for ly in img.layers)
    one = _convert(capsys, src, f"docker://{registry.host}/multi/one:v1", "--platform",
                   f"linux/{other}", *rec)  # fmt: skip
    assert one["media_type"] == OCI_MANIFEST
    assert [im["platform"] for im in one["images"]] == [f"linux/{other}"]


def test_oci_layout_round_trip(
    registry: RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = make_tar_layer({"oci/file": b"through a layout" * 50})
    _push_source(registry, "ocisrc/app", [layer])
    layout = tmp_path / "layout"
    rec = ["--record-dir", str(tmp_path / "rec")]
    out = _convert(capsys, f"docker://{registry.host}/ocisrc/app:v1", f"oci:{layout}:lazy", *rec)
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == [
        "lazy"
    ]
    assert index["manifests"][0]["digest"] == out["digest"]
    # A second tag goes into the same layout; then the layout is a source.
    _convert(capsys, f"docker://{registry.host}/ocisrc/app:v1", f"oci:{layout}:again", *rec)
    assert len(json.loads((layout / "index.json").read_text())["manifests"]) == 2
    back = _convert(capsys, f"oci:{layout}:lazy", f"docker://{registry.host}/ocidest/app:v1", *rec)
    assert back["digest"] == out["digest"]  # every layer kept, config unchanged
    assert [ly["action"] for ly in back["images"][0]["layers"]] == ["kept"]
    with RegistryClient() as c:
        _check_converted(c, f"{registry.host}/ocidest/app:v1", "estargz", [layer])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".layout.als-")]


def test_token_registry_with_authfile(
    token_registry: TokenRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = token_registry.server.host
    layer = make_tar_layer({"private": b"token-auth" * 100})
    user, pw = next(iter(TOKEN_USERS.items()))
    with RegistryClient() as anon:
        # push as bob through the real token flow (anonymous pull is allowed, push is not)
        from als.registry import CredentialStore

        creds = CredentialStore()
        creds.set(host, user, pw)
        with RegistryClient(credentials=creds) as bob:
            push_image(bob, "tok/convsrc", "v1", [layer], registry_host=host)
        assert anon.resolve(f"{host}/tok/convsrc:v1")
    rec = ["--record-dir", str(tmp_path)]
    src, dest = f"docker://{host}/tok/convsrc:v1", f"docker://{host}/tok/convdest:v1"
    err = _fails(capsys, src, dest, "--authfile", str(tmp_path / "none.json"), *rec)
    assert "does not exist" in err
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    err = _fails(capsys, src, dest, "--authfile", str(empty), *rec)
    assert "denied" in err
    with RegistryClient() as c, pytest.raises(Exception, match="not found"):
        c.resolve(dest[9:])
    auth = tmp_path / "auth.json"
    token = base64.b64encode(f"{user}:{pw}".encode()).decode()
    auth.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    out = _convert(capsys, src, dest, "--authfile", str(auth), *rec)
    with RegistryClient() as c:
        assert c.resolve(dest[9:]).manifest_digest == out["digest"]


def test_failures_leave_dest_untouched(
    registry: RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = make_tar_layer({"x": b"soon broken" * 100})
    _push_source(registry, "bad/src", [layer])
    rec = ["--record-dir", str(tmp_path / "rec")]
    layout = tmp_path / "src"
    _convert(capsys, f"docker://{registry.host}/bad/src:v1", f"oci:{layout}", "--format",
             "zstd-chunked", *rec)  # fmt: skip
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(
        (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes()
    )
    blob = layout / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
    # A layer whose content does not match its digest.
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    dest_layout = tmp_path / "dest"
    err = _fails(capsys, f"oci:{layout}", f"oci:{dest_layout}", "--format", "estargz", *rec)
    assert "digest" in err
    err = _fails(capsys, f"oci:{layout}", f"docker://{registry.host}/bad/dest:v1", *rec)
    assert "digest" in err
    assert not dest_layout.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest.als-")]
    with RegistryClient() as c, pytest.raises(Exception, match="not found"):
        c.manifest(f"{registry.host}/bad/dest:v1")
    # A huge manifest is refused before it is parsed.
    huge = tmp_path / "huge"
    (huge / "blobs/sha256").mkdir(parents=True)
    body = b'{"schemaVersion":2,"layers":[' + b"{}," * (2 << 20) + b"{}]}"
    (huge / "blobs/sha256" / hashlib.sha256(body).hexdigest()).write_bytes(body)
    (huge / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
         "size": len(body)}]}))  # fmt: skip
    err = _fails(capsys, f"oci:{huge}", f"oci:{dest_layout}", *rec)
    assert "larger than" in err
    # A source that does not exist, and a missing tag.
    assert "not found" in _fails(
        capsys, f"docker://{registry.host}/bad/none:v1", f"oci:{dest_layout}", *rec
    )
    assert "no image tagged" in _fails(capsys, f"oci:{layout}:nope", f"oci:{dest_layout}", *rec)
    assert not dest_layout.exists()
