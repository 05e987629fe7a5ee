"""Fixtures shared by the end-to-end tests: a registry per module and its registries.conf."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.podman import write_registries_conf
from tests.support.registry import RegistryServer


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def regconf(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registries_conf(
        tmp_path_factory.mktemp("conf") / "registries.conf", [registry.host]
    )
