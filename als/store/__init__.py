"""The store: the FUSE filesystem podman consults as an additional layer store."""
