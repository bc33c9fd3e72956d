"""vmruntime: run untrusted code in microVMs booted from OCI images.

The public API is what this module re-exports; everything else is private.
"""

from vmruntime.errors import VmruntimeError
from vmruntime.images import (
    ImageRecord,
    ImageStore,
    Reference,
    load,
    parse_reference,
    pull,
    resolve,
)

__version__ = "0.1.0"

__all__ = [
    "ImageRecord",
    "ImageStore",
    "Reference",
    "VmruntimeError",
    "__version__",
    "load",
    "parse_reference",
    "pull",
    "resolve",
]
