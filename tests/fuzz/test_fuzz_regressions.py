"""Regression tests for what fuzzing and hostile-input review found in the format parsers, and
the bounds on decompression bombs (measured in a subprocess with a hard address-space limit)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from als.errors import FormatError
from als.formats import LayerAnnotations
from als.formats.model import MAX_TOC_RECORDS
from als.formats.tarsplit import assemble_tar, scan_tar
from als.formats.toc import load_toc_json
from tests.support.tarspec import FileSpec, tar_from_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("size", ["-1", "-512", "-1536", "-99999999"])
def test_pax_negative_size_is_refused_not_an_endless_loop(size: str) -> None:
    # A PAX size of -1536 used to send the scanner back to the extension header, forever.
    tar = tar_from_spec({"a": FileSpec(content=b"x", pax={"size": size})})
    t = time.monotonic()
    with pytest.raises(FormatError, match=r"negative size|truncated|checksum"):
        scan_tar(tar)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mtime", "1" * 5000),  # int() refuses more than 4300 digits with a bare ValueError
        ("mtime", "\u00b2"),  # str.isdigit() accepts superscripts, int() does not
        ("atime", "9" * 5000 + ".1"),
        ("uid", "1" * 5000),
        ("gid", "\u0661"),  # Arabic-Indic digit one: int() would accept it
        ("size", "1" * 30),
    ],
)
def test_pax_numbers_are_ascii_and_bounded(key: str, value: str) -> None:
    tar = tar_from_spec({"a": FileSpec(content=b"x", pax={key: value})})
    with pytest.raises(FormatError, match="invalid"):
        scan_tar(tar)


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":1,"name_raw":5,"size":1,"payload":"AAAAAAAAAAA="}',
        b'{"type":1,"name_raw":"%%%","size":1,"payload":"AAAAAAAAAAA="}',
        b'{"type":1,"name_raw":"\xc3\xa9","size":1,"payload":"AAAAAAAAAAA="}',
        b'{"type":1,"name":["a"],"size":1,"payload":"AAAAAAAAAAA="}',
        b'{"type":1,"name":"\\ud800","size":1,"payload":"AAAAAAAAAAA="}',
        b'{"type":1,"name":"a","size":true,"payload":"AAAAAAAAAAA="}',
        b'{"type":2,"payload":"\xc3\xa9"}',
    ],
)
def test_tarsplit_bad_fields_are_format_errors(line: bytes) -> None:
    with pytest.raises(FormatError):
        assemble_tar(line, lambda name, raw: b"x")


@pytest.mark.parametrize(
    "junk", [b"{},", b"[],", b'{"a":{}},'], ids=["objects", "arrays", "nested"]
)
def test_toc_of_tiny_containers_is_refused_before_parsing(junk: bytes) -> None:
    # ~25 bytes of Python objects per byte of JSON: refused by counting, without json.loads.
    n = 2 * MAX_TOC_RECORDS + 10
    doc = b'{"version":1,"entries":[' + junk * n + b"{}]}"
    t = time.monotonic()
    with pytest.raises(FormatError, match="objects or arrays"):
        load_toc_json(doc)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("value", [83, None, ["sha256:" + "a" * 64], {"a": 1}, 1.5])
def test_annotation_values_that_are_not_strings_are_format_errors(value: object) -> None:
    # Found by atheris: a number as the TOC digest annotation raised TypeError.
    for key in (
        "containerd.io/snapshot/stargz/toc.digest",
        "io.github.containers.zstd-chunked.manifest-position",
        "io.containers.zstd-chunked.manifest-checksum",
    ):
        ann: dict[str, Any] = {key: value}
        if value is None:
            assert LayerAnnotations.parse(ann) == LayerAnnotations()
            continue
        with pytest.raises(FormatError, match="not a string"):
            LayerAnnotations.parse(ann, "L1")


def test_toc_with_names_holding_braces_still_loads() -> None:
    entries = [{"name": "{[x]}" * 10, "type": "dir"}]
    assert load_toc_json(json.dumps({"version": 1, "entries": entries}).encode())["entries"]


_BOMB = """
import resource, struct, sys
import zstandard
sys.path.insert(0, sys.argv[1])
from als.errors import AlsError
from als.formats import load_index
from als.formats.decode import decompress_exact

limit = int(sys.argv[2])
kind = sys.argv[3]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def skippable(p):
    return b"\\x50\\x2a\\x4d\\x18" + struct.pack("<I", len(p)) + p

def read_of(blob):
    return lambda ranges: [blob[o : o + n] for o, n in ranges]

z = zstandard.ZstdCompressor(level=1)
spaces = b" " * (1 << 24)
if kind == "toc-zstd":
    # 1 GiB of spaces in a small frame, the footer claiming a 1000-byte TOC
    cobj = z.compressobj(size=1 << 30)
    comp = b"".join(cobj.compress(spaces) for _ in range(64))
    comp += cobj.flush()
    head = z.compress(bytes(512))
    blob = head + skippable(comp)
    blob += skippable(struct.pack("<4Q", len(head) + 8, len(comp), 1000, 1) + b"GnUlInUx")
elif kind == "toc-gzip":
    import zlib
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    hdr = bytearray(512); hdr[0:17] = b"stargz.index.json"; hdr[124:136] = b"%011o\\0" % 100
    hdr[156:157] = b"0"; hdr[257:265] = b"ustar\\x0000"; hdr[148:156] = b"        "
    hdr[148:156] = b"%06o\\0 " % sum(hdr)
    comp = c.compress(bytes(hdr))
    for _ in range(64):
        comp += c.compress(spaces)
    comp += c.flush()
    body = z.compress(bytes(512))  # any data region
    off = len(body)
    blob = body + comp + (b"\\x1f\\x8b\\x08\\x04\\0\\0\\0\\0\\0\\xff\\x1a\\x00SG\\x16\\x00"
                          + b"%016x" % off + b"STARGZ" + b"\\x01\\x00\\x00\\xff\\xff" + bytes(8))
elif kind == "chunk-zstd":  # a 10-byte chunk whose frame inflates to 1 GiB
    cobj = z.compressobj(size=1 << 30)
    comp = b"".join(cobj.compress(spaces) for _ in range(64)) + cobj.flush()
elif kind == "control":  # the chunk bomb inflated without a bound: must not fit
    cobj = z.compressobj(size=1 << 30)
    comp = b"".join(cobj.compress(spaces) for _ in range(64)) + cobj.flush()
    del spaces
    try:
        zstandard.ZstdDecompressor().decompressobj().decompress(comp)
    except MemoryError:
        print("MemoryError")
    sys.exit(0)
else:  # the same as one gzip member
    import zlib
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    comp = b"".join(c.compress(spaces) for _ in range(64)) + c.flush()
if kind.startswith("chunk"):
    try:
        decompress_exact(kind == "chunk-gzip", comp, 0, 10)
    except Exception as exc:
        print("error", type(exc).__name__)
    else:
        print("decoded 10 bytes")
    sys.exit(0)
try:
    load_index(read_of(blob), len(blob))
except AlsError as exc:
    print("refused", type(exc).__name__, str(exc)[:100])
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["toc-zstd", "toc-gzip", "chunk-zstd", "chunk-gzip"])
def test_decompression_bombs_stay_under_a_hard_memory_limit(kind: str, tmp_path: Path) -> None:
    # The child runs with RLIMIT_AS at its own start-up size + 256 MiB: a bomb that inflated
    # (1 GiB) would die with MemoryError instead of printing the clean refusal.
    script = tmp_path / "bomb.py"
    script.write_text(textwrap.dedent(_BOMB))
    base = _startup_address_space()
    out = subprocess.run(
        [sys.executable, str(script), str(REPO), str(base + (256 << 20)), kind],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    if kind.startswith("toc"):
        assert out.stdout.startswith("refused"), out.stdout
    else:
        assert out.stdout.strip() in ("decoded 10 bytes", "error DecodeError"), out.stdout


def _startup_address_space() -> int:
    """Virtual memory of a fresh interpreter that imported the format readers and zstandard."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import zstandard, zlib, resource; "
        "import als.formats, als.formats.decode; "
        "print(open('/proc/self/statm').read().split()[0])"
    )
    pages = subprocess.run(
        [sys.executable, "-c", probe, str(REPO)], capture_output=True, text=True, check=True
    ).stdout
    return int(pages) * resource.getpagesize()


def test_bomb_is_really_a_bomb(tmp_path: Path) -> None:
    # The same limit stops the chunk bomb when it is inflated without a bound.
    script = tmp_path / "bomb.py"
    script.write_text(textwrap.dedent(_BOMB))
    limit = _startup_address_space() + (256 << 20)
    out = subprocess.run(
        [sys.executable, str(script), str(REPO), str(limit), "control"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert out.stdout.strip() == "MemoryError", (out.stdout, out.stderr[-500:])
