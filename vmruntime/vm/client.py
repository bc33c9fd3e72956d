"""The host end of one connection to a guest agent (asyncio).

Who calls it: :mod:`vmruntime.vm.sandbox` and the port forwarder. What it
promises: frames follow ``docs/agent-protocol.md``; every frame from the guest
is validated, and the first violation (or the connection's end) fails every open
channel with one error and calls ``on_failure`` once, so the sandbox can be torn
down. One slow channel never blocks another: each has its own windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
from collections import deque
from collections.abc import Callable
from pathlib import Path

from vmruntime.errors import (
    AdoptError,
    AgentProtocolError,
    FreezeError,
    GuestFileError,
    IdentityError,
    SandboxError,
)
from vmruntime.guest import protocol as p

STDOUT = 1
STDERR = 2
# An error built from (sandbox id, guest errno, guest message), e.g. FreezeError.
_ErrnoError = Callable[[str, int, str], SandboxError]
_READ_CHUNK = 1 << 18


class Channel:
    """One exec, file transfer or forwarded connection inside the guest."""

    def __init__(self, client: AgentClient, channel_id: int) -> None:
        self._client = client
        self.id = channel_id
        self.pid: int | None = None
        self.dropped = 0  # adopted: output bytes the agent dropped while it was parked
        self._started = asyncio.get_running_loop().create_future()
        self._done = asyncio.get_running_loop().create_future()
        self._output: deque[tuple[int, bytes]] = deque()
        self._output_ready = asyncio.Event()
        self._send_credit = p.WINDOW
        self._credit_ready = asyncio.Event()
        self._credit_ready.set()
        self._receive_credit = p.WINDOW
        self._consumed = 0

    # Called by the client's reader.

    def _on_started(self, started: p.Started) -> None:
        self.pid = started.pid
        self.dropped = started.dropped
        pid = started.pid
        if not self._started.done():
            self._started.set_result(pid)

    def _on_output(self, stream: int, data: bytes) -> None:
        self._receive_credit -= len(data)
        if self._receive_credit < 0:
            reason = f"channel {self.id} overran its window"
            raise AgentProtocolError(self._client.sandbox_id, reason)
        self._output.append((stream, data))
        self._output_ready.set()

    def _on_window(self, nbytes: int) -> None:
        self._send_credit += nbytes
        if self._send_credit > 0:
            self._credit_ready.set()

    def _finish(self, result: p.Exit | BaseException) -> None:
        if self._done.done():
            return
        if isinstance(result, BaseException):
            for future in (self._done, self._started):
                if not future.done():
                    future.set_exception(result)
                    # A caller that never waits must not see "exception never retrieved".
                    future.exception()
        else:
            self._done.set_result(result)
            if not self._started.done():
                self._started.set_result(0)
        self._output_ready.set()
        self._credit_ready.set()

    # Used by the sandbox.

    async def started(self) -> int:
        return await self._started

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await self._credit_ready.wait()
            if self._done.done():
                return
            size = min(len(view), self._send_credit, p.MAX_DATA)
            self._send_credit -= size
            if self._send_credit == 0:
                self._credit_ready.clear()
            await self._client.send(p.encode_frame(p.MsgType.STDIN, self.id, bytes(view[:size])))
            view = view[size:]

    async def close_stdin(self) -> None:
        if not self._done.done():
            await self._client.send(p.encode_frame(p.MsgType.STDIN_EOF, self.id))

    async def read(self) -> tuple[int, bytes] | None:
        """The next (stream, bytes) of output, or None once the channel has ended."""
        while not self._output:
            if self._done.done():
                return None
            self._output_ready.clear()
            await self._output_ready.wait()
        stream, data = self._output.popleft()
        await self._grant(len(data))
        return stream, data

    async def _grant(self, nbytes: int) -> None:
        self._consumed += nbytes
        if self._consumed >= p.WINDOW // 2 and not self._done.done():
            grant, self._consumed = self._consumed, 0
            self._receive_credit += grant
            await self._client.send(p.window(self.id, grant))

    async def signal(self, signo: int, group: bool = False) -> None:
        if not self._done.done():
            await self._client.send(p.signal(self.id, signo, group))

    async def resize(self, rows: int, cols: int) -> None:
        if not self._done.done():
            await self._client.send(p.resize(self.id, rows, cols))

    async def abort(self) -> None:
        """Give the channel up: the agent ends it at once (a port's guest connection is
        reset) and answers ERROR ``ECONNABORTED``."""
        if not self._done.done():
            await self._client.send(p.encode_frame(p.MsgType.ABORT, self.id))

    async def wait(self) -> p.Exit:
        return await asyncio.shield(self._done)

    @property
    def done(self) -> bool:
        return self._done.done()


class AgentClient:
    """A connected, handshaken agent connection and its open channels."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sandbox_id: str,
        on_failure: Callable[[SandboxError], None] | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self._reader = reader
        self._writer = writer
        self._on_failure = on_failure
        self._channels: dict[int, Channel] = {}
        self._ids = itertools.count(1)
        self._decoder = p.FrameDecoder()
        self._hello: asyncio.Future[p.Hello] = asyncio.get_running_loop().create_future()
        self._shutdown_ack = asyncio.Event()
        self._failure: SandboxError | None = None
        self._send_lock = asyncio.Lock()
        self.last_error: p.GuestError | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        socket_path: Path,
        sandbox_id: str,
        on_failure: Callable[[SandboxError], None] | None = None,
    ) -> AgentClient:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=1 << 21)
        client = cls(reader, writer, sandbox_id, on_failure)
        await client.send(p.hello())
        return client

    @property
    def failure(self) -> SandboxError | None:
        return self._failure

    async def hello(self) -> p.Hello:
        return await asyncio.shield(self._hello)

    async def send(self, frame: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        async with self._send_lock:
            self._writer.write(frame)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._fail(SandboxError(self.sandbox_id, f"agent connection lost: {exc}"))
                raise self._failure from exc  # type: ignore[misc]

    def _new_channel(self) -> Channel:
        channel = Channel(self, next(self._ids))
        self._channels[channel.id] = channel
        return channel

    async def exec(self, request: p.ExecRequest) -> Channel:
        channel = self._new_channel()
        await self.send(request.encode(channel.id))
        return channel

    async def adopt(self, pid: int) -> Channel:
        """Take over the parked detached exec ``pid`` (one that an earlier connection
        started with ``detached``): its output kept meanwhile comes first, then live
        output and its exit. Returns once the agent answered; :class:`AdoptError`
        (``ESRCH``: no such parked exec, ``EBUSY``: it is on this connection already)."""
        channel = self._new_channel()
        await self.send(p.adopt(channel.id, pid))
        try:
            started = await channel.started()
        except _GuestChannelError as exc:
            raise AdoptError(self.sandbox_id, pid, exc.error.errno, exc.error.message) from None
        if started != pid:  # a guest that hands over some other process is lying
            self._fail(AgentProtocolError(self.sandbox_id, f"ADOPT {pid} answered by {started}"))
            raise self._failure  # type: ignore[misc]
        return channel

    async def set_identity(self, *, entropy: bytes | None = None, time_ns: int | None = None,
                           hostname: str | None = None,
                           machine_id: str | None = None) -> None:  # fmt: skip
        """Give the guest a fresh identity (what is None stays): reseed its RNG with
        ``entropy`` (32 to 4096 bytes), set its clock to ``time_ns`` (ns since the epoch),
        its hostname, its ``/etc/machine-id``. Raises :class:`IdentityError`."""
        request = p.IdentityRequest(entropy, time_ns, hostname, machine_id)
        await self._answered(request.encode, error=IdentityError)

    async def read_file(self, path: str) -> bytes:
        channel = self._new_channel()
        await self.send(p.file_read(channel.id, path))
        chunks: list[bytes] = []
        while (item := await channel.read()) is not None:
            chunks.append(item[1])
        await self._file_result(channel, path)
        return b"".join(chunks)

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        channel = self._new_channel()
        await self.send(p.file_write(channel.id, path, mode))
        await channel.write(data)
        await channel.close_stdin()
        await self._file_result(channel, path)

    async def _file_result(self, channel: Channel, path: str) -> None:
        try:
            await channel.wait()
        except _GuestChannelError as exc:
            error = exc.error
            raise GuestFileError(self.sandbox_id, path, error.errno, error.message) from None

    async def mount(self, request: p.MountRequest) -> p.GuestError | None:
        """Ask the agent to mount a share or disk; None once mounted, else its error."""
        channel = self._new_channel()
        await self.send(request.encode(channel.id))
        try:
            await channel.wait()
        except _GuestChannelError as exc:
            return exc.error
        return None

    async def freeze(self, timeout: float) -> None:
        """Sync and freeze the guest's writable layer (FIFREEZE); returns once it holds.

        The agent thaws it by itself after ``timeout`` seconds, or as soon as this
        connection ends. Raises :class:`FreezeError` with the guest's errno.
        """
        try:
            # An agent older than FREEZE answers on channel 0 only: never wait forever.
            await asyncio.wait_for(self._answered(p.freeze, max(1, int(timeout * 1000))),
                                   timeout)  # fmt: skip
        except TimeoutError:
            with contextlib.suppress(SandboxError):
                await self.send(p.thaw(self._new_channel().id))  # in case it did freeze
            reason = f"the agent did not freeze the writable layer within {timeout:g} s"
            raise FreezeError(self.sandbox_id, errno.ETIMEDOUT, reason) from None

    async def thaw(self) -> None:
        """Thaw the writable layer. :class:`FreezeError` ``ETIMEDOUT`` means the freeze
        had already ended by its timeout (what was copied meanwhile is suspect)."""
        await self._answered(p.thaw)

    async def _answered(
        self, build: Callable[..., bytes], *args: int, error: _ErrnoError = FreezeError
    ) -> None:
        """Send a request answered by EXIT 0 or ERROR on its own channel (FREEZE, THAW,
        IDENTITY); an ERROR raises ``error`` with the guest's errno."""
        channel = self._new_channel()
        await self.send(build(channel.id, *args))
        try:
            await channel.wait()
        except _GuestChannelError as exc:
            raise error(self.sandbox_id, exc.error.errno, exc.error.message) from None

    async def connect_port(self, port: int) -> Channel:
        channel = self._new_channel()
        await self.send(p.port_connect(channel.id, port))
        await channel.started()
        return channel

    async def shutdown(self, timeout: float) -> bool:
        """Ask the agent to stop everything and reboot; True if it acknowledged."""
        try:
            await self.send(p.encode_frame(p.MsgType.SHUTDOWN, 0))
            await asyncio.wait_for(self._shutdown_ack.wait(), timeout)
        except (SandboxError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._fail(SandboxError(self.sandbox_id, "agent connection closed"), notify=False)

    # The reader: every guest byte passes through here.

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    raise SandboxError(self.sandbox_id, "the agent closed its connection")
                for frame in self._decoder.feed(data):
                    await self._dispatch(frame)
        except asyncio.CancelledError:
            raise
        except AgentProtocolError as exc:
            self._fail(AgentProtocolError(self.sandbox_id, exc.reason))
        except SandboxError as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(SandboxError(self.sandbox_id, f"agent connection lost: {exc}"))

    async def _dispatch(self, frame: p.Frame) -> None:
        p.check_frame(frame)
        kind = p.MsgType(frame.type)
        if frame.channel == 0:
            self._dispatch_connection(kind, frame.body)
            return
        if not self._hello.done():
            raise AgentProtocolError(self.sandbox_id, f"{kind.name} before HELLO")
        channel = self._channels.get(frame.channel)
        if channel is None:
            raise AgentProtocolError(self.sandbox_id, f"{kind.name} for unknown channel")
        self._dispatch_channel(channel, kind, frame.body)

    def _dispatch_connection(self, kind: p.MsgType, body: bytes) -> None:
        if kind is p.MsgType.HELLO and not self._hello.done():
            self._hello.set_result(p.parse_hello(body))
        elif kind is p.MsgType.SHUTDOWN and not body:
            self._shutdown_ack.set()
        elif kind is p.MsgType.ERROR:
            error = p.parse_error(body)
            if not self._hello.done():
                reason = f"the agent refused the connection: {error.message}"
                raise SandboxError(self.sandbox_id, reason)
            # After the handshake, the agent's complaint about one of our frames ends
            # nothing (docs/agent-protocol.md, "Bad host frames"); keep it for debugging.
            self.last_error = error
        else:
            raise AgentProtocolError(self.sandbox_id, f"unexpected {kind.name} on channel 0")

    def _dispatch_channel(self, channel: Channel, kind: p.MsgType, body: bytes) -> None:
        if kind is p.MsgType.STARTED:
            channel._on_started(p.parse_started_info(body))
        elif kind is p.MsgType.STDOUT:
            channel._on_output(STDOUT, body)
        elif kind is p.MsgType.STDERR:
            channel._on_output(STDERR, body)
        elif kind is p.MsgType.WINDOW:
            channel._on_window(p.parse_window(body))
        elif kind is p.MsgType.EXIT:
            channel._finish(p.parse_exit(body))
            self._channels.pop(channel.id, None)
        elif kind is p.MsgType.ERROR:
            channel._finish(_GuestChannelError(self.sandbox_id, p.parse_error(body)))
            self._channels.pop(channel.id, None)
        else:
            raise AgentProtocolError(self.sandbox_id, f"unexpected {kind.name} from the guest")

    def _fail(self, exc: SandboxError, notify: bool = True) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        if not self._hello.done():
            self._hello.set_exception(exc)
            self._hello.exception()
        for channel in list(self._channels.values()):
            channel._finish(exc)
        self._channels.clear()
        if notify and self._on_failure is not None:
            self._on_failure(exc)


class _GuestChannelError(SandboxError):
    """The agent ended a channel with ERROR; ``error`` holds its errno and message."""

    def __init__(self, sandbox_id: str, error: p.GuestError) -> None:
        super().__init__(sandbox_id, f"{error.message} (errno {error.errno})")
        self.error = error
