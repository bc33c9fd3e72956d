"""Port forwards: TCP ports on the host's 127.0.0.1 relayed to guest ports by the agent.

Who calls it: :class:`~vmruntime.vm.sandbox.AsyncSandbox` (``ports=``, ``personalize``).
What it promises:

- each accepted connection is relayed over its own agent channel, in a task this object
  owns; the channel's windows and the client stream's ``drain`` hold back a fast side
  in both directions, so no flow is buffered whole;
- either side's end reaches the other: the guest service closing closes the client's
  connection once what the service sent has been handed to it; the client's EOF
  becomes the service's EOF (a half-close: the reply still comes back); a client that
  is gone (a reset, or an error writing to it) has its guest connection aborted; a
  guest port nothing listens on (or an error from the guest) closes the client at once;
- :meth:`PortForwards.stop` stops forwarding some guest ports and ends their connections
  the same way (a restarted Jupyter kernel moves to new ports);
- :meth:`PortForwards.close` stops listening, ends every connection (the client sees
  EOF, or a reset if it had sent bytes nobody read) and returns once every task it
  made is done. Nothing is logged or handed to the loop's exception handler on the
  way: only a bug (an exception nobody expects) is reported there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable

from vmruntime.errors import SandboxError
from vmruntime.guest import protocol as p
from vmruntime.vm.client import Channel

OpenChannel = Callable[[int], Awaitable[Channel]]


class PortForwards:
    """The forwarded ports of one sandbox and their live connections.

    ``open_channel(guest_port)`` connects to a guest port through the agent (it raises
    :class:`SandboxError` if the guest refuses or the sandbox is stopped).
    """

    def __init__(self, open_channel: OpenChannel) -> None:
        self._open_channel = open_channel
        self._servers: dict[int, asyncio.Server] = {}  # by guest port
        self._connections: dict[asyncio.Task[None], int] = {}  # -> its guest port
        self._closed = False

    def __contains__(self, guest_port: int) -> bool:
        return guest_port in self._servers

    async def listen(self, guest_port: int, host_port: int) -> int:
        """Forward ``host_port`` (0: any free one) to ``guest_port``; the host port used."""
        if guest_port in self._servers:
            raise ValueError(f"guest port {guest_port} is already forwarded")
        accept = functools.partial(self._accept, guest_port)
        server = await asyncio.start_server(accept, "127.0.0.1", host_port)
        self._servers[guest_port] = server
        return int(server.sockets[0].getsockname()[1])

    def _accept(self, guest_port: int, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:  # fmt: skip
        # Deliberately not a coroutine: start_server would run one in a task of its own,
        # and on Python 3.11 the done-callback it adds calls task.exception() on a
        # cancelled task, so ending each connection by cancellation printed "Exception in
        # callback ... CancelledError" (CPython gh-113538, fixed in 3.12). Here the task
        # is ours, ended by close() and awaited there.
        if self._closed:  # accepted while closing
            writer.transport.abort()
            return
        if guest_port not in self._servers:  # accepted while that port was being stopped
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve(guest_port, reader, writer))
        self._connections[task] = guest_port
        task.add_done_callback(functools.partial(self._served, writer))

    def _served(self, writer: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)
        # However the task ended (even cancelled before it first ran), the client's
        # connection ends with it; after a graceful close this does nothing.
        writer.transport.abort()
        if not task.cancelled() and (error := task.exception()) is not None:
            task.get_loop().call_exception_handler(
                {"message": "port forward failed", "exception": error, "task": task}
            )

    async def _serve(self, guest_port: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:  # fmt: skip
        try:
            channel = await self._open_channel(guest_port)
        except SandboxError:
            return  # refused, or the sandbox is stopping: _served closes the connection
        if await _relay(reader, writer, channel):
            # The guest closed its end: let the client read the last bytes, then EOF.
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self, guest_ports: Iterable[int]) -> None:
        """Stop forwarding ``guest_ports`` and end their connections (as :meth:`close`)."""
        ports = set(guest_ports)
        for port in ports:
            server = self._servers.pop(port, None)
            if server is not None:
                server.close()
        connections = [task for task, port in self._connections.items() if port in ports]
        for task in connections:
            task.cancel()  # _served then cuts the client's connection
        if connections:
            await asyncio.wait(connections)

    async def close(self) -> None:
        """Stop listening and end every connection; return when all their tasks are done."""
        self._closed = True
        await self.stop(set(self._servers) | set(self._connections.values()))


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 channel: Channel) -> bool:  # fmt: skip
    """Copy bytes both ways until the guest ends the channel or the client breaks off.

    True if the guest ended it cleanly (its service closed the connection).
    """
    upstream = asyncio.ensure_future(_pump_in(reader, channel))
    downstream = asyncio.ensure_future(_pump_out(channel, writer))
    try:
        await _until_either_side_ends(upstream, downstream)
    finally:
        await _settle(upstream, downstream)
    failures = [task.exception() for task in (upstream, downstream) if not task.cancelled()]
    for failure in failures:
        if failure is not None and not isinstance(failure, OSError | SandboxError):
            raise failure  # a bug: let _served report it
    if any(isinstance(failure, OSError) for failure in failures):
        # The client is gone: the guest service's connection must not wait for it.
        with contextlib.suppress(SandboxError):
            await channel.abort()
        return False
    if downstream.cancelled() or downstream.exception() is not None:
        return False  # the agent connection failed: the sandbox is ending
    return await _ended_cleanly(channel)


async def _until_either_side_ends(upstream: asyncio.Future[None],
                                  downstream: asyncio.Future[None]) -> None:  # fmt: skip
    """Until the guest's side is done, or the client's fails; the client's EOF (upstream
    ending without error) leaves the guest's side running: its reply still comes back."""
    pending: set[asyncio.Future[None]] = {upstream, downstream}
    while downstream in pending:
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if upstream.done() and upstream.exception() is not None:
            return


async def _settle(*tasks: asyncio.Future[None]) -> None:
    """Cancel ``tasks`` and wait for them, taking their exceptions (nothing is reported)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _ended_cleanly(channel: Channel) -> bool:
    """Whether a finished channel ended with EXIT (the service closed), not ERROR."""
    try:
        await channel.wait()
    except SandboxError:
        return False
    return True


async def _pump_in(reader: asyncio.StreamReader, channel: Channel) -> None:
    while data := await reader.read(p.MAX_DATA):
        await channel.write(data)
    await channel.close_stdin()


async def _pump_out(channel: Channel, writer: asyncio.StreamWriter) -> None:
    while (item := await channel.read()) is not None:
        writer.write(item[1])
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
