"""The FUSE wire format: opcodes, flags and the structs of ``include/uapi/linux/fuse.h``.

Who calls it: :mod:`vmruntime.broker.handler` (decoding requests, encoding replies).
What it promises: exact little-endian layouts of protocol 7.31, the version the
broker answers INIT with; every decoder checks sizes and raises
:class:`WireError` instead of reading past what the guest sent.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 31
# Oldest minor with everything the handler relies on (RENAME2, READDIRPLUS, LSEEK...).
MIN_MINOR_VERSION = 27
ROOT_ID = 1
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50


class InitFlag(enum.IntFlag):
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23


# SETATTR's `valid` bits.
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10

GETATTR_FH = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
WRITE_KILL_PRIV = 1 << 2

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_pages map_alignment flags2 unused[7]
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")  # size flags
GETXATTR_IN = struct.Struct("<II")  # size padding
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags

ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size


class WireError(ValueError):
    """A request that does not decode (too short, a name without its NUL...)."""


@dataclass(frozen=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


@dataclass(frozen=True)
class Attr:
    """What the guest sees of one inode (``struct fuse_attr``)."""

    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int

    def pack(self) -> bytes:
        return ATTR.pack(
            self.ino, self.size, self.blocks,
            *_split_ns(self.atime_ns, self.mtime_ns, self.ctime_ns),
            self.mode, self.nlink, self.uid, self.gid, self.rdev, self.blksize, 0,
        )  # fmt: skip


def _split_ns(*times: int) -> tuple[int, ...]:
    seconds = tuple(max(0, t) // 1_000_000_000 for t in times)
    nanos = tuple(max(0, t) % 1_000_000_000 for t in times)
    return seconds + nanos


def decode_in_header(data: bytes | memoryview) -> InHeader:
    if len(data) < IN_HEADER.size:
        raise WireError(f"request of {len(data)} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(data)
    return InHeader(length, opcode, unique, nodeid, uid, gid, pid)


def out_header(unique: int, error: int, payload_len: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, error, unique)


def error_reply(unique: int, errno_value: int) -> bytes:
    return out_header(unique, -abs(errno_value), 0)


def reply(unique: int, payload: bytes = b"") -> bytes:
    return out_header(unique, 0, len(payload)) + payload


def unpack(layout: struct.Struct, body: bytes | memoryview, offset: int = 0) -> tuple[int, ...]:
    if len(body) < offset + layout.size:
        raise WireError(f"argument of {len(body) - offset} bytes, want {layout.size}")
    return layout.unpack_from(body, offset)


def split_names(body: bytes | memoryview, offset: int, count: int, *,
                exact: bool = True) -> list[bytes]:  # fmt: skip
    """``count`` NUL-terminated strings starting at ``offset`` (each must have its NUL).

    With ``exact`` the body must end at the last NUL: bytes after it would mean the
    guest and the broker disagree about which name was meant.
    """
    data = bytes(body[offset:])
    names: list[bytes] = []
    start = 0
    for _ in range(count):
        end = data.find(b"\0", start)
        if end < 0:
            raise WireError("a name without its terminating NUL")
        names.append(data[start:end])
        start = end + 1
    if exact and start != len(data):
        raise WireError(f"{len(data) - start} bytes after the last name")
    return names


def entry_out(nodeid: int, generation: int, valid_ns: int, attr: Attr) -> bytes:
    seconds, nanos = divmod(valid_ns, 1_000_000_000)
    head = ENTRY_OUT_HEAD.pack(nodeid, generation, seconds, seconds, nanos, nanos)
    return head + attr.pack()


def negative_entry(valid_ns: int) -> bytes:
    """A LOOKUP answer of node id 0: "does not exist", cacheable for ``valid_ns``."""
    seconds, nanos = divmod(valid_ns, 1_000_000_000)
    return ENTRY_OUT_HEAD.pack(0, 0, seconds, 0, nanos, 0) + bytes(ATTR.size)


def attr_out(valid_ns: int, attr: Attr) -> bytes:
    seconds, nanos = divmod(valid_ns, 1_000_000_000)
    return ATTR_OUT_HEAD.pack(seconds, nanos, 0) + attr.pack()


def dirent(ino: int, offset: int, name: bytes, kind: int) -> bytes:
    head = DIRENT_HEAD.pack(ino, offset, len(name), kind)
    padding = -(len(head) + len(name)) % 8
    return head + name + bytes(padding)
