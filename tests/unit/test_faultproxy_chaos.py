"""The fault proxy's chaos features: unreachable mode, faults by probability, random offsets,
stalls and the phase schedule, against a small loopback HTTP server."""

from __future__ import annotations

import http.client
import itertools
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.faultproxy import Fault, FaultProxy, Phase, Schedule

BODY = random.Random(5).randbytes(64 * 1024)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    fp = FaultProxy(f"http://127.0.0.1:{srv.server_address[1]}", seed=1).start()
    try:
        yield fp
    finally:
        fp.stop()
        srv.shutdown()
        srv.server_close()


def get(fp: FaultProxy, path: str = "/blob", timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(fp.host, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_unreachable_refuses_then_serves_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    assert get(proxy) == (200, BODY)
    # a kept-alive connection that was open before the outage must not keep working
    held = http.client.HTTPConnection(proxy.host, timeout=5)
    held.request("GET", "/blob")
    assert held.getresponse().read() == BODY
    proxy.set_reachable(False)
    assert not proxy.reachable
    with pytest.raises(ConnectionRefusedError):
        get(proxy)
    with pytest.raises((OSError, http.client.HTTPException)):
        held.request("GET", "/blob")
        held.getresponse().read()
    held.close()
    proxy.set_reachable(True)
    assert proxy.port == port
    assert get(proxy) == (200, BODY)


def test_unreachable_for_comes_back_by_itself(proxy: FaultProxy) -> None:
    proxy.unreachable_for(0.5)
    with pytest.raises(ConnectionRefusedError):
        get(proxy)
    end = time.monotonic() + 10
    while not proxy.reachable and time.monotonic() < end:
        time.sleep(0.05)
    assert get(proxy) == (200, BODY)


def test_probability_applies_to_about_that_share(proxy: FaultProxy) -> None:
    never = proxy.add(Fault("status", status=500, times=None, probability=0.0, match="/never"))
    always = proxy.add(Fault("status", status=503, times=None, probability=1.0, match="/always"))
    half = proxy.add(Fault("status", status=429, times=None, probability=0.5, match="/half"))
    assert [get(proxy, "/never")[0] for _ in range(20)] == [200] * 20
    assert [get(proxy, "/always")[0] for _ in range(20)] == [503] * 20
    statuses = [get(proxy, "/half")[0] for _ in range(200)]
    assert set(statuses) == {200, 429}
    assert 60 <= statuses.count(429) <= 140, statuses.count(429)
    assert (never.hits, always.hits, half.hits) == (0, 20, statuses.count(429))
    with pytest.raises(ValueError, match="probability"):
        Fault("drop", probability=1.5)


def test_random_offsets_corrupt_one_byte_and_cut_bodies_short(proxy: FaultProxy) -> None:
    proxy.add(Fault("corrupt", times=30, random_offset=True))
    flipped = set()
    for _ in range(30):
        status, data = get(proxy)
        assert status == 200 and len(data) == len(BODY)
        diff = [i for i in range(len(BODY)) if data[i] != BODY[i]]
        assert len(diff) == 1 and data[diff[0]] == BODY[diff[0]] ^ 0xFF
        flipped.add(diff[0])
    assert len(flipped) > 20  # random, not always the same offset
    proxy.add(Fault("truncate", times=10, random_offset=True))
    for _ in range(10):
        with pytest.raises(http.client.IncompleteRead) as exc:
            get(proxy)
        assert BODY.startswith(exc.value.partial) and len(exc.value.partial) < len(BODY)


def test_stall_delays_the_answer(proxy: FaultProxy) -> None:
    proxy.add(Fault("stall", delay=0.6, times=1))
    t = time.monotonic()
    assert get(proxy) == (200, BODY)
    assert time.monotonic() - t >= 0.6
    t = time.monotonic()
    assert get(proxy) == (200, BODY)
    assert time.monotonic() - t < 0.5


def test_schedule_runs_phases_in_turns_and_leaves_the_proxy_clean(proxy: FaultProxy) -> None:
    seen: list[tuple[str, int | None, bool]] = []

    def probe() -> None:
        try:
            seen.append(("probe", get(proxy, timeout=2)[0], proxy.reachable))
        except OSError:
            seen.append(("probe", None, proxy.reachable))

    phases = [
        Phase("errors", 0.3, faults=[Fault("status", status=500, times=None)], action=probe),
        Phase("quiet", 0.2, action=probe),
        Phase("down", 0.3, unreachable=True, action=probe),
    ]
    called: list[str] = []
    done = Schedule(proxy, phases).run(on_phase=lambda ph: called.append(ph.name))
    assert called == ["errors", "quiet", "down"]
    assert seen == [("probe", 500, True), ("probe", 200, True), ("probe", None, False)]
    assert [ph.hits for ph in done] == [1, 0, 0]
    for a, b in itertools.pairwise(done):
        assert a.started is not None and a.ended is not None and b.started is not None
        assert a.started < a.ended <= b.started
        assert a.ended - a.started >= a.duration - 0.01
    mid = (done[0].started or 0) + 0.1
    assert done[0].active_at(mid) and not done[1].active_at(mid)
    assert done[1].active_at(mid, before=1.0)
    assert proxy.faults == [] and proxy.reachable
    assert get(proxy) == (200, BODY)
