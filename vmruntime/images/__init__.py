"""OCI images: references, pull, offline load, and the content-addressed cache.

Public entry points: :func:`pull`, :func:`load`, :func:`resolve`,
:func:`list_images`, :func:`inspect`, :func:`remove`, :func:`prune` and
:func:`ensure_default_image`; :class:`ImageStore` is the cache itself.

Names are imported on first use, so a process that needs one piece (the layer
unpack worker, ``vmr --help``) does not pay for the HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ImageSummary": "catalog",
    "default_image_is_current": "catalog",
    "inspect": "catalog",
    "list_images": "catalog",
    "prune": "catalog",
    "remove": "catalog",
    "resolve": "catalog",
    "ImageRecord": "ingest",
    "IngestReport": "ingest",
    "load": "load",
    "pull": "pull",
    "Reference": "reference",
    "parse_reference": "reference",
    "ImageStore": "store",
    "default_cache_dir": "store",
    "ensure_default_image": "default_image",
    "DEFAULT_IMAGE": "default_image",
}

__all__ = [
    "DEFAULT_IMAGE",
    "ImageRecord",
    "ImageStore",
    "ImageSummary",
    "IngestReport",
    "Reference",
    "default_cache_dir",
    "default_image_is_current",
    "ensure_default_image",
    "inspect",
    "list_images",
    "load",
    "parse_reference",
    "prune",
    "pull",
    "remove",
    "resolve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from vmruntime.images.catalog import (
        ImageSummary,
        default_image_is_current,
        inspect,
        list_images,
        prune,
        remove,
        resolve,
    )
    from vmruntime.images.default_image import DEFAULT_IMAGE, ensure_default_image
    from vmruntime.images.ingest import ImageRecord, IngestReport
    from vmruntime.images.load import load
    from vmruntime.images.pull import pull
    from vmruntime.images.reference import Reference, parse_reference
    from vmruntime.images.store import ImageStore, default_cache_dir
