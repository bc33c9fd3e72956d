"""snapshots: a sandbox's writable layer (and later its memory) kept under a name.

Not built yet: the disk-snapshot issue adds capture, restore, export and a shared
store on fsspec URLs here. Who will use it: sandboxes (restore is the writable-layer
step of creation), the Jupyter and Ray front doors, and ``vmr snapshot``.
"""
