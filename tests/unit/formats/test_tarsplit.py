"""tar_from_spec, the raw tar scanner and tar-split."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile

import pytest

from als.errors import FormatError
from als.formats.tarsplit import (
    assemble_tar,
    build_tarsplit,
    crc64_iso,
    go_json,
    scan_tar,
    tarsplit_size,
)
from tests.support.layers import go_made
from tests.support.tarspec import FileSpec, tar_from_spec

SPEC: dict[str, bytes | str | FileSpec] = {
    "etc/os-release": b"ID=test\n",
    "etc/motd": "héllo <&> wörld\n",
    "bin/busybox": FileSpec(content=b"\x7fELF" + bytes(3000), mode=0o4755, uid=1, gid=2),
    "bin/sh": FileSpec(type="symlink", link="busybox"),
    "bin/ln": FileSpec(type="hardlink", link="bin/busybox"),
    "dev/null": FileSpec(type="char", devmajor=1, devminor=3, mode=0o666),
    "dev/sda": FileSpec(type="block", devmajor=8, devminor=0),
    "run/fifo": FileSpec(type="fifo"),
    "a/.wh.b": b"",
    "d/.wh..wh..opq": b"",
    "x/attr": FileSpec(
        content=b"1", xattrs={"user.bin": b"bar\0baz", "security.capability": b"\1"}
    ),
    "t/ns": FileSpec(content=b"t", mtime_ns=1_600_000_000_123_456_789, uname="u", gname="g"),
    "t/float": FileSpec(content=b"f", mtime=1234.5),
    "long/" + "n" * 120 + "/" + "m" * 150: b"deep",
    "long/link": FileSpec(type="symlink", link="/" + "l" * 200),
    "ünïcode/名前": b"utf8",
    "var/empty/": FileSpec(type="dir", mode=0o1777),
}


def members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {m.name: m for m in tf.getmembers()}


def contents(tar: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isreg()}  # type: ignore[union-attr]


def test_tar_from_spec_is_readable_by_python_and_gnu_tar() -> None:
    tar = tar_from_spec(SPEC)
    assert tar == tar_from_spec(SPEC)  # deterministic
    assert len(tar) % 512 == 0 and tar.endswith(bytes(1024))
    m = members(tar)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        f = tf.extractfile("etc/motd")
        assert f is not None and f.read() == "héllo <&> wörld\n".encode()
        f = tf.extractfile("long/" + "n" * 120 + "/" + "m" * 150)
        assert f is not None and f.read() == b"deep"
    bb = m["bin/busybox"]
    assert bb.mode == 0o4755 and (bb.uid, bb.gid) == (1, 2)
    assert m["bin/sh"].issym() and m["bin/sh"].linkname == "busybox"
    assert m["bin/ln"].islnk() and m["bin/ln"].linkname == "bin/busybox"
    assert m["dev/null"].ischr() and (m["dev/null"].devmajor, m["dev/null"].devminor) == (1, 3)
    assert m["dev/sda"].isblk() and m["run/fifo"].isfifo()
    assert m["var/empty"].isdir() and m["var/empty"].mode == 0o1777
    assert m["a/.wh.b"].isreg() and m["a/.wh.b"].size == 0
    xa = {k: v.encode("utf-8", "surrogateescape") for k, v in m["x/attr"].pax_headers.items()}
    assert xa == {"SCHILY.xattr.security.capability": b"\1", "SCHILY.xattr.user.bin": b"bar\0baz"}
    assert m["t/ns"].pax_headers["mtime"] == "1600000000.123456789"
    assert (m["t/ns"].uname, m["t/ns"].gname) == ("u", "g")
    assert m["t/float"].mtime == 1234.5
    assert m["long/link"].linkname == "/" + "l" * 200
    assert m["etc/os-release"].mtime == 1_600_000_000
    # implied parents come right before their first child, explicit dirs keep their attributes
    names = list(m)
    assert names[:3] == ["etc", "etc/os-release", "etc/motd"]
    assert names.index("long") < names.index("long/" + "n" * 120)
    listing = subprocess.run(
        ["tar", "-tvf", "-"], input=tar, capture_output=True, check=True
    ).stdout.decode()
    assert "bin/sh -> busybox" in listing and "bin/ln link to bin/busybox" in listing


def test_tar_from_spec_without_implied_dirs_and_eof() -> None:
    tar = tar_from_spec({"a/b/c": b"x"}, implied_dirs=False, eof=False)
    assert list(members(tar + bytes(1024))) == ["a/b/c"]
    assert not tar.endswith(bytes(512))
    assert list(members(tar_from_spec({"a/b/c": b"x"}))) == ["a", "a/b", "a/b/c"]


def test_scan_tar_matches_tarfile_on_its_own_and_other_producers() -> None:
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("g/" + "x" * 150)
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
        link = tarfile.TarInfo("g/sl")
        link.type = tarfile.SYMTYPE
        link.linkname = "y" * 130
        tf.addfile(link)
    for tar in (tar_from_spec(SPEC), go_made("in.tar"), gnu.getvalue()):
        scan = scan_tar(tar)
        want = members(tar)
        data = contents(tar)
        assert [x.name.rstrip("/") for x in scan.members] == list(want)
        for x in scan.members:
            w = want[x.name.rstrip("/")]
            assert x.mode == w.mode and (x.uid, x.gid, x.uname, x.gname) == (
                w.uid, w.gid, w.uname, w.gname,
            )  # fmt: skip
            assert x.linkname == w.linkname and x.size == (w.size if w.isreg() else 0)
            assert x.mtime_ns // 10**9 == int(w.mtime)
            assert tar[x.data_start : x.data_end] == data.get(w.name, b"")
        assert scan.eof_end == scan.eof_start + 1024 <= len(tar)


def test_scan_tar_rejects_bad_input() -> None:
    good = tar_from_spec({"a": b"x"})
    bad_sum = bytearray(good)
    bad_sum[0] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        scan_tar(bytes(bad_sum))
    with pytest.raises(FormatError, match="truncated"):
        scan_tar(good[:300])
    with pytest.raises(FormatError, match="truncated"):
        scan_tar(tar_from_spec({"a": b"x" * 1000})[:900])
    # a stream that simply stops after the last payload (no padding, no EOF) is accepted
    assert [m.name for m in scan_tar(good[:513]).members] == ["a"]
    sparse = bytearray(tar_from_spec({"s": b"x"}))
    sparse[156:157] = b"S"
    sparse[148:156] = b"%06o\0 " % (sum(sparse[:148]) + 256 + sum(sparse[156:512]))
    with pytest.raises(FormatError, match="sparse"):
        scan_tar(bytes(sparse))


def test_crc64_iso_vectors() -> None:
    # tar-split stores big-endian CRC-64/ISO; "hello\n" as in the format notes (checked vs Go)
    assert base64.b64encode(crc64_iso(b"hello\n").to_bytes(8, "big")) == b"YUw+7uLYEAA="
    assert crc64_iso(b"123456789") == 0xB90956C775A41001  # CRC-64/GO-ISO check value
    assert crc64_iso(b"") == 0


def test_tarsplit_reassembles_exactly_with_trailing_bytes_and_raw_names() -> None:
    tar = tar_from_spec({**SPEC, "caf\udce9.txt": b"latin-1 name"}) + bytes(5120) + b"trailer"
    scan = scan_tar(tar)
    contents = {m.name_raw: tar[m.data_start : m.data_end] for m in scan.members}
    ts = build_tarsplit(tar)
    assert assemble_tar(ts, lambda name, raw: contents[raw]) == tar
    lines = [json.loads(x) for x in ts.splitlines()]
    raw_entries = [x for x in lines if "name_raw" in x]
    assert [base64.b64decode(x["name_raw"]) for x in raw_entries] == [b"caf\xe9.txt"]
    assert lines[-1]["payload"] == base64.b64encode(b"\0" * 5120 + b"trailer").decode()
    files = [x for x in lines if x["type"] == 1]
    assert len(files) == len(scan.members)
    assert all(x["payload"] is None and "size" not in x for x in files if not x.get("size"))
    # a wrong content is caught by length or CRC
    with pytest.raises(FormatError, match="CRC"):
        assemble_tar(ts, lambda name, raw: bytes(len(contents[raw])))
    with pytest.raises(FormatError, match="bytes"):
        assemble_tar(ts, lambda name, raw: contents[raw] + b"!")


def test_go_json_escapes_like_go() -> None:
    want = b'{"a":"\\u003c\\u0026\\u003e\\u2028","b":[1,"\xc3\xa9"]}'
    assert go_json({"a": "<&>\u2028", "b": [1, "é"]}) == want
    assert go_json({"a": {}}, indent="\t") == b'{\n\t"a": {}\n}'


def test_tarsplit_size_is_the_tar_size() -> None:
    """PAX headers, long names, xattrs, hardlinks, devices and trailing bytes all count."""
    for tar in (tar_from_spec(SPEC), tar_from_spec(SPEC) + b"\0" * 10240, tar_from_spec({})):
        assert tarsplit_size(build_tarsplit(tar)) == len(tar)


@pytest.mark.parametrize(
    ("line", "msg"),
    [
        (b"not json", "invalid JSON"),
        (b"[1]", "not an object"),
        (b'{"type":2}', "segment without a payload"),
        (b'{"type":2,"payload":"***"}', "invalid base64"),
        (b'{"type":1,"name":"a","size":-1}', "invalid size"),
        (b'{"type":1,"name":"a","size":"9"}', "invalid size"),
        (b'{"type":7}', "unknown entry type"),
    ],
)
def test_tarsplit_size_rejects_bad_documents(line: bytes, msg: str) -> None:
    with pytest.raises(FormatError, match=msg):
        tarsplit_size(b'{"type":2,"payload":"AAAA","position":0}\n' + line + b"\n", layer="l")


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":2,"payload":"AAAA","position":0}',
        b'{"type":2,"payload":"AAA=","position":12}',
        b'{"type":2,"payload":"AA==","position":3}',
        b'{"type":2,"payload":"","position":3}',
        b'{"type":1,"name":"etc/","payload":null,"position":1}',
        b'{"type":1,"name":"a b","size":17,"payload":"AAAAAAAAAAA=","position":2}',
        b'{"type":1,"name":"x","name_raw":"/w==","size":3,"payload":null,"position":2}',
        # not the plain shape: read by the JSON parser
        b'{"type":1,"name":"q\\"uote","size":5,"payload":null,"position":2}',
        b'{"type":1,"name":"caf\xc3\xa9","size":5,"payload":null,"position":2}',
        b'{"type":1, "name":"spaced","size":5,"payload":null,"position":2}',
        b'{"type":1,"name":"big","size":123456789012345678901,"payload":null,"position":2}',
        b'{"payload":"AAAA","type":2,"position":0}',
        b'{"type":2,"payload":"AAAAA","position":0}',
    ],
)
def test_tarsplit_size_fast_path_agrees_with_the_json_parser(line: bytes) -> None:
    """Plain lines are sized without a JSON parser; every line gives what the parser gives (a
    size, or the same FormatError)."""
    doc = b'{"type":2,"payload":"AAAA","position":0}\n' + line + b"\n"
    padded = b'{"type":2,"payload":"AAAA","position":0} \n' + line + b"\n"  # forces the parser
    try:
        want: int | str = tarsplit_size(padded)
    except FormatError as exc:
        want = str(exc)
    try:
        got: int | str = tarsplit_size(doc)
    except FormatError as exc:
        got = str(exc)
    assert got == want
