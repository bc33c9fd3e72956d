"""The virtio-fs broker through the real Linux FUSE client (spec: docs/broker.md).

Each test mounts a :class:`FuseHandler` over a fresh share directory with
:class:`FuseMount` (``/dev/fuse``, no libfuse) and uses ordinary file APIs on the
mount point, then checks what happened to the host files. Needs root and
``/dev/fuse``. Every mount is undone and every temp dir removed, even on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from broker_wire import WithoutSysAdmin

from vmruntime.broker.abi import Op
from vmruntime.broker.devfuse import FSTYPE, FuseMount, _mounted_devices
from vmruntime.broker.handler import BrokerOptions, FuseHandler
from vmruntime.errors import BrokerError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/dev/fuse", os.R_OK | os.W_OK),
    reason="needs root and /dev/fuse",
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes += [ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
STAT_XATTR = "user.vmruntime.stat"
LINK_XATTR = "trusted.vmruntime.stat"  # a symlink's record (no user.* xattrs on links)
RECORD = struct.Struct("<BBHIIII")  # version flags reserved uid gid mode rdev
MiB = 1024 * 1024


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def errno_of(action: Callable[[], Any]) -> int | None:
    """The errno ``action`` failed with, or None if it worked."""
    try:
        action()
    except OSError as e:
        return e.errno
    return None


def open_close(path: Path | str, flags: int, mode: int = 0o644, dir_fd: int | None = None) -> None:
    os.close(os.open(path, flags, mode, dir_fd=dir_fd))


def new_encode_dev(major: int, minor: int) -> int:
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def record_of(path: Path) -> tuple[int, ...]:
    """The host's ``user.vmruntime.stat`` record: (version, flags, uid, gid, mode, rdev)."""
    version, flags, _reserved, uid, gid, mode, rdev = RECORD.unpack(os.getxattr(path, STAT_XATTR))
    return version, flags, uid, gid, mode, rdev


def link_record_of(path: Path) -> tuple[int, ...]:
    """The host's record on the symlink ``path`` itself: (version, flags, uid, gid, mode, rdev)."""
    raw = os.getxattr(path, LINK_XATTR, follow_symlinks=False)
    version, flags, _reserved, uid, gid, mode, rdev = RECORD.unpack(raw)
    return version, flags, uid, gid, mode, rdev


def host_identity(path: Path) -> tuple[int, int, int]:
    """What virtual identity must never change on the host: mode, owner, group."""
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid


def devfuse_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("devfuse-")]


@dataclass
class Share:
    host: Path  # the share root on the host
    mnt: Path  # where the broker serves it
    base: Path  # temp dir holding both, and room for an "outside"
    handler: FuseHandler
    mount: FuseMount


MakeShare = Callable[..., Share]


@pytest.fixture
def make_share() -> Iterator[MakeShare]:
    """Mounts a fresh share per call; everything is unmounted and removed afterwards."""
    old_umask = os.umask(0o022)
    mounts: list[Share] = []
    bases: list[Path] = []

    def make(
        populate: Callable[[Path], None] | None = None,
        *,
        threads: int = 1,
        allow_other: bool = False,
        wrap: Callable[[FuseHandler], Any] | None = None,
        root: Path | None = None,
        **options: Any,
    ) -> Share:
        """``root``: serve that existing share (another mount of it) instead of a new one."""
        base = Path(tempfile.mkdtemp(prefix="vmr-brokerfs-"))
        bases.append(base)
        base.chmod(0o755)
        host, mnt = root or base / "share", base / "mnt"
        if root is None:
            host.mkdir(mode=0o755)
        mnt.mkdir()
        if populate is not None:
            populate(host)
        handler = FuseHandler(host, BrokerOptions(**options))
        mount = FuseMount(
            wrap(handler) if wrap else handler, mnt, threads=threads, allow_other=allow_other
        )
        share = Share(host, mnt, base, handler, mount)
        try:
            mount.start()
        except BaseException:
            handler.close()
            raise
        mounts.append(share)
        return share

    try:
        yield make
    finally:
        os.umask(old_umask)
        try:
            for share in reversed(mounts):
                try:
                    share.mount.close()
                finally:
                    share.handler.close()
        finally:
            for base in bases:
                # Never descend into a mount that somehow survived: that would be the share.
                if not any(_mounted_devices(base / "mnt")):
                    shutil.rmtree(base, ignore_errors=True)
    assert not devfuse_threads(), "FuseMount left threads behind"
    for base in bases:
        assert not _mounted_devices(base / "mnt"), f"{base / 'mnt'} still mounted"


@pytest.fixture(params=["openat2", "walk"])
def containment(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- namespace: lookup, readdir, create/remove/rename, links ---------------------------------


def test_lookup_and_stat(make_share: MakeShare, containment: str) -> None:
    def populate(host: Path) -> None:
        (host / "file").write_bytes(b"x" * 1234)
        (host / "file").chmod(0o640)
        os.utime(host / "file", ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321))
        (host / "dir").mkdir(mode=0o751)
        (host / "dir" / "inner").write_bytes(b"inner")
        (host / "link").symlink_to("file")
        os.chown(host / "file", 4321, 4322)

    s = make_share(populate, containment=containment)
    st = os.stat(s.mnt / "file")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_size, st.st_nlink, st.st_uid, st.st_gid) == (1234, 1, 0, 0)
    assert st.st_mtime_ns == 1_700_000_000_987_654_321
    assert st.st_atime_ns == 1_600_000_000_123_456_789
    st = os.stat(s.mnt / "dir")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o751
    assert (s.mnt / "dir" / "inner").read_bytes() == b"inner"
    assert stat.S_ISLNK(os.lstat(s.mnt / "link").st_mode)
    assert os.stat(s.mnt / "link").st_size == 1234  # the kernel follows it, inside the mount
    assert errno_of(lambda: os.stat(s.mnt / "missing")) == errno.ENOENT
    assert errno_of(lambda: os.stat(s.mnt / "file" / "x")) == errno.ENOTDIR
    assert stat.S_ISDIR(os.stat(s.mnt).st_mode)


def test_readdir_many_entries(make_share: MakeShare, containment: str) -> None:
    def populate(host: Path) -> None:
        for i in range(300):
            name = f"entry-{i:03d}-" + "x" * (i % 7) * 30  # names of many lengths, up to 200
            if i % 3 == 0:
                (host / name).write_bytes(b"")
            elif i % 3 == 1:
                (host / name).mkdir()
            else:
                (host / name).symlink_to(f"target-{i}")
        (host / ("L" * 255)).write_bytes(b"")
        os.mkfifo(host / "fifo")

    s = make_share(populate, containment=containment)

    def listing(path: Path) -> dict[str, tuple[bool, bool, bool]]:
        with os.scandir(path) as it:
            return {
                e.name: (
                    e.is_dir(follow_symlinks=False),
                    e.is_file(follow_symlinks=False),
                    e.is_symlink(),
                )
                for e in it
            }

    seen = listing(s.mnt)
    assert len(seen) == 302
    assert seen == listing(s.host)
    assert sorted(os.listdir(s.mnt)) == sorted(os.listdir(s.host))  # a second pass agrees
    assert stat.S_ISFIFO(os.lstat(s.mnt / "fifo").st_mode)


def test_create_unlink_mkdir_rmdir_rename(make_share: MakeShare, containment: str) -> None:
    s = make_share(containment=containment)
    m, h = s.mnt, s.host
    (m / "a").write_bytes(b"A")
    assert (h / "a").read_bytes() == b"A"
    assert errno_of(lambda: open_close(m / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == (
        errno.EEXIST
    )
    os.mkdir(m / "d", 0o750)
    assert (h / "d").is_dir() and stat.S_IMODE(os.stat(m / "d").st_mode) == 0o750
    os.rename(m / "a", m / "d" / "b")
    assert not (h / "a").exists() and (h / "d" / "b").read_bytes() == b"A"
    (m / "c").write_bytes(b"C")
    os.rename(m / "c", m / "d" / "b")  # replaces
    assert (h / "d" / "b").read_bytes() == b"C" and not (h / "c").exists()
    assert errno_of(lambda: os.rmdir(m / "d")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rmdir(m / "d" / "b")) == errno.ENOTDIR
    assert errno_of(lambda: os.unlink(m / "d")) == errno.EISDIR
    assert errno_of(lambda: os.unlink(m / "nope")) == errno.ENOENT
    os.unlink(m / "d" / "b")
    assert not (h / "d" / "b").exists()
    os.rmdir(m / "d")
    assert not (h / "d").exists()
    assert os.listdir(m) == []


def test_overlong_names_are_enametoolong(make_share: MakeShare, containment: str) -> None:
    """What every Linux filesystem answers for a 256-byte name (the kernel's FUSE client
    passes names up to 1024 bytes on to the broker)."""
    s = make_share(lambda host: (host / "f").write_bytes(b""), containment=containment)
    long = "n" * 256
    assert os.listdir(s.mnt) == ["f"]
    attempts = {
        "stat": lambda: os.stat(s.mnt / long),
        "create": lambda: open_close(s.mnt / long, os.O_CREAT | os.O_WRONLY),
        "mkdir": lambda: os.mkdir(s.mnt / long),
        "symlink": lambda: os.symlink("f", s.mnt / long),
        "link": lambda: os.link(s.mnt / "f", s.mnt / long),
        "rename": lambda: os.rename(s.mnt / "f", s.mnt / long),
        "mknod": lambda: os.mkfifo(s.mnt / long),
    }
    assert {name: errno_of(action) for name, action in attempts.items()} == dict.fromkeys(
        attempts, errno.ENAMETOOLONG
    )
    (s.mnt / ("n" * 255)).write_bytes(b"ok")  # the longest name is fine
    assert sorted(os.listdir(s.host)) == sorted(["f", "n" * 255])


def test_rename2_noreplace_and_exchange(make_share: MakeShare, containment: str) -> None:
    s = make_share(containment=containment)
    m, h = s.mnt, s.host
    (m / "x").write_bytes(b"X")
    (m / "y").write_bytes(b"Y")
    os.mkdir(m / "dir")
    (m / "dir" / "inside").write_bytes(b"I")
    assert errno_of(lambda: renameat2(m / "x", m / "y", RENAME_NOREPLACE)) == errno.EEXIST
    assert (h / "x").read_bytes() == b"X" and (h / "y").read_bytes() == b"Y"
    renameat2(m / "x", m / "z", RENAME_NOREPLACE)
    assert (h / "z").read_bytes() == b"X" and not (h / "x").exists()
    renameat2(m / "z", m / "y", RENAME_EXCHANGE)
    assert (h / "z").read_bytes() == b"Y" and (h / "y").read_bytes() == b"X"
    assert (m / "z").read_bytes() == b"Y" and (m / "y").read_bytes() == b"X"
    renameat2(m / "y", m / "dir", RENAME_EXCHANGE)  # a file and a directory swap places
    assert (h / "y" / "inside").read_bytes() == b"I" and (h / "dir").read_bytes() == b"X"
    assert errno_of(lambda: renameat2(m / "z", m / "gone", RENAME_EXCHANGE)) == errno.ENOENT


def test_hardlink_within_share(make_share: MakeShare, containment: str) -> None:
    s = make_share(containment=containment)
    m, h = s.mnt, s.host
    (m / "f").write_bytes(b"one")
    os.mkdir(m / "sub")
    os.link(m / "f", m / "sub" / "g")
    assert os.path.samefile(h / "f", h / "sub" / "g")
    assert os.stat(h / "f").st_nlink == 2 and os.stat(m / "sub" / "g").st_nlink == 2
    with open(m / "sub" / "g", "ab") as f:
        f.write(b"+two")
    assert (h / "f").read_bytes() == b"one+two" == (m / "f").read_bytes()
    os.unlink(m / "f")
    assert os.stat(m / "sub" / "g").st_nlink == 1 and os.stat(h / "sub" / "g").st_nlink == 1
    assert errno_of(lambda: os.link(m / "sub", m / "sub2")) == errno.EPERM


def test_symlinks_are_stored_verbatim_and_never_followed_by_the_broker(
    make_share: MakeShare, containment: str
) -> None:
    s = make_share(containment=containment)
    m, h = s.mnt, s.host
    os.makedirs(m / "a" / "b")
    os.symlink("../../etc/passwd", m / "a" / "b" / "evil")
    os.symlink("/etc/shadow", m / "abs")
    assert os.readlink(h / "a" / "b" / "evil") == "../../etc/passwd"
    assert os.readlink(m / "a" / "b" / "evil") == "../../etc/passwd"
    assert os.readlink(h / "abs") == "/etc/shadow" == os.readlink(m / "abs")
    assert stat.S_ISLNK(os.lstat(h / "abs").st_mode)
    # The kernel resolves the relative target inside the mount (mnt/etc/passwd)...
    assert errno_of(lambda: (m / "a" / "b" / "evil").read_bytes()) == errno.ENOENT
    os.mkdir(m / "etc")
    (m / "etc" / "passwd").write_bytes(b"the share's passwd")
    assert (m / "a" / "b" / "evil").read_bytes() == b"the share's passwd"
    # ...and the broker itself never opens through a link.
    link = m / "a" / "b" / "evil"
    assert errno_of(lambda: open_close(link, os.O_RDONLY | os.O_NOFOLLOW)) == errno.ELOOP


def test_host_swap_of_a_known_directory_does_not_redirect(
    make_share: MakeShare, containment: str
) -> None:
    """The broker reaches children from the inode it looked up, not by path: replacing a
    directory by a symlink on the host (after the guest looked it up) leads nowhere."""
    s = make_share(containment=containment)
    outside = s.base / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host secret")
    os.mkdir(s.mnt / "d")
    dfd = os.open(s.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(s.host / "d", s.host / "d.old")
        os.symlink(outside, s.host / "d")
        assert errno_of(lambda: os.stat("secret", dir_fd=dfd)) == errno.ENOENT
        open_close("planted", os.O_CREAT | os.O_WRONLY, dir_fd=dfd)
        os.mkdir("planted-dir", dir_fd=dfd)
        os.symlink("x", "planted-link", dir_fd=dfd)
    finally:
        os.close(dfd)
    assert sorted(os.listdir(outside)) == ["secret"]
    assert sorted(os.listdir(s.host / "d.old")) == ["planted", "planted-dir", "planted-link"]


# --- file data ----------------------------------------------------------------------------


def test_read_write_append_truncate_at_offsets(make_share: MakeShare) -> None:
    s = make_share()
    path, host = s.mnt / "f", s.host / "f"
    model = bytearray()
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.write(fd, b"hello world") == 11
        model[:] = b"hello world"
        assert os.pwrite(fd, b"HELLO", 0) == 5
        model[0:5] = b"HELLO"
        assert os.pwrite(fd, b"!", 20) == 1  # past EOF: a gap of zeros
        model[11:21] = b"\0" * 9 + b"!"
        assert os.pread(fd, 5, 6) == b"world" and os.pread(fd, 100, 21) == b""
        assert os.pread(fd, 100, 0) == bytes(model)
        os.ftruncate(fd, 8)
        del model[8:]
        os.ftruncate(fd, 12)
        model += b"\0" * 4
        assert os.pread(fd, 100, 0) == bytes(model)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"tail")  # O_APPEND: at the end whatever the offset
        model += b"tail"
    finally:
        os.close(fd)
    assert host.read_bytes() == bytes(model) == path.read_bytes()
    os.truncate(path, 3)
    assert host.read_bytes() == b"HEL"
    with open(path, "r+b") as f:
        f.seek(1)
        assert f.read(1) == b"E"
    open_close(path, os.O_WRONLY | os.O_TRUNC)
    assert host.read_bytes() == b"" and os.stat(path).st_size == 0


def test_large_write_and_read_are_byte_exact(make_share: MakeShare) -> None:
    data = os.urandom(6 * MiB + 12345)
    s = make_share(lambda host: (host / "from-host").write_bytes(data[::-1]))
    with open(s.mnt / "big", "wb") as f:
        f.write(data)
    assert (s.host / "big").read_bytes() == data
    assert (s.mnt / "from-host").read_bytes() == data[::-1]
    fd = os.open(s.mnt / "from-host", os.O_RDONLY)
    try:
        assert os.pread(fd, 3 * MiB, 2 * MiB + 7) == data[::-1][2 * MiB + 7 : 5 * MiB + 7]
    finally:
        os.close(fd)


MMAP_PROBE = """
import mmap, sys
with open(sys.argv[1], "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
    mapped[0:4] = mapped[4096:4100]
    mapped[4:8] = b"MMAP"
    mapped.flush()
"""


def test_direct_io_and_mmap(make_share: MakeShare) -> None:
    s = make_share()
    data = os.urandom(2 * MiB)
    out = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    out[:] = data
    fd = os.open(s.mnt / "direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.writev(fd, [out]) == len(data)
        back = mmap.mmap(-1, len(data))
        assert os.preadv(fd, [back], 0) == len(data)
        assert back[:] == data
        back.close()
    finally:
        os.close(fd)
        out.close()
    assert (s.host / "direct").read_bytes() == data
    # A page fault on the mapping holds the GIL while the kernel waits for our serving
    # thread, which needs the GIL: touch the mapping from another process.
    subprocess.run(
        [sys.executable, "-I", "-c", MMAP_PROBE, str(s.mnt / "direct")], check=True, timeout=30
    )
    assert (s.host / "direct").read_bytes()[:8] == data[4096:4100] + b"MMAP"


def test_fallocate_allocates(make_share: MakeShare) -> None:
    s = make_share()
    fd = os.open(s.mnt / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fallocate(fd, 0, 0, 4 * MiB)  # the syscall itself: glibc's posix_fallocate would emulate
        host = os.stat(s.host / "f")
        assert host.st_size == 4 * MiB == os.fstat(fd).st_size
        assert host.st_blocks * 512 >= 4 * MiB
        assert os.pread(fd, 16, MiB) == b"\0" * 16
    finally:
        os.close(fd)


def test_fallocate_keep_size_and_punch_hole(make_share: MakeShare) -> None:
    s = make_share()
    path, host = s.mnt / "f", s.host / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"D" * (2 * MiB), 0)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 2 * MiB, MiB)  # beyond EOF, size kept
        assert os.stat(host).st_size == 2 * MiB and os.stat(host).st_blocks * 512 >= 3 * MiB
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 64 * 1024, MiB)
        data = host.read_bytes()
        assert data == b"D" * (64 * 1024) + b"\0" * MiB + b"D" * (MiB - 64 * 1024)
        assert os.pread(fd, 8, 64 * 1024) == b"\0" * 8
    finally:
        os.close(fd)


def test_seek_data_and_hole(make_share: MakeShare) -> None:
    s = make_share()
    path, host = s.mnt / "sparse", s.host / "sparse"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"D" * 4096, 0)
        os.pwrite(fd, b"E" * 4096, 3 * MiB)  # a hole between, on the host too
        os.fsync(fd)
        hfd = os.open(host, os.O_RDONLY)
        try:
            for offset in (0, 4096, 64 * 1024, MiB, 3 * MiB - 1, 3 * MiB + 4000):
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    want = os.lseek(hfd, offset, whence)
                    assert os.lseek(fd, offset, whence) == want, (offset, whence)
            assert os.lseek(fd, 0, os.SEEK_HOLE) < 3 * MiB  # the host fs does report holes
        finally:
            os.close(hfd)
        assert errno_of(lambda: os.lseek(fd, 4 * MiB, os.SEEK_DATA)) == errno.ENXIO
        assert os.pread(fd, 8, MiB) == b"\0" * 8
        assert os.pread(fd, 4, 3 * MiB) == b"EEEE"
    finally:
        os.close(fd)


def test_copy_file_range(make_share: MakeShare) -> None:
    data = os.urandom(300_000)
    s = make_share(lambda host: (host / "src").write_bytes(data))
    src = os.open(s.mnt / "src", os.O_RDONLY)
    dst = os.open(s.mnt / "dst", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        done = 0
        while done < 200_000:
            n = os.copy_file_range(src, dst, 200_000 - done, 1000 + done, 5000 + done)
            assert n > 0
            done += n
    finally:
        os.close(src)
        os.close(dst)
    assert (s.host / "dst").read_bytes() == b"\0" * 5000 + data[1000:201_000]


def test_fsync_and_statfs(make_share: MakeShare) -> None:
    s = make_share()
    fd = os.open(s.mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(s.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (s.host / "f").read_bytes() == b"durable"
    mine, theirs = os.statvfs(s.mnt), os.statvfs(s.host)
    assert mine.f_blocks * mine.f_frsize == theirs.f_blocks * theirs.f_frsize
    assert mine.f_files == theirs.f_files and mine.f_namemax == 255


def test_utimens_reaches_the_host(make_share: MakeShare) -> None:
    s = make_share(lambda host: (host / "f").write_bytes(b""))
    os.utime(s.mnt / "f", ns=(1_500_000_000_000_000_001, 1_500_000_001_000_000_002))
    assert os.stat(s.host / "f").st_mtime_ns == 1_500_000_001_000_000_002
    assert os.stat(s.host / "f").st_atime_ns == 1_500_000_000_000_000_001
    before = time.time_ns()
    os.utime(s.mnt / "f")
    assert os.stat(s.host / "f").st_mtime_ns >= before - 10_000_000


# --- xattrs -------------------------------------------------------------------------------


def test_xattrs(make_share: MakeShare, containment: str) -> None:
    s = make_share(lambda host: (host / "f").write_bytes(b""), containment=containment)
    m, h = s.mnt / "f", s.host / "f"
    os.setxattr(m, "user.test", b"value")
    assert os.getxattr(m, "user.test") == b"value" == os.getxattr(h, "user.test")
    assert "user.test" in os.listxattr(m)
    big = bytes(range(256)) * 4
    os.setxattr(m, "user.big", big)
    assert os.getxattr(m, "user.big") == big
    assert errno_of(lambda: os.setxattr(m, "user.test", b"v", os.XATTR_CREATE)) == errno.EEXIST
    assert errno_of(lambda: os.setxattr(m, "user.nope", b"v", os.XATTR_REPLACE)) == errno.ENODATA
    os.setxattr(m, "user.test", b"other", os.XATTR_REPLACE)
    assert os.getxattr(h, "user.test") == b"other"
    os.removexattr(m, "user.test")
    assert errno_of(lambda: os.getxattr(h, "user.test")) == errno.ENODATA
    assert errno_of(lambda: os.getxattr(m, "user.test")) == errno.ENODATA
    assert errno_of(lambda: os.removexattr(m, "user.test")) == errno.ENODATA
    os.mkdir(s.mnt / "d")
    os.setxattr(s.mnt / "d", "user.on-dir", b"1")
    assert os.getxattr(s.host / "d", "user.on-dir") == b"1"


def test_identity_record_is_invisible_and_unsettable(make_share: MakeShare) -> None:
    s = make_share(lambda host: (host / "f").write_bytes(b""))
    m, h = s.mnt / "f", s.host / "f"
    os.chmod(m, 0o600)  # leaves a record on the host
    record = os.getxattr(h, STAT_XATTR)
    assert not [n for n in os.listxattr(m) if n.startswith("user.vmruntime.")]
    assert errno_of(lambda: os.getxattr(m, STAT_XATTR)) in (errno.ENODATA, errno.EPERM)
    forged = RECORD.pack(1, 0b1111, 0, 0, 0, stat.S_IFCHR | 0o666, new_encode_dev(1, 1))
    refused = (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL)
    assert errno_of(lambda: os.setxattr(m, STAT_XATTR, forged)) in refused
    assert errno_of(lambda: os.setxattr(m, "user.vmruntime.other", b"x")) in refused
    assert errno_of(lambda: os.removexattr(m, STAT_XATTR)) in (*refused, errno.ENODATA)
    assert os.getxattr(h, STAT_XATTR) == record
    assert "user.vmruntime.other" not in os.listxattr(h)
    assert stat.S_ISREG(os.stat(m).st_mode)


def test_privileged_xattr_namespaces_do_not_reach_the_host(make_share: MakeShare) -> None:
    """Only the user.* namespace is the guest's: a security.capability or trusted.* set by
    the broker (which runs as root) would mean something to the host."""
    s = make_share(lambda host: (host / "f").write_bytes(b""))
    caps = bytes.fromhex("01000002ffffffff00000000ffffffff00000000")
    for name, value in (("security.capability", caps), ("trusted.overlay.opaque", b"y")):
        errno_of(lambda n=name, v=value: os.setxattr(s.mnt / "f", n, v))
        assert name not in os.listxattr(s.host / "f"), name


# --- identity -----------------------------------------------------------------------------


def test_virtual_identity_shows_the_guest_owner(make_share: MakeShare) -> None:
    """Files the guest did not make show the options' owner; files it makes show their
    creator (the caller), as on any filesystem; the host sees neither."""

    def populate(host: Path) -> None:
        (host / "theirs").write_bytes(b"")
        os.chown(host / "theirs", 4321, 4322)
        (host / "dir").mkdir()

    s = make_share(populate, uid=1234, gid=5678)
    for path in (s.mnt, s.mnt / "theirs", s.mnt / "dir"):
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 5678), path
    (s.mnt / "mine").write_bytes(b"data")
    os.mkdir(s.mnt / "mydir")
    os.symlink("mine", s.mnt / "mylink")
    for name in ("mine", "mydir", "mylink"):
        st = os.lstat(s.mnt / name)
        assert (st.st_uid, st.st_gid) == (0, 0), name  # this test's uid, not the host's
    for name in ("mine", "mylink"):
        host = os.lstat(s.host / name)
        assert (host.st_uid, host.st_gid) == (os.geteuid(), os.getegid()), name
    assert os.stat(s.host / "theirs").st_uid == 4321


def test_virtual_chmod_chown_leave_the_host_inode_alone(make_share: MakeShare) -> None:
    s = make_share(lambda host: (host / "f").write_bytes(b""))
    m, h = s.mnt / "f", s.host / "f"
    before = os.stat(h)
    os.chmod(m, 0o4711)
    os.chown(m, 42, 43)
    st = os.stat(m)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o777 == 0o711
    assert (st.st_uid, st.st_gid) == (42, 43)
    after = os.stat(h)
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    version, flags, uid, gid, mode, _rdev = record_of(h)
    assert (version, flags & 0b111, uid, gid) == (1, 0b111, 42, 43)
    assert stat.S_IFMT(mode) == stat.S_IFREG and mode & 0o777 == 0o711
    os.chmod(s.mnt / ".", 0o700)  # the share root too
    assert stat.S_IMODE(os.stat(s.mnt).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(s.host).st_mode) == 0o755


def test_virtual_mknod_device_and_fifo(make_share: MakeShare) -> None:
    s = make_share()
    m, h = s.mnt, s.host
    os.mknod(m / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))  # /dev/mem on a host
    os.mknod(m / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(m / "fifo", 0o640)
    os.mknod(m / "sock", stat.S_IFSOCK | 0o600)
    st = os.lstat(m / "mem")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 1)
    assert stat.S_IMODE(st.st_mode) == 0o644  # umask 022
    assert stat.S_ISBLK(os.lstat(m / "disk").st_mode)
    assert os.lstat(m / "disk").st_rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO(os.lstat(m / "fifo").st_mode)
    assert stat.S_ISSOCK(os.lstat(m / "sock").st_mode)
    for name in ("mem", "disk", "fifo", "sock"):
        host = os.lstat(h / name)
        assert stat.S_ISREG(host.st_mode) and stat.S_IMODE(host.st_mode) == 0o600, name
        assert host.st_size == 0 and host.st_rdev == 0
    assert record_of(h / "mem")[4:] == (stat.S_IFCHR | 0o644, new_encode_dev(1, 1))
    # The mount is nodev: its "device" is never a host device, for anyone.
    assert errno_of(lambda: open_close(m / "mem", os.O_RDONLY)) == errno.EACCES
    assert errno_of(lambda: open_close(m / "disk", os.O_RDWR)) == errno.EACCES
    # A FIFO is the kernel's own pipe: no writer without a reader, data never hits the host.
    assert errno_of(lambda: open_close(m / "fifo", os.O_WRONLY | os.O_NONBLOCK)) == errno.ENXIO
    reader = os.open(m / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer = os.open(m / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"through the pipe")
        os.close(writer)
        assert os.read(reader, 100) == b"through the pipe"
    finally:
        os.close(reader)
    assert os.stat(h / "fifo").st_size == 0
    os.unlink(m / "mem")
    assert not (h / "mem").exists()


def test_readdir_types_of_virtual_special_files(make_share: MakeShare) -> None:
    """readdir's d_type agrees with stat: find -type c, ls --color and scandir trust it."""
    s = make_share()
    os.mknod(s.mnt / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))
    os.mknod(s.mnt / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(s.mnt / "fifo")
    os.mknod(s.mnt / "sock", stat.S_IFSOCK | 0o600)
    with os.scandir(s.mnt) as it:
        kinds = {
            e.name: (e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False)) for e in it
        }
    assert kinds == dict.fromkeys(("mem", "disk", "fifo", "sock"), (False, False))


@pytest.mark.parametrize("identity", ["virtual", "passthrough"])
def test_setgid_directory_passes_its_group_on(make_share: MakeShare, identity: str) -> None:
    """POSIX: in a set-group-ID directory new entries get the directory's group (and new
    directories the bit). The kernel leaves that to the filesystem, here the broker."""
    s = make_share(identity=identity)
    os.mkdir(s.mnt / "shared")
    os.chown(s.mnt / "shared", 0, 77)
    os.chmod(s.mnt / "shared", 0o2775)
    (s.mnt / "shared" / "file").write_bytes(b"")
    os.mkdir(s.mnt / "shared" / "sub")
    os.symlink("file", s.mnt / "shared" / "link")
    assert os.stat(s.mnt / "shared" / "file").st_gid == 77
    assert os.lstat(s.mnt / "shared" / "link").st_gid == 77
    sub = os.stat(s.mnt / "shared" / "sub")
    assert sub.st_gid == 77 and sub.st_mode & stat.S_ISGID
    if identity == "passthrough":
        assert os.stat(s.host / "shared" / "file").st_gid == 77
        assert os.lstat(s.host / "shared" / "link").st_gid == 77


def test_host_records_are_shown_and_malformed_ones_ignored(make_share: MakeShare) -> None:
    def populate(host: Path) -> None:
        for name in ("good", "bad-size", "bad-version"):
            (host / name).write_bytes(b"")
            (host / name).chmod(0o644)
        good = RECORD.pack(1, 0b1111, 0, 7, 8, stat.S_IFCHR | 0o640, new_encode_dev(4, 300))
        os.setxattr(host / "good", STAT_XATTR, good)
        os.setxattr(host / "bad-size", STAT_XATTR, good + b"\0")
        os.setxattr(host / "bad-version", STAT_XATTR, b"\x02" + good[1:])

    s = make_share(populate)
    st = os.lstat(s.mnt / "good")
    assert (st.st_uid, st.st_gid, st.st_mode) == (7, 8, stat.S_IFCHR | 0o640)
    assert st.st_rdev == os.makedev(4, 300)
    for name in ("bad-size", "bad-version"):
        st = os.lstat(s.mnt / name)
        assert (st.st_uid, st.st_gid, st.st_mode) == (0, 0, stat.S_IFREG | 0o644), name


def test_passthrough_identity_acts_on_the_host(make_share: MakeShare) -> None:
    def populate(host: Path) -> None:
        (host / "f").write_bytes(b"")
        os.chown(host / "f", 4321, 4322)

    s = make_share(populate, identity="passthrough")
    assert (os.stat(s.mnt / "f").st_uid, os.stat(s.mnt / "f").st_gid) == (4321, 4322)
    os.chmod(s.mnt / "f", 0o600)
    os.chown(s.mnt / "f", 7, 8)
    host = os.stat(s.host / "f")
    assert (stat.S_IMODE(host.st_mode), host.st_uid, host.st_gid) == (0o600, 7, 8)
    assert STAT_XATTR not in os.listxattr(s.host / "f")
    os.mkfifo(s.mnt / "fifo")  # docs/broker.md: mknod acts on the host
    assert stat.S_ISFIFO(os.lstat(s.host / "fifo").st_mode)
    os.symlink("f", s.mnt / "link")
    os.chown(s.mnt / "link", 9, 10, follow_symlinks=False)  # lchown: the link, not "f"
    assert host_identity(s.host / "link")[1:] == (9, 10)
    assert host_identity(s.host / "f")[1:] == (7, 8)
    assert (os.lstat(s.mnt / "link").st_uid, os.lstat(s.mnt / "link").st_gid) == (9, 10)
    assert LINK_XATTR not in os.listxattr(s.host / "link", follow_symlinks=False)


# --- identity of symlinks (trusted.vmruntime.stat) -----------------------------------------


def lowner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def test_lchown_is_recorded_and_never_reaches_the_host(
    make_share: MakeShare, containment: str
) -> None:
    def populate(host: Path) -> None:
        (host / "f").write_bytes(b"target")
        (host / "link").symlink_to("f")
        (host / "dir").mkdir()
        (host / "dir" / "inner").symlink_to("../f")

    s = make_share(populate, uid=1234, gid=5678, containment=containment)
    m, h = s.mnt, s.host
    link_before, target_before = host_identity(h / "link"), host_identity(h / "f")
    assert lowner(m / "link") == (1234, 5678)  # no record yet: the share's owner
    os.chown(m / "link", 42, 43, follow_symlinks=False)
    os.chown(m / "dir" / "inner", 44, -1, follow_symlinks=False)  # uid only
    st = os.lstat(m / "link")
    assert (st.st_uid, st.st_gid, st.st_mode) == (42, 43, stat.S_IFLNK | 0o777)
    assert lowner(m / "dir" / "inner") == (44, 5678)
    assert lowner(m / "f") == (1234, 5678)  # the target is not what changed
    assert os.readlink(m / "link") == "f" and (m / "link").read_bytes() == b"target"
    # The host link and its target keep their real owner and mode; the link has a record.
    assert host_identity(h / "link") == link_before and host_identity(h / "f") == target_before
    assert link_record_of(h / "link")[:4] == (1, 0b11, 42, 43)
    assert link_record_of(h / "dir" / "inner")[:3] == (1, 0b01, 44)
    assert STAT_XATTR not in os.listxattr(h / "f")


def test_link_records_survive_a_new_mount(make_share: MakeShare) -> None:
    """The record lives on the host: another broker of the same share shows it. (Which
    reply carried it, the raw-request tests check: LOOKUP, GETATTR and READDIRPLUS.)"""

    def populate(host: Path) -> None:
        (host / "dir").mkdir()
        for name in ("a", "b"):
            (host / "dir" / name).symlink_to("nowhere")

    first = make_share(populate)
    os.chown(first.mnt / "dir" / "a", 42, 43, follow_symlinks=False)
    first.mount.close()
    again = make_share(root=first.host, attr_timeout=0.0)
    with os.scandir(again.mnt / "dir") as listing:  # READDIRPLUS, then LOOKUP/GETATTR
        seen = {e.name: (e.stat(follow_symlinks=False).st_uid, e.is_symlink()) for e in listing}
    assert seen == {"a": (42, True), "b": (0, True)}
    for _ in range(2):  # the first lstat looks the name up, the second asks GETATTR
        assert lowner(again.mnt / "dir" / "a") == (42, 43)
    assert lowner(again.mnt / "dir" / "b") == (0, 0)
    asked = again.handler.counts
    assert asked[Op.READDIRPLUS] and asked[Op.LOOKUP] and asked[Op.GETATTR], asked


def test_link_record_follows_the_inode(make_share: MakeShare, containment: str) -> None:
    """Hard links, rename and unlink of a symlink keep working, the record with the inode."""
    s = make_share(containment=containment)
    m, h = s.mnt, s.host
    os.symlink("target", m / "l")
    os.chown(m / "l", 7, 8, follow_symlinks=False)
    os.link(m / "l", m / "hard", follow_symlinks=False)  # a second name for the link itself
    assert os.lstat(h / "l").st_ino == os.lstat(h / "hard").st_ino
    assert os.lstat(h / "hard").st_nlink == 2
    assert lowner(m / "hard") == (7, 8) and os.readlink(m / "hard") == "target"
    os.mkdir(m / "sub")
    os.rename(m / "l", m / "sub" / "moved")
    assert lowner(m / "sub" / "moved") == (7, 8) and os.readlink(m / "sub" / "moved") == "target"
    assert link_record_of(h / "sub" / "moved")[2:4] == (7, 8)
    os.chown(m / "hard", 9, -1, follow_symlinks=False)  # one inode: both names change
    assert lowner(m / "sub" / "moved") == (9, 8)
    os.unlink(m / "sub" / "moved")
    os.unlink(m / "hard")
    assert os.listdir(h) == ["sub"] and os.listdir(h / "sub") == []


def test_new_symlink_records_its_creator(make_share: MakeShare) -> None:
    s = make_share(uid=1234, gid=5678, allow_other=True)
    os.chmod(s.mnt, 0o777)  # virtual: lets another user make a name in the share root
    subprocess.run(
        [python_for_nobody(), "-I", "-c", "import os, sys; os.symlink('t', sys.argv[1])",
         str(s.mnt / "theirs")],
        user=4321, group=4322, extra_groups=[], capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    os.symlink("t", s.mnt / "mine")
    assert lowner(s.mnt / "theirs") == (4321, 4322)
    assert lowner(s.mnt / "mine") == (0, 0)
    for name in ("theirs", "mine"):
        assert lowner(s.host / name) == (os.geteuid(), os.getegid()), name
    assert link_record_of(s.host / "theirs")[1:4] == (0b11, 4321, 4322)


def xattr_errnos(
    path: Path, name: str, value: bytes, *, follow: bool
) -> tuple[int | None, int | None, int | None]:
    """The errnos of getxattr, setxattr and removexattr of ``name`` on ``path``."""
    return (
        errno_of(lambda: os.getxattr(path, name, follow_symlinks=follow)),
        errno_of(lambda: os.setxattr(path, name, value, follow_symlinks=follow)),
        errno_of(lambda: os.removexattr(path, name, follow_symlinks=follow)),
    )


def test_link_and_file_records_are_invisible_and_unsettable(make_share: MakeShare) -> None:
    """No *.vmruntime.* name through the mount, on a link or a file. (The host kernel itself
    refuses user.* on links; the trusted.* ones it passes on, and the broker refuses.)"""

    def populate(host: Path) -> None:
        (host / "f").write_bytes(b"")
        (host / "l").symlink_to("f")

    s = make_share(populate)
    os.chown(s.mnt / "l", 7, 8, follow_symlinks=False)
    os.chown(s.mnt / "f", 7, 8)
    before = snapshot(s.host)
    forged = RECORD.pack(1, 0b111, 0, 0, 0, stat.S_IFREG | 0o4755, 0)
    private = (STAT_XATTR, LINK_XATTR, "user.vmruntime.x", "trusted.vmruntime.x")
    for name, follow in (("l", False), ("f", True)):
        path = s.mnt / name
        assert not [n for n in os.listxattr(path, follow_symlinks=follow) if "vmruntime" in n]
        for attr in private:
            got, put, removed = xattr_errnos(path, attr, forged, follow=follow)
            assert got in (errno.EPERM, errno.ENODATA), f"get {attr} on {name}"
            assert put == errno.EPERM, f"set {attr} on {name}"
            assert removed in (errno.EPERM, errno.ENODATA), f"remove {attr} on {name}"
    assert snapshot(s.host) == before
    assert lowner(s.mnt / "l") == (7, 8) and lowner(s.mnt / "f") == (7, 8)


@pytest.fixture
def unprivileged() -> Iterator[Callable[[FuseHandler], WithoutSysAdmin]]:
    """Wraps a handler so that it is served without CAP_SYS_ADMIN. Request this fixture
    before ``make_share``: the mounts then go before the serving threads."""
    made: list[WithoutSysAdmin] = []

    def wrap(handler: FuseHandler) -> WithoutSysAdmin:
        made.append(WithoutSysAdmin(handler))
        return made[-1]

    yield wrap
    for wrapper in made:
        wrapper.close()


def test_unprivileged_broker_refuses_what_it_cannot_record(
    unprivileged: Callable[[FuseHandler], WithoutSysAdmin], make_share: MakeShare
) -> None:
    """docs/broker.md: without CAP_SYS_ADMIN no link record can be written (or read); a
    change the guest would see is EOPNOTSUPP, and the host inode still never changes."""

    def populate(host: Path) -> None:
        (host / "f").write_bytes(b"")
        (host / "l").symlink_to("f")
        (host / "old").symlink_to("f")
        record = RECORD.pack(1, 0b11, 0, 42, 43, 0, 0)  # left by a privileged broker
        os.setxattr(host / "old", LINK_XATTR, record, follow_symlinks=False)

    s = make_share(populate, wrap=unprivileged, allow_other=True)
    m = s.mnt
    before = snapshot(s.host)
    assert lowner(m / "old") == (0, 0)  # unreadable without the capability: the defaults
    assert errno_of(lambda: os.chown(m / "l", 7, 8, follow_symlinks=False)) == errno.EOPNOTSUPP
    assert lowner(m / "l") == (0, 0)
    os.chown(m / "l", 0, 0, follow_symlinks=False)  # to the owner shown: nothing to record
    assert snapshot(s.host) == before
    os.chown(m / "f", 7, 8)  # files keep user.* records, which need no capability
    assert lowner(m / "f") == (7, 8) and record_of(s.host / "f")[2:4] == (7, 8)
    os.symlink("f", m / "mine")  # the share's owner makes a link: no record needed
    assert lowner(m / "mine") == (0, 0)
    os.chmod(m, 0o777)
    theirs = subprocess.run(
        [python_for_nobody(), "-I", "-c", THEIR_SYMLINK, str(m / "theirs")],
        user=4321, group=4322, extra_groups=[], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert theirs.stdout.strip() == str(errno.EOPNOTSUPP), theirs.stderr
    assert not os.path.lexists(s.host / "theirs")  # no link left with an owner nobody asked for


THEIR_SYMLINK = """
import os, sys
try:
    os.symlink("f", sys.argv[1])
    print(0)
except OSError as e:
    print(e.errno)
"""


# --- read-only shares ---------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """What a mutation could change on the host (atime aside)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                content: bytes | str | None = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            xattrs = {
                n: os.getxattr(path, n, follow_symlinks=False)
                for n in os.listxattr(path, follow_symlinks=False)
            }
            key = str(path.relative_to(root))
            out[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content)
            out[key] += (st.st_nlink, st.st_ctime_ns, xattrs)
    return out


def test_readonly_share_refuses_every_mutation(make_share: MakeShare) -> None:
    def populate(host: Path) -> None:
        (host / "f").write_bytes(b"hello")
        os.setxattr(host / "f", "user.k", b"v")
        (host / "d").mkdir()
        (host / "d" / "x").write_bytes(b"x")
        (host / "empty").mkdir()
        (host / "l").symlink_to("f")
        record = RECORD.pack(1, 0b11, 0, 42, 43, 0, 0)
        os.setxattr(host / "l", LINK_XATTR, record, follow_symlinks=False)

    s = make_share(populate, readonly=True)
    m = s.mnt
    before = snapshot(s.host)
    mutations: dict[str, Callable[[], Any]] = {
        "open O_WRONLY": lambda: open_close(m / "f", os.O_WRONLY),
        "open O_RDWR": lambda: open_close(m / "f", os.O_RDWR),
        "open O_APPEND": lambda: open_close(m / "f", os.O_WRONLY | os.O_APPEND),
        "open O_TRUNC": lambda: open_close(m / "f", os.O_RDONLY | os.O_TRUNC),
        "open O_CREAT": lambda: open_close(m / "new", os.O_CREAT | os.O_WRONLY),
        "open O_CREAT rdonly": lambda: open_close(m / "new", os.O_CREAT | os.O_RDONLY),
        "open O_CREAT in dir": lambda: open_close(m / "d" / "new", os.O_CREAT | os.O_EXCL),
        "mkdir": lambda: os.mkdir(m / "newdir"),
        "rmdir": lambda: os.rmdir(m / "empty"),
        "unlink": lambda: os.unlink(m / "f"),
        "unlink link": lambda: os.unlink(m / "l"),
        "rename": lambda: os.rename(m / "f", m / "g"),
        "rename over": lambda: os.rename(m / "d" / "x", m / "f"),
        "rename noreplace": lambda: renameat2(m / "f", m / "g", RENAME_NOREPLACE),
        "rename exchange": lambda: renameat2(m / "f", m / "d", RENAME_EXCHANGE),
        "symlink": lambda: os.symlink("f", m / "l2"),
        "link": lambda: os.link(m / "f", m / "f2"),
        "mkfifo": lambda: os.mkfifo(m / "fifo"),
        "mknod": lambda: os.mknod(m / "node", stat.S_IFREG | 0o644),
        "setxattr": lambda: os.setxattr(m / "f", "user.k", b"w"),
        "setxattr new": lambda: os.setxattr(m / "f", "user.new", b"w"),
        "removexattr": lambda: os.removexattr(m / "f", "user.k"),
        "chmod": lambda: os.chmod(m / "f", 0o600),
        "chmod dir": lambda: os.chmod(m / "d", 0o700),
        "chown": lambda: os.chown(m / "f", 1, 1),
        "lchown": lambda: os.chown(m / "l", 1, 1, follow_symlinks=False),
        "lchown uid": lambda: os.chown(m / "l", 1, -1, follow_symlinks=False),
        "truncate": lambda: os.truncate(m / "f", 1),
        "truncate grow": lambda: os.truncate(m / "f", 100),
        "utime": lambda: os.utime(m / "f", ns=(1, 1)),
        "utime now": lambda: os.utime(m / "f"),
    }
    results = {name: errno_of(action) for name, action in mutations.items()}
    assert {n: r for n, r in results.items() if r != errno.EROFS} == {}
    assert snapshot(s.host) == before
    # Reads work.
    assert (m / "f").read_bytes() == b"hello" and (m / "l").read_bytes() == b"hello"
    assert sorted(os.listdir(m)) == ["d", "empty", "f", "l"]
    assert os.getxattr(m / "f", "user.k") == b"v" and os.readlink(m / "l") == "f"
    assert (os.lstat(m / "l").st_uid, os.lstat(m / "l").st_gid) == (42, 43)
    assert os.statvfs(m).f_namemax == 255
    assert snapshot(s.host) == before


# --- limits -------------------------------------------------------------------------------


def test_handle_cap_gives_emfile_then_recovers(make_share: MakeShare) -> None:
    def populate(host: Path) -> None:
        for i in range(20):
            (host / f"f{i}").write_bytes(b"")

    s = make_share(populate, max_handles=8)
    fds: list[int] = []
    try:
        failure = None
        for i in range(20):
            try:
                fds.append(os.open(s.mnt / f"f{i}", os.O_RDONLY))
            except OSError as e:
                failure = e.errno
                break
        assert (len(fds), failure) == (8, errno.EMFILE)
        assert errno_of(lambda: os.listdir(s.mnt)) == errno.EMFILE  # OPENDIR counts too
        created = s.mnt / "created"
        assert errno_of(lambda: open_close(created, os.O_CREAT | os.O_WRONLY)) == errno.EMFILE
        assert not (s.host / "created").exists()  # refused before anything was made
    finally:
        for fd in fds:
            os.close(fd)
    # RELEASE is sent asynchronously after close(2): give it a moment.
    deadline = time.monotonic() + 5
    while errno_of(lambda: open_close(s.mnt / "f19", os.O_RDONLY)) == errno.EMFILE:
        assert time.monotonic() < deadline, "handles never came back"
        time.sleep(0.01)
    fds = []
    try:
        for i in range(8):
            fds.append(os.open(s.mnt / f"f{i}", os.O_RDONLY))
    finally:
        for fd in fds:
            os.close(fd)


def test_inode_cap_gives_enfile_and_forget_gives_back(make_share: MakeShare) -> None:
    def populate(host: Path) -> None:
        for i in range(40):
            (host / f"f{i}").write_bytes(b"")

    s = make_share(populate, max_inodes=16)
    known = []
    failure = None
    for i in range(40):
        try:
            os.stat(s.mnt / f"f{i}")
            known.append(i)
        except OSError as e:
            failure = e.errno
            break
    assert failure == errno.ENFILE and 8 <= len(known) < 16
    for i in known[:5]:  # the kernel forgets an unlinked inode at once
        os.unlink(s.mnt / f"f{i}")
    deadline = time.monotonic() + 5
    while errno_of(lambda: os.stat(s.mnt / "f39")) == errno.ENFILE:
        assert time.monotonic() < deadline, "FORGET never gave inodes back"
        time.sleep(0.01)


# --- the transport itself -----------------------------------------------------------------


def fuse_device_fds() -> list[str]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse":
                fds.append(fd)
    return fds


def test_mount_options_and_clean_close(make_share: MakeShare) -> None:
    s = make_share()
    assert len(fuse_device_fds()) == 1
    line = next(
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if f" {s.mnt} " in line
    )
    mount_opts, _, rest = line.partition(" - ")
    fstype, source, super_opts = rest.split()
    assert (fstype, source) == (FSTYPE, "vmruntime")
    assert {"nosuid", "nodev"} <= set(mount_opts.split()[5].split(","))
    assert "default_permissions" in super_opts.split(",")
    assert "allow_other" not in super_opts.split(",")
    assert s.mount.max_write >= 128 * 1024 and s.mount.serving
    s.mount.close()
    s.mount.close()  # idempotent
    assert not os.path.ismount(s.mnt) and not devfuse_threads() and not s.mount.serving
    assert fuse_device_fds() == []


def test_close_while_busy_detaches_and_aborts(make_share: MakeShare) -> None:
    s = make_share(lambda host: (host / "f").write_bytes(b"abc"))
    fd = os.open(s.mnt / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, 3, 0) == b"abc"
        s.mount.close()
        assert not _mounted_devices(s.mnt) and not devfuse_threads()
        # (not a read: that may come from the page cache)
        assert errno_of(lambda: os.listxattr(fd)) == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # FLUSH on the aborted connection: ENOTCONN, fd closed anyway


def test_outside_unmount_ends_serving_and_close_spares_a_new_mount(
    make_share: MakeShare,
) -> None:
    s = make_share()
    os.listdir(s.mnt)
    assert _libc.umount2(os.fsencode(s.mnt), 0) == 0
    assert s.mount.wait(5) and not s.mount.serving
    # Someone mounts something else there; our close() must leave it alone.
    assert _libc.mount(b"tmpfs", os.fsencode(s.mnt), b"tmpfs", 0, b"size=1m") == 0
    try:
        s.mount.close()
        assert os.path.ismount(s.mnt)
    finally:
        _libc.umount2(os.fsencode(s.mnt), 0)
    assert not devfuse_threads()


def test_several_threads_serve_concurrent_callers(make_share: MakeShare) -> None:
    s = make_share(threads=3)
    blobs = {f"f{i}": os.urandom(512 * 1024 + i) for i in range(6)}
    errors: list[BaseException] = []

    def worker(name: str, data: bytes) -> None:
        try:
            for _ in range(3):
                (s.mnt / name).write_bytes(data)
                assert (s.mnt / name).read_bytes() == data
                os.listdir(s.mnt)
        except BaseException as e:
            errors.append(e)

    callers = [threading.Thread(target=worker, args=item) for item in blobs.items()]
    for t in callers:
        t.start()
    for t in callers:
        t.join(30)
    assert errors == []
    for name, data in blobs.items():
        assert (s.host / name).read_bytes() == data


def test_a_raising_handler_costs_one_request(make_share: MakeShare) -> None:
    class Exploding:
        def __init__(self, inner: FuseHandler) -> None:
            self.inner = inner

        def handle(self, request: bytes) -> bytes | None:
            if b"explode\0" in request:
                raise RuntimeError("handler bug")
            return self.inner.handle(request)

    s = make_share(lambda host: (host / "ok").write_bytes(b"fine"), wrap=Exploding)
    assert errno_of(lambda: os.stat(s.mnt / "explode")) == errno.EIO
    assert (s.mnt / "ok").read_bytes() == b"fine"


def test_start_errors_leave_nothing_mounted() -> None:
    base = Path(tempfile.mkdtemp(prefix="vmr-brokerfs-"))
    try:
        (base / "share").mkdir()
        (base / "file").write_bytes(b"")
        handler = FuseHandler(base / "share", BrokerOptions())
        try:
            for bad in (base / "missing", base / "file"):
                with pytest.raises(BrokerError):
                    FuseMount(handler, bad).start()
            assert not devfuse_threads()
        finally:
            handler.close()
    finally:
        shutil.rmtree(base)


def python_for_nobody() -> str:
    """A python3 on PATH that user nobody can run (the probe's user): not one under a home
    such as /root, where our own interpreter may live. Skips the test if there is none."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("python3", path=directory)
        if found and all_searchable_by_others(Path(found).resolve()):
            return found
    pytest.skip("no python3 on PATH that user nobody can run")


def all_searchable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))


NOBODY_PROBE = """
import json, os, sys
mnt = sys.argv[1]
def attempt(action):
    try:
        action()
        return 0
    except OSError as e:
        return e.errno
def read(name):
    with open(os.path.join(mnt, name), "rb") as f:
        f.read()
def write(name):
    with open(os.path.join(mnt, name), "ab") as f:
        f.write(b"x")
print(json.dumps({
    "stat": attempt(lambda: os.stat(mnt)),
    "read public": attempt(lambda: read("public")),
    "read private": attempt(lambda: read("private")),
    "write public": attempt(lambda: write("public")),
    "create": attempt(lambda: write("new")),
    "create in open dir": attempt(lambda: write("open/by-nobody")),
}))
"""


@pytest.mark.parametrize("allow_other", [False, True])
def test_other_users_and_default_permissions(make_share: MakeShare, allow_other: bool) -> None:
    """Decision: the mount is default_permissions (the kernel checks the modes and owners the
    broker shows, as the guest's kernel does) and only shared with other users on request."""

    def populate(host: Path) -> None:
        (host / "public").write_bytes(b"p")
        (host / "public").chmod(0o644)
        (host / "private").write_bytes(b"s")
        (host / "private").chmod(0o600)
        (host / "open").mkdir(mode=0o755)

    s = make_share(populate, allow_other=allow_other)
    os.chmod(s.mnt / "open", 0o777)  # virtual: the host directory stays 0755
    probe = subprocess.run(
        [python_for_nobody(), "-I", "-c", NOBODY_PROBE, str(s.mnt)],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    seen = json.loads(probe.stdout)
    if not allow_other:  # only the mounting user may enter
        assert seen == dict.fromkeys(seen, errno.EACCES)
        assert not (s.host / "open" / "by-nobody").exists()
    else:  # the kernel checks the modes and owner (0) the broker shows
        assert seen == {
            "stat": 0,
            "read public": 0,
            "read private": errno.EACCES,
            "write public": errno.EACCES,
            "create": errno.EACCES,
            "create in open dir": 0,
        }
        made = os.stat(s.mnt / "open" / "by-nobody")
        assert (made.st_uid, made.st_gid) == (65534, 65534)
        host = os.stat(s.host / "open" / "by-nobody")
        assert (host.st_uid, host.st_gid) == (os.geteuid(), os.getegid())
    assert stat.S_IMODE(os.stat(s.host / "open").st_mode) == 0o755
    assert (s.host / "public").read_bytes() == b"p" and not (s.host / "new").exists()


SERVE = """
import sys
from pathlib import Path
from vmruntime.broker.devfuse import serve_mount
from vmruntime.broker.handler import BrokerOptions
serve_mount(Path(sys.argv[1]), Path(sys.argv[2]), BrokerOptions())
"""


@pytest.mark.parametrize("ending", ["SIGTERM", "SIGINT", "unmount"])
def test_serve_mount_runs_until_signal_or_unmount(ending: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="vmr-brokerfs-"))
    host, mnt = base / "share", base / "mnt"
    host.mkdir()
    mnt.mkdir()
    (host / "hello").write_bytes(b"world")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(host), str(mnt)])
    try:
        deadline = time.monotonic() + 20
        while not _mounted_devices(mnt):
            assert proc.poll() is None, "serve_mount exited early"
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.02)
        assert (mnt / "hello").read_bytes() == b"world"
        if ending == "unmount":
            assert _libc.umount2(os.fsencode(mnt), 0) == 0
        else:
            proc.send_signal(getattr(signal, ending))
        assert proc.wait(20) == 0
        assert not _mounted_devices(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            # Only if the child died without unmounting: a dead server's mount is inert.
            if _mounted_devices(mnt):
                _libc.umount2(os.fsencode(mnt), 2)
        shutil.rmtree(base)


FORGETFUL = """
import sys
from pathlib import Path
from vmruntime.broker.devfuse import FuseMount
from vmruntime.broker.handler import FuseHandler
mount = FuseMount(FuseHandler(Path(sys.argv[1])), Path(sys.argv[2])).start()
print((Path(sys.argv[2]) / "hello").read_text(), flush=True)
"""


def test_a_mount_left_open_goes_at_interpreter_exit() -> None:
    base = Path(tempfile.mkdtemp(prefix="vmr-brokerfs-"))
    host, mnt = base / "share", base / "mnt"
    host.mkdir()
    mnt.mkdir()
    (host / "hello").write_text("world")
    try:
        done = subprocess.run(
            [sys.executable, "-c", FORGETFUL, str(host), str(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, done.stdout) == (0, "world\n"), done.stderr
        assert not _mounted_devices(mnt)
    finally:
        with contextlib.suppress(OSError):
            if _mounted_devices(mnt):
                _libc.umount2(os.fsencode(mnt), 2)
        shutil.rmtree(base)


def test_mount_point_with_awkward_characters() -> None:
    base = Path(tempfile.mkdtemp(prefix="vmr-brokerfs-"))
    host, mnt = base / "share", base / "m n\tt\\x"
    host.mkdir()
    mnt.mkdir()
    (host / "f").write_bytes(b"ok")
    handler = FuseHandler(host, BrokerOptions())
    try:
        with FuseMount(handler, mnt) as mount:
            assert (mnt / "f").read_bytes() == b"ok" and len(_mounted_devices(mnt)) == 1
            assert mount.serving
        assert not _mounted_devices(mnt) and not os.path.ismount(mnt)
    finally:
        handler.close()
        with contextlib.suppress(OSError):
            if _mounted_devices(mnt):
                _libc.umount2(os.fsencode(mnt), 2)
        shutil.rmtree(base)
