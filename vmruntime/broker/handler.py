"""The FUSE request handler: raw request bytes in, raw reply bytes out.

Who calls it: the transports (:mod:`vmruntime.broker.vhost_user` for QEMU,
:mod:`vmruntime.broker.devfuse` for a host mount point) and the attack tests,
which feed it crafted requests. What it promises (docs/broker.md):

- it never raises for anything the guest sends: a request that does not decode
  gets EINVAL (EIO when even its header is unusable), an unknown opcode ENOSYS,
  a failed operation its errno, and the next request is served as usual;
- READ and WRITE data move between files and the transport's buffers with
  ``preadv``/``pwritev`` (:meth:`FuseHandler.handle_sg`): guest memory is not copied;
- every operation goes through containment, identity virtualization and, for a
  read-only share, the EROFS wrapper.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmruntime.broker import abi
from vmruntime.broker.abi import Op, WireError, unpack
from vmruntime.broker.containment import make_resolver
from vmruntime.broker.passthrough import Caller, Entry, Passthrough, SetAttr
from vmruntime.broker.readonly import ReadOnly
from vmruntime.errors import BrokerError

log = logging.getLogger("vmruntime.broker")

_WANTED_INIT_FLAGS = (
    abi.InitFlag.ASYNC_READ | abi.InitFlag.ATOMIC_O_TRUNC | abi.InitFlag.BIG_WRITES
    | abi.InitFlag.AUTO_INVAL_DATA | abi.InitFlag.DO_READDIRPLUS | abi.InitFlag.READDIRPLUS_AUTO
    | abi.InitFlag.PARALLEL_DIROPS | abi.InitFlag.MAX_PAGES | abi.InitFlag.CACHE_SYMLINKS
)  # fmt: skip
_HEADER = abi.IN_HEADER.size
_WRITE_ARGS_END = _HEADER + abi.WRITE_IN.size
_DIRENTPLUS_FIXED = abi.ENTRY_OUT_SIZE + abi.DIRENT_HEAD.size


@dataclass(frozen=True)
class BrokerOptions:
    """How one share is served (docs/broker.md)."""

    readonly: bool = False
    identity: str = "virtual"  # or "passthrough", for trusted shares
    uid: int = 0  # the owner the guest sees where it set none (virtual identity)
    gid: int = 0
    containment: str = "auto"  # "openat2", "walk", or "auto": openat2 where the kernel has it
    max_handles: int = 1024
    max_inodes: int = 65536
    max_write: int = 1 << 20
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    # The guest's FUSE session began with an earlier broker (a memory snapshot restored,
    # a broker restarted): INIT is done, and node ids and handles that broker gave out
    # are unknown here (ESTALE for node ids, so the guest looks them up again).
    resumed: bool = False
    # Fewer, larger round trips, for transports where each costs much (the console port:
    # docs/broker.md, "Transport (c)"): READDIRPLUS for every readdir (not only where the
    # kernel guesses attributes will be wanted), which spares a LOOKUP per entry of a
    # directory that is listed and stat'ed; and FLUSH answered ENOSYS once, after which
    # the kernel sends none (a flush does nothing here: data is written through).
    few_round_trips: bool = False


class FuseHandler:
    """Serves the FUSE protocol for one share root."""

    def __init__(self, root: str | os.PathLike[str], options: BrokerOptions | None = None) -> None:
        self.root = Path(root)
        self.options = options or BrokerOptions()
        try:
            root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise BrokerError(self.root, f"cannot open the share root: {exc.strerror}") from exc
        try:
            resolver = make_resolver(self.options.containment)
            self._passthrough = Passthrough(
                root_fd, resolver, identity_mode=self.options.identity, uid=self.options.uid,
                gid=self.options.gid, max_inodes=self.options.max_inodes,
                max_handles=self.options.max_handles, resumed=self.options.resumed,
            )  # fmt: skip
        except (ValueError, OSError) as exc:
            os.close(root_fd)
            raise BrokerError(self.root, str(exc)) from exc
        self.containment = resolver.name
        self._ops: Passthrough = (
            ReadOnly(self._passthrough) if self.options.readonly else self._passthrough  # type: ignore[assignment]
        )
        self._lock = threading.Lock()
        self.counts: Counter[int] = Counter()  # requests by opcode, for the broker's log
        self._initialized = self.options.resumed
        self._entry_ns = int(self.options.entry_timeout * 1e9)
        self._attr_ns = int(self.options.attr_timeout * 1e9)
        self._max_request = self.options.max_write + 4096
        self._closed = False
        self._dispatch: dict[int, Callable[[abi.InHeader, bytes], bytes | None]] = {
            Op.LOOKUP: self._lookup, Op.FORGET: self._forget, Op.BATCH_FORGET: self._batch_forget,
            Op.GETATTR: self._getattr, Op.SETATTR: self._setattr, Op.READLINK: self._readlink,
            Op.SYMLINK: self._symlink, Op.MKNOD: self._mknod, Op.MKDIR: self._mkdir,
            Op.UNLINK: self._unlink, Op.RMDIR: self._rmdir, Op.RENAME: self._rename,
            Op.RENAME2: self._rename2, Op.LINK: self._link, Op.OPEN: self._open,
            Op.READ: self._read, Op.STATFS: self._statfs,
            Op.RELEASE: self._release, Op.FSYNC: self._fsync, Op.SETXATTR: self._setxattr,
            Op.GETXATTR: self._getxattr, Op.LISTXATTR: self._listxattr,
            Op.REMOVEXATTR: self._removexattr, Op.FLUSH: self._flush, Op.INIT: self._init,
            Op.OPENDIR: self._opendir, Op.READDIR: self._readdir,
            Op.READDIRPLUS: self._readdirplus, Op.RELEASEDIR: self._releasedir,
            Op.FSYNCDIR: self._fsyncdir, Op.ACCESS: self._access, Op.CREATE: self._create,
            Op.FALLOCATE: self._fallocate, Op.LSEEK: self._lseek,
            Op.COPY_FILE_RANGE: self._copy_file_range, Op.DESTROY: self._destroy,
        }  # fmt: skip

    # Entry points.

    def handle(self, request: bytes | bytearray | memoryview) -> bytes | None:
        """The reply to one whole request, or None for requests without one (FORGET)."""
        view = memoryview(request).cast("B")
        with self._lock:
            return self._serve(view, [], None)[0]

    def handle_sg(self, request: Sequence[memoryview], reply: Sequence[memoryview]) -> int | None:
        """One request from scattered buffers, its reply written into ``reply``.

        Returns the reply's length, or None when the request has no reply.
        """
        total = sum(map(len, request))
        if total > self._max_request:
            head = _gather(request, _HEADER)
            return _scatter(self._refusal(head, errno.EINVAL), reply)
        head = _gather(request, min(total, _WRITE_ARGS_END))
        opcode = abi.IN_HEADER.unpack_from(head)[1] if len(head) >= _HEADER else 0
        data: list[memoryview] = []
        whole = head  # most requests (READ, GETATTR, FORGET...) are no longer than this
        if opcode == Op.WRITE:
            data = _slice(request, _WRITE_ARGS_END, total - _WRITE_ARGS_END)
        elif total > len(head):
            whole = _gather(request, total)
        with self._lock:
            answer, read_count = self._serve(memoryview(whole), data, reply)
        if answer is None:
            return None
        if read_count is not None:  # READ data is already in place after the header
            _scatter(answer, reply)
            return len(answer) + read_count
        return _scatter(answer, reply)

    def describe_counts(self) -> str:
        """``LOOKUP 12, GETATTR 3, ...``: what the guest asked for, most frequent first."""
        return ", ".join(
            f"{Op(op).name if op in Op._value2member_map_ else op} {count}"
            for op, count in self.counts.most_common()
        )

    def close(self) -> None:
        """Release every descriptor; later requests get EIO and touch nothing."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._passthrough.close()

    # Decoding and dispatch.

    def _serve(
        self,
        request: memoryview,
        write_data: list[memoryview],
        reply_views: Sequence[memoryview] | None,
    ) -> tuple[bytes | None, int | None]:
        """(reply, count of READ bytes placed straight into ``reply_views`` or None)."""
        try:
            header = abi.decode_in_header(request)
        except WireError:
            return abi.error_reply(0, errno.EIO), None
        carried = sum(map(len, write_data))  # WRITE data left in the transport's buffers
        if header.length != len(request) + carried or header.length > self._max_request:
            return abi.error_reply(header.unique, errno.EINVAL), None
        self.counts[header.opcode] += 1
        if self._closed:  # its descriptor numbers may belong to someone else by now
            return abi.error_reply(header.unique, errno.EIO), None
        if not self._initialized and header.opcode != Op.INIT:
            return abi.error_reply(header.unique, errno.EIO), None
        body = request[_HEADER:]
        try:
            if header.opcode == Op.READ and reply_views is not None:
                count = self._read_into(header, body, reply_views)
                return abi.out_header(header.unique, 0, count), count
            if header.opcode == Op.WRITE:
                return self._write_views(header, body, write_data, carried), None
            handler = self._dispatch.get(header.opcode)
            if handler is None:
                return abi.error_reply(header.unique, errno.ENOSYS), None
            return handler(header, bytes(body)), None
        except OSError as exc:
            return abi.error_reply(header.unique, exc.errno or errno.EIO), None
        except (WireError, OverflowError, ValueError):
            return abi.error_reply(header.unique, errno.EINVAL), None
        except Exception:
            log.exception("request %s failed unexpectedly", header.opcode)
            return abi.error_reply(header.unique, errno.EIO), None

    @staticmethod
    def _refusal(head: bytes, code: int) -> bytes:
        unique = abi.IN_HEADER.unpack_from(head)[2] if len(head) >= _HEADER else 0
        return abi.error_reply(unique, code)

    def _entry(self, entry: Entry) -> bytes:
        return abi.entry_out(entry.inode.nodeid, 0, self._entry_ns, entry.attr)

    @staticmethod
    def _caller(header: abi.InHeader) -> Caller:
        return Caller(header.uid, header.gid, header.pid)

    # Operations.

    def _init(self, header: abi.InHeader, body: bytes) -> bytes:
        major, minor, max_readahead, flags = unpack(abi.INIT_IN, body)
        if self._initialized:
            raise OSError(errno.EIO, "INIT twice")
        if major != abi.KERNEL_VERSION or minor < abi.MIN_MINOR_VERSION:
            raise OSError(errno.EPROTO, f"FUSE {major}.{minor} is not supported")
        max_write = self.options.max_write
        wanted = _WANTED_INIT_FLAGS
        if self.options.few_round_trips:
            wanted &= ~abi.InitFlag.READDIRPLUS_AUTO
        payload = abi.INIT_OUT.pack(
            abi.KERNEL_VERSION, min(minor, abi.KERNEL_MINOR_VERSION), max_readahead,
            flags & wanted, 64, 48, max_write, 1, max_write // 4096, 0, 0,
        )  # fmt: skip
        self._initialized = True
        return abi.reply(header.unique, payload)

    def _destroy(self, header: abi.InHeader, body: bytes) -> bytes:
        self._passthrough.reset()
        self._initialized = False
        return abi.reply(header.unique)

    def _lookup(self, header: abi.InHeader, body: bytes) -> bytes:
        (name,) = abi.split_names(body, 0, 1)
        try:
            entry = self._ops.lookup(header.nodeid, name)
        except FileNotFoundError:
            # A cacheable "no such name" spares the guest a round trip per create.
            return abi.reply(header.unique, abi.negative_entry(self._entry_ns))
        return abi.reply(header.unique, self._entry(entry))

    def _forget(self, header: abi.InHeader, body: bytes) -> None:
        (count,) = unpack(abi.FORGET_IN, body)
        self._ops.forget(header.nodeid, count)

    def _batch_forget(self, header: abi.InHeader, body: bytes) -> None:
        count, _ = unpack(abi.BATCH_FORGET_IN, body)
        offset = abi.BATCH_FORGET_IN.size
        for _ in range(min(count, (len(body) - offset) // abi.FORGET_ONE.size)):
            nodeid, nlookup = abi.FORGET_ONE.unpack_from(body, offset)
            self._ops.forget(nodeid, nlookup)
            offset += abi.FORGET_ONE.size

    def _getattr(self, header: abi.InHeader, body: bytes) -> bytes:
        attr = self._ops.getattr(header.nodeid)
        return abi.reply(header.unique, abi.attr_out(self._attr_ns, attr))

    def _setattr(self, header: abi.InHeader, body: bytes) -> bytes:
        fields = unpack(abi.SETATTR_IN, body)
        valid, _, fh, size, _owner, atime, mtime, _ctime, atime_ns, mtime_ns = fields[:10]
        mode, uid, gid = fields[11], fields[13], fields[14]
        args = SetAttr(
            valid, fh, size, atime * 1_000_000_000 + atime_ns, mtime * 1_000_000_000 + mtime_ns,
            mode, uid, gid,
        )  # fmt: skip
        attr = self._ops.setattr(header.nodeid, args)
        return abi.reply(header.unique, abi.attr_out(self._attr_ns, attr))

    def _readlink(self, header: abi.InHeader, body: bytes) -> bytes:
        return abi.reply(header.unique, self._ops.readlink(header.nodeid))

    def _symlink(self, header: abi.InHeader, body: bytes) -> bytes:
        name, target = abi.split_names(body, 0, 2)
        entry = self._ops.symlink(header.nodeid, name, target, self._caller(header))
        return abi.reply(header.unique, self._entry(entry))

    def _mknod(self, header: abi.InHeader, body: bytes) -> bytes:
        mode, rdev, _umask, _ = unpack(abi.MKNOD_IN, body)
        (name,) = abi.split_names(body, abi.MKNOD_IN.size, 1)
        entry = self._ops.mknod(header.nodeid, name, mode, rdev, self._caller(header))
        return abi.reply(header.unique, self._entry(entry))

    def _mkdir(self, header: abi.InHeader, body: bytes) -> bytes:
        mode, _umask = unpack(abi.MKDIR_IN, body)
        (name,) = abi.split_names(body, abi.MKDIR_IN.size, 1)
        entry = self._ops.mkdir(header.nodeid, name, mode, self._caller(header))
        return abi.reply(header.unique, self._entry(entry))

    def _unlink(self, header: abi.InHeader, body: bytes) -> bytes:
        (name,) = abi.split_names(body, 0, 1)
        self._ops.unlink(header.nodeid, name)
        return abi.reply(header.unique)

    def _rmdir(self, header: abi.InHeader, body: bytes) -> bytes:
        (name,) = abi.split_names(body, 0, 1)
        self._ops.rmdir(header.nodeid, name)
        return abi.reply(header.unique)

    def _rename(self, header: abi.InHeader, body: bytes) -> bytes:
        (new_dir,) = unpack(abi.RENAME_IN, body)
        old, new = abi.split_names(body, abi.RENAME_IN.size, 2)
        self._ops.rename(header.nodeid, old, new_dir, new, 0)
        return abi.reply(header.unique)

    def _rename2(self, header: abi.InHeader, body: bytes) -> bytes:
        new_dir, flags, _ = unpack(abi.RENAME2_IN, body)
        old, new = abi.split_names(body, abi.RENAME2_IN.size, 2)
        self._ops.rename(header.nodeid, old, new_dir, new, flags)
        return abi.reply(header.unique)

    def _link(self, header: abi.InHeader, body: bytes) -> bytes:
        (old_node,) = unpack(abi.LINK_IN, body)
        (name,) = abi.split_names(body, abi.LINK_IN.size, 1)
        return abi.reply(header.unique, self._entry(self._ops.link(old_node, header.nodeid, name)))

    def _open(self, header: abi.InHeader, body: bytes) -> bytes:
        flags, _ = unpack(abi.OPEN_IN, body)
        handle = self._ops.open(header.nodeid, flags)
        return abi.reply(header.unique, abi.OPEN_OUT.pack(handle.fh, 0, 0))

    def _create(self, header: abi.InHeader, body: bytes) -> bytes:
        flags, mode, _umask, _ = unpack(abi.CREATE_IN, body)
        (name,) = abi.split_names(body, abi.CREATE_IN.size, 1)
        entry, handle = self._ops.create(header.nodeid, name, flags, mode, self._caller(header))
        return abi.reply(header.unique, self._entry(entry) + abi.OPEN_OUT.pack(handle.fh, 0, 0))

    def _read(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, offset, size, *_ = unpack(abi.READ_IN, body)
        return abi.reply(header.unique, self._ops.read(fh, offset, min(size, self._max_read)))

    def _read_into(self, header: abi.InHeader, body: memoryview,
                   reply_views: Sequence[memoryview]) -> int:  # fmt: skip
        fh, offset, size, *_ = unpack(abi.READ_IN, body)
        room = sum(map(len, reply_views)) - abi.OUT_HEADER.size
        if room < 0:
            raise OSError(errno.EINVAL, "no room for the reply")
        target = _slice(reply_views, abi.OUT_HEADER.size, min(size, room, self._max_read))
        return self._ops.read_into(fh, offset, target)

    @property
    def _max_read(self) -> int:
        return self.options.max_write

    def _write_views(self, header: abi.InHeader, body: memoryview, data: list[memoryview],
                     available: int) -> bytes:  # fmt: skip
        fh, offset, size, *_ = unpack(abi.WRITE_IN, body)
        if not data:  # a whole request: the data follows the arguments
            data = [body[abi.WRITE_IN.size :]]
            available = len(data[0])
        if size != available:
            raise OSError(errno.EINVAL, f"WRITE says {size} bytes and carries {available}")
        written = self._ops.write(fh, offset, data, size)
        return abi.reply(header.unique, abi.WRITE_OUT.pack(written, 0))

    def _statfs(self, header: abi.InHeader, body: bytes) -> bytes:
        st = self._ops.statfs(header.nodeid)
        payload = abi.STATFS_OUT.pack(
            st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize,
            st.f_namemax, st.f_frsize,
        )  # fmt: skip
        return abi.reply(header.unique, payload)

    def _release(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, *_ = unpack(abi.RELEASE_IN, body)
        self._ops.release(fh)
        return abi.reply(header.unique)

    def _flush(self, header: abi.InHeader, body: bytes) -> bytes:
        if self.options.few_round_trips:
            raise OSError(errno.ENOSYS, "FLUSH: the kernel need not send it")
        fh, *_ = unpack(abi.FLUSH_IN, body)
        self._ops.flush(fh)
        return abi.reply(header.unique)

    def _fsync(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, flags, _ = unpack(abi.FSYNC_IN, body)
        self._ops.fsync(fh, bool(flags & 1))
        return abi.reply(header.unique)

    def _fsyncdir(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, flags, _ = unpack(abi.FSYNC_IN, body)
        self._ops.fsync(fh, bool(flags & 1), is_dir=True)
        return abi.reply(header.unique)

    def _setxattr(self, header: abi.InHeader, body: bytes) -> bytes:
        size, flags = unpack(abi.SETXATTR_IN, body)
        (name,) = abi.split_names(body, abi.SETXATTR_IN.size, 1, exact=False)
        value = body[abi.SETXATTR_IN.size + len(name) + 1 :]
        if size != len(value) or size > abi.XATTR_SIZE_MAX:
            raise OSError(errno.EINVAL, f"SETXATTR says {size} bytes and carries {len(value)}")
        self._ops.setxattr(header.nodeid, name, value, flags)
        return abi.reply(header.unique)

    def _getxattr(self, header: abi.InHeader, body: bytes) -> bytes:
        size, _ = unpack(abi.GETXATTR_IN, body)
        (name,) = abi.split_names(body, abi.GETXATTR_IN.size, 1)
        return self._sized(header, size, self._ops.getxattr(header.nodeid, name))

    def _listxattr(self, header: abi.InHeader, body: bytes) -> bytes:
        size, _ = unpack(abi.GETXATTR_IN, body)
        names = self._ops.listxattr(header.nodeid)
        return self._sized(header, size, b"".join(n + b"\0" for n in names))

    @staticmethod
    def _sized(header: abi.InHeader, size: int, value: bytes) -> bytes:
        """GETXATTR/LISTXATTR: size 0 asks how big; a too-small buffer is ERANGE."""
        if size == 0:
            return abi.reply(header.unique, abi.GETXATTR_OUT.pack(len(value), 0))
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return abi.reply(header.unique, value)

    def _removexattr(self, header: abi.InHeader, body: bytes) -> bytes:
        (name,) = abi.split_names(body, 0, 1)
        self._ops.removexattr(header.nodeid, name)
        return abi.reply(header.unique)

    def _opendir(self, header: abi.InHeader, body: bytes) -> bytes:
        unpack(abi.OPEN_IN, body)
        handle = self._ops.opendir(header.nodeid)
        return abi.reply(header.unique, abi.OPEN_OUT.pack(handle.fh, 0, 0))

    def _readdir(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, offset, size, *_ = unpack(abi.READ_IN, body)
        out = bytearray()
        for item in self._ops.readdir(fh, offset):
            encoded = abi.dirent(item.ino, item.offset, item.name, item.d_type)
            if len(out) + len(encoded) > size:
                break
            out += encoded
        return abi.reply(header.unique, bytes(out))

    def _readdirplus(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, offset, size, *_ = unpack(abi.READ_IN, body)
        dir_node = self._ops.dir_nodeid(fh)
        out = bytearray()
        for item in self._ops.readdir(fh, offset):
            needed = _DIRENTPLUS_FIXED + len(item.name) + (-len(item.name) % 8)
            if len(out) + needed > size:
                break
            if item.name in (b".", b".."):
                entry = abi.ENTRY_OUT_HEAD.pack(0, 0, 0, 0, 0, 0) + bytes(abi.ATTR.size)
            else:
                try:
                    found = self._ops.lookup(dir_node, item.name)
                except OSError:
                    continue  # gone since the listing; the next entry keeps its own offset
                entry = self._entry(found)
            out += entry + abi.dirent(item.ino, item.offset, item.name, item.d_type)
        return abi.reply(header.unique, bytes(out))

    def _releasedir(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, *_ = unpack(abi.RELEASE_IN, body)
        self._ops.releasedir(fh)
        return abi.reply(header.unique)

    def _access(self, header: abi.InHeader, body: bytes) -> bytes:
        mask, _ = unpack(abi.ACCESS_IN, body)
        self._ops.access(header.nodeid, mask)
        return abi.reply(header.unique)

    def _fallocate(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, offset, length, mode, _ = unpack(abi.FALLOCATE_IN, body)
        self._ops.fallocate(fh, offset, length, mode)
        return abi.reply(header.unique)

    def _lseek(self, header: abi.InHeader, body: bytes) -> bytes:
        fh, offset, whence, _ = unpack(abi.LSEEK_IN, body)
        position = self._ops.lseek(fh, offset, whence)
        return abi.reply(header.unique, abi.LSEEK_OUT.pack(position))

    def _copy_file_range(self, header: abi.InHeader, body: bytes) -> bytes:
        fh_in, off_in, _node_out, fh_out, off_out, length, _flags = unpack(
            abi.COPY_FILE_RANGE_IN, body
        )
        copied = self._ops.copy_file_range(fh_in, off_in, fh_out, off_out, length)
        return abi.reply(header.unique, abi.WRITE_OUT.pack(copied, 0))


# Scatter-gather helpers over a transport's buffers.


def _gather(views: Sequence[memoryview], count: int) -> bytes:
    """The first ``count`` bytes across ``views``."""
    parts: list[bytes] = []
    for view in views:
        if count <= 0:
            break
        parts.append(bytes(view[:count]))
        count -= len(parts[-1])
    return b"".join(parts)


def _slice(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """Views of ``length`` bytes starting ``start`` bytes into ``views`` (no copy)."""
    result: list[memoryview] = []
    for view in views:
        if length <= 0:
            break
        size = len(view)
        if start >= size:
            start -= size
            continue
        if start == 0 and size <= length:  # the common case: whole guest pages
            result.append(view)
            length -= size
            continue
        piece = view[start : start + length]
        result.append(piece)
        length -= len(piece)
        start = 0
    return result


def _scatter(data: bytes, views: Sequence[memoryview]) -> int:
    """Copy ``data`` into ``views``; a reply that does not fit becomes an error reply."""
    if len(data) > sum(map(len, views)):
        unique = abi.OUT_HEADER.unpack_from(data)[2]
        data = abi.error_reply(unique, errno.EOVERFLOW)
        if len(data) > sum(map(len, views)):
            return 0
    offset = 0
    for view in views:
        if offset >= len(data):
            break
        chunk = data[offset : offset + len(view)]
        view[: len(chunk)] = chunk
        offset += len(chunk)
    return len(data)
