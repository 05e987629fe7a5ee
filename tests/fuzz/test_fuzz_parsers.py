"""Every parser entry point fed random bytes and mutations of valid inputs (writer-made and
Go-made): each example ends in a valid, consistent result or a clean AlsError, within the
per-example deadline and the memory bound. Bounded time: see tests/fuzz/budget.py."""

from __future__ import annotations

import pytest
from hypothesis import given

from tests.fuzz.budget import budgeted, fuzz_settings, mutated, random_bytes
from tests.fuzz.targets import MAX_INPUT, TARGETS, Target, run_bounded

NAMES = sorted(TARGETS)


@pytest.fixture(params=NAMES)
def target(request: pytest.FixtureRequest) -> Target:
    return TARGETS[str(request.param)]


def test_seeds_are_valid_inputs(target: Target) -> None:
    seeds = target.seeds()
    assert seeds, target.name
    for s in seeds:
        run_bounded(target, s)


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_random_bytes(name: str) -> None:
    target = TARGETS[name]

    @fuzz_settings()
    @given(random_bytes(MAX_INPUT))
    @budgeted
    def run(data: bytes) -> None:
        run_bounded(target, data)

    run()


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_mutated_seeds(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()

    @fuzz_settings()
    @given(mutated(seeds))
    @budgeted
    def run(data: bytes) -> None:
        run_bounded(target, data)

    run()
