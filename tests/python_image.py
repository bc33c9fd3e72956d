"""The small Python test image: Debian's ``python3-minimal`` and the Essential set.

Who uses it: tests that run Python in a guest but not the default image's libraries
(the two-node Ray test pushes it to a store and pulls it on an empty cache, where the
default image's 0.68 GB would dominate). What it promises: the same builder as the
default image (``vmruntime.images.default_image``: mmdebstrap from the host's mirrors,
reproducible, cached by its input hash), so it is a real Debian image; about 78 MB of
layer, built in about 25 s once and found in the user's cache afterwards.

Why these choices (measured on these machines): ``--variant=essential`` with
``python3-minimal`` is 127 MB, most of it the full perl that ``usrmerge`` drags in;
mmdebstrap's ``merged-usr`` hook makes the /usr merge itself instead, which leaves 78 MB.
``--variant=custom`` (no Essential set) does not bootstrap: dpkg's own maintainer
scripts need a shell, coreutils and ldconfig before they are unpacked. The smoke test
imports what the Ray front door's guest worker uses from the standard library; bookworm's
``python3-minimal`` is Python 3.11, as on the host.
"""

from __future__ import annotations

from vmruntime.images.default_image import DefaultImageRecipe

PYTHON_IMAGE = "localhost/vmruntime/test-python:latest"

PYTHON_RECIPE = DefaultImageRecipe(
    reference=PYTHON_IMAGE,
    name="small Python test image",
    contents="python3-minimal",
    packages=("python3-minimal",),
    variant="essential",
    mmdebstrap_options=("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",),
    smoke_imports=("pickle", "zipimport", "struct", "io", "os", "traceback"),
)
