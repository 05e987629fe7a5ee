"""als: a lazy-pulling additional layer store for podman."""

__version__ = "0.1.0"
