"""The filesystem operations on the host tree behind a share.

Who calls it: :class:`vmruntime.broker.handler.FuseHandler`, with decoded
arguments; :class:`vmruntime.broker.readonly.ReadOnly` wraps it for read-only
shares. What it promises: every path it touches is reached from an inode
descriptor by one validated name (:mod:`vmruntime.broker.containment`); only
regular files and directories are ever opened for I/O (CVE-2020-35517: a guest
that made the broker open a device node); symlinks are stored as given and
never followed; in ``virtual`` identity mode the host inode's owner and mode
never change (:mod:`vmruntime.broker.identity`). Failures are ``OSError`` with
the errno the guest gets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmruntime.broker import _libc, identity
from vmruntime.broker.abi import (
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    XATTR_NAME_MAX,
    Attr,
)
from vmruntime.broker.containment import Resolver, check_name
from vmruntime.broker.inodes import Handle, HandleTable, Inode, InodeTable, resumed_base

# Open flags a guest may ask for; anything else (O_DIRECT's alignment rules,
# O_NOATIME, O_PATH, O_TMPFILE...) is dropped rather than passed to the host.
_ALLOWED_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_EXCL | os.O_SYNC | os.O_DSYNC
)
_SAFE_OPEN = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_HOST_PERMS = 0o777  # never a setuid, setgid or sticky bit on a host file made by a guest
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
_FALLOCATE_MODES = 0x01 | 0x02 | 0x10  # KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE
# Inodes that carry an identity record (identity.record_name says where).
_RECORDED_KINDS = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK})
_DT = {
    stat.S_IFDIR: 4, stat.S_IFREG: 8, stat.S_IFLNK: 10, stat.S_IFCHR: 2, stat.S_IFBLK: 6,
    stat.S_IFIFO: 1, stat.S_IFSOCK: 12,
}  # fmt: skip


@dataclass(frozen=True)
class Caller:
    """Who in the guest asked (from the request header)."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True)
class Entry:
    inode: Inode
    attr: Attr


@dataclass(frozen=True)
class SetAttr:
    valid: int
    fh: int
    size: int
    atime_ns: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    ino: int
    d_type: int
    offset: int


class Passthrough:
    """Operations on the host tree rooted at an open directory descriptor."""

    def __init__(self, root_fd: int, resolver: Resolver, *, identity_mode: str, uid: int,
                 gid: int, max_inodes: int, max_handles: int,
                 resumed: bool = False) -> None:  # fmt: skip
        if identity_mode not in ("virtual", "passthrough"):
            raise ValueError(f"identity mode {identity_mode!r}: want virtual or passthrough")
        self.resolver = resolver
        self.virtual = identity_mode == "virtual"
        self.uid, self.gid = uid, gid
        if resumed:  # see InodeTable: the guest still holds an earlier broker's numbers
            base = resumed_base()
            self.inodes = InodeTable(root_fd, max_inodes, first_id=base, unknown_errno=errno.ESTALE)
            self.handles = HandleTable(max_handles, first=base)
        else:
            self.inodes = InodeTable(root_fd, max_inodes)
            self.handles = HandleTable(max_handles)

    def close(self) -> None:
        self.handles.clear()
        self.inodes.clear()
        os.close(self.inodes.root.fd)

    def reset(self) -> None:
        """DESTROY: the guest unmounted; drop everything it held."""
        self.handles.clear()
        self.inodes.clear()

    # What the guest sees.

    def attr(self, inode: Inode) -> Attr:
        st = os.fstat(inode.fd)
        return self._attr_of(inode, st)

    def _attr_of(self, inode: Inode, st: os.stat_result) -> Attr:
        mode, uid, gid, rdev, size = st.st_mode, st.st_uid, st.st_gid, 0, st.st_size
        if self.virtual:
            record = self._record(inode)
            uid, gid = self._owner(record)
            perms = record.mode if record and record.mode is not None else st.st_mode
            kind = identity.shown_type(st.st_mode, record)
            mode = kind | stat.S_IMODE(perms)
            if kind in (stat.S_IFCHR, stat.S_IFBLK) and record and record.rdev is not None:
                rdev = record.rdev
            if kind != stat.S_IFMT(st.st_mode):
                size = 0
        else:
            rdev = st.st_rdev
        return Attr(
            ino=st.st_ino, size=size, blocks=st.st_blocks,
            atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
            mode=mode, nlink=st.st_nlink, uid=uid, gid=gid, rdev=rdev & 0xFFFFFFFF,
            blksize=st.st_blksize,
        )  # fmt: skip

    def _record(self, inode: Inode) -> identity.StatRecord | None:
        if inode.kind not in _RECORDED_KINDS:
            return None  # a host-made FIFO, socket or device: the guest made none of them
        return identity.read_record(inode.proc_path, inode.kind)

    # Names.

    def lookup(self, parent_id: int, name: bytes) -> Entry:
        parent = self._dir(parent_id)
        fd = self.resolver.open_child(parent.fd, name, os.O_PATH)
        return self._remember(fd, parent)

    def _remember(self, fd: int, parent: Inode) -> Entry:
        try:
            st = os.fstat(fd)
            if st.st_dev != parent.key[0] and _libc.is_pseudo_fs(fd):
                raise OSError(errno.EACCES, "a kernel pseudo-filesystem inside the share")
        except OSError:
            os.close(fd)
            raise
        inode = self.inodes.remember(fd, st)
        return Entry(inode, self._attr_of(inode, st))

    def forget(self, nodeid: int, count: int) -> None:
        self.inodes.forget(nodeid, count)

    def _dir(self, nodeid: int) -> Inode:
        inode = self.inodes.get(nodeid)
        if inode.kind != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, f"node {nodeid} is not a directory")
        return inode

    # Attributes.

    def getattr(self, nodeid: int) -> Attr:
        return self.attr(self.inodes.get(nodeid))

    def setattr(self, nodeid: int, args: SetAttr) -> Attr:
        inode = self.inodes.get(nodeid)
        if args.valid & FATTR_MODE and inode.kind == stat.S_IFLNK:
            # As Linux answers fchmodat(AT_SYMLINK_NOFOLLOW): a link's mode means nothing.
            raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
        if args.valid & FATTR_SIZE:
            self._truncate(inode, args)
        if args.valid & (FATTR_ATIME | FATTR_MTIME):
            self._set_times(inode, args)
        if args.valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            self._set_identity(inode, args)
        return self.attr(inode)

    def _truncate(self, inode: Inode, args: SetAttr) -> None:
        if args.valid & FATTR_FH:
            os.ftruncate(self.handles.get(args.fh, is_dir=False).fd, args.size)
            return
        if inode.kind != stat.S_IFREG:
            raise OSError(errno.EISDIR if inode.kind == stat.S_IFDIR else errno.EINVAL, "truncate")
        if self.virtual and self._shows_special(inode):
            raise OSError(errno.EINVAL, "truncate of a device node or FIFO")
        fd = self._reopen(inode, os.O_WRONLY)
        try:
            os.ftruncate(fd, args.size)
        finally:
            os.close(fd)

    def _shows_special(self, inode: Inode) -> bool:
        return stat.S_IFMT(self.attr(inode).mode) != inode.kind

    def _set_times(self, inode: Inode, args: SetAttr) -> None:
        if inode.kind == stat.S_IFLNK:
            return  # no descriptor-relative lutimes without a name; times of links matter little
        st = os.fstat(inode.fd)
        now = time.time_ns()
        atime = st.st_atime_ns
        mtime = st.st_mtime_ns
        if args.valid & FATTR_ATIME:
            atime = now if args.valid & FATTR_ATIME_NOW else args.atime_ns
        if args.valid & FATTR_MTIME:
            mtime = now if args.valid & FATTR_MTIME_NOW else args.mtime_ns
        os.utime(inode.proc_path, ns=(atime, mtime))

    def _set_identity(self, inode: Inode, args: SetAttr) -> None:
        mode = args.mode if args.valid & FATTR_MODE else None
        uid = args.uid if args.valid & FATTR_UID else None
        gid = args.gid if args.valid & FATTR_GID else None
        if not self.virtual:
            if mode is not None:  # never a symlink's (setattr refused that)
                os.chmod(inode.proc_path, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                _libc.chown_inode(inode.fd, -1 if uid is None else uid, -1 if gid is None else gid)
            return
        if inode.kind == stat.S_IFLNK:
            self._set_link_owner(inode, uid, gid)
            return
        record = self._record(inode)
        if mode is not None:  # chmod keeps the type the guest sees (a device stays one)
            mode = identity.shown_type(os.fstat(inode.fd).st_mode, record) | stat.S_IMODE(mode)
        merged = (record or identity.StatRecord()).merged(uid=uid, gid=gid, mode=mode)
        identity.write_record(inode.proc_path, merged, inode.kind)

    def _set_link_owner(self, inode: Inode, uid: int | None, gid: int | None) -> None:
        """lchown in virtual mode: recorded in the link's trusted.* record.

        Where that record cannot be written (no CAP_SYS_ADMIN), a chown the guest
        would not see anyway (to the owner already shown) succeeds, as it would on any
        filesystem; any other is EOPNOTSUPP, never a change that silently did not happen.
        """
        record = self._record(inode)
        merged = (record or identity.StatRecord()).merged(uid=uid, gid=gid)
        try:
            identity.write_record(inode.proc_path, merged, stat.S_IFLNK)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP or self._owner(merged) != self._owner(record):
                raise

    def _owner(self, record: identity.StatRecord | None) -> tuple[int, int]:
        """The uid and gid the guest sees for an inode with ``record``."""
        uid = record.uid if record and record.uid is not None else self.uid
        gid = record.gid if record and record.gid is not None else self.gid
        return uid, gid

    # Creating and removing names.

    def mkdir(self, parent_id: int, name: bytes, mode: int, caller: Caller) -> Entry:
        parent = self._dir(parent_id)
        check_name(name)
        os.mkdir(name, mode & _HOST_PERMS, dir_fd=parent.fd)
        entry = self.lookup(parent_id, name)
        self._adopt(entry.inode, parent, mode | stat.S_IFDIR, caller)
        return Entry(entry.inode, self.attr(entry.inode))

    def mknod(self, parent_id: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Entry:
        parent = self._dir(parent_id)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in identity.SPECIAL_TYPES:
            raise OSError(errno.EINVAL, f"mknod of type {kind:o}")
        if not self.virtual and kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EPERM, "device nodes on the host need identity virtualization")
        if self.virtual or kind == stat.S_IFREG:
            # In virtual mode, whatever the guest asked for, the host gets a regular file.
            host_mode = mode & _HOST_PERMS if kind == stat.S_IFREG else 0o600
            os.close(self.resolver.open_child(
                parent.fd, name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, host_mode
            ))  # fmt: skip
        else:  # a FIFO or socket of a trusted share
            os.mknod(check_name(name), kind | (mode & _HOST_PERMS), dir_fd=parent.fd)
        entry = self.lookup(parent_id, name)
        self._adopt(entry.inode, parent, kind | stat.S_IMODE(mode), caller, rdev=rdev,
                    force=True)  # fmt: skip
        return Entry(entry.inode, self.attr(entry.inode))

    def symlink(self, parent_id: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        parent = self._dir(parent_id)
        check_name(name)
        if not target or len(target) > 4095 or b"\0" in target:
            raise OSError(errno.EINVAL, "bad symlink target")
        os.symlink(target, name, dir_fd=parent.fd)  # stored as given, never followed by us
        entry = self.lookup(parent_id, name)
        try:
            self._adopt(entry.inode, parent, stat.S_IFLNK | 0o777, caller)
        except OSError:
            # The guest hears that SYMLINK failed: no link stays behind with an owner
            # nobody asked for (an unprivileged broker cannot record it: docs/broker.md).
            self.forget(entry.inode.nodeid, 1)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=parent.fd)
            raise
        return Entry(entry.inode, self.attr(entry.inode))

    def link(self, nodeid: int, parent_id: int, name: bytes) -> Entry:
        inode = self.inodes.get(nodeid)
        parent = self._dir(parent_id)
        check_name(name)
        if inode.kind == stat.S_IFDIR:
            raise OSError(errno.EPERM, "hard link to a directory")
        _libc.link_inode(inode.fd, parent.fd, name)
        return self.lookup(parent_id, name)

    def unlink(self, parent_id: int, name: bytes) -> None:
        parent = self._dir(parent_id)
        os.unlink(check_name(name), dir_fd=parent.fd)

    def rmdir(self, parent_id: int, name: bytes) -> None:
        parent = self._dir(parent_id)
        os.rmdir(check_name(name), dir_fd=parent.fd)

    def rename(self, parent_id: int, name: bytes, new_parent_id: int, new_name: bytes,
               flags: int) -> None:  # fmt: skip
        parent, new_parent = self._dir(parent_id), self._dir(new_parent_id)
        check_name(name)
        check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise OSError(errno.EINVAL, f"rename flags {flags:#x}")
        _libc.renameat2(parent.fd, name, new_parent.fd, new_name, flags)

    def _adopt(self, inode: Inode, parent: Inode, mode: int, caller: Caller, *, rdev: int = 0,
               force: bool = False) -> None:  # fmt: skip
        """Give a new inode the owner and mode the guest meant.

        As on any Unix filesystem, a setgid directory passes its group on (and, to
        subdirectories, its setgid bit).
        """
        parent_attr = self.attr(parent)
        inherit_group = bool(parent_attr.mode & stat.S_ISGID)
        if not self.virtual:
            # The host kernel has already given the new inode the setgid parent's group.
            _libc.chown_inode(inode.fd, caller.uid, -1 if inherit_group else caller.gid)
            return
        gid = parent_attr.gid if inherit_group else caller.gid
        if inherit_group and stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
        wants_mode = force or bool(stat.S_IMODE(mode) & ~_HOST_PERMS)
        record = identity.StatRecord(
            uid=caller.uid if caller.uid != self.uid else None,
            gid=gid if gid != self.gid else None,
            mode=mode if wants_mode else None,
            rdev=rdev if stat.S_IFMT(mode) in (stat.S_IFCHR, stat.S_IFBLK) else None,
        )
        if record != identity.StatRecord():
            identity.write_record(inode.proc_path, record, inode.kind)

    # Symlinks.

    def readlink(self, nodeid: int) -> bytes:
        inode = self.inodes.get(nodeid)
        if inode.kind != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return os.readlink(b"", dir_fd=inode.fd)

    # Files.

    def open(self, nodeid: int, flags: int) -> Handle:
        inode = self.inodes.get(nodeid)
        if inode.kind == stat.S_IFDIR:
            raise OSError(errno.EISDIR, "open of a directory as a file")
        fd = self._reopen(inode, flags & _ALLOWED_OPEN_FLAGS & ~(os.O_CREAT | os.O_EXCL))
        return self.handles.add(fd, inode, is_dir=False)

    def create(self, parent_id: int, name: bytes, flags: int, mode: int,
               caller: Caller) -> tuple[Entry, Handle]:  # fmt: skip
        parent = self._dir(parent_id)
        if self.handles.full():
            raise OSError(errno.EMFILE, "too many open files in this share")
        wanted = flags & _ALLOWED_OPEN_FLAGS & ~(os.O_EXCL | os.O_CREAT)
        try:
            fd = self.resolver.open_child(
                parent.fd, name, wanted | os.O_CREAT | os.O_EXCL | _SAFE_OPEN, mode & _HOST_PERMS
            )
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            return self._open_existing(parent_id, name, wanted)
        try:
            entry = self.lookup(parent_id, name)
            self._adopt(entry.inode, parent, mode | stat.S_IFREG, caller)
        except BaseException:
            os.close(fd)
            raise
        handle = self.handles.add(fd, entry.inode, is_dir=False)
        return Entry(entry.inode, self.attr(entry.inode)), handle

    def _open_existing(self, parent_id: int, name: bytes, flags: int) -> tuple[Entry, Handle]:
        # Through the inode, so an existing FIFO or device is refused, never opened.
        entry = self.lookup(parent_id, name)
        try:
            if entry.inode.kind != stat.S_IFREG:
                raise OSError(errno.EISDIR if entry.inode.kind == stat.S_IFDIR else errno.EACCES,
                              "create of an existing name that is not a file")  # fmt: skip
            handle = self.handles.add(self._reopen(entry.inode, flags), entry.inode, is_dir=False)
        except BaseException:
            self.forget(entry.inode.nodeid, 1)
            raise
        return entry, handle

    def _reopen(self, inode: Inode, flags: int) -> int:
        """An I/O descriptor for a file or directory inode; nothing else is ever opened."""
        if inode.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise OSError(errno.ELOOP if inode.kind == stat.S_IFLNK else errno.EACCES,
                          "only regular files and directories are opened")  # fmt: skip
        return os.open(inode.proc_path, flags | _SAFE_OPEN)

    def read_into(self, fh: int, offset: int, buffers: Sequence[memoryview]) -> int:
        fd = self.handles.get(fh, is_dir=False).fd
        return os.preadv(fd, buffers, offset) if buffers else 0

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.handles.get(fh, is_dir=False).fd, size, offset)

    def write(self, fh: int, offset: int, buffers: Sequence[memoryview], size: int) -> int:
        """Write all ``size`` bytes of ``buffers`` at ``offset`` (one pwritev, as a rule)."""
        fd = self.handles.get(fh, is_dir=False).fd
        if not size:
            return 0
        total = os.pwritev(fd, buffers, offset)
        while 0 < total < size:  # a short write (a signal, a nearly full disk): go on
            written = os.pwritev(fd, _advance(list(buffers), total), offset + total)
            if written <= 0:
                break
            total += written
        return total

    def release(self, fh: int) -> None:
        self.handles.remove(fh, is_dir=False)

    def flush(self, fh: int) -> None:
        self.handles.get(fh, is_dir=False)

    def fsync(self, fh: int, datasync: bool, *, is_dir: bool = False) -> None:
        fd = self.handles.get(fh, is_dir=is_dir).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        if mode & ~_FALLOCATE_MODES:
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        _libc.fallocate(self.handles.get(fh, is_dir=False).fd, mode, offset, length)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, f"lseek whence {whence}")
        return os.lseek(self.handles.get(fh, is_dir=False).fd, offset, whence)

    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int) -> int:  # fmt: skip
        src = self.handles.get(fh_in, is_dir=False).fd
        dst = self.handles.get(fh_out, is_dir=False).fd
        return os.copy_file_range(src, dst, length, off_in, off_out)

    def statfs(self, nodeid: int) -> os.statvfs_result:
        return os.fstatvfs(self.inodes.get(nodeid).fd)

    def access(self, nodeid: int, mask: int) -> None:
        self.inodes.get(nodeid)  # the guest kernel checks permissions (default_permissions)

    # Directories.

    def opendir(self, nodeid: int) -> Handle:
        inode = self._dir(nodeid)
        fd = self._reopen(inode, os.O_RDONLY | os.O_DIRECTORY)
        return self.handles.add(fd, inode, is_dir=True)

    def readdir(self, fh: int, offset: int) -> Iterator[DirEntry]:
        """Entries after ``offset``, from a listing taken when the guest starts (offset 0).

        Lazy: the caller stops when its reply is full, so a large directory read in
        many requests costs each one only the entries it returns.
        """
        handle = self.handles.get(fh, is_dir=True)
        if offset == 0 or handle.listing is None:
            handle.listing = _list_dir(handle)
            if self.virtual:
                handle.listing = [self._shown_dirent(handle, *item) for item in handle.listing]
        listing = handle.listing
        for index in range(max(0, offset), len(listing)):
            name, ino, d_type = listing[index]
            yield DirEntry(name, ino, d_type, index + 1)

    def _shown_dirent(self, handle: Handle, name: bytes, ino: int,
                      d_type: int) -> tuple[bytes, int, int]:  # fmt: skip
        """A host regular file may be a guest's device or FIFO: list it as one."""
        if d_type != _DT[stat.S_IFREG]:
            return name, ino, d_type
        path = f"/proc/self/fd/{handle.fd}/{os.fsdecode(name)}"
        try:
            record = identity.read_record(path, follow_symlinks=False)
        except OSError:
            return name, ino, d_type
        return name, ino, _DT[identity.shown_type(stat.S_IFREG, record)]

    def dir_nodeid(self, fh: int) -> int:
        return self.handles.get(fh, is_dir=True).inode.nodeid

    def releasedir(self, fh: int) -> None:
        self.handles.remove(fh, is_dir=True)

    # Extended attributes (only user.*, and never the broker's own).

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        inode = self._xattr_target(nodeid, name, foreign=errno.EOPNOTSUPP)
        os.setxattr(inode.proc_path, name, value, flags & 3)

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        inode = self._xattr_target(nodeid, name, foreign=errno.ENODATA)
        return os.getxattr(inode.proc_path, name)

    def listxattr(self, nodeid: int) -> list[bytes]:
        inode = self.inodes.get(nodeid)
        if inode.kind not in (stat.S_IFREG, stat.S_IFDIR):
            return []
        names = [n.encode() for n in os.listxattr(inode.proc_path)]
        return [n for n in names if n.startswith(b"user.") and not identity.is_private_xattr(n)]

    def removexattr(self, nodeid: int, name: bytes) -> None:
        inode = self._xattr_target(nodeid, name, foreign=errno.ENODATA)
        os.removexattr(inode.proc_path, name)

    def _xattr_target(self, nodeid: int, name: bytes, *, foreign: int) -> Inode:
        """The inode whose ``user.*`` attribute ``name`` the guest may use.

        ``foreign`` is the errno for another namespace: "no such attribute" for
        reads and removals, "not supported" for writes.
        """
        inode = self.inodes.get(nodeid)
        if not name or len(name) > XATTR_NAME_MAX or b"\0" in name:
            raise OSError(errno.EINVAL, "bad extended attribute name")
        if identity.is_private_xattr(name):
            raise OSError(errno.EPERM, "the broker's own attribute")
        if inode.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise OSError(errno.EPERM, "extended attributes only on files and directories")
        if not name.startswith(b"user."):
            raise OSError(foreign, "only user.* extended attributes")
        return inode


def _list_dir(handle: Handle) -> list[tuple[bytes, int, int]]:
    st = os.fstat(handle.fd)
    dot = _DT[stat.S_IFDIR]
    entries: list[tuple[bytes, int, int]] = [(b".", st.st_ino, dot), (b"..", 0, dot)]
    os.lseek(handle.fd, 0, os.SEEK_SET)
    with os.scandir(handle.fd) as scan:
        for item in scan:
            entries.append((os.fsencode(item.name), item.inode(), _d_type(item)))
    return entries


def _d_type(item: os.DirEntry[str]) -> int:
    if item.is_symlink():
        return _DT[stat.S_IFLNK]
    if item.is_dir(follow_symlinks=False):
        return _DT[stat.S_IFDIR]
    if item.is_file(follow_symlinks=False):
        return _DT[stat.S_IFREG]
    return 0  # DT_UNKNOWN: the guest asks GETATTR


def _advance(buffers: list[memoryview], count: int) -> list[memoryview]:
    """``buffers`` without their first ``count`` bytes."""
    for index, view in enumerate(buffers):
        if count < len(view):
            return [view[count:], *buffers[index + 1 :]]
        count -= len(view)
    return []
