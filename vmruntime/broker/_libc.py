"""The few system calls the os module does not expose the way the broker needs them."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100


def _check(result: int, what: bytes | str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        name = what.decode(errors="replace") if isinstance(what, bytes) else what
        raise OSError(code, os.strerror(code), name)


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dir, old, new_dir, new, flags), old)


def link_inode(fd: int, new_dir: int, name: bytes) -> None:
    """A new name for the inode ``fd`` (an O_PATH descriptor) refers to."""
    if _libc.linkat(fd, b"", new_dir, name, AT_EMPTY_PATH) == 0:
        return
    if ctypes.get_errno() != 2:  # ENOENT: no CAP_DAC_READ_SEARCH; the /proc form needs none
        _check(-1, name)
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=new_dir, follow_symlinks=True)


def chown_inode(fd: int, uid: int, gid: int) -> None:
    """chown of the inode ``fd`` refers to, a symlink included (never what it points at)."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), f"fd {fd}")


# Kernel pseudo-filesystems a share must never lead into: a bind of /proc inside a
# share would otherwise hand the guest /proc/<broker>/mem, a regular "file".
_PSEUDO_FS_MAGIC = frozenset({
    0x9FA0,  # proc
    0x62656572,  # sysfs
    0x64626720,  # debugfs
    0x74726163,  # tracefs
    0x73636673,  # securityfs
    0x63677270,  # cgroup2
    0x27E0EB,  # cgroup
    0xCAFE4A11,  # bpf
    0xDE5E81E4,  # efivarfs
    0x62656570,  # configfs
    0x6E736673,  # nsfs
})  # fmt: skip


def is_pseudo_fs(fd: int) -> bool:
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    _check(_libc.fstatfs(fd, buffer), f"fd {fd}")
    f_type = ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF
    return f_type in _PSEUDO_FS_MAGIC


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself: glibc's posix_fallocate would write zeros instead of failing."""
    _check(_libc.fallocate(fd, mode, offset, length), f"fd {fd}")


def mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    _check(
        _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode()),
        str(target),
    )


def umount2(target: Path, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), str(target))
