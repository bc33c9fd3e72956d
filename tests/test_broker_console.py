"""Transport (c): the broker's FUSE-over-console-port stream, fed what a hostile guest sends.

The guest side is a socketpair end standing in for QEMU's chardev socket: every byte a
modified guest kernel (or its root, who can write the port) could put on the port.
Replies are parsed with the independent wire module (``broker_wire``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_wire import (
    IN_HEADER_SIZE,
    OUT_HEADER_SIZE,
    Client,
    Op,
    Reply,
    cstr,
    flush_in,
    getattr_in,
    init_in,
    parse_reply,
    request,
)

from vmruntime.broker import BrokerOptions, FuseHandler
from vmruntime.broker.console import ConsoleTransport, FramingError, RequestFramer

MAX_WRITE = 64 * 1024  # small, so that the largest legal request is cheap to build
MAX_REQUEST = MAX_WRITE + 4096


class Served:
    """A ConsoleTransport serving a share on a thread; ``guest`` is the port's far end."""

    def __init__(self, root: Path, options: BrokerOptions) -> None:
        self.handler = FuseHandler(root, options)
        self.transport = ConsoleTransport(self.handler)
        self.guest, host = socket.socketpair()
        self.guest.settimeout(10)
        self.error: BaseException | None = None
        self._host = host
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.transport.serve(self._host)
        except BaseException as exc:  # the test inspects it
            self.error = exc
        finally:
            self._host.close()

    def read_reply(self) -> bytes:
        head = self._exactly(OUT_HEADER_SIZE)
        (length,) = struct.unpack_from("<I", head)
        return head + self._exactly(length - OUT_HEADER_SIZE)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.guest.recv(n - len(data))
            if not chunk:
                raise EOFError(f"the broker closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def handle(self, raw: bytes) -> bytes | None:
        """A Client's ``handle``: one request on the stream, its reply off it."""
        self.guest.sendall(raw)
        opcode = struct.unpack_from("<I", raw, 4)[0]
        if opcode in (Op.FORGET, Op.BATCH_FORGET):
            return None
        return self.read_reply()

    def ended(self) -> BaseException | None:
        """Wait for the transport to stop; what it raised, if anything."""
        self.thread.join(10)
        assert not self.thread.is_alive(), "the transport is still serving"
        return self.error

    def close(self) -> None:
        self.guest.close()
        self.thread.join(10)
        self.handler.close()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello, world\n")
    (root / "dir").mkdir()
    (root / "dir" / "inner.txt").write_bytes(b"inner\n")
    return root


@pytest.fixture
def served(share: Path) -> Iterator[Served]:
    s = Served(share, BrokerOptions(max_write=MAX_WRITE))
    yield s
    s.close()


@pytest.fixture
def client(served: Served) -> Client:
    c = Client(served.handle)
    c.init()
    return c


def test_a_share_works_over_the_stream(client: Client, served: Served, share: Path) -> None:
    entry = client.lookup(1, "hello.txt")
    fh = client.open(entry.nodeid, os.O_RDONLY)
    assert client.read(entry.nodeid, fh, 0, 4096) == b"hello, world\n"
    client.release(entry.nodeid, fh)
    new, fh = client.create(1, "new.bin", os.O_WRONLY, 0o644)
    data = os.urandom(MAX_WRITE)  # the largest request there may be
    assert client.write(new.nodeid, fh, 0, data) == MAX_WRITE
    client.release(new.nodeid, fh)
    assert (share / "new.bin").read_bytes() == data
    fh = client.open(new.nodeid, os.O_RDONLY)
    assert client.read(new.nodeid, fh, 0, MAX_WRITE) == data
    assert sorted(client.listdir(1)) == [b".", b"..", b"dir", b"hello.txt", b"new.bin"]


def test_requests_split_anywhere_or_run_together_are_all_answered(
    client: Client, served: Served
) -> None:
    stream = b"".join(request(Op.GETATTR, 1, getattr_in(), unique=0x9000 + i) for i in range(200))
    for i in range(0, len(stream), 7):  # in 7-byte pieces: no read ends at a boundary
        served.guest.sendall(stream[i : i + 7])
    replies = [parse_reply(served.read_reply()) for _ in range(200)]
    assert [r.unique for r in replies] == [0x9000 + i for i in range(200)]
    assert all(r.ok for r in replies)
    served.guest.sendall(stream)  # and all at once
    assert [parse_reply(served.read_reply()).unique for _ in range(200)][-1] == 0x9000 + 199


@pytest.mark.parametrize("length", [0, 1, 4, IN_HEADER_SIZE - 1])
def test_a_length_shorter_than_a_header_ends_the_stream(served: Served, length: int) -> None:
    served.guest.sendall(struct.pack("<I", length) + b"\0" * 60)
    error = served.ended()
    assert isinstance(error, FramingError) and error.length == length
    assert served.guest.recv(1) == b""  # nothing answered, the connection closed


@pytest.mark.parametrize("length", [MAX_REQUEST + 1, 1 << 31, 0xFFFFFFFF])
def test_a_giant_length_is_refused_before_anything_is_buffered(served: Served, length: int) -> None:
    # Only the header is sent: waiting for the claimed bytes would be the bug.
    served.guest.sendall(request(Op.WRITE, 1, b"", unique=7, length=length))
    error = served.ended()
    assert isinstance(error, FramingError) and error.length == length
    assert served.transport.framer.pending <= IN_HEADER_SIZE


def test_the_limit_is_the_handlers_largest_request(served: Served) -> None:
    assert served.transport.framer.max_request == MAX_REQUEST


def test_a_truncated_request_at_eof_is_dropped_quietly(client: Client, served: Served) -> None:
    whole = request(Op.LOOKUP, 1, cstr("hello.txt"), unique=0x77)
    served.guest.sendall(whole[:-3])
    served.guest.shutdown(socket.SHUT_WR)
    assert served.ended() is None
    assert served.guest.recv(1) == b""  # no reply to half a request


def test_garbage_of_a_plausible_length_gets_an_error_and_the_stream_goes_on(
    client: Client, served: Served
) -> None:
    rng = random.Random(17)
    for _ in range(200):
        length = rng.randrange(IN_HEADER_SIZE, 512)
        body = bytes(rng.randrange(256) for _ in range(length - 4))
        opcode = struct.unpack_from("<I", body)[0]
        served.guest.sendall(struct.pack("<I", length) + body)
        if opcode in (Op.FORGET, Op.BATCH_FORGET):
            continue
        reply = parse_reply(served.read_reply())
        assert reply.error != 0 or opcode in (Op.STATFS, Op.GETATTR, Op.ACCESS)
    assert client.getattr(1).mode & 0o170000 == 0o040000  # still serving, still sane
    assert client.read(
        client.lookup(1, "hello.txt").nodeid,
        client.open(client.lookup(1, "hello.txt").nodeid, os.O_RDONLY), 0, 100
    ) == b"hello, world\n"  # fmt: skip


def test_a_header_whose_length_cuts_its_name_gets_einval_and_the_stream_goes_on(
    client: Client, served: Served
) -> None:
    # The stream takes the header's word: 45 bytes end the LOOKUP inside its name, before
    # the NUL, and the handler refuses the name; the next request starts at byte 45.
    lookup = request(Op.LOOKUP, 1, cstr("hello.txt"), unique=0x55, length=45)
    served.guest.sendall(lookup[:45])
    reply = parse_reply(served.read_reply())
    assert reply.unique == 0x55 and reply.errno == errno.EINVAL
    assert client.getattr(1)  # the stream is at a boundary again


def test_fuzzed_streams_never_break_the_broker(share: Path) -> None:
    rng = random.Random(1717)
    for _ in range(30):
        served = Served(share, BrokerOptions(max_write=MAX_WRITE))
        try:
            Client(served.handle).init()
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000)))
            served.guest.sendall(blob)
            served.guest.shutdown(socket.SHUT_WR)
            while served.guest.recv(65536):  # drain the replies to what parsed
                pass
            error = served.ended()
            assert error is None or isinstance(error, FramingError), repr(error)
        finally:
            served.close()


def test_the_framer_holds_at_most_one_request_and_a_read(share: Path) -> None:
    framer = RequestFramer(MAX_REQUEST)
    framer.feed(request(Op.GETATTR, 1, getattr_in(), unique=1))
    assert [len(r) for r in framer.requests()] == [IN_HEADER_SIZE + 16]
    with pytest.raises(ValueError, match="more than the framer holds"):
        framer.feed(b"\0" * (MAX_REQUEST + 512 * 1024))


def test_a_resumed_broker_serves_without_init_and_answers_old_node_ids_estale(
    share: Path,
) -> None:
    served = Served(share, BrokerOptions(max_write=MAX_WRITE, resumed=True))
    try:
        client = Client(served.handle)
        # The guest's session began with another broker: no INIT comes, the root works.
        assert client.getattr(1).mode & 0o170000 == 0o040000
        old = client.call(Op.GETATTR, 2, getattr_in())  # a node id the old broker gave out
        assert old.errno == errno.ESTALE
        entry = client.lookup(1, "dir")
        assert entry.nodeid > 1 << 32  # never a number the old broker could have used
        assert client.lookup(entry.nodeid, "inner.txt").nodeid != entry.nodeid
    finally:
        served.close()


def test_a_fresh_broker_still_answers_unknown_node_ids_ebadf(client: Client) -> None:
    assert client.call(Op.GETATTR, 12345, getattr_in()).errno == errno.EBADF


def _reply(raw: bytes) -> Reply:
    return parse_reply(raw)


def test_the_broker_process_ends_a_stream_that_breaks_the_framing(
    share: Path, tmp_path: Path
) -> None:
    # The test plays QEMU: it listens, the broker connects.
    path = tmp_path / "port.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    log = tmp_path / "broker.log"
    argv = [sys.executable, "-m", "vmruntime.broker", "serve", "--transport", "console",
            "--socket", str(path), "--root", str(share)]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.settimeout(10)
        conn.sendall(request(Op.INIT, 0, init_in(), unique=2))
        head = conn.recv(OUT_HEADER_SIZE, socket.MSG_WAITALL)
        assert _reply(head + conn.recv(4096)).ok
        conn.sendall(request(Op.WRITE, 1, b"", unique=4, length=0xFFFFFFF0))
        assert proc.wait(timeout=30) == 3
        assert conn.recv(1) == b""
        text = log.read_text()
        assert "request length 4294967280" in text and "closing the connection" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()


def test_stop_ends_a_transport_blocked_on_a_guest_that_reads_no_replies(share: Path) -> None:
    served = Served(share, BrokerOptions(max_write=MAX_WRITE))
    try:
        Client(served.handle).init()
        # GETATTR replies pile up unread until the broker's sendall blocks.
        many = request(Op.GETATTR, 1, getattr_in(), unique=9) * 20000
        served.guest.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            served.guest.send(many)
        time.sleep(0.5)  # the broker fills the socket's buffer and blocks in sendall
        assert served.thread.is_alive()
        served.transport.stop()
        assert served.ended() is None
    finally:
        served.close()


def test_a_resumed_machine_takes_console_shares_only(tmp_path: Path, share: Path) -> None:
    from vmruntime.errors import MountError
    from vmruntime.vm import state
    from vmruntime.vm.mounts import Mount, SandboxMounts, resolve_mounts

    paths = state.SandboxPaths("fusecon-test")
    resolved = resolve_mounts([Mount(share, "/mnt/s")])
    with pytest.raises(MountError, match="console shares only"):
        SandboxMounts.prepare(resolved, paths, owner=(0, 0), detached=False, resume=True)
    with pytest.raises(ValueError, match="no 'console' transport"):
        Mount(tmp_path / "disk.img", "/mnt/d", kind="disk", transport="console")


def test_the_transport_is_kept_in_a_sandbox_config(share: Path) -> None:
    from vmruntime.vm.config import SandboxConfig
    from vmruntime.vm.mounts import Mount

    config = SandboxConfig(image="x", mounts=[Mount(share, "/mnt/s", transport="console")])
    again = SandboxConfig.from_json(config.to_json())
    assert [m.transport for m in again.mounts] == ["console"]  # type: ignore[union-attr]


def test_a_console_broker_asks_for_fewer_round_trips(share: Path) -> None:
    from broker_wire import parse_init_out

    served = Served(share, BrokerOptions(max_write=MAX_WRITE, few_round_trips=True))
    try:
        reply = parse_reply(served.handle(request(Op.INIT, 0, init_in(flags=0xFFFFFFFF), unique=2)))
        flags = parse_init_out(reply.body).flags
        assert flags & (1 << 13) and not flags & (1 << 14)  # READDIRPLUS always, not AUTO
        client = Client(served.handle)
        entry = client.lookup(1, "hello.txt")
        fh = client.open(entry.nodeid, os.O_RDONLY)
        assert client.call(Op.FLUSH, entry.nodeid, flush_in(fh)).errno == errno.ENOSYS
    finally:
        served.close()
