"""OCI images: references, pull, offline load, and the content-addressed cache.

Public entry points: :func:`pull`, :func:`load`, :func:`resolve`,
:func:`list_images`, :func:`inspect`, :func:`remove`, :func:`prune` and
:func:`ensure_default_image`; :class:`ImageStore` is the cache itself.
"""

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
