"""rootfs: the files a sandbox's root filesystem is made of.

What it is: each image layer as a read-only EROFS image written straight from the
layer's tar (``erofs.py``, ``tarstream.py``), built while the layer downloads
(``unpack.py``) and kept once per layer in the cache (``layers.py``); bootable
pulls and loads (``bootable.py``); and the per-sandbox writable layer, a sparse ext4
image (``writable.py``).

Who uses it: sandboxes (:mod:`vmruntime.vm`), the ``vmr image`` commands, and the
public API, whose ``pull``, ``load`` and ``resolve`` are the bootable ones here.
"""

from vmruntime.rootfs.bootable import load, pull, resolve
from vmruntime.rootfs.erofs import ErofsStats, build_erofs_from_tar
from vmruntime.rootfs.layers import ErofsLayers, layer_images
from vmruntime.rootfs.writable import create_writable_layer

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
