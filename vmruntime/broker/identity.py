"""Identity virtualization: the guest's view of owner, mode and file type.

Who calls it: :mod:`vmruntime.broker.passthrough`. What it promises: in
``virtual`` mode the guest never sees the host's uid/gid and never changes the
host inode's owner or mode; what it sets with chmod, chown and mknod is kept in
an xattr on the host inode (format in docs/broker.md) and shown back:
``user.vmruntime.stat`` on files and directories, ``trusted.vmruntime.stat`` on
symlinks, where Linux refuses every ``user.*`` xattr. No ``*.vmruntime.*`` name
is ever the guest's to read, list, set or remove.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass, replace

XATTR = "user.vmruntime.stat"
# Symlinks take no user.* xattrs (the kernel answers EPERM); trusted.* they do take, on
# ext4, xfs, btrfs and tmpfs, for a process with CAP_SYS_ADMIN in the initial namespace.
LINK_XATTR = "trusted.vmruntime.stat"
PRIVATE_SUFFIX = b"vmruntime."  # user.vmruntime.*, trusted.vmruntime.*, any namespace's
VERSION = 1
_RECORD = struct.Struct("<BBHIIII")  # version flags reserved uid gid mode rdev
_HAS_UID, _HAS_GID, _HAS_MODE, _HAS_RDEV = 1, 2, 4, 8
# Types the guest may give a host regular file: what mknod makes, or a file again.
SPECIAL_TYPES = frozenset({stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG})


@dataclass(frozen=True)
class StatRecord:
    """The guest's overrides for one inode; ``None`` means "as the defaults say"."""

    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    rdev: int | None = None

    def pack(self) -> bytes:
        flags = (
            (_HAS_UID if self.uid is not None else 0)
            | (_HAS_GID if self.gid is not None else 0)
            | (_HAS_MODE if self.mode is not None else 0)
            | (_HAS_RDEV if self.rdev is not None else 0)
        )
        return _RECORD.pack(
            VERSION, flags, 0, self.uid or 0, self.gid or 0, self.mode or 0, self.rdev or 0
        )

    @classmethod
    def unpack(cls, data: bytes) -> StatRecord | None:
        """The record in ``data``, or None if it is not a version-1 record."""
        if len(data) != _RECORD.size:
            return None
        version, flags, _reserved, uid, gid, mode, rdev = _RECORD.unpack(data)
        if version != VERSION:
            return None
        return cls(
            uid if flags & _HAS_UID else None,
            gid if flags & _HAS_GID else None,
            mode if flags & _HAS_MODE else None,
            rdev if flags & _HAS_RDEV else None,
        )

    def merged(self, **changes: int | None) -> StatRecord:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def is_private_xattr(name: bytes) -> bool:
    """Names the guest may never read, list, set or remove: ``<namespace>.vmruntime.*``."""
    _namespace, dot, rest = name.partition(b".")
    return bool(dot) and rest.startswith(PRIVATE_SUFFIX)


def record_name(kind: int) -> str:
    """The xattr holding the record of an inode of type ``kind`` (``S_IFMT`` bits)."""
    return LINK_XATTR if kind == stat.S_IFLNK else XATTR


def read_record(path: str, kind: int = stat.S_IFREG, *,
                follow_symlinks: bool = True) -> StatRecord | None:  # fmt: skip
    """The record on the inode at ``path`` (a ``/proc/self/fd`` path), if any.

    Without CAP_SYS_ADMIN a symlink's ``trusted.*`` record reads as absent (ENODATA).
    """
    try:
        raw = os.getxattr(path, record_name(kind), follow_symlinks=follow_symlinks)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise
    record = StatRecord.unpack(raw)
    if record is not None and kind == stat.S_IFLNK:
        # A link's mode is 0777 and it is no device, whatever a record on the host says.
        return StatRecord(uid=record.uid, gid=record.gid)
    return record


def write_record(path: str, record: StatRecord, kind: int = stat.S_IFREG) -> None:
    """Store ``record`` on the inode at ``path``; OSError with the errno for the guest.

    A symlink's record is refused (EPERM) without CAP_SYS_ADMIN, or (EOPNOTSUPP) by a
    filesystem without trusted.* xattrs: the guest gets EOPNOTSUPP, "this share cannot
    keep that", rather than EPERM, which would read as "you may not".
    """
    name = record_name(kind)
    try:
        os.setxattr(path, name, record.pack())
    except OSError as exc:
        if kind == stat.S_IFLNK and exc.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP):
            raise OSError(
                errno.EOPNOTSUPP,
                f"cannot record a symlink's owner: {name} needs CAP_SYS_ADMIN "
                "and a filesystem with trusted.* xattrs",
            ) from exc
        raise


def shown_type(host_mode: int, record: StatRecord | None) -> int:
    """The file type the guest sees: a host regular file may stand for a device or FIFO."""
    host_type = stat.S_IFMT(host_mode)
    if record is None or record.mode is None or host_type != stat.S_IFREG:
        return host_type
    wanted = stat.S_IFMT(record.mode)
    return wanted if wanted in SPECIAL_TYPES else host_type
