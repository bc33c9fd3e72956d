"""images: OCI images fetched, verified and kept in the content-addressed cache.

What it is: references, the registry client, pulls, offline loads, the cache of
verified blobs, and the builder of the built-in default image. It does not know how
a layer becomes a filesystem: callers that want one pass a layer handler (the
runtime's is :class:`vmruntime.rootfs.ErofsLayers`).

Who uses it: the rootfs package (bootable images), sandboxes (resolving a reference),
the ``vmr image`` commands. Public entry points: :func:`pull`, :func:`load`,
:func:`resolve`, :func:`list_images`, :func:`inspect`, :func:`remove`, :func:`prune`
and :func:`ensure_default_image`; :class:`ImageStore` is the cache itself.
"""

from vmruntime.images.catalog import (
    ImageSummary,
    Referenced,
    inspect,
    list_images,
    prune,
    remove,
    resolve,
)
from vmruntime.images.default_image import default_image_is_current, ensure_default_image
from vmruntime.images.ingest import ImageRecord, IngestReport, LayerHandler
from vmruntime.images.load import load
from vmruntime.images.pull import pull
from vmruntime.images.reference import DEFAULT_IMAGE, Reference, parse_reference
from vmruntime.images.store import ImageStore, default_cache_dir

__all__ = [
    "DEFAULT_IMAGE",
    "ImageRecord",
    "ImageStore",
    "ImageSummary",
    "IngestReport",
    "LayerHandler",
    "Reference",
    "Referenced",
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
