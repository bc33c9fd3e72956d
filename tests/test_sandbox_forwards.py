"""Port forwards through a fake VMM (fast tier): the guest agent runs on the host, so a
"guest service" is a TCP server on the host's 127.0.0.1 and a forward relays host
clients to it through the real agent protocol.

What is checked: ending a sandbox with clients connected is quiet (nothing reaches the
event loop's exception handler or the log) and leaves no task behind; either side
ending a connection ends the other; heavy flows arrive whole, with backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_vmm import FakeDriver
from helpers import pattern
from imagefactory import directory, file, make_layer_tar, write_oci_layout

from vmruntime import images
from vmruntime.vm import AsyncSandbox

IMAGE = "test/fake:1"
MiB = 1 << 20
# The test's own sockets (service and client ends) buffer little, so what a stalled flow
# leaves in flight is mostly the forward's: its sockets' kernel buffers (measured 5-6 MiB
# here) and the agent channel's window. The tests allow it half of a 20 MiB flow.
SOCKET_BUFFER = 64 << 10

_agent_cache: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def agent_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    _agent_cache.append(tmp_path_factory.mktemp("fake-vmm-agent"))


@pytest.fixture(autouse=True)
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Private cache, state and runtime dirs with a one-file image loaded."""
    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))
    runtime = Path(f"/tmp/vmr-forwards-{os.getpid()}-{time.monotonic_ns()}")
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    layer = make_layer_tar([directory("etc"), file("etc/marker", "x")])
    images.load(write_oci_layout(tmp_path / "layout", [layer]).layout_dir, IMAGE)
    yield tmp_path
    shutil.rmtree(runtime, ignore_errors=True)


# --- the "guest" side: a threaded TCP service on the host --------------------------------

Behaviour = Callable[[socket.socket, "GuestService"], None]


class GuestService:
    """A blocking TCP server in threads, one per connection, each running ``behaviour``.

    It stands where a service in the guest would: the agent connects to it.
    ``sent``/``received`` count bytes; ``errors`` collects what ended connections.
    """

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.listener = small_buffers(socket.socket())
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()  # accepted sockets inherit its buffer sizes
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.sent = 0
        self.received = bytearray()
        self.errors: list[BaseException] = []
        self.ended = threading.Event()  # set when a connection's behaviour returns
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.behaviour(conn, self)
        except OSError as exc:
            self.errors.append(exc)
        finally:
            conn.close()
            self.ended.set()

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


def echo(conn: socket.socket, service: GuestService) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def say_goodbye(conn: socket.socket, service: GuestService) -> None:
    conn.sendall(b"goodbye")


def stream_forever(conn: socket.socket, service: GuestService) -> None:
    chunk = b"x" * 65536
    while True:
        service.sent += conn.send(chunk)


def push(data: bytes) -> Behaviour:
    def behaviour(conn: socket.socket, service: GuestService) -> None:
        view = memoryview(data)
        while view:
            n = conn.send(view[: 1 << 16])
            service.sent += n
            view = view[n:]

    return behaviour


def read_when(gate: threading.Event) -> Behaviour:
    """Read nothing until ``gate`` is set, then everything until EOF."""

    def behaviour(conn: socket.socket, service: GuestService) -> None:
        gate.wait(30)
        while data := conn.recv(1 << 16):
            service.received += data

    return behaviour


@pytest.fixture
def services() -> Iterator[Callable[[Behaviour], GuestService]]:
    made: list[GuestService] = []

    def make(behaviour: Behaviour) -> GuestService:
        made.append(GuestService(behaviour))
        return made[-1]

    yield make
    for service in made:
        service.close()


# --- the host side: a loop that records what reaches its exception handler --------------


def run_quietly(test: Callable[[], Coroutine[Any, Any, None]]) -> list[dict[str, Any]]:
    """Run ``test`` on a fresh loop; return every call of the loop's exception handler,
    including those made while garbage collecting its tasks ("Task was destroyed but
    it is pending", "Task exception was never retrieved")."""
    calls: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: calls.append(context))
        await test()
        await asyncio.sleep(0.1)  # let late callbacks and connection_lost calls run
        gc.collect()

    asyncio.run(main())
    gc.collect()
    return calls


def loud_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at WARNING or above from asyncio or vmruntime."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno >= logging.WARNING
        and record.name.split(".")[0] in ("asyncio", "vmruntime")
    ]


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def create(guest_port: int) -> AsyncSandbox:
    driver = FakeDriver(agent_cache=_agent_cache[0])
    return await AsyncSandbox.create(IMAGE, driver=driver, ports=[guest_port])


def small_buffers(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return sock


async def connect(box: AsyncSandbox, guest_port: int) -> tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter]:  # fmt: skip
    sock = small_buffers(socket.socket())
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", box.ports[guest_port]))
    return await asyncio.open_connection(sock=sock)


async def read_to_end(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """What arrives until EOF; a reset counts as the end too (then b"" is what is left)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.01)


# --- ending a sandbox with clients connected ------------------------------------------


@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_ending_a_sandbox_with_clients_connected_is_quiet(
    services: Callable[[Behaviour], GuestService], caplog: pytest.LogCaptureFixture, ending: str
) -> None:
    service = services(echo)

    async def test() -> None:
        box = await create(service.port)
        clients = [await connect(box, service.port) for _ in range(4)]
        for i, (reader, writer) in enumerate(clients):
            writer.write(b"hello %d" % i)
            await writer.drain()
            assert await reader.readexactly(7) == b"hello %d" % i
        # One client has a reply in flight, one has half-closed its side.
        clients[2][1].write(b"unread reply")
        clients[3][1].write_eof()
        await getattr(box, ending)()
        assert other_tasks() == set(), "a task outlived the sandbox"
        for reader, writer in clients:
            await read_to_end(reader)  # EOF or a reset, not a hang
            writer.close()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []


def test_leaving_the_with_block_with_a_client_connected_is_quiet(
    services: Callable[[Behaviour], GuestService], caplog: pytest.LogCaptureFixture
) -> None:
    service = services(echo)

    async def test() -> None:
        async with await create(service.port) as box:
            reader, writer = await connect(box, service.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        assert other_tasks() == set()
        assert await read_to_end(reader) == b""
        writer.close()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []


# --- one connection ending -------------------------------------------------------------


def test_a_guest_service_that_closes_closes_the_client_quietly(
    services: Callable[[Behaviour], GuestService], caplog: pytest.LogCaptureFixture
) -> None:
    service = services(say_goodbye)

    async def test() -> None:
        box = await create(service.port)
        idle = other_tasks()  # the sandbox's own (its agent connection's reader)
        reader, writer = await connect(box, service.port)
        assert await read_to_end(reader) == b"goodbye"
        await wait_until(lambda: other_tasks() == idle)  # the forward's task has ended
        writer.close()
        await box.stop()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []


def test_a_client_that_disconnects_mid_stream_ends_the_guest_connection(
    services: Callable[[Behaviour], GuestService], caplog: pytest.LogCaptureFixture
) -> None:
    """The guest service writes without reading: only the agent closing its socket
    (which its next send sees as EPIPE or a reset) tells it the client is gone."""
    service = services(stream_forever)

    async def test() -> None:
        box = await create(service.port)
        idle = other_tasks()
        reader, writer = await connect(box, service.port)
        assert len(await reader.readexactly(MiB)) == MiB
        writer.close()
        await writer.wait_closed()
        await wait_until(service.ended.is_set, timeout=10)
        assert isinstance(service.errors[0], BrokenPipeError | ConnectionResetError)
        await wait_until(lambda: other_tasks() == idle)
        await box.stop()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []


def test_a_client_that_half_closes_still_gets_the_reply(
    services: Callable[[Behaviour], GuestService], caplog: pytest.LogCaptureFixture
) -> None:
    service = services(echo)

    async def test() -> None:
        box = await create(service.port)
        reader, writer = await connect(box, service.port)
        writer.write(b"all of the request")
        writer.write_eof()  # the service sees EOF, answers, closes
        assert await read_to_end(reader) == b"all of the request"
        writer.close()
        await box.stop()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []


def test_a_port_nothing_listens_on_closes_the_client_quickly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        unused = placeholder.getsockname()[1]  # closed again: nothing listens there

    async def test() -> None:
        box = await create(unused)
        idle = other_tasks()
        reader, writer = await connect(box, unused)
        started = time.monotonic()
        assert await read_to_end(reader) == b""
        assert time.monotonic() - started < 1.0
        await wait_until(lambda: other_tasks() == idle)
        writer.close()
        await box.stop()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []


# --- heavy flows ------------------------------------------------------------------------


async def _settled(read: Callable[[], int], quiet: float, limit: float) -> int:
    """``read()`` once it has not changed for ``quiet`` seconds (at most ``limit``)."""
    deadline = asyncio.get_running_loop().time() + limit
    value = read()
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(quiet)
        if (latest := read()) == value:
            return value
        value = latest
    raise AssertionError(f"still changing after {limit} s: {value}")


def test_20_mib_from_the_guest_reach_a_slow_client_whole(
    services: Callable[[Behaviour], GuestService], caplog: pytest.LogCaptureFixture
) -> None:
    data = pattern(20 * MiB, seed=11)
    service = services(push(data))

    async def test() -> None:
        box = await create(service.port)
        reader, writer = await connect(box, service.port)
        # Backpressure: while the client reads nothing, the service is held up long
        # before it has sent everything (however slowly a loaded machine gets there).
        stalled_at = await _settled(lambda: service.sent, quiet=0.3, limit=15)
        assert stalled_at < len(data) // 2
        digest, total = hashlib.sha256(), 0
        while chunk := await asyncio.wait_for(reader.read(1 << 16), 10):
            digest.update(chunk)
            total += len(chunk)
            await asyncio.sleep(0.0005)  # a slow reader
        assert (total, digest.hexdigest()) == (len(data), hashlib.sha256(data).hexdigest())
        writer.close()
        await box.stop()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []


def test_20_mib_from_a_client_reach_a_slow_guest_service_whole(
    services: Callable[[Behaviour], GuestService], caplog: pytest.LogCaptureFixture
) -> None:
    data = pattern(20 * MiB, seed=12)
    gate = threading.Event()
    service = services(read_when(gate))
    accepted = 0  # bytes the client's writer took (drain returned)

    async def upload(writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        for offset in range(0, len(data), 1 << 16):
            writer.write(data[offset : offset + (1 << 16)])
            await writer.drain()
            accepted = offset + (1 << 16)
        writer.write_eof()

    async def test() -> None:
        box = await create(service.port)
        _, writer = await connect(box, service.port)
        uploading = asyncio.ensure_future(upload(writer))
        # Backpressure: while the service reads nothing, the client is held up long
        # before it has written everything.
        stalled_at = await _settled(lambda: accepted, quiet=0.3, limit=15)
        assert stalled_at < len(data) // 2
        gate.set()
        await asyncio.wait_for(uploading, 30)
        await wait_until(service.ended.is_set, timeout=30)
        assert len(service.received) == len(data)
        assert hashlib.sha256(service.received).digest() == hashlib.sha256(data).digest()
        writer.close()
        await box.stop()

    assert run_quietly(test) == []
    assert loud_records(caplog) == []
