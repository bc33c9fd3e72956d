"""Transport (a): a vhost-user-fs back-end for QEMU's ``vhost-user-fs-device``.

QEMU (the front-end) connects to our Unix socket, hands us the guest's RAM as
memfds and each virtqueue's rings, kick and call eventfds; the guest kernel's
virtio-fs driver then puts FUSE requests straight into those rings and we
answer them in place. Queue 0 is the high-priority queue (FORGET,
BATCH_FORGET, INTERRUPT), queues 1.. carry requests; both go to the same
:class:`~vmruntime.broker.FuseHandler` through ``handle_sg``.

Protocol: docs/interop/vhost-user.rst in QEMU. We offer VERSION_1,
INDIRECT_DESC, EVENT_IDX and PROTOCOL_FEATURES; protocol features MQ,
REPLY_ACK and RESET_DEVICE. No dirty logging (no live migration), no IOMMU,
no packed rings, no back-end channel (no DAX), no in-flight tracking.

Trust: QEMU is trusted to follow the protocol, yet every message is checked
(size, indexes, fds) and a malformed one ends the connection with a logged
reason. The guest is hostile: everything it controls (the rings and the
buffers) is checked by :mod:`vmruntime.broker.virtqueue`; a bad request gets a
used length of 0 and a bad ring stops only that queue.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import selectors
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vmruntime.broker.virtqueue import (
    MAX_MEMORY_REGIONS,
    AddressError,
    BrokenQueueError,
    Chain,
    GuestMemory,
    MemoryTableError,
    RegionSpec,
    SplitQueue,
    ring_sizes,
    valid_queue_size,
)
from vmruntime.errors import VmruntimeError

log = logging.getLogger(__name__)


class Req(enum.IntEnum):
    """Front-end requests (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Virtio feature bits we offer (VIRTIO_F_*, VIRTIO_RING_F_*) plus vhost-user's own bit 30.
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
OFFERED_FEATURES = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | F_PROTOCOL_FEATURES

PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_RESET_DEVICE = 1 << 13
OFFERED_PROTOCOL_FEATURES = PF_MQ | PF_REPLY_ACK | PF_RESET_DEVICE

# Requests that always get a reply, whatever the need_reply flag says.
_ALWAYS_REPLY = {
    Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE, Req.GET_QUEUE_NUM,
    Req.GET_CONFIG, Req.GET_INFLIGHT_FD, Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS,
    Req.POSTCOPY_ADVISE, Req.CREATE_CRYPTO_SESSION,
}  # fmt: skip

HEADER = struct.Struct("<III")  # request, flags, payload size
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")  # vring index, num
_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
_REGION = struct.Struct("<QQQQ")  # guest addr, size, user addr, mmap offset
_CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100

# Hiprio plus up to 8 request queues; QEMU's default is 1 request queue.
DEFAULT_MAX_QUEUES = 9
# The largest message we need is SET_MEM_TABLE with 8 regions (264 bytes).
MAX_PAYLOAD = 4096
MAX_FDS = MAX_MEMORY_REGIONS
# Once the first byte of a message is in, the rest must follow within this time.
MESSAGE_TIMEOUT = 5.0
# Requests served from one queue before the loop looks at its other sources again.
BUDGET = 64
# A ring started without a kick eventfd (NOFD) is polled this often.
POLL_INTERVAL = 0.005
_MAX_CONFIG = 256
_LOGGED_GUEST_ERRORS = 20


class ProtocolError(VmruntimeError):
    """The front-end broke the vhost-user protocol; its connection is ended."""


class _Refused(VmruntimeError):
    """A well-formed request we do not carry out (a feature we never offered)."""


class SgHandler(Protocol):
    """What the transport needs from :class:`vmruntime.broker.FuseHandler`.

    ``handle_sg`` gets one request's device-readable and device-writable buffers
    (views of guest RAM, valid only during the call) and returns the number of
    reply bytes it wrote (None: no reply). It must not raise for guest input.
    """

    def handle_sg(self, readable: Sequence[memoryview],
                  writable: Sequence[memoryview]) -> int | None: ...  # fmt: skip


@dataclass
class _Message:
    """One front-end request as read off the socket; its fds are ours to close."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        try:
            return Req(self.request).name
        except ValueError:
            return f"request {self.request}"

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


@dataclass
class _Vring:
    """What the front-end has told us about one virtqueue, and its running state."""

    index: int
    num: int = 0
    addrs: tuple[int, int, int] | None = None  # desc, avail, used as front-end addresses
    base: int = 0
    enabled: bool = False
    kick: int | None = None
    polled: bool = False  # started with NOFD: no kick eventfd, the loop polls it
    call: int | None = None
    err: int | None = None
    queue: SplitQueue | None = None
    broken: str = ""


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return True  # no /proc to ask: trust the front-end


def _signal(fd: int) -> None:
    try:  # noqa: SIM105 - once per request: suppress() would cost an object each time
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # a full eventfd counter already means "notified"


class VhostUserFsBackend:
    """The device side of one vhost-user-fs connection.

    Who calls it: the broker process (``python -m vmruntime.broker serve``), one
    per share per sandbox, and the tests that play QEMU. Promises: ``serve``
    accepts one front-end and serves it on the calling thread until the
    front-end disconnects, breaks the protocol (logged, never raised) or
    :meth:`stop` is called (from a signal handler or another thread); every fd
    and mapping it was given is closed when it returns. Each request chain is
    passed to ``handler.handle_sg`` exactly once and answered in the used ring.
    """

    def __init__(self, handler: SgHandler, *, max_queues: int = DEFAULT_MAX_QUEUES) -> None:
        if not 2 <= max_queues <= VRING_INDEX_MASK + 1:
            raise ValueError(f"max_queues={max_queues}: want 2..256")
        self._handler = handler
        self._vrings = [_Vring(index) for index in range(max_queues)]
        self._memory = GuestMemory.empty()
        self.features = 0
        self.protocol_features = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._sel: selectors.BaseSelector | None = None
        self._conn: socket.socket | None = None
        self._pending: set[int] = set()
        self.requests = 0
        self.bad_requests = 0
        self._handlers: dict[int, Callable[[_Message], bytes | None]] = {
            Req.GET_FEATURES: self._get_features,
            Req.SET_FEATURES: self._set_features,
            Req.SET_OWNER: self._set_owner,
            Req.RESET_OWNER: self._reset_device,
            Req.RESET_DEVICE: self._reset_device,
            Req.SET_MEM_TABLE: self._set_mem_table,
            Req.SET_VRING_NUM: self._set_vring_num,
            Req.SET_VRING_ADDR: self._set_vring_addr,
            Req.SET_VRING_BASE: self._set_vring_base,
            Req.GET_VRING_BASE: self._get_vring_base,
            Req.SET_VRING_KICK: self._set_vring_kick,
            Req.SET_VRING_CALL: self._set_vring_call,
            Req.SET_VRING_ERR: self._set_vring_err,
            Req.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Req.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Req.GET_QUEUE_NUM: self._get_queue_num,
            Req.SET_VRING_ENABLE: self._set_vring_enable,
            Req.GET_CONFIG: self._get_config,
        }

    # Lifetime.

    def stop(self) -> None:
        """End ``serve`` soon; safe from a signal handler or another thread."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            _close(fd)
        self._wake_r = self._wake_w = -1

    def serve(self, listener: socket.socket) -> None:
        """Accept one front-end on ``listener`` and serve it (returns when it is gone)."""
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            conn: socket.socket | None = None
            while conn is None and not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is listener:
                        conn, _ = listener.accept()
                        break
                    self._drain_wake()
        if conn is not None:
            log.info("front-end connected")
            self.serve_connection(conn)

    def serve_connection(self, conn: socket.socket) -> None:
        """Serve one connected front-end until it leaves; closes ``conn``."""
        conn.settimeout(MESSAGE_TIMEOUT)
        self._conn = conn
        self._sel = selectors.DefaultSelector()
        self._sel.register(conn, selectors.EVENT_READ, "socket")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            self._loop()
        except ProtocolError as exc:
            log.error("ending the front-end connection: %s", exc)
        except OSError as exc:
            log.error("front-end connection failed: %s", exc)
        except Exception:
            log.exception("internal error; ending the front-end connection")
        finally:
            self._teardown()
        log.info("served %d requests (%d refused as malformed)", self.requests, self.bad_requests)

    def _loop(self) -> None:
        assert self._sel is not None
        while not self._stopping:
            polled = any(v.polled and v.queue is not None for v in self._vrings)
            timeout = 0 if self._pending else POLL_INTERVAL if polled else None
            for key, _ in self._sel.select(timeout):
                if key.data == "socket":
                    if not self._on_message():
                        return
                elif key.data == "wake":
                    self._drain_wake()
                elif isinstance(key.data, _Vring) and key.data.kick == key.fd:
                    self._on_kick(key.data)
            self._run_pending()

    def _teardown(self) -> None:
        for vring in self._vrings:
            self._stop_ring(vring)
            _close(vring.err)
            vring.err = None
        self._memory.close()
        self._memory = GuestMemory.empty()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 512)

    # Messages.

    def _recv_exact(self, size: int, fds: list[int], *, eof_ok: bool = False) -> bytes:
        """``size`` bytes (b"" for a clean end of stream if ``eof_ok``), fds into ``fds``."""
        assert self._conn is not None
        data = b""
        while len(data) < size:
            try:
                chunk, new_fds, flags, _ = socket.recv_fds(self._conn, size - len(data), MAX_FDS)
            except TimeoutError:
                raise ProtocolError(f"message incomplete after {MESSAGE_TIMEOUT:g} s") from None
            fds.extend(new_fds)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors in one message")
            if not chunk:
                if not data and eof_ok:
                    return b""
                raise ProtocolError("connection closed in the middle of a message")
            data += chunk
        return data

    def _recv_message(self) -> _Message | None:
        fds: list[int] = []
        try:
            header = self._recv_exact(HEADER.size, fds, eof_ok=True)
            if not header:
                return None
            request, flags, size = HEADER.unpack(header)
            if flags & VERSION_MASK != VERSION or flags & FLAG_REPLY:
                raise ProtocolError(f"request {request} with flags {flags:#x}")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"request {request} with a {size}-byte payload")
            payload = self._recv_exact(size, fds) if size else b""
        except BaseException:
            _Message(0, 0, b"", fds).close_fds()
            raise
        return _Message(request, flags, payload, fds)

    def _send(self, request: int, payload: bytes) -> None:
        assert self._conn is not None
        self._conn.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)

    def _on_message(self) -> bool:
        msg = self._recv_message()
        if msg is None:
            log.info("the front-end closed the connection")
            return False
        try:
            self._dispatch(msg)
        finally:
            msg.close_fds()
        return True

    def _dispatch(self, msg: _Message) -> None:
        log.debug("%s flags=%#x, %d bytes, %d fds", msg.name, msg.flags, len(msg.payload),
                  len(msg.fds))  # fmt: skip
        handler = self._handlers.get(msg.request)
        ok = True
        reply: bytes | None = None
        try:
            if handler is None:
                self._unsupported(msg)
            else:
                reply = handler(msg)
        except _Refused as exc:
            log.warning("%s refused: %s", msg.name, exc)
            ok = False
        if msg.request in _ALWAYS_REPLY:
            self._send(msg.request, reply or b"")
        elif msg.flags & FLAG_NEED_REPLY and self.protocol_features & PF_REPLY_ACK:
            self._send(msg.request, _U64.pack(0 if ok else 1))

    def _unsupported(self, msg: _Message) -> None:
        if msg.request in _ALWAYS_REPLY:
            # The front-end would wait for an answer we cannot give; it only asks this
            # after negotiating a protocol feature we never offered.
            raise ProtocolError(f"{msg.name} needs a feature this back-end never offered")
        raise _Refused("not supported by this back-end")

    # Payload decoding; each checks the exact size first.

    @staticmethod
    def _expect(msg: _Message, size: int) -> None:
        if len(msg.payload) != size:
            raise ProtocolError(f"{msg.name} with {len(msg.payload)} payload bytes, want {size}")

    def _u64(self, msg: _Message) -> int:
        self._expect(msg, _U64.size)
        return _U64.unpack(msg.payload)[0]

    def _vring(self, index: int, msg: _Message) -> _Vring:
        if index >= len(self._vrings):
            raise ProtocolError(f"{msg.name} for queue {index}; there are {len(self._vrings)}")
        return self._vrings[index]

    def _state(self, msg: _Message) -> tuple[_Vring, int]:
        self._expect(msg, _STATE.size)
        index, num = _STATE.unpack(msg.payload)
        return self._vring(index, msg), num

    def _stopped_vring(self, vring: _Vring, msg: _Message) -> _Vring:
        if vring.kick is not None or vring.polled:
            raise ProtocolError(f"{msg.name} for queue {vring.index} while it runs")
        return vring

    def _vring_fd(self, msg: _Message) -> tuple[_Vring, int | None]:
        """SET_VRING_KICK/CALL/ERR: a u64 naming the queue, plus one eventfd unless NOFD."""
        value = self._u64(msg)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise ProtocolError(f"{msg.name} with unknown bits in {value:#x}")
        vring = self._vring(value & VRING_INDEX_MASK, msg)
        want = 0 if value & VRING_NOFD else 1
        if len(msg.fds) != want:
            raise ProtocolError(f"{msg.name} with {len(msg.fds)} file descriptors, want {want}")
        if not want:
            return vring, None
        fd = msg.fds.pop()
        if not _is_eventfd(fd):
            _close(fd)
            raise ProtocolError(f"{msg.name} with a file descriptor that is not an eventfd")
        # QEMU's eventfds are non-blocking already; ours must never block the loop.
        os.set_blocking(fd, False)
        return vring, fd

    # Feature negotiation and ownership.

    def _get_features(self, msg: _Message) -> bytes:
        self._expect(msg, 0)
        return _U64.pack(OFFERED_FEATURES)

    def _set_features(self, msg: _Message) -> None:
        features = self._u64(msg)
        if features & ~OFFERED_FEATURES:
            raise ProtocolError(f"SET_FEATURES {features:#x} asks for bits never offered")
        if features != self.features:
            log.info("virtio features %#x", features)
        self.features = features

    def _get_protocol_features(self, msg: _Message) -> bytes:
        self._expect(msg, 0)
        return _U64.pack(OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: _Message) -> None:
        features = self._u64(msg)
        if features & ~OFFERED_PROTOCOL_FEATURES:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES {features:#x} asks for bits never offered")
        log.info("vhost-user protocol features %#x", features)
        self.protocol_features = features

    def _get_queue_num(self, msg: _Message) -> bytes:
        self._expect(msg, 0)
        return _U64.pack(len(self._vrings))

    def _set_owner(self, msg: _Message) -> None:
        self._expect(msg, 0)

    def _reset_device(self, msg: _Message) -> None:
        self._expect(msg, 0)
        for vring in self._vrings:
            self._stop_ring(vring)
            _close(vring.err)
            self._vrings[vring.index] = _Vring(vring.index)
        self._pending.clear()

    def _get_config(self, msg: _Message) -> bytes:
        if len(msg.payload) < _CONFIG_HEADER.size:
            raise ProtocolError(f"GET_CONFIG with {len(msg.payload)} payload bytes")
        _, size, _ = _CONFIG_HEADER.unpack_from(msg.payload)
        if size > _MAX_CONFIG or len(msg.payload) != _CONFIG_HEADER.size + size:
            raise ProtocolError(f"GET_CONFIG for {size} bytes in a {len(msg.payload)}-byte message")
        # QEMU's vhost-user-fs-device answers config reads itself; an empty reply is
        # the protocol's way to say "not from this back-end".
        log.warning("GET_CONFIG: the device config belongs to the front-end; answered empty")
        return b""

    # Memory.

    def _set_mem_table(self, msg: _Message) -> None:
        if len(msg.payload) < 8:
            raise ProtocolError(f"SET_MEM_TABLE with {len(msg.payload)} payload bytes")
        count = struct.unpack_from("<I", msg.payload)[0]
        if count > MAX_MEMORY_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE with {count} regions")
        self._expect(msg, 8 + _REGION.size * count)
        if len(msg.fds) != count:
            raise ProtocolError(f"SET_MEM_TABLE: {count} regions but {len(msg.fds)} fds")
        specs = [RegionSpec(*_REGION.unpack_from(msg.payload, 8 + _REGION.size * i))
                 for i in range(count)]  # fmt: skip
        try:
            memory = GuestMemory(specs, msg.fds)  # the mappings outlive the fds
        except MemoryTableError as exc:
            raise ProtocolError(f"SET_MEM_TABLE: {exc}") from exc
        old, self._memory = self._memory, memory
        for vring in self._vrings:
            if vring.queue is not None:
                self._remap(vring)
        old.close()
        regions = ", ".join(f"{s.guest_addr:#x}+{s.size >> 10} KiB" for s in specs)
        log.info("guest memory: %s", regions or "none")

    def _ring_views(self, vring: _Vring) -> tuple[memoryview, memoryview, memoryview]:
        assert vring.addrs is not None
        sizes = ring_sizes(vring.num, event_idx=True)
        views: list[memoryview] = []
        try:
            for addr, size in zip(vring.addrs, sizes, strict=True):
                views.append(self._memory.uva_span(addr, size))
        except AddressError:
            for view in views:
                view.release()
            raise
        return views[0], views[1], views[2]

    def _remap(self, vring: _Vring) -> None:
        assert vring.queue is not None
        try:
            vring.queue.remap(self._memory, *self._ring_views(vring))
        except (AddressError, BrokenQueueError) as exc:
            self._break(vring, f"rings not in the new memory table: {exc}")

    # Rings: configuration.

    def _set_vring_num(self, msg: _Message) -> None:
        vring, num = self._state(msg)
        if not valid_queue_size(num):
            raise ProtocolError(f"SET_VRING_NUM {num} for queue {vring.index}")
        self._stopped_vring(vring, msg).num = num

    def _set_vring_addr(self, msg: _Message) -> None:
        self._expect(msg, _ADDR.size)
        index, flags, desc, used, avail, _log = _ADDR.unpack(msg.payload)
        vring = self._stopped_vring(self._vring(index, msg), msg)
        if flags:
            log.warning("SET_VRING_ADDR flags %#x ignored (no dirty logging)", flags)
        if desc % 16 or avail % 2 or used % 4:
            raise ProtocolError(f"SET_VRING_ADDR misaligned rings {desc:#x} {avail:#x} {used:#x}")
        vring.addrs = (desc, avail, used)

    def _set_vring_base(self, msg: _Message) -> None:
        vring, num = self._state(msg)
        if num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE {num:#x} for a split ring")
        self._stopped_vring(vring, msg).base = num

    def _get_vring_base(self, msg: _Message) -> bytes:
        vring, _ = self._state(msg)
        self._stop_ring(vring)
        return _STATE.pack(vring.index, vring.base)

    def _set_vring_enable(self, msg: _Message) -> None:
        vring, num = self._state(msg)
        if num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE {num} for queue {vring.index}")
        vring.enabled = bool(num)
        if vring.enabled:
            self._pending.add(vring.index)  # buffers may have been waiting

    def _set_vring_kick(self, msg: _Message) -> None:
        vring, fd = self._vring_fd(msg)
        self._drop_kick(vring)
        vring.kick, vring.polled = fd, fd is None
        if fd is not None:
            assert self._sel is not None
            self._sel.register(fd, selectors.EVENT_READ, vring)
        if not self.features & F_PROTOCOL_FEATURES:
            vring.enabled = True  # without PROTOCOL_FEATURES a ring starts enabled
        self._start_ring(vring)
        self._pending.add(vring.index)  # kicks sent before this fd existed are not lost

    def _set_vring_call(self, msg: _Message) -> None:
        vring, fd = self._vring_fd(msg)
        _close(vring.call)
        vring.call = fd
        if fd is not None and vring.queue is not None:
            # QEMU swaps call fds when it masks/unmasks; an interrupt for entries
            # pushed meanwhile would be lost, and a spurious one is harmless.
            _signal(fd)

    def _set_vring_err(self, msg: _Message) -> None:
        vring, fd = self._vring_fd(msg)
        _close(vring.err)
        vring.err = fd

    # Rings: start, stop, break.

    def _start_ring(self, vring: _Vring) -> None:
        if vring.queue is not None:
            return
        vring.broken = ""
        if not vring.num or vring.addrs is None:
            self._break(vring, "started before its size and addresses were set")
            return
        try:
            views = self._ring_views(vring)
        except AddressError as exc:
            self._break(vring, f"rings outside guest memory: {exc}")
            return
        try:
            vring.queue = SplitQueue(
                self._memory, vring.num, *views, last_avail=vring.base,
                event_idx=bool(self.features & F_EVENT_IDX),
                indirect=bool(self.features & F_INDIRECT_DESC),
            )  # fmt: skip
        except BrokenQueueError as exc:
            for view in views:
                view.release()
            self._break(vring, str(exc))
            return
        log.info("queue %d started: size %d, avail idx %d, used idx %d",
                 vring.index, vring.num, vring.base, vring.queue.used_idx)  # fmt: skip

    def _drop_kick(self, vring: _Vring) -> None:
        if vring.kick is not None and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(vring.kick)
        _close(vring.kick)
        vring.kick, vring.polled = None, False

    def _stop_ring(self, vring: _Vring) -> None:
        """GET_VRING_BASE: stop serving, remember where we were, give back the fds."""
        if vring.queue is not None:
            vring.base = vring.queue.last_avail
            vring.queue.release()
            vring.queue = None
        self._drop_kick(vring)
        _close(vring.call)
        vring.call = None
        vring.broken = ""
        self._pending.discard(vring.index)

    def _break(self, vring: _Vring, reason: str) -> None:
        log.error("queue %d broken, no longer served: %s", vring.index, reason)
        vring.broken = reason
        self._pending.discard(vring.index)
        if vring.err is not None:
            _signal(vring.err)

    # Rings: serving requests.

    def _on_kick(self, vring: _Vring) -> None:
        assert vring.kick is not None
        try:  # noqa: SIM105 - once per request: suppress() would cost an object each time
            os.eventfd_read(vring.kick)
        except BlockingIOError:
            pass  # woken for a kick someone already consumed
        self._service(vring)

    def _run_pending(self) -> None:
        pending, self._pending = self._pending, set()
        for index in sorted(pending):
            self._service(self._vrings[index])
        for vring in self._vrings:
            if vring.polled and vring.index not in pending:
                self._service(vring)

    def _service(self, vring: _Vring) -> None:
        queue = vring.queue
        if queue is None or not vring.enabled or vring.broken:
            return
        served = 0
        try:
            while True:
                while served < BUDGET and (chain := queue.pop()) is not None:
                    queue.push(chain.head, self._serve_chain(vring.index, chain))
                    served += 1
                if served >= BUDGET:
                    self._pending.add(vring.index)  # come back after the other sources
                    break
                if not queue.arm():
                    break
        except BrokenQueueError as exc:
            self._break(vring, str(exc))
        if served and queue.need_notify() and vring.call is not None:
            _signal(vring.call)

    def _serve_chain(self, index: int, chain: Chain) -> int:
        self.requests += 1
        if chain.error:
            self._guest_error(f"queue {index}: request at descriptor {chain.head}: {chain.error}")
            return 0
        capacity = chain.writable_len
        try:
            written = self._handler.handle_sg(chain.readable, chain.writable)
        except Exception:
            # The handler promises never to raise for guest input: this is our bug.
            # Answer the request empty and keep serving the other ones.
            log.exception("queue %d: the handler failed on a request", index)
            written = 0
        finally:
            chain.release()
        if not isinstance(written, int) or written <= 0:
            return 0
        return min(written, capacity)

    def _guest_error(self, message: str) -> None:
        self.bad_requests += 1
        count = self.bad_requests
        if count <= _LOGGED_GUEST_ERRORS or count % 1000 == 0:
            suffix = f" ({count} so far; only some are logged)" if count > 1 else ""
            log.warning("%s%s", message, suffix)
