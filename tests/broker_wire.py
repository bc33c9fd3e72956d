"""The guest's side of the FUSE wire, written from Linux's include/uapi/linux/fuse.h.

This is deliberately independent of ``vmruntime.broker.abi``: the attack tests build
their requests and parse the broker's replies with this module, so a layout mistake
in the broker's codec shows up as a disagreement instead of cancelling itself out.
Everything is little-endian (x86-64 and aarch64 guests) and follows protocol 7.31,
the version the broker answers in INIT; the struct sizes below are those of 7.31
(``fuse_setxattr_in`` is the 8-byte compat form, no extension headers).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import secrets
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

FUSE_ROOT_ID = 1


class Op(IntEnum):
    """``enum fuse_opcode``."""

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
    TMPFILE = 51


# Operations the kernel never expects an answer to: the handler returns None for them.
NO_REPLY_OPS = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT, Op.NOTIFY_REPLY})

# fuse_setattr_in.valid bits.
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# Struct layouts ("<" = little-endian, no implicit padding: fuse.h pads explicitly).
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
IN_HEADER_SIZE = IN_HEADER.size  # 40
OUT_HEADER_SIZE = OUT_HEADER.size  # 16
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # + fuse_attr = 128
ATTR_OUT = struct.Struct("<QII")  # + fuse_attr = 104
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
WRITE_OUT = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII6I")  # 80
INIT_IN = struct.Struct("<IIIII11I")  # 64 bytes (the 7.36+ form a current kernel sends)
INIT_OUT = struct.Struct("<IIIIHHIIHHII6I")  # 64
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name, padded to 8
LSEEK_OUT = struct.Struct("<Q")

ENTRY_OUT_SIZE = ENTRY_OUT.size + ATTR.size
ATTR_OUT_SIZE = ATTR_OUT.size + ATTR.size
assert ATTR.size == 88 and ENTRY_OUT_SIZE == 128 and ATTR_OUT_SIZE == 104
assert KSTATFS.size == 80 and INIT_IN.size == 64 and INIT_OUT.size == 64


def forget_in(nlookup: int) -> bytes:
    return struct.pack("<Q", nlookup)


def batch_forget_in(items: list[tuple[int, int]], count: int | None = None) -> bytes:
    """``fuse_batch_forget_in`` + ``fuse_forget_one`` * n; ``count`` can lie."""
    head = struct.pack("<II", len(items) if count is None else count, 0)
    return head + b"".join(struct.pack("<QQ", n, k) for n, k in items)


def getattr_in(flags: int = 0, fh: int = 0) -> bytes:
    return struct.pack("<IIQ", flags, 0, fh)


def setattr_in(
    valid: int,
    *,
    fh: int = 0,
    size: int = 0,
    atime: int = 0,
    mtime: int = 0,
    ctime: int = 0,
    atimensec: int = 0,
    mtimensec: int = 0,
    ctimensec: int = 0,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
) -> bytes:
    """``fuse_setattr_in``, 88 bytes."""
    return struct.pack(
        "<IIQQQQQQIIIIIIII",
        valid,
        0,
        fh,
        size,
        0,  # lock_owner
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode,
        0,
        uid,
        gid,
        0,
    )


def mknod_in(mode: int, rdev: int = 0, umask: int = 0) -> bytes:
    return struct.pack("<IIII", mode, rdev, umask, 0)


def mkdir_in(mode: int, umask: int = 0) -> bytes:
    return struct.pack("<II", mode, umask)


def rename_in(newdir: int) -> bytes:
    return struct.pack("<Q", newdir)


def rename2_in(newdir: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", newdir, flags, 0)


def link_in(oldnodeid: int) -> bytes:
    return struct.pack("<Q", oldnodeid)


def open_in(flags: int, open_flags: int = 0) -> bytes:
    return struct.pack("<II", flags, open_flags)


def create_in(flags: int, mode: int, umask: int = 0) -> bytes:
    return struct.pack("<IIII", flags, mode, umask, 0)


def release_in(fh: int, flags: int = 0) -> bytes:
    return struct.pack("<QIIQ", fh, flags, 0, 0)


def flush_in(fh: int) -> bytes:
    return struct.pack("<QIIQ", fh, 0, 0, 0)


def read_in(fh: int, offset: int, size: int) -> bytes:
    """``fuse_read_in`` (also READDIR/READDIRPLUS), 40 bytes."""
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def write_in(fh: int, offset: int, size: int) -> bytes:
    """``fuse_write_in`` header only: the data follows it."""
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def fsync_in(fh: int) -> bytes:
    return struct.pack("<QII", fh, 0, 0)


def setxattr_in(size: int, flags: int = 0) -> bytes:
    """The compat 8-byte form used below protocol 7.33."""
    return struct.pack("<II", size, flags)


def getxattr_in(size: int) -> bytes:
    return struct.pack("<II", size, 0)


def access_in(mask: int) -> bytes:
    return struct.pack("<II", mask, 0)


def interrupt_in(unique: int) -> bytes:
    return struct.pack("<Q", unique)


def fallocate_in(fh: int, offset: int, length: int, mode: int = 0) -> bytes:
    return struct.pack("<QQQII", fh, offset, length, mode, 0)


def lseek_in(fh: int, offset: int, whence: int) -> bytes:
    return struct.pack("<QQII", fh, offset, whence, 0)


def copy_file_range_in(
    fh_in: int, off_in: int, nodeid_out: int, fh_out: int, off_out: int, length: int
) -> bytes:
    return struct.pack("<QQQQQQQ", fh_in, off_in, nodeid_out, fh_out, off_out, length, 0)


def init_in(major: int = 7, minor: int = 38, max_readahead: int = 131072, flags: int = 0) -> bytes:
    return INIT_IN.pack(major, minor, max_readahead, flags, 0, *([0] * 11))


def cstr(name: bytes | str) -> bytes:
    """A NUL-terminated name, as the kernel sends every name."""
    raw = name.encode() if isinstance(name, str) else name
    return raw + b"\0"


def request(
    opcode: int,
    nodeid: int,
    body: bytes = b"",
    *,
    unique: int,
    uid: int = 0,
    gid: int = 0,
    pid: int = 1,
    length: int | None = None,
) -> bytes:
    """One whole request; ``length`` overrides ``fuse_in_header.len`` (to lie about it)."""
    total = IN_HEADER_SIZE + len(body) if length is None else length
    return IN_HEADER.pack(total, opcode, unique, nodeid, uid, gid, pid, 0, 0) + body


class WireError(AssertionError):
    """The broker sent something a guest kernel would reject."""


@dataclass(frozen=True)
class Reply:
    length: int
    error: int  # negative errno, 0 for success
    unique: int
    body: bytes

    @property
    def ok(self) -> bool:
        return self.error == 0

    @property
    def errno(self) -> int:
        return -self.error

    def __repr__(self) -> str:
        what = "ok" if self.ok else errno.errorcode.get(self.errno, str(self.errno))
        return f"Reply({what}, unique={self.unique}, body={self.body[:64]!r}…{len(self.body)}B)"


def parse_reply(raw: bytes) -> Reply:
    """Check what the guest kernel's fuse_dev_do_write/virtio_fs checks, then split."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise WireError(f"reply is {type(raw).__name__}, not bytes")
    raw = bytes(raw)
    if len(raw) < OUT_HEADER_SIZE:
        raise WireError(f"reply of {len(raw)} bytes is shorter than fuse_out_header")
    length, error, unique = OUT_HEADER.unpack_from(raw)
    if length != len(raw):
        raise WireError(f"fuse_out_header.len {length} but the reply has {len(raw)} bytes")
    # The kernel refuses error > 0 or <= -512 (fs/fuse/dev.c), and an error reply
    # carries no body.
    if error > 0 or error <= -512:
        raise WireError(f"fuse_out_header.error {error} is not a negative errno")
    if error != 0 and length != OUT_HEADER_SIZE:
        raise WireError(f"error reply {error} carries a {length - OUT_HEADER_SIZE}-byte body")
    return Reply(length, error, unique, raw[OUT_HEADER_SIZE:])


@dataclass(frozen=True)
class Attr:
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


@dataclass(frozen=True)
class Entry:
    nodeid: int
    generation: int
    attr: Attr


def parse_attr(raw: bytes, offset: int = 0) -> Attr:
    return Attr(*ATTR.unpack_from(raw, offset))


def parse_entry(body: bytes) -> Entry:
    if len(body) != ENTRY_OUT_SIZE:
        raise WireError(f"fuse_entry_out of {len(body)} bytes, expected {ENTRY_OUT_SIZE}")
    nodeid, generation, *_ = ENTRY_OUT.unpack_from(body)
    return Entry(nodeid, generation, parse_attr(body, ENTRY_OUT.size))


def parse_attr_out(body: bytes) -> Attr:
    if len(body) != ATTR_OUT_SIZE:
        raise WireError(f"fuse_attr_out of {len(body)} bytes, expected {ATTR_OUT_SIZE}")
    return parse_attr(body, ATTR_OUT.size)


def parse_open_out(body: bytes) -> int:
    if len(body) != OPEN_OUT.size:
        raise WireError(f"fuse_open_out of {len(body)} bytes")
    return OPEN_OUT.unpack(body)[0]


def parse_create_out(body: bytes) -> tuple[Entry, int]:
    if len(body) != ENTRY_OUT_SIZE + OPEN_OUT.size:
        raise WireError(f"CREATE reply body of {len(body)} bytes")
    return parse_entry(body[:ENTRY_OUT_SIZE]), parse_open_out(body[ENTRY_OUT_SIZE:])


def parse_write_out(body: bytes) -> int:
    if len(body) != WRITE_OUT.size:
        raise WireError(f"fuse_write_out of {len(body)} bytes")
    return WRITE_OUT.unpack(body)[0]


def parse_getxattr_out(body: bytes) -> int:
    if len(body) != GETXATTR_OUT.size:
        raise WireError(f"fuse_getxattr_out of {len(body)} bytes")
    return GETXATTR_OUT.unpack(body)[0]


@dataclass(frozen=True)
class InitOut:
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_write: int


def parse_init_out(body: bytes) -> InitOut:
    if len(body) != INIT_OUT.size:
        raise WireError(f"fuse_init_out of {len(body)} bytes")
    f = INIT_OUT.unpack(body)
    return InitOut(major=f[0], minor=f[1], max_readahead=f[2], flags=f[3], max_write=f[6])


@dataclass(frozen=True)
class Dirent:
    ino: int
    off: int
    type: int
    name: bytes
    entry: Entry | None = None  # READDIRPLUS only


def _align8(n: int) -> int:
    return (n + 7) & ~7


def parse_dirents(body: bytes, plus: bool = False) -> list[Dirent]:
    """``fuse_dirent``/``fuse_direntplus`` records, each padded to 8 bytes."""
    out: list[Dirent] = []
    pos = 0
    while pos < len(body):
        entry = None
        if plus:
            if pos + ENTRY_OUT_SIZE > len(body):
                raise WireError("truncated fuse_direntplus")
            entry = parse_entry(body[pos : pos + ENTRY_OUT_SIZE])
            pos += ENTRY_OUT_SIZE
        if pos + DIRENT.size > len(body):
            raise WireError("truncated fuse_dirent")
        ino, off, namelen, dtype = DIRENT.unpack_from(body, pos)
        start = pos + DIRENT.size
        name = body[start : start + namelen]
        if len(name) != namelen or namelen == 0:
            raise WireError(f"dirent name of {namelen} bytes does not fit")
        pos = _align8(start + namelen) if not plus else pos + _align8(DIRENT.size + namelen)
        if pos > len(body):
            raise WireError("dirent padding runs past the reply")
        out.append(Dirent(ino, off, dtype, name, entry))
    return out


def parse_statfs(body: bytes) -> tuple[int, ...]:
    if len(body) != KSTATFS.size:
        raise WireError(f"fuse_statfs_out of {len(body)} bytes")
    return KSTATFS.unpack(body)


# Fixed body sizes of successful replies, per opcode (variable-size ones are checked by
# the caller against what it asked for).
FIXED_OK_BODY: dict[int, int] = {
    Op.LOOKUP: ENTRY_OUT_SIZE,
    Op.GETATTR: ATTR_OUT_SIZE,
    Op.SETATTR: ATTR_OUT_SIZE,
    Op.SYMLINK: ENTRY_OUT_SIZE,
    Op.MKNOD: ENTRY_OUT_SIZE,
    Op.MKDIR: ENTRY_OUT_SIZE,
    Op.LINK: ENTRY_OUT_SIZE,
    Op.UNLINK: 0,
    Op.RMDIR: 0,
    Op.RENAME: 0,
    Op.RENAME2: 0,
    Op.OPEN: OPEN_OUT.size,
    Op.OPENDIR: OPEN_OUT.size,
    Op.WRITE: WRITE_OUT.size,
    Op.STATFS: KSTATFS.size,
    Op.RELEASE: 0,
    Op.RELEASEDIR: 0,
    Op.FSYNC: 0,
    Op.FSYNCDIR: 0,
    Op.FLUSH: 0,
    Op.SETXATTR: 0,
    Op.REMOVEXATTR: 0,
    Op.ACCESS: 0,
    Op.CREATE: ENTRY_OUT_SIZE + OPEN_OUT.size,
    Op.INIT: INIT_OUT.size,
    Op.DESTROY: 0,
    Op.FALLOCATE: 0,
    Op.LSEEK: LSEEK_OUT.size,
    Op.COPY_FILE_RANGE: WRITE_OUT.size,
}


def check_reply_shape(req: bytes, reply: Reply) -> None:
    """The body of a successful reply has the size its opcode's reply struct has, and a
    variable-size reply never exceeds what the guest said its buffer holds."""
    if not reply.ok or len(req) < IN_HEADER_SIZE:
        return
    opcode = IN_HEADER.unpack_from(req)[1]
    if opcode in FIXED_OK_BODY and len(reply.body) != FIXED_OK_BODY[opcode]:
        raise WireError(
            f"{Op(opcode).name} ok reply has {len(reply.body)} body bytes, "
            f"expected {FIXED_OK_BODY[opcode]}"
        )
    if opcode in (Op.READ, Op.READDIR, Op.READDIRPLUS) and len(req) >= IN_HEADER_SIZE + 40:
        size = struct.unpack_from("<I", req, IN_HEADER_SIZE + 16)[0]
        if len(reply.body) > size:
            raise WireError(f"{Op(opcode).name} returned {len(reply.body)} > {size} bytes")
    if opcode in (Op.GETXATTR, Op.LISTXATTR) and len(req) >= IN_HEADER_SIZE + 8:
        size = struct.unpack_from("<I", req, IN_HEADER_SIZE)[0]
        if size == 0 and len(reply.body) != GETXATTR_OUT.size:
            raise WireError(f"size-0 {Op(opcode).name} probe got {len(reply.body)} bytes")
        if size != 0 and len(reply.body) > size:
            raise WireError(f"{Op(opcode).name} returned {len(reply.body)} > {size} bytes")


@dataclass
class Client:
    """A hostile guest kernel: sends raw requests to ``handle`` and checks every reply.

    ``guard`` sees every raw reply (the tests use it to assert that no canary secret
    ever crosses the wire).
    """

    handle: Callable[[bytes], bytes | None]
    guard: Callable[[bytes], None] = lambda raw: None
    uid: int = 0
    gid: int = 0
    _uniques: itertools.count = field(default_factory=lambda: itertools.count(0x1000, 2))
    max_write: int = 0
    sent: int = 0

    def next_unique(self) -> int:
        return next(self._uniques)

    def raw(self, data: bytes) -> bytes | None:
        """Send exactly ``data``; return the raw reply after the cross-cutting checks."""
        self.sent += 1
        out = self.handle(data)
        if out is not None:
            out = bytes(out)
            self.guard(out)
        return out

    def send(
        self, opcode: int, nodeid: int, body: bytes = b"", *, length: int | None = None
    ) -> Reply | None:
        unique = self.next_unique()
        req = request(
            opcode, nodeid, body, unique=unique, uid=self.uid, gid=self.gid, length=length
        )
        out = self.raw(req)
        if out is None:
            if opcode not in NO_REPLY_OPS:
                raise WireError(f"no reply to opcode {opcode}")
            return None
        reply = parse_reply(out)
        if reply.unique != unique:
            raise WireError(f"reply unique {reply.unique:#x} does not echo {unique:#x}")
        check_reply_shape(req, reply)
        return reply

    def call(self, opcode: int, nodeid: int, body: bytes = b"", **kw: int | None) -> Reply:
        reply = self.send(opcode, nodeid, body, **kw)  # type: ignore[arg-type]
        if reply is None:
            raise WireError(f"opcode {opcode} got no reply")
        return reply

    # --- success-path helpers: these assert the operation worked --------------------

    def init(self, **kw: int) -> InitOut:
        reply = self.call(Op.INIT, 0, init_in(**kw))
        _ok(reply, "INIT")
        out = parse_init_out(reply.body)
        self.max_write = out.max_write
        return out

    def lookup(self, parent: int, name: bytes | str) -> Entry:
        reply = self.call(Op.LOOKUP, parent, cstr(name))
        _ok(reply, f"LOOKUP {name!r}")
        entry = parse_entry(reply.body)
        if entry.nodeid == 0:
            raise WireError(f"LOOKUP {name!r} answered a negative entry")
        return entry

    def getattr(self, nodeid: int) -> Attr:
        reply = self.call(Op.GETATTR, nodeid, getattr_in())
        _ok(reply, f"GETATTR {nodeid}")
        return parse_attr_out(reply.body)

    def open(self, nodeid: int, flags: int) -> int:
        reply = self.call(Op.OPEN, nodeid, open_in(flags))
        _ok(reply, f"OPEN {nodeid}")
        return parse_open_out(reply.body)

    def opendir(self, nodeid: int) -> int:
        reply = self.call(Op.OPENDIR, nodeid, open_in(0))
        _ok(reply, f"OPENDIR {nodeid}")
        return parse_open_out(reply.body)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        reply = self.call(Op.READ, nodeid, read_in(fh, offset, size))
        _ok(reply, "READ")
        return reply.body

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        reply = self.call(Op.WRITE, nodeid, write_in(fh, offset, len(data)) + data)
        _ok(reply, "WRITE")
        return parse_write_out(reply.body)

    def release(self, nodeid: int, fh: int) -> None:
        _ok(self.call(Op.RELEASE, nodeid, release_in(fh)), "RELEASE")

    def releasedir(self, nodeid: int, fh: int) -> None:
        _ok(self.call(Op.RELEASEDIR, nodeid, release_in(fh)), "RELEASEDIR")

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 65536) -> list[Dirent]:
        reply = self.call(Op.READDIR, nodeid, read_in(fh, offset, size))
        _ok(reply, "READDIR")
        return parse_dirents(reply.body)

    def listdir(self, nodeid: int) -> list[bytes]:
        """Every name in a directory, following the offsets the broker hands out."""
        fh = self.opendir(nodeid)
        names: list[bytes] = []
        offset = 0
        for _ in range(10000):
            ents = self.readdir(nodeid, fh, offset)
            if not ents:
                break
            names += [e.name for e in ents]
            offset = ents[-1].off
        self.releasedir(nodeid, fh)
        return names

    def create(self, parent: int, name: bytes | str, flags: int, mode: int) -> tuple[Entry, int]:
        reply = self.call(Op.CREATE, parent, create_in(flags, mode) + cstr(name))
        _ok(reply, f"CREATE {name!r}")
        return parse_create_out(reply.body)

    def mkdir(self, parent: int, name: bytes | str, mode: int = 0o755) -> Entry:
        reply = self.call(Op.MKDIR, parent, mkdir_in(mode) + cstr(name))
        _ok(reply, f"MKDIR {name!r}")
        return parse_entry(reply.body)

    def mknod(self, parent: int, name: bytes | str, mode: int, rdev: int = 0) -> Entry:
        reply = self.call(Op.MKNOD, parent, mknod_in(mode, rdev) + cstr(name))
        _ok(reply, f"MKNOD {name!r}")
        return parse_entry(reply.body)

    def symlink(self, parent: int, name: bytes | str, target: bytes | str) -> Entry:
        reply = self.call(Op.SYMLINK, parent, cstr(name) + cstr(target))
        _ok(reply, f"SYMLINK {name!r}")
        return parse_entry(reply.body)

    def readlink(self, nodeid: int) -> bytes:
        reply = self.call(Op.READLINK, nodeid)
        _ok(reply, "READLINK")
        return reply.body

    def setattr(self, nodeid: int, valid: int, **kw: int) -> Attr:
        reply = self.call(Op.SETATTR, nodeid, setattr_in(valid, **kw))
        _ok(reply, "SETATTR")
        return parse_attr_out(reply.body)

    def getxattr(self, nodeid: int, name: bytes | str, size: int = 65536) -> bytes:
        reply = self.call(Op.GETXATTR, nodeid, getxattr_in(size) + cstr(name))
        _ok(reply, f"GETXATTR {name!r}")
        return reply.body

    def listxattr(self, nodeid: int, size: int = 65536) -> bytes:
        reply = self.call(Op.LISTXATTR, nodeid, getxattr_in(size))
        _ok(reply, "LISTXATTR")
        return reply.body

    def forget(self, nodeid: int, nlookup: int) -> None:
        if self.send(Op.FORGET, nodeid, forget_in(nlookup)) is not None:
            raise WireError("FORGET got a reply")


def _ok(reply: Reply, what: str) -> None:
    if not reply.ok:
        raise WireError(f"{what} failed: {reply!r}")


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def new_encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``: how FUSE carries rdev in 32 bits."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


# --- the identity record (docs/broker.md), built independently of identity.py -----------

STAT_XATTR = "user.vmruntime.stat"
LINK_XATTR = "trusted.vmruntime.stat"  # a symlink's record: Linux allows no user.* on links
# Every name the guest must never read, list, set or remove, whatever the inode.
PRIVATE_XATTRS = (
    STAT_XATTR,
    LINK_XATTR,
    "user.vmruntime.other",
    "trusted.vmruntime.other",
    "security.vmruntime.stat",
    "user.vmruntime.",
)
REC_UID, REC_GID, REC_MODE, REC_RDEV = 1, 2, 4, 8
STAT_RECORD = struct.Struct("<BBHIIII")  # version flags reserved uid gid mode rdev: 20 bytes


def stat_record(
    *, version: int = 1, flags: int = 15, uid: int = 0, gid: int = 0, mode: int = 0, rdev: int = 0
) -> bytes:
    return STAT_RECORD.pack(version, flags, 0, uid, gid, mode, rdev)


# --- the host side of an attack: a share, a canary outside it, and a watch on it --------

# Fresh per process, so a value in a reply cannot be a coincidence.
SECRET = b"CANARY-SECRET-" + secrets.token_hex(16).encode()
SECRET_X = b"CANARY-XATTR-" + secrets.token_hex(16).encode()
CANARY_NAME = "canary-only-outside-" + secrets.token_hex(6)
PLANTED = "planted-" + secrets.token_hex(4)  # prefix of every name an attack tries to create
SHARE_FILE = b"hello from inside the share\n"
BENIGN = b"benign share content\n"
GUEST_UID = 1000  # the guest's owner, deliberately not the host owner (root)
GUEST_GID = 1000

IN_ALL_EVENTS = 0x00000FFF
_INOTIFY_EVENT = struct.Struct("iIII")
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """Every access, open, change or creation under the watched directories.

    O_PATH opens generate no event (checked on this kernel), so the broker's own
    lookups are invisible; what shows is data being opened, read, written or
    created, or metadata (mode, owner, xattrs, size) changing.
    """

    def __init__(self) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.paths: dict[int, Path] = {}

    def watch(self, path: Path, mask: int = IN_ALL_EVENTS) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.paths[wd] = path

    def events(self) -> list[tuple[Path, int, str]]:
        out: list[tuple[Path, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, n = _INOTIFY_EVENT.unpack_from(data, pos)
                name = data[pos + 16 : pos + 16 + n].rstrip(b"\0").decode(errors="replace")
                out.append((self.paths.get(wd, Path("?")), mask, name))
                pos += 16 + n

    def close(self) -> None:
        os.close(self.fd)


def tree(root: Path, content: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything about a host tree an attack could change, without following links and
    without crossing into other mounts (no atime: reading is caught by inotify)."""
    out: dict[str, tuple[Any, ...]] = {}
    root_dev = os.lstat(root).st_dev
    stack = [root]
    while stack:
        here = stack.pop()
        for entry in sorted(os.scandir(here), key=lambda e: e.name):
            path = Path(entry.path)
            st = os.lstat(path)
            # Links too: their identity record (trusted.*, listed for root) is on the link.
            xattrs = tuple(
                (k, os.getxattr(path, k, follow_symlinks=False))
                for k in sorted(os.listxattr(path, follow_symlinks=False))
            )
            extra: bytes | str | None = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st.st_mode) and content:
                extra = path.read_bytes()
            out[str(path.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_nlink,
                st.st_rdev,
                st.st_mtime_ns,
                st.st_ctime_ns,
                xattrs,
                extra,
            )
            if stat.S_ISDIR(st.st_mode) and st.st_dev == root_dev:
                stack.append(path)
    return out


# --- a broker without CAP_SYS_ADMIN ----------------------------------------------------

CAP_SYS_ADMIN = 21
_CAP_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set


def has_sys_admin() -> bool:
    """Whether the calling thread has CAP_SYS_ADMIN in its effective set."""
    with open("/proc/thread-self/status", encoding="ascii") as status:
        line = next(row for row in status if row.startswith("CapEff:"))
    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)


def drop_sys_admin() -> None:
    """Drop CAP_SYS_ADMIN from the calling thread for good (capset is per thread)."""
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2 words
    if _libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for word in range(3):  # the first word's effective, permitted and inheritable
        data[word] &= ~(1 << CAP_SYS_ADMIN)
    if _libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


class WithoutSysAdmin:
    """A handler served by a thread that has dropped CAP_SYS_ADMIN: a broker that runs
    unprivileged (the kernel then refuses it trusted.* xattrs), in an otherwise root
    test process. Capabilities belong to threads, so nothing else loses any."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self._pool = ThreadPoolExecutor(1, "broker-without-sys-admin", drop_sys_admin)
        if self._pool.submit(has_sys_admin).result():
            raise AssertionError("the serving thread kept CAP_SYS_ADMIN")

    def handle(self, request: bytes) -> bytes | None:
        return self._pool.submit(self.handler.handle, request).result()

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> WithoutSysAdmin:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Recorder(logging.Handler):
    """The handler turns an unexpected exception into EIO and logs it: that is a raise
    the guest provoked, hidden behind a well-formed reply, so the tests count it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        out = [
            f"{r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
            for r in self.records
        ]
        self.records.clear()
        return out


class World:
    """A share and, beside it, a canary the guest must never read, change or add to.

    base/share    what the broker serves
    base/outside  secret.txt (SECRET, xattr user.canary=SECRET_X), CANARY_NAME, sub/inner.txt

    Names inside the share mirror the canary's (share/secret.txt, share/dir/sub/...)
    so an escape that lands outside succeeds silently instead of failing on ENOENT.
    ``outside_fd``/``secret_fd`` are open in this process, which is the broker's
    process too: forged node ids/fh values equal to them probe for raw-fd handles.
    """

    def __init__(self, base: Path, containment: str) -> None:
        self.base = base
        self.containment = containment
        self.share = base / "share"
        self.outside = base / "outside"
        self.handlers: list[Any] = []
        self.build_outside()
        self.build_share()
        self.outside_fd = os.open(self.outside, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.secret_fd = os.open(self.outside / "secret.txt", os.O_RDONLY | os.O_CLOEXEC)
        self.before = tree(self.outside)
        self.base_names = sorted(os.listdir(self.base))
        self.watch = Inotify()
        for d in (self.outside, self.outside / "sub", self.base):
            # On base only creations/renames/deletions: the broker opening the share
            # root itself is expected.
            self.watch.watch(d, IN_ALL_EVENTS if d != self.base else 0x100 | 0x200 | 0xC0)
        self.finished = False
        self.log = _Recorder()
        logging.getLogger("vmruntime.broker").addHandler(self.log)

    def build_outside(self) -> None:
        self.outside.mkdir()
        secret = self.outside / "secret.txt"
        secret.write_bytes(SECRET)
        os.setxattr(secret, "user.canary", SECRET_X)
        (self.outside / CANARY_NAME).write_bytes(SECRET)
        (self.outside / "sub").mkdir()
        (self.outside / "sub" / "inner.txt").write_bytes(SECRET)

    def build_share(self) -> None:
        share = self.share
        if share.exists():
            shutil.rmtree(share)
        os.mkdir(share, 0o755)
        for rel in ("dir", "dir/sub", "a", "empty"):
            os.mkdir(share / rel, 0o755)
        for rel, data in (
            ("file.txt", SHARE_FILE),
            ("secret.txt", BENIGN),
            ("clean.txt", b"clean"),
            ("dir/inner.txt", BENIGN),
            ("dir/secret.txt", BENIGN),
            ("dir/sub/inner.txt", BENIGN),
            ("a/b", b"b"),
        ):
            fd = os.open(share / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
        for p in (share, share / "dir", share / "dir/sub", share / "a", share / "empty"):
            os.chmod(p, 0o755)  # explicit modes: the umask is not ours to rely on
        for rel in ("file.txt", "secret.txt", "clean.txt", "dir/inner.txt", "a/b"):
            os.chmod(share / rel, 0o644)
        os.chmod(share / "dir/secret.txt", 0o644)
        os.chmod(share / "dir/sub/inner.txt", 0o644)
        os.setxattr(share / "file.txt", "user.x", b"value")

    def guard(self, raw: bytes) -> None:
        for needle in (SECRET, SECRET_X, CANARY_NAME.encode()):
            if needle in raw:
                raise WireError(f"a reply carries canary data {needle[:24]!r}: {raw[:200]!r}")

    def handler(self, **options: Any) -> Any:
        from vmruntime.broker import BrokerOptions, FuseHandler

        opts: dict[str, Any] = {
            "containment": self.containment,
            "uid": GUEST_UID,
            "gid": GUEST_GID,
        }
        opts.update(options)
        h = FuseHandler(self.share, BrokerOptions(**opts))
        self.handlers.append(h)
        return h

    def client(self, *, init: bool = True, **options: Any) -> Client:
        c = Client(self.handler(**options).handle, guard=self.guard)
        if init:
            c.init()
        return c

    def close_handlers(self) -> None:
        while self.handlers:
            self.handlers.pop().close()

    def outside_events(self) -> list[tuple[Path, int, str]]:
        # The share itself is replaced between fuzz examples (build_share); the guest
        # cannot do that (it has no name for the share root), so that is not an event.
        return [
            (p, m, n) for p, m, n in self.watch.events() if not (p == self.base and n == "share")
        ]

    def internal_errors(self) -> list[str]:
        return self.log.take()

    def problems(self) -> list[str]:
        """What the guest did to the world outside the share, or to the handler."""
        found = [f"inotify {hex(m)} on {p}/{n}" for p, m, n in self.outside_events()]
        found += [f"handler error: {e}" for e in self.internal_errors()]
        after = tree(self.outside)
        if after != self.before:
            changed = sorted(
                k for k in set(after) | set(self.before) if after.get(k) != self.before.get(k)
            )
            found.append(f"outside changed: {changed}")
        if sorted(os.listdir(self.base)) != self.base_names:
            found.append(f"base now holds {sorted(os.listdir(self.base))}")
        for d in {self.base.parent, Path("/"), Path("/tmp"), Path.cwd(), self.outside}:
            with os.scandir(d) as it:
                found += [f"planted {e.path}" for e in it if e.name.startswith(PLANTED)]
        return found

    def finish(self, check: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self.close_handlers()
        finally:
            problems = self.problems() if check else []
            logging.getLogger("vmruntime.broker").removeHandler(self.log)
            self.watch.close()
            os.close(self.outside_fd)
            os.close(self.secret_fd)
        if problems:
            raise AssertionError("after the attacks: " + "; ".join(problems))

    def __enter__(self) -> World:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.finish(check=exc_type is None)


def bind_mount(source: str, target: Path) -> bool:
    """``mount --bind`` (root only); False where this host does not allow it."""
    result = subprocess.run(["mount", "--bind", source, str(target)], capture_output=True)
    return result.returncode == 0


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
