"""Images ready to boot: pull, load and resolve that also give each layer its EROFS image.

Who calls it: the public API (``vmruntime.pull``, ``vmruntime.load``,
``vmruntime.resolve``), the ``vmr image pull | load | build-default`` commands, and
sandboxes (through :func:`resolve`).

What it promises: the same as :mod:`vmruntime.images` (every blob verified, nothing
half-written), plus, in the returned record's ``layer_paths``, one complete EROFS
image per layer, bottom first: built while the layer downloads, or from its cached
blob. The options are those of :func:`vmruntime.images.pull` and
:func:`vmruntime.images.load`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vmruntime import images
from vmruntime.images import ImageRecord, ImageStore
from vmruntime.rootfs.layers import ErofsLayers, layer_images


def pull(reference: str | images.Reference, *, store: ImageStore | None = None,
         **options: Any) -> ImageRecord:  # fmt: skip
    """:func:`vmruntime.images.pull`, with every layer's filesystem image."""
    store = store or ImageStore()
    return images.pull(reference, store=store, layers=ErofsLayers(store), **options)


def load(path: Path | str, tag: str | None = None, *, store: ImageStore | None = None,
         **options: Any) -> ImageRecord:  # fmt: skip
    """:func:`vmruntime.images.load`, with every layer's filesystem image."""
    store = store or ImageStore()
    return images.load(path, tag, store=store, layers=ErofsLayers(store), **options)


def resolve(reference: str, store: ImageStore | None = None) -> ImageRecord:
    """:func:`vmruntime.images.resolve`, with every layer's filesystem image (a missing
    one is rebuilt from its blob, so this may write to the cache)."""
    store = store or ImageStore()
    image = images.resolve(reference, store)
    return dataclasses.replace(image, layer_paths=layer_images(image, store))
