"""The FUSE device helpers that need no mount: INIT parsing, mount options, the handoff's
environment, and the resend notification's bytes."""

from __future__ import annotations

import os
import socket

import pytest

from als.store.fs import device
from als.store.fs.handoff import ENV, Handoff


def init_request(flags: int, flags2: int, *, opcode: int = device.FUSE_INIT) -> bytes:
    body = device.INIT_IN.pack(7, 45, 131072, flags, flags2) + bytes(44)
    header = device.IN_HEADER.pack(device.IN_HEADER.size + len(body), opcode, 2, 0, 0, 0, 0, 0, 0)
    return header + body


def test_init_flags_and_the_resend_probe() -> None:
    req = device.InitRequest.parse(init_request(device.FUSE_INIT_EXT | 1, 1 << 7))
    assert (req.major, req.minor, req.unique) == (7, 45, 2)
    assert req.supports_resend  # bit 39: flags2 bit 7
    old = device.InitRequest.parse(init_request(device.FUSE_INIT_EXT | 1, 0))
    assert not old.supports_resend
    # flags2 means nothing without FUSE_INIT_EXT
    assert not device.InitRequest.parse(init_request(1, 1 << 7)).supports_resend


@pytest.mark.parametrize(
    "raw",
    [b"", b"\0" * 20, init_request(0, 0, opcode=1), init_request(0, 0)[:-4]],
)
def test_anything_but_an_init_is_refused(raw: bytes) -> None:
    with pytest.raises(device.DeviceError):
        device.InitRequest.parse(raw)


def test_mount_data_is_what_libfuse_passes() -> None:
    data = device.MountOptions().data(7, 0o40755)
    assert data == (
        f"fd=7,rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},"
        "default_permissions,allow_other"
    )


def test_the_handoff_travels_in_one_environment_variable() -> None:
    h = Handoff(10, 11, 12, 13, 14, generation=3, resend=True, wait_go=True)
    assert Handoff.from_env({ENV: h.to_env()}) == h
    assert Handoff.from_env({}) is None
    with pytest.raises(ValueError, match="malformed"):
        Handoff.from_env({ENV: "fuse=1,init=x"})
    assert h.mountpoint == "/dev/fd/11"


def test_wait_for_go_reads_the_supervisors_word() -> None:
    sup, srv = socket.socketpair()
    with sup, srv:
        h = Handoff(-1, -1, -1, srv.fileno(), -1, generation=2, resend=False, wait_go=True)
        sup.sendall(b"go\n")
        h.wait_for_go()
        assert sup.recv(64) == b"prepared\n"
        sup.sendall(b"no\n")
        with pytest.raises(ConnectionError):
            h.wait_for_go()


def test_resend_notification_bytes() -> None:
    r, w = os.pipe()
    try:
        assert device.notify_resend(w)
        assert os.read(r, 64) == device.OUT_HEADER.pack(16, 7, 0)
    finally:
        os.close(r)
        os.close(w)
