"""The vhost-user-fs back-end, driven by a test front-end that plays QEMU.

The front-end here speaks vhost-user over a real Unix socket to the real back-end
(in a thread), keeps "guest RAM" in a memfd it shares as two regions, builds
split virtqueues in it and puts requests there the way a guest kernel would, or
the way a hostile one might.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vmruntime.broker import BrokerOptions, FuseHandler
from vmruntime.broker import vhost_user as vu
from vmruntime.broker.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
)

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
# Guest RAM: two regions, contiguous in guest physical space (buffers may straddle
# them), far apart in the front-end's address space, as QEMU may send.
REGIONS = [  # guest addr, size, front-end address, memfd offset
    (0, 2 * MIB, 0x7F00_0000_0000, 0),
    (2 * MIB, 2 * MIB, 0x7F40_0000_0000, 2 * MIB),
]
RAM_END = 4 * MIB
QUEUE_SIZE = 64
ALL_FEATURES = vu.OFFERED_FEATURES
ALL_PROTOCOL = vu.OFFERED_PROTOCOL_FEATURES

# FUSE wire structs (protocol 7.31), written out here so the tests check the bytes.
IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
OP_LOOKUP, OP_FORGET, OP_OPEN, OP_READ, OP_WRITE, OP_INIT, OP_CREATE = 1, 2, 14, 15, 16, 26, 35


class GuestRam:
    """The memfd behind guest RAM; guest physical address == memfd offset here."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, RAM_END)
        self.map = mmap.mmap(self.fd, RAM_END)
        self._next = 0x1000

    def alloc(self, size: int, align: int = 64) -> int:
        addr = -(-self._next // align) * align
        self._next = addr + size
        assert self._next <= RAM_END, "test guest RAM exhausted"
        return addr

    def uva(self, gpa: int) -> int:
        for guest, size, user, _ in REGIONS:
            if guest <= gpa < guest + size:
                return user + gpa - guest
        raise AssertionError(gpa)

    def write(self, gpa: int, data: bytes) -> None:
        self.map[gpa : gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.map[gpa : gpa + size])

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Ring:
    """A split virtqueue the test driver fills; descriptors are handed out round-robin."""

    def __init__(self, ram: GuestRam, size: int = QUEUE_SIZE) -> None:
        self.ram, self.size = ram, size
        self.desc = ram.alloc(16 * size, 16)
        self.avail = ram.alloc(6 + 2 * size, 2)
        self.used = ram.alloc(6 + 8 * size, 4)
        self.avail_idx = 0
        self.seen_used = 0
        self._next_desc = 0
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)

    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int,
                   nxt: int) -> None:  # fmt: skip
        self.ram.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def take(self, count: int) -> list[int]:
        indexes = [(self._next_desc + i) % self.size for i in range(count)]
        self._next_desc = (self._next_desc + count) % self.size
        return indexes

    def chain(self, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Descriptors for (addr, len, writable) buffers; returns the head index."""
        indexes = self.take(len(buffers))
        for pos, (addr, length, writable) in enumerate(buffers):
            last = pos == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            nxt = 0 if last else indexes[pos + 1]
            self.write_desc(self.desc, indexes[pos], addr, length, flags, nxt)
        return indexes[0]

    def indirect(self, entries: Sequence[tuple[int, int, int, int]], table_addr: int | None = None,
                 table_len: int | None = None) -> int:  # fmt: skip
        """One descriptor pointing at an indirect table of (addr, len, flags, next)."""
        table = self.ram.alloc(16 * len(entries), 16) if table_addr is None else table_addr
        for index, entry in enumerate(entries):
            if table_addr is None:
                self.write_desc(table, index, *entry)
        (head,) = self.take(1)
        length = 16 * len(entries) if table_len is None else table_len
        self.write_desc(self.desc, head, table, length, VIRTQ_DESC_F_INDIRECT, 0)
        return head

    def offer(self, head: int) -> None:
        slot = self.avail_idx % self.size
        self.ram.write(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail, struct.pack("<H", flags))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.ram.read(self.used + 2, 2))[0]

    def used_entry(self, n: int) -> tuple[int, int]:
        slot = n % self.size
        return struct.unpack("<II", self.ram.read(self.used + 4 + 8 * slot, 8))

    def do_kick(self) -> None:
        os.eventfd_write(self.kick, 1)

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.seen_used) & 0xFFFF < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no used entry after {timeout} s")
            select.select([self.call], [], [], 0.01)
        entries = [self.used_entry(self.seen_used + i) for i in range(count)]
        self.seen_used = (self.seen_used + count) & 0xFFFF
        return entries

    def calls(self) -> int:
        try:
            return os.eventfd_read(self.call)
        except BlockingIOError:
            return 0


class FrontEnd:
    """The QEMU side of the vhost-user socket."""

    def __init__(self, path: Path, ram: GuestRam) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(os.fspath(path))
        self.ram = ram
        self.rings: dict[int, Ring] = {}

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int = vu.VERSION, size: int | None = None) -> None:  # fmt: skip
        header = vu.HEADER.pack(request, flags, len(payload) if size is None else size)
        socket.send_fds(self.sock, [header + payload], list(fds))

    def reply(self, request: int) -> bytes:
        header = self._recv(vu.HEADER.size)
        got, flags, size = vu.HEADER.unpack(header)
        assert (got, flags & ~vu.VERSION_MASK) == (request, vu.FLAG_REPLY)
        return self._recv(size) if size else b""

    def _recv(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "back-end closed the connection"
            data += chunk
        return data

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        self.send(request, payload, fds)
        return self.reply(request)

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        self.send(request, payload, fds, flags=vu.VERSION | vu.FLAG_NEED_REPLY)
        return struct.unpack("<Q", self.reply(request))[0]

    def closed_by_backend(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def negotiate(self, features: int = ALL_FEATURES, protocol: int = ALL_PROTOCOL) -> None:
        offered = struct.unpack("<Q", self.call(vu.Req.GET_FEATURES))[0]
        assert offered & features == features
        if features & vu.F_PROTOCOL_FEATURES:
            self.call(vu.Req.GET_PROTOCOL_FEATURES)
            self.send(vu.Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol))
        self.send(vu.Req.SET_OWNER)
        self.send(vu.Req.SET_FEATURES, struct.pack("<Q", features))
        table = struct.pack("<II", len(REGIONS), 0)
        table += b"".join(struct.pack("<QQQQ", *region) for region in REGIONS)
        fds = [self.ram.fd] * len(REGIONS)
        if protocol & vu.PF_REPLY_ACK:
            assert self.ack(vu.Req.SET_MEM_TABLE, table, fds) == 0
        else:
            self.send(vu.Req.SET_MEM_TABLE, table, fds)

    def start_ring(self, index: int, ring: Ring | None = None, *, enable: bool = True,
                   kick: bool = True) -> Ring:  # fmt: skip
        ring = ring or Ring(self.ram)
        self.rings[index] = ring
        self.send(vu.Req.SET_VRING_NUM, struct.pack("<II", index, ring.size))
        self.send(vu.Req.SET_VRING_BASE, struct.pack("<II", index, ring.avail_idx))
        addrs = (self.ram.uva(ring.desc), self.ram.uva(ring.used), self.ram.uva(ring.avail))
        self.send(vu.Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, *addrs, 0))
        self.send(vu.Req.SET_VRING_ERR, struct.pack("<Q", index), [ring.err])
        if kick:
            self.send(vu.Req.SET_VRING_KICK, struct.pack("<Q", index), [ring.kick])
        else:
            self.send(vu.Req.SET_VRING_KICK, struct.pack("<Q", index | vu.VRING_NOFD))
        self.send(vu.Req.SET_VRING_CALL, struct.pack("<Q", index), [ring.call])
        if enable:
            self.send(vu.Req.SET_VRING_ENABLE, struct.pack("<II", index, 1))
        self.sync()
        return ring

    def sync(self) -> None:
        """Returns once the back-end has handled every message sent before."""
        self.call(vu.Req.GET_QUEUE_NUM)

    def request(self, index: int, readable: Sequence[bytes],
                writable: Sequence[int] = ()) -> tuple[int, bytes]:  # fmt: skip
        """One request through queue ``index``: (used length, reply bytes)."""
        ring = self.rings[index]
        buffers = []
        for data in readable:
            addr = self.ram.alloc(len(data))
            self.ram.write(addr, data)
            buffers.append((addr, len(data), False))
        out = [(self.ram.alloc(size), size, True) for size in writable]
        ring.offer(ring.chain(buffers + out))
        ring.do_kick()
        ((_, length),) = ring.wait_used()
        reply = b"".join(self.ram.read(addr, size) for addr, size, _ in out)
        return length, reply[:length]

    def close(self) -> None:
        self.sock.close()
        for ring in self.rings.values():
            ring.close()


class EchoHandler:
    """Replies with the request reversed; records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[memoryview], list[memoryview]]] = []
        self.objects: list[object] = []

    def handle_sg(self, readable: Sequence[memoryview],
                  writable: Sequence[memoryview]) -> int | None:  # fmt: skip
        self.objects = [view.obj for view in (*readable, *writable)]
        request = b"".join(bytes(view) for view in readable)
        self.calls.append(([], []))
        if not writable:
            return None
        reply, offset = request[::-1], 0
        for view in writable:
            chunk = reply[offset : offset + len(view)]
            view[: len(chunk)] = chunk
            offset += len(chunk)
        return min(len(reply), offset)


class Backend:
    """The real back-end serving one connection in a thread."""

    def __init__(self, tmp_path: Path, handler: vu.SgHandler) -> None:
        self.path = tmp_path / "vhost.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.fspath(self.path))
        self.listener.listen(1)
        self.backend = vu.VhostUserFsBackend(handler)
        self.thread = threading.Thread(target=self.backend.serve, args=(self.listener,))
        self.thread.start()

    def finished(self, timeout: float = 5.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.backend.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.listener.close()
        self.backend.close()


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    memory = GuestRam()
    yield memory
    memory.close()


@pytest.fixture
def echo() -> EchoHandler:
    return EchoHandler()


@pytest.fixture
def backend(tmp_path: Path, echo: EchoHandler) -> Iterator[Backend]:
    served = Backend(tmp_path, echo)
    yield served
    served.close()


@pytest.fixture
def front(backend: Backend, ram: GuestRam) -> Iterator[FrontEnd]:
    end = FrontEnd(backend.path, ram)
    yield end
    end.close()


@pytest.fixture
def ready(front: FrontEnd) -> FrontEnd:
    """Negotiated, with the hiprio queue and one request queue running."""
    front.negotiate()
    front.start_ring(0)
    front.start_ring(1)
    return front


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- negotiation and the transport ------------------------------------------------


def test_features_offered(front: FrontEnd) -> None:
    features = struct.unpack("<Q", front.call(vu.Req.GET_FEATURES))[0]
    assert features & vu.F_VERSION_1 and features & vu.F_PROTOCOL_FEATURES
    assert not features & (1 << 34)  # no packed rings
    protocol = struct.unpack("<Q", front.call(vu.Req.GET_PROTOCOL_FEATURES))[0]
    assert protocol & vu.PF_MQ and protocol & vu.PF_REPLY_ACK
    assert not protocol & (1 << 15)  # no CONFIGURE_MEM_SLOTS: SET_MEM_TABLE it is
    front.send(vu.Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol))
    assert struct.unpack("<Q", front.call(vu.Req.GET_QUEUE_NUM))[0] >= 2
    # Messages that do not exist are refused (with REPLY_ACK) and the connection goes on.
    assert front.ack(99) == 1
    assert front.ack(vu.Req.SET_OWNER) == 0


def test_request_round_trip_zero_copy(ready: FrontEnd, echo: EchoHandler) -> None:
    length, reply = ready.request(1, [b"hello ", b"world"], [4, 100])
    assert (length, reply) == (11, b"dlrow olleh")
    assert all(isinstance(obj, mmap.mmap) for obj in echo.objects)  # views of guest RAM
    assert ready.rings[1].calls() >= 1


def test_hiprio_request_without_reply(ready: FrontEnd, echo: EchoHandler) -> None:
    forget = IN_HEADER.pack(48, OP_FORGET, 7, 5, 0, 0, 0, 0, 0) + struct.pack("<Q", 1)
    assert ready.request(0, [forget]) == (0, b"")
    assert len(echo.calls) == 1


def test_buffer_straddling_two_regions(ready: FrontEnd, echo: EchoHandler, ram: GuestRam) -> None:
    ring = ready.rings[1]
    data = bytes(range(256)) * 64
    start = 2 * MIB - 1000  # 1000 bytes in the first region, the rest in the second
    ram.write(start, data)
    out = ram.alloc(len(data))
    ring.offer(ring.chain([(start, len(data), False), (out, len(data), True)]))
    ring.do_kick()
    assert ring.wait_used() == [(ring.used_entry(0)[0], len(data))]
    assert ram.read(out, len(data)) == data[::-1]


def test_many_requests_event_idx(ready: FrontEnd, ram: GuestRam) -> None:
    ring = ready.rings[1]
    heads = []
    for n in range(3 * QUEUE_SIZE):
        data = str(n).encode()
        addr, out = ram.alloc(len(data)), ram.alloc(16)
        ram.write(addr, data)
        heads.append((ring.chain([(addr, len(data), False), (out, 16, True)]), len(data)))
        ring.offer(heads[-1][0])
        ring.do_kick()
        if len(heads) == QUEUE_SIZE // 2:
            assert ring.wait_used(QUEUE_SIZE // 2) == heads
            heads = []
    assert ring.wait_used(len(heads)) == heads


def test_event_idx_asks_for_the_next_kick(ready: FrontEnd) -> None:
    ring = ready.rings[1]
    for _ in range(3):
        assert ready.request(1, [b"k"], [1]) == (1, b"k")
    avail_event = struct.unpack("<H", ready.ram.read(ring.used + 4 + 8 * ring.size, 2))[0]
    assert avail_event == ring.avail_idx == 3


def test_used_event_suppresses_interrupts(ready: FrontEnd) -> None:
    ring = ready.rings[1]
    assert ready.request(1, [b"e"], [1]) == (1, b"e")  # the first one always interrupts
    ring.calls()
    used_event = ring.avail + 4 + 2 * ring.size
    ready.ram.write(used_event, struct.pack("<H", 5))  # "interrupt me once entry 5 is used"
    for used in range(2, 9):
        assert ready.request(1, [b"e"], [1]) == (1, b"e")
        assert ring.calls() == (1 if used == 6 else 0), used


def test_config_space_is_the_front_ends(front: FrontEnd) -> None:
    front.negotiate()
    assert front.call(vu.Req.GET_CONFIG, struct.pack("<III", 0, 40, 0) + bytes(40)) == b""
    assert front.ack(vu.Req.SET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(4)) == 1


def test_reset_then_serve_again(ready: FrontEnd) -> None:
    assert ready.request(1, [b"before"], [6]) == (6, b"erofeb")
    assert ready.ack(vu.Req.RESET_DEVICE) == 0
    ready.rings[1].close()
    ring = Ring(ready.ram)
    ready.start_ring(1, ring)
    assert ready.request(1, [b"after"], [5]) == (5, b"retfa")


def test_call_fd_swapped_while_running(ready: FrontEnd) -> None:
    ring = ready.rings[1]
    old, ring.call = ring.call, os.eventfd(0, os.EFD_NONBLOCK)
    ready.send(vu.Req.SET_VRING_CALL, struct.pack("<Q", 1), [ring.call])
    ready.sync()
    os.close(old)
    assert ring.calls() == 1  # an interrupt in case one went to the old fd
    assert ready.request(1, [b"new"], [3]) == (3, b"wen")
    assert ring.calls() == 1


def test_no_interrupt_flag_honoured(tmp_path: Path, front: FrontEnd) -> None:
    front.negotiate(ALL_FEATURES & ~vu.F_EVENT_IDX)
    ring = front.start_ring(1)
    ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    ring.calls()  # the one a new call fd gets on a running ring
    assert front.request(1, [b"abc"], [8]) == (3, b"cba")
    assert ring.calls() == 0
    ring.set_avail_flags(0)
    assert front.request(1, [b"abc"], [8]) == (3, b"cba")
    assert ring.calls() == 1


def test_without_protocol_features_rings_start_enabled(front: FrontEnd) -> None:
    front.negotiate(vu.F_VERSION_1, protocol=0)
    front.start_ring(1, enable=False)
    assert front.request(1, [b"xy"], [2]) == (2, b"yx")


def test_disabled_ring_waits_for_enable(front: FrontEnd, ram: GuestRam) -> None:
    front.negotiate()
    ring = front.start_ring(1, enable=False)
    addr, out = ram.alloc(2), ram.alloc(2)
    ram.write(addr, b"ab")
    ring.offer(ring.chain([(addr, 2, False), (out, 2, True)]))
    ring.do_kick()
    time.sleep(0.1)
    assert ring.used_idx() == 0
    front.send(vu.Req.SET_VRING_ENABLE, struct.pack("<II", 1, 1))
    assert ring.wait_used()[0][1] == 2


def test_polled_ring_without_kick_fd(front: FrontEnd) -> None:
    front.negotiate()
    front.start_ring(1, kick=False)
    assert front.request(1, [b"poll"], [4]) == (4, b"llop")


def test_stop_and_restart_ring(ready: FrontEnd) -> None:
    for _ in range(3):
        assert ready.request(1, [b"ab"], [2]) == (2, b"ba")
    state = ready.call(vu.Req.GET_VRING_BASE, struct.pack("<II", 1, 0))
    assert struct.unpack("<II", state) == (1, 3)
    ring = ready.rings[1]
    ring.kick, ring.call = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2))
    ready.start_ring(1, ring)  # SET_VRING_BASE 3, then the same rings again
    assert ready.request(1, [b"cd"], [2]) == (2, b"dc")


def test_mem_table_replaced_while_running(ready: FrontEnd) -> None:
    assert ready.request(1, [b"one"], [3]) == (3, b"eno")
    table = struct.pack("<II", len(REGIONS), 0)
    table += b"".join(struct.pack("<QQQQ", *region) for region in REGIONS)
    assert ready.ack(vu.Req.SET_MEM_TABLE, table, [ready.ram.fd] * 2) == 0
    assert ready.request(1, [b"two"], [3]) == (3, b"owt")


def test_fds_are_released_on_disconnect(tmp_path: Path, echo: EchoHandler, ram: GuestRam) -> None:
    before = open_fds()
    served = Backend(tmp_path, echo)
    front = FrontEnd(served.path, ram)
    front.negotiate()
    front.start_ring(1)
    assert front.request(1, [b"x"], [1]) == (1, b"x")
    front.close()
    assert served.finished()
    served.close()
    assert open_fds() <= before


def test_stop_while_waiting_for_a_front_end(tmp_path: Path, echo: EchoHandler) -> None:
    served = Backend(tmp_path, echo)
    served.backend.stop()
    assert served.finished()
    served.close()


# --- a hostile guest: every bad request gets a used entry of length 0 -------------


def bad_then_good(front: FrontEnd, head: int, echo: EchoHandler) -> None:
    """``head`` is answered with length 0 and never reaches the handler; the queue goes on."""
    ring = front.rings[1]
    calls = len(echo.calls)
    ring.offer(head)
    ring.do_kick()
    assert ring.wait_used() == [(head, 0)]
    assert len(echo.calls) == calls
    assert front.request(1, [b"ok"], [2]) == (2, b"ko")


def test_descriptor_loop(ready: FrontEnd, echo: EchoHandler, ram: GuestRam) -> None:
    ring = ready.rings[1]
    a, b = ring.take(2)
    buf = ram.alloc(16)
    ring.write_desc(ring.desc, a, buf, 16, VIRTQ_DESC_F_NEXT, b)
    ring.write_desc(ring.desc, b, buf, 16, VIRTQ_DESC_F_NEXT, a)
    bad_then_good(ready, a, echo)


def test_self_loop(ready: FrontEnd, echo: EchoHandler, ram: GuestRam) -> None:
    ring = ready.rings[1]
    (a,) = ring.take(1)
    ring.write_desc(ring.desc, a, ram.alloc(16), 16, VIRTQ_DESC_F_NEXT, a)
    bad_then_good(ready, a, echo)


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (RAM_END, 16),  # just past guest RAM
        (RAM_END - 8, 16),  # crosses the end of the last region
        (0x1000, 0xFFFF_FFFF),  # a 4 GiB buffer
        (0xFFFF_FFFF_FFFF_FFF0, 0x100),  # wraps around 2**64
        (1 << 40, 1),
    ],
)
def test_buffer_outside_guest_memory(ready: FrontEnd, echo: EchoHandler, addr: int,
                                     length: int) -> None:  # fmt: skip
    ring = ready.rings[1]
    bad_then_good(ready, ring.chain([(addr, length, False)]), echo)


def test_next_index_out_of_range(ready: FrontEnd, echo: EchoHandler, ram: GuestRam) -> None:
    ring = ready.rings[1]
    (a,) = ring.take(1)
    ring.write_desc(ring.desc, a, ram.alloc(16), 16, VIRTQ_DESC_F_NEXT, 0xFFFF)
    bad_then_good(ready, a, echo)


def test_readable_after_writable(ready: FrontEnd, echo: EchoHandler, ram: GuestRam) -> None:
    ring = ready.rings[1]
    head = ring.chain([(ram.alloc(8), 8, False), (ram.alloc(8), 8, True), (ram.alloc(8), 8, False)])
    bad_then_good(ready, head, echo)


def test_indirect_table(ready: FrontEnd, ram: GuestRam) -> None:
    ring = ready.rings[1]
    data, out = ram.alloc(4), ram.alloc(8)
    ram.write(data, b"abcd")
    head = ring.indirect([(data, 2, VIRTQ_DESC_F_NEXT, 1), (data + 2, 2, VIRTQ_DESC_F_NEXT, 2),
                          (out, 8, VIRTQ_DESC_F_WRITE, 0)])  # fmt: skip
    ring.offer(head)
    ring.do_kick()
    assert ring.wait_used() == [(head, 4)]
    assert ram.read(out, 4) == b"dcba"


@pytest.mark.parametrize(
    "case", ["outside", "crosses-end", "bad-length", "empty", "huge", "nested", "loop", "next"]
)
def test_hostile_indirect_tables(ready: FrontEnd, echo: EchoHandler, ram: GuestRam,
                                 case: str) -> None:  # fmt: skip
    ring = ready.rings[1]
    buf = ram.alloc(16)
    plain = [(buf, 16, 0, 0)]
    if case == "outside":
        head = ring.indirect(plain, table_addr=RAM_END + 4096, table_len=16)
    elif case == "crosses-end":
        head = ring.indirect(plain, table_addr=RAM_END - 16, table_len=64)
    elif case == "bad-length":
        head = ring.indirect(plain, table_len=17)
    elif case == "empty":
        head = ring.indirect(plain, table_len=0)
    elif case == "huge":
        head = ring.indirect(plain, table_addr=0x1000, table_len=16 * 100_000)
    elif case == "nested":
        inner = ram.alloc(16, 16)
        ring.write_desc(inner, 0, buf, 16, 0, 0)
        head = ring.indirect([(inner, 16, VIRTQ_DESC_F_INDIRECT, 0)])
    elif case == "loop":
        head = ring.indirect([(buf, 16, VIRTQ_DESC_F_NEXT, 1), (buf, 16, VIRTQ_DESC_F_NEXT, 0)])
    else:  # an indirect descriptor that also claims a successor
        head = ring.indirect(plain)
        ring.write_desc(ring.desc, head, ram.alloc(16, 16), 16,
                        VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, head)  # fmt: skip
        table = struct.unpack("<Q", ram.read(ring.desc + 16 * head, 8))[0]
        ring.write_desc(table, 0, buf, 16, 0, 0)
    bad_then_good(ready, head, echo)


def test_indirect_refused_when_not_negotiated(front: FrontEnd, echo: EchoHandler,
                                              ram: GuestRam) -> None:  # fmt: skip
    front.negotiate(ALL_FEATURES & ~vu.F_INDIRECT_DESC)
    ring = front.start_ring(1)
    bad_then_good(front, ring.indirect([(ram.alloc(8), 8, 0, 0)]), echo)


def test_head_out_of_range_breaks_only_that_queue(
    ready: FrontEnd, caplog: pytest.LogCaptureFixture
) -> None:
    other = ready.start_ring(2)
    ring = ready.rings[1]
    ring.offer(QUEUE_SIZE + 5)
    ring.do_kick()
    assert select.select([ring.err], [], [], 5)[0], "the err eventfd was never signalled"
    assert "broken" in caplog.text
    assert ready.request(2, [b"still"], [5]) == (5, b"llits")
    assert ready.request(0, [b"hi"], [2]) == (2, b"ih")
    assert other.used_idx() == 1


def test_avail_index_leaping_ahead_breaks_the_queue(ready: FrontEnd) -> None:
    ring = ready.rings[1]
    ring.ram.write(ring.avail + 2, struct.pack("<H", QUEUE_SIZE + 1))
    ring.do_kick()
    assert select.select([ring.err], [], [], 5)[0]
    assert ready.request(0, [b"hi"], [2]) == (2, b"ih")


def test_rings_outside_memory_break_the_queue(ready: FrontEnd, ram: GuestRam) -> None:
    index, ring = 2, Ring(ram)
    ready.rings[index] = ring
    ready.send(vu.Req.SET_VRING_NUM, struct.pack("<II", index, QUEUE_SIZE))
    ready.send(vu.Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, 0x1000, 0x2000, 0x3000, 0))
    ready.send(vu.Req.SET_VRING_ERR, struct.pack("<Q", index), [ring.err])
    ready.send(vu.Req.SET_VRING_KICK, struct.pack("<Q", index), [ring.kick])
    assert select.select([ring.err], [], [], 5)[0]
    assert ready.request(1, [b"ok"], [2]) == (2, b"ko")


def test_handler_failure_answers_empty(ready: FrontEnd, echo: EchoHandler,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def explode(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        raise RuntimeError("handler bug")

    monkeypatch.setattr(echo, "handle_sg", explode)
    assert ready.request(1, [b"x"], [4]) == (0, b"")
    monkeypatch.undo()
    assert ready.request(1, [b"xy"], [4]) == (2, b"yx")


# --- a front-end that breaks the protocol: the connection ends, logged ------------


def kick_without_fd(front: FrontEnd) -> None:
    front.send(vu.Req.SET_VRING_KICK, struct.pack("<Q", 1))


def mem_table_missing_fd(front: FrontEnd) -> None:
    table = struct.pack("<II", 2, 0) + b"".join(struct.pack("<QQQQ", *r) for r in REGIONS)
    front.send(vu.Req.SET_MEM_TABLE, table, [front.ram.fd])


def mem_table_beyond_file(front: FrontEnd) -> None:
    table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 64 * MIB, 0x7F00_0000_0000, 0)
    front.send(vu.Req.SET_MEM_TABLE, table, [front.ram.fd])


def mem_table_overlapping(front: FrontEnd) -> None:
    regions = [(0, 2 * MIB, 0x1000_0000, 0), (MIB, 2 * MIB, 0x2000_0000, 0)]
    table = struct.pack("<II", 2, 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)
    front.send(vu.Req.SET_MEM_TABLE, table, [front.ram.fd] * 2)


def mem_table_too_many(front: FrontEnd) -> None:
    front.send(vu.Req.SET_MEM_TABLE, struct.pack("<II", 1000, 0))


def call_with_two_fds(front: FrontEnd) -> None:
    fds = [os.eventfd(0), os.eventfd(0)]
    front.send(vu.Req.SET_VRING_CALL, struct.pack("<Q", 1), fds)
    for fd in fds:
        os.close(fd)


def kick_not_an_eventfd(front: FrontEnd) -> None:
    front.send(vu.Req.SET_VRING_KICK, struct.pack("<Q", 1), [front.ram.fd])


MALFORMED = {
    "short-vring-num": lambda f: f.send(vu.Req.SET_VRING_NUM, b"\0" * 4),
    "long-features": lambda f: f.send(vu.Req.SET_FEATURES, b"\0" * 16),
    "unoffered-feature": lambda f: f.send(vu.Req.SET_FEATURES, struct.pack("<Q", 1 << 34)),
    "payload-too-big": lambda f: f.send(vu.Req.SET_FEATURES, size=1 << 30),
    "bad-version": lambda f: f.send(vu.Req.GET_FEATURES, flags=0),
    "reply-flag": lambda f: f.send(vu.Req.GET_FEATURES, flags=vu.VERSION | vu.FLAG_REPLY),
    "queue-index": lambda f: f.send(vu.Req.SET_VRING_NUM, struct.pack("<II", 200, 64)),
    "queue-size": lambda f: f.send(vu.Req.SET_VRING_NUM, struct.pack("<II", 1, 100)),
    "vring-base": lambda f: f.send(vu.Req.SET_VRING_BASE, struct.pack("<II", 1, 1 << 20)),
    "misaligned": lambda f: f.send(vu.Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, 3, 0, 0, 0)),
    "enable-2": lambda f: f.send(vu.Req.SET_VRING_ENABLE, struct.pack("<II", 1, 2)),
    "kick-bits": lambda f: f.send(vu.Req.SET_VRING_KICK, struct.pack("<Q", 1 << 40)),
    "kick-no-fd": kick_without_fd,
    "kick-not-eventfd": kick_not_an_eventfd,
    "call-two-fds": call_with_two_fds,
    "mem-missing-fd": mem_table_missing_fd,
    "mem-beyond-file": mem_table_beyond_file,
    "mem-overlap": mem_table_overlapping,
    "mem-too-many": mem_table_too_many,
    "truncated": lambda f: f.send(vu.Req.SET_VRING_ADDR, b"\0" * 8, size=40),
    "needs-unoffered-reply": lambda f: f.send(vu.Req.GET_INFLIGHT_FD, b"\0" * 8),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_ends_connection(backend: Backend, ram: GuestRam, case: str,
                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="vmruntime.broker")
    front = FrontEnd(backend.path, ram)
    try:
        front.negotiate()
        front.start_ring(1)
        MALFORMED[case](front)
        if case == "truncated":
            front.sock.shutdown(socket.SHUT_WR)
        assert front.closed_by_backend()
        assert backend.finished()
    finally:
        front.close()
    assert "ending the front-end connection" in caplog.text
    assert "Traceback" not in caplog.text


def test_garbage_stream(backend: Backend, ram: GuestRam) -> None:
    front = FrontEnd(backend.path, ram)
    try:
        front.sock.sendall(os.urandom(4096))
        assert front.closed_by_backend()
        assert backend.finished()
    finally:
        front.close()


def test_sudden_disconnect_mid_message(backend: Backend, ram: GuestRam) -> None:
    front = FrontEnd(backend.path, ram)
    front.negotiate()
    front.sock.sendall(vu.HEADER.pack(vu.Req.SET_FEATURES, vu.VERSION, 8) + b"\0\0")
    front.close()
    assert backend.finished()


# --- the real FUSE handler behind the transport ------------------------------------


class Fuse:
    """FUSE requests through the request queue of a front-end."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front
        self.unique = 0

    def call(self, opcode: int, nodeid: int, args: bytes, reply_size: int = 4096,
             data: Sequence[bytes] = ()) -> tuple[int, bytes]:  # fmt: skip
        self.unique += 1
        length = IN_HEADER.size + len(args) + sum(len(d) for d in data)
        header = IN_HEADER.pack(length, opcode, self.unique, nodeid, 0, 0, 1, 0, 0)
        used, reply = self.front.request(1, [header + args, *data], [16, reply_size - 16])
        size, error, unique = OUT_HEADER.unpack_from(reply)
        assert (size, unique) == (used, self.unique)
        return error, reply[16:]

    def init(self) -> None:
        error, body = self.call(OP_INIT, 0, struct.pack("<IIII", 7, 31, 1 << 20, 0))
        assert error == 0
        assert struct.unpack_from("<II", body) == (7, 31)

    def lookup(self, name: bytes) -> int:
        error, body = self.call(OP_LOOKUP, 1, name + b"\0")
        assert error == 0, errno.errorcode[-error]
        return struct.unpack_from("<Q", body)[0]

    def open(self, nodeid: int, flags: int) -> int:
        error, body = self.call(OP_OPEN, nodeid, struct.pack("<II", flags, 0))
        assert error == 0
        return struct.unpack_from("<Q", body)[0]


def assert_missing(client: Fuse, name: bytes) -> None:
    """ENOENT, or the cacheable negative entry (node id 0) the handler may answer."""
    error, body = client.call(OP_LOOKUP, 1, name + b"\0")
    assert error == -errno.ENOENT or (error == 0 and struct.unpack_from("<Q", body)[0] == 0)


@pytest.fixture
def fuse(tmp_path: Path, ram: GuestRam) -> Iterator[tuple[Fuse, Path]]:
    root = tmp_path / "share"
    root.mkdir()
    handler = FuseHandler(root, BrokerOptions())
    served = Backend(tmp_path, handler)
    front = FrontEnd(served.path, ram)
    try:
        front.negotiate()
        front.start_ring(0)
        front.start_ring(1)
        client = Fuse(front)
        client.init()
        yield client, root
    finally:
        front.close()
        served.close()
        handler.close()


def test_fuse_lookup_read_write(fuse: tuple[Fuse, Path], ram: GuestRam) -> None:
    client, root = fuse
    content = os.urandom(300_000)
    (root / "data.bin").write_bytes(content)
    node = client.lookup(b"data.bin")
    fh = client.open(node, os.O_RDWR)
    # READ lands in guest memory: a 128 KiB read into 32 scattered 4 KiB pages.
    ring = client.front.rings[1]
    client.unique += 1
    header = IN_HEADER.pack(80, OP_READ, client.unique, node, 0, 0, 1, 0, 0)
    request = header + struct.pack("<QQIIQII", fh, 4096, 131072, 0, 0, 0, 0)
    req_addr, out_head = ram.alloc(len(request)), ram.alloc(16)
    ram.write(req_addr, request)
    pages = [ram.alloc(4096, 4096) for _ in range(32)]
    buffers = [(req_addr, len(request), False), (out_head, 16, True)]
    ring.offer(ring.chain(buffers + [(page, 4096, True) for page in pages]))
    ring.do_kick()
    assert ring.wait_used()[0][1] == 16 + 131072
    assert b"".join(ram.read(page, 4096) for page in pages) == content[4096 : 4096 + 131072]
    # WRITE data comes from guest memory, split over several buffers.
    payload = [b"A" * 5000, b"B" * 3000, b"C" * 100]
    size = sum(len(p) for p in payload)
    args = struct.pack("<QQIIQII", fh, 10, size, 0, 0, 0, 0)
    error, body = client.call(OP_WRITE, node, args, 64, data=payload)
    assert error == 0 and struct.unpack_from("<I", body)[0] == size
    on_disk = (root / "data.bin").read_bytes()
    assert on_disk[10 : 10 + size] == b"".join(payload)
    assert on_disk[:10] == content[:10]


def test_fuse_errors_travel_back(fuse: tuple[Fuse, Path]) -> None:
    client, _ = fuse
    assert_missing(client, b"missing")
    error, _ = client.call(OP_LOOKUP, 1, b"..\0")
    assert error != 0
    error, _ = client.call(9999, 1, b"")
    assert error == -errno.ENOSYS


def test_fuse_reply_too_small_for_buffer(fuse: tuple[Fuse, Path]) -> None:
    client, root = fuse
    (root / "f").write_bytes(b"x" * 1000)
    node = client.lookup(b"f")
    fh = client.open(node, os.O_RDONLY)
    error, body = client.call(OP_READ, node, struct.pack("<QQIIQII", fh, 0, 1000, 0, 0, 0, 0), 116)
    assert error == 0 and body == b"x" * 100  # only what the guest gave room for


# Request bytes a hostile guest may put in a well-formed chain, and the one reply each
# must get (docs/broker.md, the handler contract): an unusable header is EIO with
# unique 0 (there is no unique to echo); a header whose length is not the request's is
# EINVAL echoing its unique. Each is one 16-byte error reply; the queue goes on.
_LYING_LENGTH = struct.pack("<IIQ", 41, 0xDEAD, 0x1234_5678_9ABC_DEF0) + os.urandom(24)
HOSTILE_REQUESTS: dict[str, tuple[bytes, int, int]] = {  # bytes, errno, unique
    "no-readable-buffer": (b"", errno.EIO, 0),
    "short-header": (b"\xff" * 7, errno.EIO, 0),
    "lying-length": (_LYING_LENGTH, errno.EINVAL, 0x1234_5678_9ABC_DEF0),
    "huge-write-length": (IN_HEADER.pack(1 << 31, OP_WRITE, 1, 1, 0, 0, 0, 0, 0), errno.EINVAL, 1),
    "header-only-write": (IN_HEADER.pack(40, OP_WRITE, 2, 1, 0, 0, 0, 0, 0), errno.EINVAL, 2),
}


@pytest.mark.parametrize("case", list(HOSTILE_REQUESTS))
def test_fuse_hostile_request_bytes(fuse: tuple[Fuse, Path], case: str) -> None:
    client, root = fuse
    junk, code, unique = HOSTILE_REQUESTS[case]
    used, reply = client.front.request(1, [junk] if junk else [], [64])
    assert used == OUT_HEADER.size == len(reply)
    assert OUT_HEADER.unpack(reply) == (OUT_HEADER.size, -code, unique)
    assert os.listdir(root) == []  # WRITE or not, nothing reached the share
    assert_missing(client, b"missing")  # the queue and the handler go on


def test_neighbouring_buffers_become_one_view(ready: FrontEnd, echo: EchoHandler,
                                              ram: GuestRam) -> None:  # fmt: skip
    """Pages that are neighbours in guest memory reach the handler as one view (fewer
    iovecs per WRITE), never across the readable/writable boundary."""
    seen: list[tuple[list[int], list[int]]] = []
    original = echo.handle_sg

    def recording(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int | None:
        seen.append(([len(v) for v in readable], [len(v) for v in writable]))
        return original(readable, writable)

    echo.handle_sg = recording  # type: ignore[method-assign]
    pages = ram.alloc(8192, align=4096)
    ram.alloc(64)  # a gap: the next buffer is not the pages' neighbour
    other = ram.alloc(64)
    ram.write(pages, b"a" * 4096 + b"b" * 4096)
    ram.write(other, b"c" * 10)
    ring = ready.rings[1]
    buffers = [(pages, 4096, False), (pages + 4096, 4096, False), (other, 10, False),
               (other + 10, 20, True), (other + 30, 20, True)]  # fmt: skip
    ring.offer(ring.chain(buffers))
    ring.do_kick()
    ((_, length),) = ring.wait_used()
    assert seen == [([8192, 10], [40])]
    assert (
        length == 40
        and ram.read(other + 10, 40) == (b"a" * 4096 + b"b" * 4096 + b"c" * 10)[::-1][:40]
    )
