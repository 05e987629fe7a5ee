"""Registry access: references, registries.conf, credentials, and the HTTP client.

The only package of als that imports requests (in ``als.registry.transport``). The data types
the store and the CLI need are in ``als.registry.types``, which imports no network code.
"""

from __future__ import annotations

from als.registry.auth import CredentialStore
from als.registry.client import RegistryClient
from als.registry.config import Endpoint, RegistriesConf
from als.registry.reference import ImageRef, InvalidReference, parse_reference
from als.registry.types import ClientStats, LayerDescriptor, ResolvedImage

__all__ = [
    "ClientStats",
    "CredentialStore",
    "Endpoint",
    "ImageRef",
    "InvalidReference",
    "LayerDescriptor",
    "RegistriesConf",
    "RegistryClient",
    "ResolvedImage",
    "parse_reference",
]
