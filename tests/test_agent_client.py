"""The host's agent client against a hostile guest (fast tier, no VM).

The test plays a malicious guest kernel/agent on the far end of a socketpair and
sends raw frames the protocol forbids. Each must end the connection with
AgentProtocolError, call ``on_failure`` exactly once, fail the open channels with
that error, and never raise anywhere else in the host process.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import pytest

from vmruntime.errors import AgentProtocolError, SandboxError
from vmruntime.guest import protocol as p
from vmruntime.vm.client import STDOUT, AgentClient

Tag, Msg = p.Tag, p.MsgType


def guest_hello(version: int = 1) -> bytes:
    body = p.encode_fields(
        [(Tag.VERSION, version), (Tag.AGENT, "fake"), (Tag.KERNEL, "6.1-test"), (Tag.UPTIME_MS, 5)]
    )
    return p.encode_frame(Msg.HELLO, 0, body)


def frame_header(length: int, kind: int, channel: int, flags: int = 0) -> bytes:
    return p.HEADER.pack(length, kind, flags, 0, channel)


class FakeGuest:
    """The guest end: reads what the host sends, writes whatever the test wants."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = p.FrameDecoder()
        self.received: list[p.Frame] = []

    async def expect(self, kind: Msg) -> p.Frame:
        loop = asyncio.get_running_loop()
        while True:
            for index, frame in enumerate(self.received):
                if frame.type == kind:
                    return self.received.pop(index)
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), 5)
            assert data, "host closed the connection"
            self.received += self.decoder.feed(data)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)


async def connected() -> tuple[AgentClient, FakeGuest, list[SandboxError]]:
    host_sock, guest_sock = socket.socketpair()
    guest_sock.setblocking(False)
    failures: list[SandboxError] = []
    reader, writer = await asyncio.open_unix_connection(sock=host_sock)
    client = AgentClient(reader, writer, "test-sandbox", failures.append)
    await client.send(p.hello())
    guest = FakeGuest(guest_sock)
    hello = await guest.expect(Msg.HELLO)
    fields = dict(p.decode_fields(hello.body))
    assert int.from_bytes(fields[Tag.VERSION_MAX], "little") == p.VERSION
    return client, guest, failures


async def handshaken() -> tuple[AgentClient, FakeGuest, list[SandboxError]]:
    client, guest, failures = await connected()
    await guest.send(guest_hello())
    await client.hello()
    return client, guest, failures


def run(coro_fn: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 20))  # type: ignore[arg-type]


def exit_frame(channel: int, **values: int) -> bytes:
    fields = [(Tag[name.upper()], value) for name, value in values.items()]
    return p.encode_frame(Msg.EXIT, channel, p.encode_fields(fields))


def test_well_behaved_guest_exec_round_trip_and_window_grants() -> None:
    async def scenario() -> None:
        client, guest, failures = await connected()
        await guest.send(guest_hello())
        assert (await client.hello()).kernel == "6.1-test"
        channel = await client.exec(p.ExecRequest(["cat"], {"PATH": "/bin"}, stdin=True))
        request = await guest.expect(Msg.EXEC)
        assert (Tag.ARG, b"cat") in p.decode_fields(request.body)
        started = p.encode_fields([(Tag.PID, 42)])
        await guest.send(p.encode_frame(Msg.STARTED, request.channel, started))
        assert await channel.started() == 42
        # The guest fills its whole window; the host grants credit back as it reads.
        chunk = b"x" * p.MAX_DATA
        for _ in range(p.WINDOW // p.MAX_DATA):
            await guest.send(p.encode_frame(Msg.STDOUT, request.channel, chunk))
        total = 0
        while total < p.WINDOW:
            stream, data = await channel.read()  # type: ignore[misc]
            assert stream == STDOUT
            total += len(data)
        grant = await guest.expect(Msg.WINDOW)
        assert p.parse_window(grant.body) >= p.WINDOW // 2
        await guest.send(exit_frame(request.channel, code=3))
        result = await channel.wait()
        assert (result.code, result.signal) == (3, None)
        assert failures == []
        await client.close()

    run(scenario)


HOSTILE_FRAMES: dict[str, Callable[[int], bytes]] = {
    "length over 1 MiB": lambda ch: frame_header(p.MAX_BODY + 1, Msg.STDOUT, ch),
    "length 4 GiB - 1": lambda ch: frame_header(0xFFFFFFFF, Msg.STDOUT, ch),
    "unknown type": lambda ch: p.encode_frame(99, ch, b""),
    "nonzero flags": lambda ch: frame_header(0, Msg.STDOUT, ch, flags=1),
    "data for a channel never opened": lambda ch: p.encode_frame(Msg.STDOUT, ch + 7, b"hi"),
    "EXEC sent by the guest": lambda ch: p.encode_frame(Msg.EXEC, ch, b""),
    "exit with code and signal": lambda ch: exit_frame(ch, code=1, signal=9),
    "exit with neither": lambda ch: exit_frame(ch),
    "exit code 300": lambda ch: exit_frame(ch, code=300),
    "signal 200": lambda ch: exit_frame(ch, signal=200),
    "flag value 7": lambda ch: exit_frame(ch, code=0, timed_out=7),
    "field longer than body": lambda ch: p.encode_frame(
        Msg.EXIT, ch, struct.pack("<HI", Tag.CODE, 1000) + b"\0" * 8
    ),
    "truncated field header": lambda ch: p.encode_frame(Msg.EXIT, ch, b"\x15\x00\x08"),
    "u64 field of 3 bytes": lambda ch: p.encode_frame(
        Msg.EXIT, ch, struct.pack("<HI", Tag.CODE, 3) + b"abc"
    ),
    "unknown field tag": lambda ch: p.encode_frame(
        Msg.EXIT, ch, p.encode_fields([(Tag.CODE, 0), (999, 1)])
    ),
    "repeated field": lambda ch: p.encode_frame(
        Msg.EXIT, ch, p.encode_fields([(Tag.CODE, 0), (Tag.CODE, 1)])
    ),
    "stdout frame over 64 KiB": lambda ch: p.encode_frame(Msg.STDOUT, ch, b"x" * (p.MAX_DATA + 1)),
    "window overrun": lambda ch: b"".join(
        p.encode_frame(Msg.STDOUT, ch, b"y" * p.MAX_DATA) for _ in range(p.WINDOW // p.MAX_DATA + 1)
    ),
    "absurd window grant": lambda ch: p.encode_frame(
        Msg.WINDOW, ch, p.encode_fields([(Tag.BYTES, 1 << 62)])
    ),
    "pid out of range": lambda ch: p.encode_frame(
        Msg.STARTED, ch, p.encode_fields([(Tag.PID, 1 << 40)])
    ),
    "absurd dropped byte count": lambda ch: p.encode_frame(
        Msg.STARTED, ch, p.encode_fields([(Tag.PID, 5), (Tag.DROPPED, 1 << 63)])
    ),
    "second HELLO": lambda ch: guest_hello(),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_FRAMES))
def test_hostile_guest_frame_ends_the_connection_cleanly(attack: str) -> None:
    async def scenario() -> None:
        client, guest, failures = await handshaken()
        channel = await client.exec(p.ExecRequest(["true"], {}))
        request = await guest.expect(Msg.EXEC)
        await guest.send(HOSTILE_FRAMES[attack](request.channel))
        with pytest.raises(AgentProtocolError) as caught:
            await channel.wait()
        assert caught.value.sandbox_id == "test-sandbox"
        await asyncio.sleep(0.01)
        assert len(failures) == 1 and failures[0] is client.failure
        with pytest.raises(AgentProtocolError):
            await client.exec(p.ExecRequest(["true"], {}))
        await client.close()
        assert len(failures) == 1

    run(scenario)


REFUSED_HANDSHAKES: dict[str, tuple[bytes, type[SandboxError], str]] = {
    "another version": (guest_hello(version=2), AgentProtocolError, "version 2"),
    "data before HELLO": (p.encode_frame(Msg.STDOUT, 1, b"early"), AgentProtocolError,
                          "before HELLO"),
    "the agent's refusal": (
        p.encode_frame(Msg.ERROR, 0, p.encode_fields([(Tag.ERRNO, 93),
                                                      (Tag.MESSAGE, "no common version")])),
        SandboxError, "refused the connection: no common version",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED_HANDSHAKES))
def test_a_failed_handshake_is_an_error(case: str) -> None:
    frame, error, message = REFUSED_HANDSHAKES[case]

    async def scenario() -> None:
        client, guest, failures = await connected()
        await guest.send(frame)
        with pytest.raises(error, match=message):
            await client.hello()
        assert len(failures) == 1
        await client.close()

    run(scenario)


def test_guest_hanging_up_fails_open_channels_without_protocol_blame() -> None:
    async def scenario() -> None:
        client, guest, failures = await handshaken()
        channel = await client.exec(p.ExecRequest(["sleep", "9"], {}))
        guest.sock.close()
        with pytest.raises(SandboxError) as caught:
            await channel.wait()
        assert not isinstance(caught.value, AgentProtocolError)
        # A close with unread data arrives as a reset; either way it is named.
        assert "connection" in caught.value.reason
        assert len(failures) == 1
        await client.close()

    run(scenario)


def test_guest_error_on_a_channel_fails_only_that_channel() -> None:
    async def scenario() -> None:
        client, guest, failures = await handshaken()
        bad = await client.exec(p.ExecRequest(["x"], {}, cwd="/nope"))
        good = await client.exec(p.ExecRequest(["y"], {}))
        first = await guest.expect(Msg.EXEC)
        second = await guest.expect(Msg.EXEC)
        body = p.encode_fields([(Tag.ERRNO, 2), (Tag.MESSAGE, "chdir /nope: No such file")])
        await guest.send(p.encode_frame(Msg.ERROR, first.channel, body))
        await guest.send(exit_frame(second.channel, code=0))
        with pytest.raises(SandboxError, match="chdir /nope"):
            await bad.wait()
        assert (await good.wait()).code == 0
        assert failures == [] and client.failure is None
        await client.close()

    run(scenario)


def test_agent_complaint_on_channel_zero_ends_nothing() -> None:
    async def scenario() -> None:
        client, guest, failures = await handshaken()
        channel = await client.exec(p.ExecRequest(["true"], {}))
        request = await guest.expect(Msg.EXEC)
        body = p.encode_fields([(Tag.ERRNO, 75), (Tag.MESSAGE, "STDIN beyond the window")])
        await guest.send(p.encode_frame(Msg.ERROR, 0, body))
        await guest.send(exit_frame(request.channel, code=0))
        assert (await channel.wait()).code == 0
        assert client.last_error is not None and client.last_error.errno == 75
        assert failures == []
        await client.close()

    run(scenario)
