"""rootfs: the files a sandbox's root filesystem is made of.

What it is: each image layer as a read-only EROFS image written straight from the
layer's tar (``erofs.py``, ``tarstream.py``), built while the layer downloads
(``unpack.py``, in worker processes for large layers) and kept once per layer in the
cache (``layers.py``); bootable pulls and loads (``bootable.py``); and the
per-sandbox writable layer, a sparse ext4 image (``writable.py``).

Who uses it: sandboxes (:mod:`vmruntime.vm`), the ``vmr image`` commands, and the
public API, whose ``pull``, ``load`` and ``resolve`` are the bootable ones here.

Names are imported on first use: an unpack worker imports this package on its way
to ``unpack.py`` and must not pay for the registry client and the rest of images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmruntime._lazy import lazy_exports

_EXPORTS = {
    "ErofsLayers": "vmruntime.rootfs.layers",
    "ErofsStats": "vmruntime.rootfs.erofs",
    "build_erofs_from_tar": "vmruntime.rootfs.erofs",
    "create_writable_layer": "vmruntime.rootfs.writable",
    "layer_images": "vmruntime.rootfs.layers",
    "load": "vmruntime.rootfs.bootable",
    "pull": "vmruntime.rootfs.bootable",
    "resolve": "vmruntime.rootfs.bootable",
}
__all__ = [
    "ErofsLayers",
    "ErofsStats",
    "build_erofs_from_tar",
    "create_writable_layer",
    "layer_images",
    "load",
    "pull",
    "resolve",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from vmruntime.rootfs.bootable import load, pull, resolve
    from vmruntime.rootfs.erofs import ErofsStats, build_erofs_from_tar
    from vmruntime.rootfs.layers import ErofsLayers, layer_images
    from vmruntime.rootfs.writable import create_writable_layer
