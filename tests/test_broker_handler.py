"""The broker's core without a transport: wire layouts, names, identity records,
the read-only wrapper's coverage, and the INIT/DESTROY life cycle."""

from __future__ import annotations

import errno
import inspect
import os
import struct
from pathlib import Path

import pytest

from vmruntime.broker import BrokerOptions, FuseHandler, abi, identity
from vmruntime.broker.containment import check_name, make_resolver
from vmruntime.broker.passthrough import Passthrough
from vmruntime.broker.readonly import MUTATING, ReadOnly
from vmruntime.errors import BrokerError

# Sizes from include/uapi/linux/fuse.h (protocol 7.31).
FUSE_SIZES = {
    "IN_HEADER": 40, "OUT_HEADER": 16, "ATTR": 88, "INIT_IN": 16, "INIT_OUT": 64,
    "SETATTR_IN": 88, "READ_IN": 40, "WRITE_IN": 40, "WRITE_OUT": 8, "OPEN_OUT": 16,
    "STATFS_OUT": 80, "RELEASE_IN": 24, "FLUSH_IN": 24, "FSYNC_IN": 16, "MKNOD_IN": 16,
    "CREATE_IN": 16, "RENAME2_IN": 16, "FALLOCATE_IN": 32, "LSEEK_IN": 24,
    "COPY_FILE_RANGE_IN": 56, "DIRENT_HEAD": 24, "GETATTR_IN": 16,
}  # fmt: skip


@pytest.mark.parametrize("name,size", FUSE_SIZES.items())
def test_struct_sizes_match_the_kernel_header(name: str, size: int) -> None:
    assert getattr(abi, name).size == size
    assert abi.ENTRY_OUT_SIZE == 128 and abi.ATTR_OUT_SIZE == 104


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/etc", b"a\0b", b"x" * 256, b"../x"])
def test_names_that_could_escape_are_refused(name: bytes) -> None:
    with pytest.raises(OSError) as caught:
        check_name(name)
    assert caught.value.errno == (errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL)


def test_ordinary_names_pass() -> None:
    for name in (b"a", b"...", b".hidden", b"x" * 255, "é".encode(), b"a b"):
        assert check_name(name) == name


def test_identity_record_round_trip_and_malformed_records() -> None:
    record = identity.StatRecord(uid=1000, gid=None, mode=0o20600, rdev=os.makedev(1, 3))
    packed = record.pack()
    assert len(packed) == 20 and packed[0] == 1
    assert identity.StatRecord.unpack(packed) == record
    assert identity.StatRecord.unpack(packed[:-1]) is None
    assert identity.StatRecord.unpack(bytes([99]) + packed[1:]) is None
    assert identity.StatRecord().merged(uid=5, gid=None) == identity.StatRecord(uid=5)


def test_every_mutating_operation_is_wrapped_by_read_only() -> None:
    """A new Passthrough method that changes the share must be listed in MUTATING."""
    reads = {
        "attr", "lookup", "forget", "getattr", "readlink", "open", "read", "read_into",
        "release", "flush", "fsync", "lseek", "statfs", "access", "opendir", "readdir",
        "dir_nodeid", "releasedir", "getxattr", "listxattr", "close", "reset",
    }  # fmt: skip
    public = {
        name for name, _ in inspect.getmembers(Passthrough, inspect.isfunction)
        if not name.startswith("_")
    }  # fmt: skip
    assert public - reads == MUTATING
    wrapped = ReadOnly.__new__(ReadOnly)
    for name in MUTATING:
        with pytest.raises(OSError) as caught:
            getattr(wrapped, name)(1, b"x")
        assert caught.value.errno == errno.EROFS


def test_containment_modes(tmp_path: Path) -> None:
    assert make_resolver("walk").name == "walk"
    assert make_resolver("openat2").name == "openat2"
    assert make_resolver("auto").name == "openat2"  # this host's kernel is newer than 5.6
    with pytest.raises(ValueError):
        make_resolver("none")
    with pytest.raises(BrokerError, match="containment"):
        FuseHandler(tmp_path, BrokerOptions(containment="none"))


def test_a_missing_root_is_a_broker_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BrokerError) as caught:
        FuseHandler(tmp_path / "absent")
    assert caught.value.root == tmp_path / "absent"


class Wire:
    def __init__(self, handler: FuseHandler) -> None:
        self.handler = handler
        self.unique = 0

    def send(self, op: int, nodeid: int = 1, body: bytes = b"") -> tuple[int, bytes]:
        self.unique += 1
        header = abi.IN_HEADER.pack(40 + len(body), op, self.unique, nodeid, 0, 0, 1, 0, 0)
        reply = self.handler.handle(header + body)
        assert reply is not None
        length, error, unique = abi.OUT_HEADER.unpack_from(reply)
        assert (length, unique) == (len(reply), self.unique)
        return error, reply[16:]

    def init(self, minor: int = 38) -> tuple[int, bytes]:
        return self.send(abi.Op.INIT, 0, abi.INIT_IN.pack(7, minor, 1 << 17, 0xFFFFFFFF))


@pytest.fixture
def wire(tmp_path: Path) -> Wire:
    (tmp_path / "f").write_bytes(b"data")
    handler = FuseHandler(tmp_path)
    yield Wire(handler)
    handler.close()


def test_requests_before_init_get_eio(wire: Wire) -> None:
    assert wire.send(abi.Op.GETATTR, 1, bytes(16))[0] == -errno.EIO
    assert wire.init()[0] == 0
    assert wire.send(abi.Op.GETATTR, 1, bytes(16))[0] == 0


def test_init_negotiates_our_minor_and_refuses_old_kernels(wire: Wire) -> None:
    assert wire.init(minor=20)[0] == -errno.EPROTO
    error, payload = wire.init()
    major, minor, _readahead, flags, *_ = abi.INIT_OUT.unpack(payload)
    assert (error, major, minor) == (0, 7, abi.KERNEL_MINOR_VERSION)
    assert flags & abi.InitFlag.DO_READDIRPLUS and not flags & abi.InitFlag.WRITEBACK_CACHE
    assert wire.init()[0] == -errno.EIO  # a second INIT


def test_destroy_forgets_everything_the_guest_held(wire: Wire) -> None:
    wire.init()
    _error, entry = wire.send(abi.Op.LOOKUP, 1, b"f\0")
    (nodeid,) = struct.unpack_from("<Q", entry)
    _error, opened = wire.send(abi.Op.OPEN, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0))
    (fh,) = struct.unpack_from("<Q", opened)
    assert wire.send(abi.Op.DESTROY)[0] == 0
    wire.init()
    read = abi.READ_IN.pack(fh, 0, 4, 0, 0, 0, 0)
    assert wire.send(abi.Op.READ, nodeid, read)[0] == -errno.EBADF
    assert wire.send(abi.Op.GETATTR, nodeid, bytes(16))[0] == -errno.EBADF


def test_unknown_and_unsupported_opcodes_get_enosys(wire: Wire) -> None:
    wire.init()
    for op in (abi.Op.GETLK, abi.Op.IOCTL, abi.Op.BMAP, abi.Op.SETUPMAPPING, 0, 9999):
        assert wire.send(op)[0] == -errno.ENOSYS
    assert wire.send(abi.Op.STATFS)[0] == 0
