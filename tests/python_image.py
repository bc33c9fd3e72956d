"""The small Python test image: Debian's ``python3`` (the standard library, nothing else)
on the Essential set.

Who uses it: tests that run Python in a guest but not the default image's libraries
(the two-node Ray test pushes it to a store and pulls it on an empty cache, where the
default image's 0.68 GB would dominate). What it promises: the same builder as the
default image (``vmruntime.images.default_image``: mmdebstrap from the host's mirrors,
reproducible, cached by its input hash), so it is a real Debian image; a 98 MB layer,
built in about 32 s once and found in the user's cache afterwards.

Why these choices (measured on these machines): ``--variant=essential`` with
``python3-minimal`` is 127 MB, most of it the full perl that ``usrmerge`` drags in;
mmdebstrap's ``merged-usr`` hook makes the /usr merge itself instead, which leaves 78 MB.
But ``python3-minimal``'s standard library lacks ``dataclasses`` and ``uuid``, which the
guest worker's own modules and the cloudpickle it ships import (tried: the worker fails
with ``No module named 'dataclasses'``), so the image has ``python3``: 98 MB.
``--variant=custom`` (no Essential set) does not bootstrap: dpkg's own maintainer
scripts need a shell, coreutils and ldconfig before they are unpacked. The smoke test
imports what the guest worker needs; bookworm's Python is 3.11, as on the host.
"""

from __future__ import annotations

from vmruntime.images.default_image import DefaultImageRecipe

PYTHON_IMAGE = "localhost/vmruntime/test-python:latest"

# What the Ray front door's guest worker imports from the standard library: its own
# modules (ray_backend/_worker.py, _wire.py, _codec.py) and the cloudpickle it ships
# (3.1: cloudpickle/cloudpickle.py's imports).
GUEST_WORKER_IMPORTS = (
    "pickle", "zipimport", "struct", "io", "os", "sys", "traceback", "contextlib",
    "importlib.abc", "importlib.util", "dataclasses", "enum", "typing", "re",
    "collections.abc", "abc", "copyreg", "dis", "itertools", "logging", "opcode",
    "platform", "threading", "types", "uuid", "warnings", "weakref",
)  # fmt: skip

PYTHON_RECIPE = DefaultImageRecipe(
    reference=PYTHON_IMAGE,
    name="small Python test image",
    contents="python3 (its standard library, no other module)",
    packages=("python3",),
    variant="essential",
    mmdebstrap_options=("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",),
    smoke_imports=GUEST_WORKER_IMPORTS,
)
