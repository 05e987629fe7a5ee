"""The store as a filesystem: what podman sees under ``ROOT/.pool``.

- :mod:`.protocol`: pure helpers for the two ALS path protocols and the ``info`` document;
- :mod:`.namespace`: store nodes (:class:`~.namespace.NodeKind`) and layer tree inodes, no pyfuse3;
- :mod:`.layerlink`: protocol 1's ``ROOT/<layer ID>`` symlinks;
- :mod:`.operations`: the pyfuse3 Operations and their single error boundary.

Nothing is imported here, so that importing the pure modules does not import pyfuse3.
"""
