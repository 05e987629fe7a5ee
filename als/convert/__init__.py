"""Image conversion (``als convert SRC DEST``): whole images made lazily pullable.

- ``refs``: the locations ``docker://REF``, ``oci:DIR[:TAG]``, ``containers-storage:REF``;
- ``store``: sources and destinations (registry through als's client, OCI layout, podman);
- ``layer``: decompress, rebuild, reorder, verify one layer (pure);
- ``records``: the conversion records (each source layer converted once per options);
- ``image``: the two phases (convert and verify everything, then write DEST);
- ``run``: wiring for the CLI (client, records, the optimize run);
- ``optimize``: the ``--optimize`` run (a temporary store, podman, the recorded profile).

Imported only when a conversion runs; the CLI parser needs nothing from here.
"""
