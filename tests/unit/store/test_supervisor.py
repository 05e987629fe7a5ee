"""The supervisor's restart policy, without processes: servers that served and were killed are
replaced at once, servers that keep failing back off."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from als.store.supervisor import Server, Supervisor


def dead(code: int, state: str, started: float, generation: int) -> Server:
    proc = cast(Any, SimpleNamespace(poll=lambda: code, pid=1000 + generation))
    a, _ = socket.socketpair()
    return Server(proc, a, generation, started, state=state)


def delays(sup: Supervisor, deaths: list[tuple[int, str, float]]) -> list[float]:
    out: list[float] = []
    for i, (code, state, age) in enumerate(deaths, 2):
        sup.current = dead(code, state, time.monotonic() - age, i)
        sup._reap()
        assert sup.current is None and sup._respawn_at is not None
        out.append(round(sup._respawn_at - time.monotonic(), 1))
        sup._respawn_at = None
    return out


def test_killed_servers_are_replaced_at_once_however_often() -> None:
    sup = Supervisor(Path("/nonexistent/.pool"), [])
    kill = (-signal.SIGKILL, "serving", 0.5)  # served, killed half a second after its start
    assert delays(sup, [kill] * 6) == [0.0] * 6


def test_a_crash_loop_backs_off() -> None:
    sup = Supervisor(Path("/nonexistent/.pool"), [])
    failing = (1, "starting", 0.5)  # exits with an error before it serves
    assert delays(sup, [failing] * 6) == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    # A server that served for long and then crashed counts as a crash only if it was quick.
    sup2 = Supervisor(Path("/nonexistent/.pool"), [])
    assert delays(sup2, [(-signal.SIGSEGV, "serving", 600.0)] * 4) == [0.0] * 4
