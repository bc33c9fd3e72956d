"""Keeping every path the broker touches under the share root.

Who calls it: :mod:`vmruntime.broker.passthrough`, for every name the guest sends.
What it promises: a child is only ever reached from its parent's descriptor by
one validated component, never following a symlink (and never a magic link),
with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)``
where the kernel has it (Linux 5.6+) and a component-by-component ``O_NOFOLLOW``
walk otherwise. Names that could climb out (``..``, ``/``) never reach the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Protocol

from vmruntime.broker.abi import NAME_MAX

_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_OPEN_HOW = struct.Struct("<QQQ")  # flags mode resolve

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def check_name(name: bytes) -> bytes:
    """``name`` if it is one harmless path component; else OSError(EINVAL).

    GHSA-2gv2-cffp-j227 (virtiofsd): an unchecked name in MKDIR, SYMLINK, MKNOD,
    LINK or RENAME created entries outside the share.
    """
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, f"a name of {len(name)} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, f"bad name {name!r}")
    return name


class Resolver(Protocol):
    """How a child is opened from its parent's descriptor."""

    name: str

    def open_child(self, parent_fd: int, name: bytes, flags: int, mode: int = 0) -> int:
        """An fd for ``name`` in ``parent_fd``; ``flags`` must include ``O_NOFOLLOW``."""
        ...


class Openat2Resolver:
    """``openat2`` with the kernel refusing symlinks, magic links and escapes."""

    name = "openat2"
    resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS

    def __init__(self) -> None:
        self._hows: dict[tuple[int, int], bytes] = {}  # packed once per (flags, mode)

    def open_child(self, parent_fd: int, name: bytes, flags: int, mode: int = 0) -> int:
        check_name(name)
        how = self._hows.get((flags, mode))
        if how is None:
            how = _OPEN_HOW.pack(flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, self.resolve)
            if len(self._hows) < 256:
                self._hows[flags, mode] = how
        fd = _libc.syscall(_SYS_OPENAT2, parent_fd, name, how, _OPEN_HOW.size)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), name.decode(errors="replace"))
        return int(fd)


class WalkResolver:
    """``openat`` of one validated component with ``O_NOFOLLOW`` (kernels before 5.6).

    With a single component that is neither ``..`` nor contains ``/``, and no
    symlink followed at the end, ``openat`` cannot leave the parent directory:
    this is the per-component walk reduced to its only step.
    """

    name = "walk"

    def open_child(self, parent_fd: int, name: bytes, flags: int, mode: int = 0) -> int:
        check_name(name)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent_fd)


def openat2_available() -> bool:
    """Does this kernel have ``openat2`` (and let us call it)?"""
    probe = Openat2Resolver()
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(probe.open_child(root, b"proc", os.O_PATH))
        return True
    except OSError as exc:
        return exc.errno not in (errno.ENOSYS, errno.EPERM)
    finally:
        os.close(root)


def make_resolver(mode: str) -> Resolver:
    """``"openat2"``, ``"walk"``, or ``"auto"``: openat2 where the kernel has it."""
    if mode == "openat2":
        return Openat2Resolver()
    if mode == "walk":
        return WalkResolver()
    if mode == "auto":
        return Openat2Resolver() if openat2_available() else WalkResolver()
    raise ValueError(f"containment mode {mode!r}: want auto, openat2 or walk")
