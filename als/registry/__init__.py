"""Registry access: references, registries.conf, credentials, and the HTTP client.

The only package of als that imports requests.
"""

from __future__ import annotations

from als.registry.auth import CredentialStore
from als.registry.client import ClientStats, LayerDescriptor, RegistryClient, ResolvedImage
from als.registry.config import Endpoint, RegistriesConf
from als.registry.reference import ImageRef, InvalidReference, parse_reference

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
