"""Build an EROFS image straight from an uncompressed OCI layer tar stream.

The writer is pure Python and needs no privileges: it never extracts the tar to
disk.  It produces an uncompressed EROFS image with 4096-byte blocks that a
Linux 6.1 kernel mounts (and overlayfs stacks) as one read-only layer.  Only
features the 6.1 kernel already has are used: 64-byte extended inodes, plain and
tail-inline flat data layouts and inline xattrs with the short name indexes.

Image layout (block numbers in 4096-byte units)::

    block 0            superblock at byte 1024, the rest zero
    blocks 1..D        regular-file data, appended while the tar streams
    blocks D+1..M-1    directory blocks and symlink targets that need a block
    blocks M..end      metadata: inodes, inline xattrs and inline tails

``meta_blkaddr`` is ``M - 1`` rather than ``M``: the root inode sits at the
start of block M, so every nid (including the root's, 128) is non-zero.  The
kernel turns nids into inode numbers, and inode number 0 confuses user space.

The tar is read once, strictly sequentially.  Full blocks of each regular file
go to the data area as they arrive; a file's last partial block (its tail) is
kept in a spool file next to ``dest`` until the metadata area is written, where
it is stored right after its inode (``FLAT_INLINE``).  A tail that would not fit
in the inode's block is written as a padded block of its own (``FLAT_PLAIN``).
Memory use grows with the number of entries, not with their sizes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from vmruntime.errors import LayerError
from vmruntime.rootfs.tarstream import (
    BLKTYPE,
    CHRTYPE,
    DIRTYPE,
    FIFOTYPE,
    LNKTYPE,
    REGULAR_TYPES,
    SYMTYPE,
    TarEntry,
    TarReader,
)

__all__ = ["BLOCK_SIZE", "ErofsStats", "build_erofs_from_tar"]

BLOCK_SIZE = 4096
_BLOCK_BITS = 12
_SUPERBLOCK_OFFSET = 1024
_EROFS_MAGIC = 0xE0F5E1E2
_NAME_MAX = 255
_XATTR_NAME_MAX = 255
_XATTR_VALUE_MAX = 0xFFFF  # e_value_size is a le16
_SYMLINK_MAX = BLOCK_SIZE - 1  # PATH_MAX including the NUL
_SLOT = 32  # inodes are addressed in 32-byte units (nid)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_META_FLUSH = 1 << 20
_OPEN_META_BLOCKS = 16

_LAYOUT_FLAT_PLAIN = 0
_LAYOUT_FLAT_INLINE = 2

_SUPERBLOCK = struct.Struct("<IIIBBHQqIIII16s16sIHHHBBIQB23s")
_INODE = struct.Struct("<HHHHQIIIIqII16s")  # struct erofs_inode_extended
_DIRENT = struct.Struct("<QHBB")
_XATTR_ENTRY = struct.Struct("<BBH")
_XATTR_IBODY_HEADER = bytes(12)  # no name filter, no shared xattrs
# i_xattr_icount is a le16: the header counts as 1, then 4-byte units.
_XATTR_IBODY_MAX = len(_XATTR_IBODY_HEADER) + 4 * (0xFFFF - 1)
assert _SUPERBLOCK.size == 128 and _INODE.size == 64 and _DIRENT.size == 12

_INODE_SIZE = _INODE.size

# erofs name indexes; the ACL names are whole names with an empty suffix.
_XATTR_PREFIXES: tuple[tuple[bytes, int, bool], ...] = (
    (b"user.", 1, False),
    (b"system.posix_acl_access", 2, True),
    (b"system.posix_acl_default", 3, True),
    (b"trusted.", 4, False),
    (b"security.", 6, False),
)

_FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}

_WHITEOUT_PREFIX = b".wh."
_WHITEOUT_META_PREFIX = b".wh..wh."
_OPAQUE_MARKER = b".wh..wh..opq"
_OPAQUE_XATTR = (4, b"overlay.opaque", b"y")

Xattr = tuple[int, bytes, bytes]  # (erofs name index, name suffix, value)


@dataclass(frozen=True)
class ErofsStats:
    """What :func:`build_erofs_from_tar` wrote."""

    inodes: int
    blocks: int
    bytes_written: int
    files: int
    dirs: int
    symlinks: int
    hardlinks: int  # names beyond the first one of an inode
    devices: int  # character and block devices other than whiteouts
    fifos: int
    whiteouts: int  # 0/0 character devices (overlayfs whiteouts)
    opaque_dirs: int


class _Node:
    """One inode of the image being built, shared by all its hard links."""

    __slots__ = (
        "blkaddr",
        "children",
        "dir_blocks",
        "gid",
        "inline",
        "mode",
        "mtime",
        "mtime_nsec",
        "nid",
        "nlink",
        "opaque",
        "rdev",
        "size",
        "tail_len",
        "tail_off",
        "target",
        "uid",
        "xattr_blob",
        "xattrs",
    )

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.mtime_nsec = 0
        self.xattrs: tuple[Xattr, ...] = ()
        self.xattr_blob = b""
        self.size = 0
        self.rdev = 0
        self.blkaddr = 0
        self.inline = False
        self.tail_off = 0
        self.tail_len = 0
        self.target = b""
        self.children: dict[bytes, _Node] | None = {} if stat.S_ISDIR(mode) else None
        self.opaque = False
        # Set when directories are laid out; None until then spares a list per entry.
        self.dir_blocks: list[list[tuple[bytes, _Node]]] | None = None
        self.nlink = 0
        self.nid = 0

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def build_erofs_from_tar(
    tar_stream: BinaryIO,
    dest: Path | str,
    *,
    layer: str = "<layer>",
    mtime: int | None = None,
) -> ErofsStats:
    """Convert one uncompressed OCI layer tar into an EROFS image at ``dest``.

    ``tar_stream`` is read once, front to back, in large chunks (it may be a
    pipe), and read to its end so that a caller hashing the stream sees every
    byte.  It may be ustar, GNU or PAX (see :mod:`vmruntime.rootfs.tarstream`);
    GNU sparse members are stored expanded, their holes as zeros.  ``dest`` is
    created or truncated, written, flushed and fsynced; the caller owns
    atomicity (write to a temporary name, then rename) and removes ``dest`` if
    this raises.  A scratch file for small file tails is created
    (already unlinked) in ``dest``'s directory.

    The image keeps, per entry: type, permission bits including
    setuid/setgid/sticky, 32-bit uid/gid, mtime with nanoseconds (from PAX),
    size and content, symlink targets verbatim, hard links (one inode, correct
    link count), device numbers, FIFOs and the ``SCHILY.xattr.*`` (and
    ``LIBARCHIVE.xattr.*``) xattrs in the ``user.``, ``trusted.``,
    ``security.`` and ``system.posix_acl_*`` namespaces.  OCI whiteouts become
    overlayfs ones: ``.wh.NAME`` a 0/0 character device ``NAME`` (dropping any
    earlier ``NAME`` of this tar), ``.wh..wh..opq`` the xattr
    ``trusted.overlay.opaque=y`` on its directory (dropping the directory's
    earlier children); other ``.wh..wh.*`` entries are ignored.  Later entries
    replace earlier ones for the same path, as when extracting; a directory
    restated keeps its children.  Missing parent directories are created
    0755 root:root.

    ``layer`` (the layer digest) only appears in error messages.  ``mtime`` is
    the time given to directories the tar does not describe (implicit parents,
    a missing root entry) and the image build time; ``None`` means 0.  The
    volume UUID is a hash of the metadata area, so the same tar always yields
    the same image bytes.

    Raises :class:`~vmruntime.errors.LayerError` naming the offending entry for
    unsafe or unrepresentable content (``..`` or NUL in paths, names over 255
    bytes, hard links to entries not seen earlier, xattrs outside the supported
    namespaces, unknown entry types) and for a corrupt or truncated tar.
    """
    dest = Path(dest)
    with (
        open(dest, "wb") as out,
        tempfile.TemporaryFile(dir=dest.parent, prefix=".erofs-tails-") as spool,
    ):
        builder = _Builder(out, spool, layer, 0 if mtime is None else mtime)
        builder.read_tar(tar_stream)
        stats = builder.write_image()
        out.flush()
        os.fsync(out.fileno())
    return stats


# --- reading the tar ---------------------------------------------------------


class _Builder:
    """Holds the tree while the tar streams in, then lays out and writes the image."""

    def __init__(self, out: IO[bytes], spool: IO[bytes], layer: str, default_mtime: int) -> None:
        self._out = out
        self._spool = spool
        self._spool_size = 0
        self._layer = layer
        self._default_mtime = default_mtime
        self._root = _Node(stat.S_IFDIR | 0o755, mtime=default_mtime)
        self._next_block = 1  # block 0 holds the superblock
        self._out.seek(BLOCK_SIZE)

    def _error(self, reason: str, member: str | None = None) -> LayerError:
        return LayerError(self._layer, reason, member)

    def read_tar(self, stream: BinaryIO) -> None:
        """Add every member of the stream to the tree; the reader drains the stream."""
        reader = TarReader(stream, self._layer)
        for entry in reader:
            self._add_member(reader, entry)

    def _add_member(self, reader: TarReader, entry: TarEntry) -> None:
        parts = self._split_path(entry.name, entry)
        kind = entry.type
        if parts and parts[-1].startswith(_WHITEOUT_PREFIX):
            self._add_whiteout(parts, entry)
            return
        if kind == DIRTYPE:
            self._add_directory(parts, entry)
            return
        if not parts:
            raise self._error("the root directory entry is not a directory", entry.path)
        if kind in REGULAR_TYPES:
            node = self._add_regular_file(reader, entry)
        elif kind == SYMTYPE:
            node = self._new_symlink(entry)
        elif kind == LNKTYPE:
            node = self._hardlink_target(entry)
        elif kind in (CHRTYPE, BLKTYPE):
            node = self._new_device(entry)
        elif kind == FIFOTYPE:
            node = self._new_node(stat.S_IFIFO, entry)
        else:
            raise self._error(f"unsupported tar entry type {kind!r}", entry.path)
        self._parent_dir(parts, entry)[parts[-1]] = node

    # --- paths --------------------------------------------------------------

    def _split_path(self, raw: bytes, entry: TarEntry) -> list[bytes]:
        """Split a tar path into name components; [] is the root directory."""
        if b"\0" in raw:
            raise self._error("path contains a NUL byte", entry.path)
        parts = [p for p in raw.split(b"/") if p != b"" and p != b"."]
        for part in parts:
            if part == b"..":
                raise self._error("path contains a '..' component", entry.path)
            if len(part) > _NAME_MAX:
                raise self._error(f"name component longer than {_NAME_MAX} bytes", entry.path)
        return parts

    def _parent_dir(self, parts: list[bytes], entry: TarEntry) -> dict[bytes, _Node]:
        """The children of the directory that holds ``parts``."""
        children = self._directory_at(parts, len(parts) - 1, entry).children
        assert children is not None
        return children

    def _directory_at(self, parts: list[bytes], depth: int, entry: TarEntry) -> _Node:
        """The directory at ``parts[:depth]``, creating missing ones (0755 root:root)."""
        node = self._root
        for index in range(depth):
            part = parts[index]
            children = node.children
            assert children is not None
            child = children.get(part)
            if child is None:
                child = children[part] = _Node(stat.S_IFDIR | 0o755, mtime=self._default_mtime)
            elif child.children is None:
                shown = part.decode(errors="replace")
                raise self._error(f"{shown!r} is used as a directory but is not one", entry.path)
            node = child
        return node

    def _lookup(self, parts: list[bytes]) -> _Node | None:
        node: _Node | None = self._root
        for part in parts:
            if node is None or node.children is None:
                return None
            node = node.children.get(part)
        return node

    # --- entry kinds ----------------------------------------------------------

    def _new_node(self, file_type: int, entry: TarEntry) -> _Node:
        self._check_ids(entry)
        node = _Node(file_type | (entry.mode & 0o7777), entry.uid, entry.gid, entry.mtime)
        node.mtime_nsec = entry.mtime_nsec
        self._check_mtime(entry)
        if entry.xattrs:
            node.xattrs = self._xattrs(entry.xattrs, entry)
        return node

    def _check_ids(self, entry: TarEntry) -> None:
        for value in (entry.uid, entry.gid):
            if not 0 <= value <= 0xFFFFFFFF:
                raise self._error(f"uid/gid {value} does not fit in 32 bits", entry.path)

    def _check_mtime(self, entry: TarEntry) -> None:
        if not -(1 << 63) <= entry.mtime < (1 << 63):
            raise self._error(f"mtime {entry.mtime} out of range", entry.path)

    def _xattrs(self, found: dict[bytes, bytes], entry: TarEntry) -> tuple[Xattr, ...]:
        entries = tuple(self._xattr_entry(n, v, entry.path) for n, v in found.items())
        # Leave room for the opaque marker a directory may still receive.
        if _xattr_ibody_size(entries) > _XATTR_IBODY_MAX - _xattr_entry_size(_OPAQUE_XATTR):
            raise self._error("xattrs too large for one inode", entry.path)
        return entries

    def _xattr_entry(self, name: bytes, value: bytes, member: str) -> Xattr:
        shown = name.decode(errors="replace")
        if len(name) > _XATTR_NAME_MAX:
            raise self._error(f"xattr name {shown!r} longer than {_XATTR_NAME_MAX} bytes", member)
        if len(value) > _XATTR_VALUE_MAX:
            raise self._error(f"xattr {shown!r} value longer than {_XATTR_VALUE_MAX} bytes", member)
        for prefix, index, whole_name in _XATTR_PREFIXES:
            if whole_name and name == prefix:
                return (index, b"", value)
            if not whole_name and name.startswith(prefix) and len(name) > len(prefix):
                return (index, name[len(prefix) :], value)
        raise self._error(
            f"xattr {shown!r} is outside the user., trusted., security. and "
            "system.posix_acl_* namespaces",
            member,
        )

    def _add_directory(self, parts: list[bytes], entry: TarEntry) -> None:
        fresh = self._new_node(stat.S_IFDIR, entry)
        if not parts:
            self._restate_directory(self._root, fresh)
            return
        parent = self._parent_dir(parts, entry)
        existing = parent.get(parts[-1])
        if existing is not None and existing.is_dir:
            self._restate_directory(existing, fresh)
        else:
            parent[parts[-1]] = fresh

    @staticmethod
    def _restate_directory(node: _Node, fresh: _Node) -> None:
        """A directory listed again takes the new metadata but keeps its children."""
        node.mode, node.uid, node.gid = fresh.mode, fresh.uid, fresh.gid
        node.mtime, node.mtime_nsec, node.xattrs = fresh.mtime, fresh.mtime_nsec, fresh.xattrs

    def _add_whiteout(self, parts: list[bytes], entry: TarEntry) -> None:
        name = parts[-1]
        if name == _OPAQUE_MARKER:
            directory = self._directory_at(parts, len(parts) - 1, entry)
            assert directory.children is not None
            directory.children.clear()  # only this layer's earlier entries can go
            directory.opaque = True
            return
        if name.startswith(_WHITEOUT_META_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk and such): not content
        hidden = name[len(_WHITEOUT_PREFIX) :]
        if hidden in (b"", b".", b".."):
            raise self._error("whiteout without a valid name", entry.path)
        self._check_ids(entry)
        whiteout = _Node(stat.S_IFCHR, entry.uid, entry.gid, entry.mtime)
        whiteout.mtime_nsec = entry.mtime_nsec
        self._check_mtime(entry)
        self._parent_dir(parts, entry)[hidden] = whiteout

    def _new_symlink(self, entry: TarEntry) -> _Node:
        node = self._new_node(stat.S_IFLNK, entry)
        target = entry.linkname
        if not target or len(target) > _SYMLINK_MAX or b"\0" in target:
            raise self._error(
                f"symlink target must be 1..{_SYMLINK_MAX} bytes without NUL", entry.path
            )
        node.target = target
        node.size = len(target)
        return node

    def _hardlink_target(self, entry: TarEntry) -> _Node:
        target = self._lookup(self._split_path(entry.linkname, entry))
        shown = entry.linkname.decode("utf-8", "surrogateescape")
        if target is None:
            raise self._error(
                f"hard link to {shown!r}, which is not earlier in the layer", entry.path
            )
        if target.is_dir:
            raise self._error(f"hard link to directory {shown!r}", entry.path)
        return target

    def _new_device(self, entry: TarEntry) -> _Node:
        node = self._new_node(stat.S_IFCHR if entry.type == CHRTYPE else stat.S_IFBLK, entry)
        major, minor = entry.devmajor, entry.devminor
        if not (0 <= major < (1 << 12) and 0 <= minor < (1 << 20)):
            raise self._error(f"device number {major}:{minor} out of range", entry.path)
        node.rdev = _encode_dev(major, minor)
        return node

    def _add_regular_file(self, reader: TarReader, entry: TarEntry) -> _Node:
        """Copy the file's full blocks to the data area now; spool or pad its tail."""
        node = self._new_node(stat.S_IFREG, entry)
        size = node.size = entry.size
        full_blocks, tail = divmod(size, BLOCK_SIZE)
        node.inline = tail > 0 and _INODE_SIZE + _xattr_ibody_size(node.xattrs) + tail <= BLOCK_SIZE
        blocks = full_blocks + (1 if tail and not node.inline else 0)
        node.blkaddr = self._next_block if blocks else 0
        if node.inline:
            self._copy(reader, full_blocks * BLOCK_SIZE, self._out)
            node.tail_off, node.tail_len = self._spool_size, tail
            self._copy(reader, tail, self._spool)
            self._spool_size += tail
        else:
            self._copy(reader, size, self._out)
            if tail:
                self._out.write(_ZERO_BLOCK[tail:])
        self._next_block += blocks
        return node

    @staticmethod
    def _copy(reader: TarReader, length: int, sink: IO[bytes]) -> None:
        """Move ``length`` bytes of the member's data to ``sink``, a buffer at a time."""
        while length:
            chunk = reader.read(length)  # a view of the reader's buffer: no copy
            assert chunk, "the reader returns a member's whole size"
            sink.write(chunk)
            length -= len(chunk)

    # --- laying out and writing the image -------------------------------------

    def write_image(self) -> ErofsStats:
        nodes, parents = self._collect_nodes()
        for node in nodes:
            if node.is_dir:
                self._layout_directory(node, parents[id(node)])
            elif stat.S_ISLNK(node.mode):
                self._layout_symlink(node)
        tree_blocks_start = self._next_block
        meta_start = self._allocate_tree_blocks(nodes)
        placed = self._place_inodes(nodes)
        self._out.seek(tree_blocks_start * BLOCK_SIZE)
        self._write_tree_blocks(nodes)
        meta_hash = self._write_metadata(placed, meta_start)
        total_blocks = self._out.tell() // BLOCK_SIZE
        if total_blocks >= 1 << 32:
            raise self._error("image would exceed 2**32 blocks")
        self._write_superblock(total_blocks, meta_start, len(nodes), meta_hash)
        self._out.truncate(total_blocks * BLOCK_SIZE)
        return _stats(nodes, total_blocks)

    def _collect_nodes(self) -> tuple[list[_Node], dict[int, _Node]]:
        """All inodes reachable from the root, breadth first, and each directory's
        parent (by id); sets link counts and encodes xattrs."""
        root = self._root
        root.nlink = 2
        nodes = [root]
        parents = {id(root): root}
        for directory in nodes:  # grows while we walk it: a breadth-first queue
            if not directory.is_dir:
                continue
            assert directory.children is not None
            if directory.opaque:
                kept = [x for x in directory.xattrs if x[:2] != _OPAQUE_XATTR[:2]]
                directory.xattrs = (*kept, _OPAQUE_XATTR)
            for name in sorted(directory.children):
                child = directory.children[name]
                if child.is_dir:
                    child.nlink = 2
                    directory.nlink += 1
                    parents[id(child)] = directory
                    nodes.append(child)
                else:
                    if child.nlink == 0:
                        nodes.append(child)
                    child.nlink += 1
        for node in nodes:
            node.xattr_blob = _encode_xattrs(node.xattrs)
        return nodes, parents

    def _layout_directory(self, node: _Node, parent: _Node) -> None:
        """Split the sorted entries into blocks and decide where the last one lives."""
        assert node.children is not None
        # Sort by name only: raw byte order is what the kernel's binary search expects.
        entries = sorted(
            [(b".", node), (b"..", parent), *node.children.items()], key=lambda entry: entry[0]
        )
        blocks: list[list[tuple[bytes, _Node]]] = [[]]
        used = 0
        for entry in entries:
            need = _DIRENT.size + len(entry[0])
            if used + need > BLOCK_SIZE:
                blocks.append([])
                used = 0
            blocks[-1].append(entry)
            used += need
        node.dir_blocks = blocks
        node.size = (len(blocks) - 1) * BLOCK_SIZE + used
        self._choose_tail_layout(node, used if used < BLOCK_SIZE else 0)

    def _layout_symlink(self, node: _Node) -> None:
        self._choose_tail_layout(node, node.size)

    def _choose_tail_layout(self, node: _Node, tail: int) -> None:
        """Inline the tail after the inode when inode, xattrs and tail share a block."""
        node.inline = tail > 0 and _INODE_SIZE + len(node.xattr_blob) + tail <= BLOCK_SIZE
        node.tail_len = tail if node.inline else 0

    def _allocate_tree_blocks(self, nodes: list[_Node]) -> int:
        """Give directories and symlinks their out-of-line blocks; return the meta start."""
        for node in nodes:
            if node.is_dir or stat.S_ISLNK(node.mode):
                blocks = -(-node.size // BLOCK_SIZE) - (1 if node.inline else 0)
                node.blkaddr = self._next_block if blocks else 0
                self._next_block += blocks
        return self._next_block

    def _place_inodes(self, nodes: list[_Node]) -> list[_Node]:
        """Assign nids; return the nodes in the order their records sit in the image."""
        packer = _MetaPacker()
        for node in nodes:
            offset = packer.place(_INODE_SIZE + len(node.xattr_blob) + node.tail_len)
            # meta_blkaddr is meta_start - 1, hence the extra block in the nid.
            node.nid = (offset + BLOCK_SIZE) // _SLOT
        # A nid is the record's place, so sorting by it sorts by offset (and
        # needs no (offset, node) tuple per inode).
        return sorted(nodes, key=_nid)

    def _write_tree_blocks(self, nodes: list[_Node]) -> None:
        """Directory and symlink blocks, in allocation order (so sequentially)."""
        for node in nodes:
            if node.is_dir:
                assert node.dir_blocks is not None
                out_of_line = node.dir_blocks[:-1] if node.inline else node.dir_blocks
                for block in out_of_line:
                    self._out.write(_pad_block(_directory_block(block)))
            elif stat.S_ISLNK(node.mode) and not node.inline:
                self._out.write(_pad_block(node.target))

    def _write_metadata(self, placed: list[_Node], meta_start: int) -> bytes:
        """Write inodes (+ xattrs + inline tails) at their nids' offsets; returns a digest."""
        digest = hashlib.sha256()
        position = meta_start * BLOCK_SIZE
        nid_zero = position - BLOCK_SIZE  # meta_blkaddr is meta_start - 1
        self._out.seek(position)
        self._spool.flush()
        pending = bytearray()
        for ino, node in enumerate(placed, start=1):
            offset = nid_zero + node.nid * _SLOT
            pending += bytes(offset - position - len(pending))
            pending += self._inode_record(node, ino)
            if len(pending) >= _META_FLUSH:
                digest.update(pending)
                self._out.write(pending)
                position += len(pending)
                pending.clear()
        # fsck.erofs 1.5 reads an xattr ibody header after every inode, even one
        # without xattrs: keep room for it after the last record.
        padding = -(position + len(pending)) % BLOCK_SIZE
        if padding < len(_XATTR_IBODY_HEADER):
            padding += BLOCK_SIZE
        pending += bytes(padding)
        digest.update(pending)
        self._out.write(pending)
        return digest.digest()

    def _inode_record(self, node: _Node, ino: int) -> bytes:
        layout = _LAYOUT_FLAT_INLINE if node.inline else _LAYOUT_FLAT_PLAIN
        i_u = node.rdev if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode) else node.blkaddr
        xattr_icount = (len(node.xattr_blob) - 12) // 4 + 1 if node.xattr_blob else 0
        inode = _INODE.pack(
            1 | (layout << 1),  # extended inode
            xattr_icount,
            node.mode,
            0,
            node.size,
            i_u,
            ino & 0xFFFFFFFF,
            node.uid,
            node.gid,
            node.mtime,
            node.mtime_nsec,
            node.nlink,
            bytes(16),
        )
        return inode + node.xattr_blob + self._inline_tail(node)

    def _inline_tail(self, node: _Node) -> bytes:
        if not node.inline:
            return b""
        if node.is_dir:
            assert node.dir_blocks is not None
            return _directory_block(node.dir_blocks[-1])
        if stat.S_ISLNK(node.mode):
            return node.target
        return os.pread(self._spool.fileno(), node.tail_len, node.tail_off)

    def _write_superblock(
        self, blocks: int, meta_start: int, inodes: int, meta_hash: bytes
    ) -> None:
        superblock = _SUPERBLOCK.pack(
            _EROFS_MAGIC,
            0,  # checksum: unused without EROFS_FEATURE_COMPAT_SB_CHKSUM
            0,  # feature_compat
            _BLOCK_BITS,
            0,  # sb_extslots
            self._root.nid,
            inodes,
            self._default_mtime,  # build_time
            0,  # build_time_nsec
            blocks,
            meta_start - 1,  # meta_blkaddr, see the module docstring
            0,  # xattr_blkaddr: no shared xattrs
            uuid.UUID(bytes=meta_hash[:16], version=4).bytes,
            b"",  # volume_name
            0,  # feature_incompat: nothing newer than the 6.1 kernel's baseline
            0,
            0,
            0,
            0,  # dirblkbits: directory blocks are filesystem blocks
            0,
            0,
            0,
            0,
            b"",
        )
        assert self._root.nid < 1 << 16, "root_nid is a le16"
        self._out.seek(_SUPERBLOCK_OFFSET)
        self._out.write(superblock)
        self._out.seek(blocks * BLOCK_SIZE)


class _MetaPacker:
    """First-fit packing of inode records into metadata blocks.

    A record of at most one block never crosses a block boundary (the kernel
    requires inode, xattrs and inline tail in one block); larger records (huge
    xattr sets, never with a tail) start on a fresh block.
    """

    def __init__(self) -> None:
        self._blocks = 0
        self._open: list[list[int]] = []  # [block, bytes used], a few recent blocks

    def place(self, size: int) -> int:
        size = -(-size // _SLOT) * _SLOT
        if size > BLOCK_SIZE:
            start = self._blocks
            self._blocks += -(-size // BLOCK_SIZE)
            return start * BLOCK_SIZE
        for index, slot in enumerate(self._open):
            block, used = slot
            if used + size <= BLOCK_SIZE:
                slot[1] = used + size
                if BLOCK_SIZE - slot[1] < _INODE_SIZE:  # nothing fits any more
                    del self._open[index]
                return block * BLOCK_SIZE + used
        block = self._blocks
        self._blocks += 1
        if size < BLOCK_SIZE:
            self._open.append([block, size])
            if len(self._open) > _OPEN_META_BLOCKS:
                del self._open[0]
        return block * BLOCK_SIZE


# --- encoding helpers ----------------------------------------------------------


def _nid(node: _Node) -> int:
    return node.nid


def _encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev()."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _xattr_entry_size(entry: Xattr) -> int:
    return -(-(_XATTR_ENTRY.size + len(entry[1]) + len(entry[2])) // 4) * 4


def _xattr_ibody_size(xattrs: Iterable[Xattr]) -> int:
    body = sum(_xattr_entry_size(entry) for entry in xattrs)
    return len(_XATTR_IBODY_HEADER) + body if body else 0


def _encode_xattrs(xattrs: tuple[Xattr, ...]) -> bytes:
    """The inline xattr body: header then 4-byte aligned entries (b"" if none)."""
    if not xattrs:
        return b""
    parts = [_XATTR_IBODY_HEADER]
    for index, suffix, value in xattrs:
        entry = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        parts.append(entry + bytes(-len(entry) % 4))
    return b"".join(parts)


def _directory_block(entries: list[tuple[bytes, _Node]]) -> bytes:
    """Dirents then names; the last name runs to the first NUL or the block end."""
    nameoff = _DIRENT.size * len(entries)
    dirents = []
    for name, node in entries:
        dirents.append(_DIRENT.pack(node.nid, nameoff, _FILE_TYPES[stat.S_IFMT(node.mode)], 0))
        nameoff += len(name)
    return b"".join(dirents) + b"".join(name for name, _ in entries)


def _pad_block(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK_SIZE)


def _stats(nodes: list[_Node], blocks: int) -> ErofsStats:
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "devices": 0, "fifos": 0, "whiteouts": 0}
    hardlinks = opaque = 0
    for node in nodes:
        kind = stat.S_IFMT(node.mode)
        if kind == stat.S_IFDIR:
            counts["dirs"] += 1
            opaque += node.opaque
            continue
        hardlinks += node.nlink - 1
        if kind == stat.S_IFREG:
            counts["files"] += 1
        elif kind == stat.S_IFLNK:
            counts["symlinks"] += 1
        elif kind == stat.S_IFIFO:
            counts["fifos"] += 1
        elif kind == stat.S_IFCHR and node.rdev == 0:
            counts["whiteouts"] += 1
        else:
            counts["devices"] += 1
    return ErofsStats(
        inodes=len(nodes),
        blocks=blocks,
        bytes_written=blocks * BLOCK_SIZE,
        hardlinks=hardlinks,
        opaque_dirs=opaque,
        **counts,
    )
