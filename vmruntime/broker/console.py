"""Transport (c): FUSE messages on a virtio-console port (docs/broker.md, "Transport (c)").

A share on this transport is a ``fuse`` mount in the guest whose requests the agent
relays between ``/dev/fuse`` and a virtio-console port (``fuserelay.c``). QEMU joins
the port to a Unix socket (it listens, ``server=on,wait=off``) and the broker connects
to it. Unlike vhost-user-fs, a console port migrates with the VM and needs no shared
guest memory, so a sandbox with such shares can be memory-snapshotted.

The stream carries nothing but FUSE messages back to back: guest to host, requests,
each ``fuse_in_header.len`` bytes long; host to guest, replies, each
``fuse_out_header.len`` long. The guest is hostile: :class:`RequestFramer` bounds what
it buffers (one largest request), and a length that no request can have (shorter than
its header, longer than ``max_write`` + 4 KiB) is a :class:`FramingError`, after which
the stream cannot be trusted to be at a message boundary again and the connection ends.
A request of a plausible length whose content is wrong is the handler's business: it
gets an error reply like any other (docs/broker.md, "The handler contract").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vmruntime.broker.abi import IN_HEADER
from vmruntime.errors import BrokerError

if TYPE_CHECKING:
    from vmruntime.broker.handler import FuseHandler

__all__ = ["ConsoleTransport", "FramingError", "RequestFramer", "connect_console"]

log = logging.getLogger("vmruntime.broker")

_LENGTH = struct.Struct("<I")
# What one recv may add beyond a largest request: enough to take many small requests
# (LOOKUP, GETATTR...) per system call.
_READ_SLACK = 256 * 1024
_CONNECT_RETRY_S = 0.01


class FramingError(BrokerError):
    """The guest's byte stream broke the framing: a length no request can have."""

    def __init__(self, root: Path | str, length: int, reason: str) -> None:
        super().__init__(root, f"console stream: request length {length}: {reason}")
        self.length = length


class RequestFramer:
    """Cuts a byte stream into whole FUSE requests, holding at most one request's bytes
    (plus one read's slack) at a time.

    Who calls it: :class:`ConsoleTransport` and the framing tests. Promises: every view
    :meth:`requests` yields is exactly one request whose header says its own length, at
    least ``fuse_in_header`` and at most ``max_request`` bytes; a length outside that
    raises :class:`FramingError` before anything is buffered for it. The views are valid
    until the next :meth:`fill`.
    """

    def __init__(self, max_request: int, root: Path | str = "-") -> None:
        if max_request < IN_HEADER.size:
            raise ValueError(f"max_request {max_request} is below a request header")
        self.max_request = max_request
        self.root = root
        self._buffer = bytearray(max_request + _READ_SLACK)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    @property
    def pending(self) -> int:
        """Bytes of a request begun but not finished."""
        return self._end - self._start

    def fill(self, sock: socket.socket) -> int:
        """One ``recv`` into the free space; 0 at EOF."""
        if self._start:  # move the unfinished request to the front
            pending = self.pending
            self._buffer[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        got = sock.recv_into(self._view[self._end :])
        self._end += got
        return got

    def feed(self, data: bytes) -> None:
        """Append bytes (for tests and callers without a socket); same bounds."""
        if self._start:
            pending = self.pending
            self._buffer[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        if len(data) > len(self._buffer) - self._end:
            raise ValueError("feed more than the framer holds: take the requests first")
        self._buffer[self._end : self._end + len(data)] = data
        self._end += len(data)

    def requests(self) -> Iterator[memoryview]:
        """The whole requests buffered so far, in order; raises on an impossible length."""
        while self._end - self._start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, self._start)
            if length < IN_HEADER.size:
                raise FramingError(self.root, length, f"shorter than a header ({IN_HEADER.size})")
            if length > self.max_request:
                raise FramingError(self.root, length, f"longer than the limit {self.max_request}")
            if self._end - self._start < length:
                return
            start = self._start
            self._start += length
            yield self._view[start : start + length]


class ConsoleTransport:
    """Serves one :class:`FuseHandler` on one connected console-port socket.

    Who calls it: ``python -m vmruntime.broker serve --transport console`` and the tests.
    Promises: :meth:`serve` answers every request in order, one reply per request that
    has one, and returns when the peer closes (QEMU exited) or :meth:`stop` is called;
    it raises :class:`FramingError` for a stream that breaks the framing (nothing more
    is read from it). READ data goes from the file straight into the reply buffer and
    WRITE data from the request buffer straight into the file.
    """

    def __init__(self, handler: FuseHandler) -> None:
        self.handler = handler
        max_request = handler.options.max_write + 4096
        self.framer = RequestFramer(max_request, handler.root)
        self._reply = memoryview(bytearray(max_request))
        self._sock: socket.socket | None = None
        self._stopping = False

    def serve(self, sock: socket.socket) -> None:
        self._sock = sock
        try:
            while not self._stopping:
                try:
                    got = self.framer.fill(sock)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if self._stopping or exc.errno in (errno.ECONNRESET, errno.EBADF):
                        return
                    raise
                if got == 0:
                    if self.framer.pending:
                        log.warning("the guest's last request was cut short (%d bytes)",
                                    self.framer.pending)  # fmt: skip
                    return
                try:
                    for request in self.framer.requests():
                        self._answer(sock, request)
                except (BrokenPipeError, ConnectionResetError):
                    return  # QEMU went away while we answered
                except OSError:
                    if self._stopping:  # stop() shut the socket under a blocked sendall
                        return
                    raise
        finally:
            self._sock = None

    def _answer(self, sock: socket.socket, request: memoryview) -> None:
        count = self.handler.handle_sg([request], [self._reply])
        if count is not None:
            sock.sendall(self._reply[:count])

    def stop(self) -> None:
        """From a signal handler: make :meth:`serve` return."""
        self._stopping = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def connect_console(path: Path, timeout: float) -> socket.socket:
    """A connection to QEMU's socket for the port, retried until QEMU listens there."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise BrokerError(path, f"nothing listened at {path} for {timeout:.0f} s") from None
            time.sleep(_CONNECT_RETRY_S)
        except BaseException:
            sock.close()
            raise
