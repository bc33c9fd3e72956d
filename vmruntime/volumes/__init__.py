"""volumes: named volumes (directories shared live, or ext4 disk images) and disk attach locks.

See docs/volumes.md. Who calls it: the ``vmr volume`` commands and the sandbox
code, which resolves ``--volume NAME:GUEST`` with :class:`VolumeStore` and holds
an :class:`Attachment` (:meth:`Volume.attach`, :meth:`DiskAttachment.acquire`)
for as long as a VM uses a volume or disk image.
"""

from vmruntime.volumes.attach import Attachment, DiskAttachment
from vmruntime.volumes.store import Volume, VolumeStore, parse_size, validate_name

__all__ = [
    "Attachment",
    "DiskAttachment",
    "Volume",
    "VolumeStore",
    "parse_size",
    "validate_name",
]
