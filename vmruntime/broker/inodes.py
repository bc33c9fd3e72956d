"""Node ids and file handles: what the guest names, mapped to host descriptors.

Who calls it: :mod:`vmruntime.broker.passthrough`. What it promises: a node id
or file handle the broker did not hand out (forged, stale, of the wrong kind)
is EBADF, never some other file; every inode is an ``O_PATH`` descriptor, one
per host inode however many names it has; the number of known inodes and open
handles is capped (CVE-2020-10717: a guest exhausting the broker's descriptors).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass, field

from vmruntime.broker.abi import ROOT_ID


@dataclass
class Inode:
    nodeid: int
    fd: int  # O_PATH, never opened for I/O itself
    key: tuple[int, int]  # (st_dev, st_ino)
    kind: int  # S_IFMT of the host inode; it cannot change while we hold the fd
    nlookup: int = 0

    @property
    def proc_path(self) -> str:
        """A path to this very inode: opening it reopens the inode, not a name."""
        return f"/proc/self/fd/{self.fd}"


def resumed_base() -> int:
    """Where a resumed broker starts numbering node ids and handles: a random multiple of
    2**32, so that no number an earlier broker of the same session handed out (which count
    up from 1) names something else here."""
    return (secrets.randbits(30) + 1) << 32


class InodeTable:
    """Node ids of one share. ``first_id`` is where numbering starts (ids count up from it);
    ``unknown_errno`` is the answer for an id we never gave out: EBADF normally, ESTALE in a
    resumed broker, where the guest's kernel still holds the ids of the broker before us
    and, on ESTALE, looks the name up again from the parent (the root, id 1, always works)."""

    def __init__(self, root_fd: int, max_inodes: int, *, first_id: int = ROOT_ID + 1,
                 unknown_errno: int = errno.EBADF) -> None:  # fmt: skip
        st = os.fstat(root_fd)
        self.root = Inode(ROOT_ID, root_fd, (st.st_dev, st.st_ino), stat.S_IFMT(st.st_mode), 1)
        self._by_id: dict[int, Inode] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._next_id = first_id
        self._max = max_inodes
        self._unknown_errno = unknown_errno

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, nodeid: int) -> Inode:
        inode = self._by_id.get(nodeid)
        if inode is None:
            raise OSError(self._unknown_errno, f"unknown node id {nodeid}")
        return inode

    def remember(self, fd: int, st: os.stat_result) -> Inode:
        """Count one more lookup of the inode ``fd`` refers to; takes ownership of ``fd``."""
        key = (st.st_dev, st.st_ino)
        known = self._by_key.get(key)
        if known is not None:
            os.close(fd)
            known.nlookup += 1
            return known
        if len(self._by_id) >= self._max:
            os.close(fd)
            raise OSError(errno.ENFILE, "the share's inode table is full")
        inode = Inode(self._next_id, fd, key, stat.S_IFMT(st.st_mode), 1)
        self._next_id += 1
        self._by_id[inode.nodeid] = inode
        self._by_key[key] = inode
        return inode

    def forget(self, nodeid: int, count: int) -> None:
        inode = self._by_id.get(nodeid)
        if inode is None or inode is self.root:
            return  # the kernel may forget what a DESTROY already dropped
        inode.nlookup -= min(count, inode.nlookup)
        if inode.nlookup == 0:
            del self._by_id[nodeid]
            del self._by_key[inode.key]
            os.close(inode.fd)

    def clear(self) -> None:
        """Forget everything but the root."""
        for inode in list(self._by_id.values()):
            if inode is not self.root:
                os.close(inode.fd)
        self._by_id = {ROOT_ID: self.root}
        self._by_key = {self.root.key: self.root}


@dataclass
class Handle:
    fh: int
    fd: int  # opened for I/O: a regular file or a directory
    inode: Inode
    is_dir: bool
    listing: list[tuple[bytes, int, int]] | None = field(default=None)  # name, ino, d_type


class HandleTable:
    def __init__(self, max_handles: int, *, first: int = 1) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = first
        self._max = max_handles

    def __len__(self) -> int:
        return len(self._handles)

    def full(self) -> bool:
        return len(self._handles) >= self._max

    def add(self, fd: int, inode: Inode, *, is_dir: bool) -> Handle:
        if self.full():
            os.close(fd)
            raise OSError(errno.EMFILE, "too many open files in this share")
        handle = Handle(self._next, fd, inode, is_dir)
        self._next += 1
        self._handles[handle.fh] = handle
        return handle

    def get(self, fh: int, *, is_dir: bool) -> Handle:
        handle = self._handles.get(fh)
        if handle is None or handle.is_dir != is_dir:
            raise OSError(errno.EBADF, f"unknown {'directory' if is_dir else 'file'} handle {fh}")
        return handle

    def remove(self, fh: int, *, is_dir: bool) -> None:
        handle = self.get(fh, is_dir=is_dir)
        del self._handles[fh]
        os.close(handle.fd)

    def clear(self) -> None:
        for handle in self._handles.values():
            os.close(handle.fd)
        self._handles.clear()
