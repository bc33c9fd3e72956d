"""Detached execs, ADOPT and IDENTITY (docs/agent-protocol.md, items 11 and 12) with the
real agent on the host.

Fast tier: the agent runs in ``--listen-fd`` test mode, where each connection to a Unix
socket is a host in turn, as hosts come and go on a guest's port: a test disconnects
and connects again, and finds its detached processes parked. IDENTITY runs with
``--identity-log`` (the agent writes what it would apply and never touches this
host's RNG, clock, hostname or files); the real effects are checked in a VM by
tests/test_sandbox_warm.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_agent_host import AgentConn, Result, alive, fields, spawn_agent

from vmruntime.errors import AdoptError, IdentityError
from vmruntime.guest import protocol as p
from vmruntime.guest.build import ensure_agent
from vmruntime.guest.protocol import MsgType, Tag
from vmruntime.vm.client import STDOUT, AgentClient

PARKED_OUTPUT_MAX = 1 << 20  # the agent's PARKED_OUTPUT_MAX
MAX_DETACHED = 64


@pytest.fixture(scope="module")
def agent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_agent(tmp_path_factory.mktemp("agent-cache"))


@dataclass
class ListeningAgent:
    """One agent process serving hosts one after another on ``socket_path``."""

    proc: subprocess.Popen[bytes]
    socket_path: Path
    identity_log: Path
    conns: list[AgentConn] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # process groups to kill at the end

    def connect(self) -> AgentConn:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(self.socket_path))
        conn = AgentConn(proc=self.proc, sock=sock)
        conn.hello()
        self.conns.append(conn)
        return conn

    def start_detached(self, conn: AgentConn, argv: list[str], **kw: object) -> tuple[int, int]:
        """(channel, pid) of a detached exec started on conn."""
        channel = conn.start(argv, detached=True, **kw)
        frame = conn.next(channel)
        assert frame.type == MsgType.STARTED, frame
        pid = p.parse_started(frame.body)
        self.pids.append(pid)
        return channel, pid


@pytest.fixture
def listening(agent_path: Path, tmp_path: Path) -> Iterator[ListeningAgent]:
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    log = tmp_path / "identity.log"
    proc = subprocess.Popen(
        [str(agent_path), "--listen-fd", str(server.fileno()), "--identity-log", str(log)],
        pass_fds=[server.fileno()],
    )  # fmt: skip
    server.close()
    agent = ListeningAgent(proc, path, log)
    yield agent
    for conn in agent.conns:
        conn.sock.close()
    # SHUTDOWN ends every exec the agent has, parked ones too, and the agent itself.
    with contextlib.suppress(OSError, EOFError, TimeoutError):
        last = agent.connect()
        last.send(p.encode_frame(MsgType.SHUTDOWN, 0))
        assert last.next(0, timeout=5).type == MsgType.SHUTDOWN
        last.sock.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in agent.pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def adopt(conn: AgentConn, pid: int) -> tuple[int, p.Started]:
    channel = conn.new_id()
    conn.send(p.adopt(channel, pid))
    frame = conn.next(channel)
    assert frame.type == MsgType.STARTED, p.parse_error(frame.body)
    return channel, p.parse_started_info(frame.body)


def adopt_error(conn: AgentConn, body: bytes) -> p.GuestError:
    channel = conn.new_id()
    conn.send(p.encode_frame(MsgType.ADOPT, channel, body))
    return conn.error_on(channel)


def read_stdout_until(conn: AgentConn, channel: int, wanted: bytes) -> bytes:
    got = b""
    while wanted not in got:
        frame = conn.next(channel)
        assert frame.type in (MsgType.STDOUT, MsgType.WINDOW), frame
        if frame.type == MsgType.STDOUT:
            got += frame.body
            conn.grant(channel, len(frame.body))
    return got


# --- detached execs and ADOPT -----------------------------------------------------


def test_a_detached_exec_survives_a_disconnect_and_is_adopted_with_what_it_wrote(
    listening: ListeningAgent,
) -> None:
    first = listening.connect()
    script = "echo before; sleep 0.5; echo while-parked; echo err >&2; exit 7"
    channel, pid = listening.start_detached(first, ["sh", "-c", script])
    assert read_stdout_until(first, channel, b"before\n") == b"before\n"
    first.sock.close()
    assert wait_gone(pid), "the detached exec did not finish while parked"
    second = listening.connect()
    adopted, started = adopt(second, pid)
    assert started == p.Started(pid, dropped=0)
    result = second.collect(adopted)
    assert (result.stdout, result.stderr) == (b"while-parked\n", b"err\n")
    assert result.exit == p.Exit(code=7, signal=None)
    # Once its EXIT went out it is gone for good.
    assert adopt_error(second, fields((Tag.PID, pid))).errno == errno.ESRCH


def test_an_adopted_exec_takes_stdin_signals_and_ends_live(listening: ListeningAgent) -> None:
    first = listening.connect()
    script = "echo ready; read line; echo got:$line; trap 'echo term; exit 9' TERM; sleep 60 & wait"
    channel, pid = listening.start_detached(first, ["sh", "-c", script], stdin=True)
    # Read here: output the agent already sent to this session is gone with it.
    assert read_stdout_until(first, channel, b"ready\n") == b"ready\n"
    first.sock.close()
    time.sleep(0.2)
    assert alive(pid)
    second = listening.connect()
    adopted, _ = adopt(second, pid)
    second.send_stdin(adopted, b"hello\n")
    assert read_stdout_until(second, adopted, b"got:hello\n") == b"got:hello\n"
    second.send(p.signal(adopted, signal.SIGTERM))
    result = second.collect(adopted)
    assert result.stdout == b"term\n"
    assert result.exit == p.Exit(code=9, signal=None)


def test_stdin_the_old_host_sent_still_arrives_and_the_new_host_has_a_whole_window(
    listening: ListeningAgent,
) -> None:
    first = listening.connect()
    channel, pid = listening.start_detached(first, ["sh", "-c", "sleep 1; exec cat"], stdin=True)
    old, new = os.urandom(p.WINDOW), os.urandom(p.WINDOW)
    first.send_stdin(channel, old)  # most of it waits in the agent: the pipe holds 64 KiB
    first.sock.close()
    second = listening.connect()
    adopted, _ = adopt(second, pid)
    second.auto_grant.add(adopted)
    second.send_stdin(adopted, new)  # a whole window, however much of the old is pending
    second.send(p.encode_frame(MsgType.STDIN_EOF, adopted))
    result = second.collect(adopted, grant=False, timeout=30)
    assert result.exit == p.Exit(code=0, signal=None)
    assert result.stdout == old + new
    refusals = [f for f in second.queued if f.channel == 0 and f.type == MsgType.ERROR]
    assert refusals == []


def test_a_new_hello_parks_detached_execs_too(listening: ListeningAgent) -> None:
    conn = listening.connect()
    _, pid = listening.start_detached(conn, ["sh", "-c", "sleep 0.3; echo late"])
    conn.hello()  # a new host on the same connection: the old session ends
    adopted, _ = adopt(conn, pid)
    result = conn.collect(adopted)
    assert result.stdout == b"late\n"
    assert result.exit == p.Exit(code=0, signal=None)


def test_a_plain_exec_is_still_killed_when_the_host_leaves(listening: ListeningAgent) -> None:
    first = listening.connect()
    channel = first.start(["sleep", "100"])
    pid = p.parse_started(first.next(channel).body)
    listening.pids.append(pid)
    first.sock.close()
    assert wait_gone(pid)
    second = listening.connect()
    assert adopt_error(second, fields((Tag.PID, pid))).errno == errno.ESRCH


def test_adopt_refusals(listening: ListeningAgent) -> None:
    conn = listening.connect()
    _, pid = listening.start_detached(conn, ["sleep", "100"])
    assert adopt_error(conn, fields((Tag.PID, pid))).errno == errno.EBUSY
    assert adopt_error(conn, fields((Tag.PID, 4_000_000))).errno == errno.ESRCH
    assert adopt_error(conn, b"").errno == errno.EINVAL
    assert adopt_error(conn, fields((Tag.PID, 0))).errno == errno.EINVAL
    assert adopt_error(conn, fields((Tag.PID, pid), (Tag.PID, pid))).errno == errno.EINVAL
    assert adopt_error(conn, fields((Tag.PID, pid), (Tag.PATH, "/x"))).errno == errno.EINVAL
    assert adopt_error(conn, struct_u32_pid(pid)).errno == errno.EINVAL
    # Still adoptable by the next host after all that.
    conn.sock.close()
    second = listening.connect()
    adopted, started = adopt(second, pid)
    assert started.pid == pid
    second.send(p.signal(adopted, signal.SIGKILL, group=True))
    assert second.collect(adopted).exit == p.Exit(code=None, signal=signal.SIGKILL)


def struct_u32_pid(pid: int) -> bytes:
    """A PID field of 4 bytes: integers are u64."""
    return Tag.PID.to_bytes(2, "little") + (4).to_bytes(4, "little") + pid.to_bytes(4, "little")


def test_a_parked_exec_never_blocks_and_keeps_the_newest_mebibyte(
    listening: ListeningAgent,
) -> None:
    first = listening.connect()
    count = 400_000  # seq 1..400000 is 2.7 MB: more than the agent keeps
    expected = b"".join(b"%d\n" % i for i in range(1, count + 1))
    _, pid = listening.start_detached(first, ["seq", str(count)])
    first.sock.close()  # nobody reads: the agent must, or seq blocks on a full pipe
    assert wait_gone(pid), "the parked exec blocked on its output"
    second = listening.connect()
    adopted, started = adopt(second, pid)
    # The backlog goes out within the window like any output: one window, then nothing.
    got = bytearray()
    while len(got) < p.WINDOW:
        frame = second.next(adopted)
        assert frame.type == MsgType.STDOUT, frame
        got += frame.body
    assert len(got) == p.WINDOW and second.quiet(adopted, 0.3)
    second.grant(adopted, len(got))
    second.auto_grant.add(adopted)
    result = second.collect(adopted, grant=False)
    got += result.stdout
    assert result.exit == p.Exit(code=0, signal=None)
    # The newest bytes, whole records of at most 64 KiB dropped oldest first.
    assert expected.endswith(bytes(got))
    assert PARKED_OUTPUT_MAX - p.MAX_DATA < len(got) <= PARKED_OUTPUT_MAX
    assert started.dropped > 0
    assert len(got) + started.dropped <= len(expected)


def test_at_most_64_detached_execs(listening: ListeningAgent) -> None:
    conn = listening.connect()
    for _ in range(MAX_DETACHED):
        listening.start_detached(conn, ["sleep", "100"])
    refused = conn.start(["sleep", "100"], detached=True)
    assert conn.error_on(refused).errno == errno.EMFILE
    assert conn.run(["true"]).exit == p.Exit(code=0, signal=None)  # plain ones still run


def test_a_detached_flag_other_than_0_or_1_is_refused(listening: ListeningAgent) -> None:
    conn = listening.connect()
    channel = conn.new_id()
    body = fields((Tag.ARG, "true"), (Tag.DETACHED, 2))
    conn.send(p.encode_frame(MsgType.EXEC, channel, body))
    assert conn.error_on(channel).errno == errno.EINVAL


def test_in_serve_fd_mode_detached_execs_end_with_the_agent(agent_path: Path) -> None:
    conn = spawn_agent(agent_path)
    conn.hello()
    channel = conn.start(["sleep", "100"], detached=True)
    pid = p.parse_started(conn.next(channel).body)
    try:
        conn.sock.close()  # no later host can come: nothing is parked
        conn.proc.wait(timeout=5)
        assert wait_gone(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


# --- IDENTITY --------------------------------------------------------------------


def identity(conn: AgentConn, body: bytes) -> Result:
    channel = conn.new_id()
    conn.send(p.encode_frame(MsgType.IDENTITY, channel, body))
    return conn.collect(channel)


def test_identity_is_decoded_and_applied_in_order(listening: ListeningAgent) -> None:
    conn = listening.connect()
    seed = bytes(range(64))
    machine_id = "0123456789abcdef" * 2
    request = p.IdentityRequest(entropy=seed, time_ns=1_900_000_000_123_456_789,
                                hostname="vmr-clone-1", machine_id=machine_id)  # fmt: skip
    channel = conn.new_id()
    conn.send(request.encode(channel))
    assert conn.collect(channel).exit == p.Exit(code=0, signal=None)
    assert identity(conn, fields((Tag.HOSTNAME, "only-this"))).exit == p.Exit(code=0, signal=None)
    assert identity(conn, b"").exit == p.Exit(code=0, signal=None)  # nothing asked, nothing done
    assert listening.identity_log.read_text().splitlines() == [
        f"entropy {seed.hex()}",
        "time_ns 1900000000123456789",
        "hostname vmr-clone-1",
        f"machine_id {machine_id}",
        "hostname only-this",
    ]


BAD_IDENTITIES = {
    "entropy of 31 bytes": fields((Tag.ENTROPY, b"x" * 31)),
    "entropy of 4097 bytes": fields((Tag.ENTROPY, b"x" * 4097)),
    "entropy twice": fields((Tag.ENTROPY, b"x" * 32), (Tag.ENTROPY, b"y" * 32)),
    "time of 4 bytes": fields((Tag.TIME_NS, b"\0" * 4)),
    "time beyond 2^63": fields((Tag.TIME_NS, 1 << 63)),
    "machine id in upper case": fields((Tag.MACHINE_ID, "0123456789ABCDEF" * 2)),
    "machine id of 31 digits": fields((Tag.MACHINE_ID, "a" * 31)),
    "machine id of 33 digits": fields((Tag.MACHINE_ID, "a" * 33)),
    "machine id not hex": fields((Tag.MACHINE_ID, "g" * 32)),
    "machine id with a NUL": fields((Tag.MACHINE_ID, "a" * 31 + "\0")),
    "hostname with a NUL": fields((Tag.HOSTNAME, "evil\0name")),
    "empty hostname": fields((Tag.HOSTNAME, "")),
    "hostname of 65 bytes": fields((Tag.HOSTNAME, "h" * 65)),
    "hostname with a slash": fields((Tag.HOSTNAME, "a/b")),
    "hostname with a newline": fields((Tag.HOSTNAME, "a\nb")),
    "unknown tag": fields((Tag.PATH, "/etc/machine-id")),
    "truncated field": fields((Tag.HOSTNAME, "ok"))[:-1],
}


@pytest.mark.parametrize("case", sorted(BAD_IDENTITIES))
def test_a_malformed_identity_is_refused_whole(listening: ListeningAgent, case: str) -> None:
    conn = listening.connect()
    # A good field first: a refusal applies nothing, not even the parts before the bad one.
    good = fields((Tag.HOSTNAME, "good")) if case.startswith("time") else fields((Tag.TIME_NS, 5))
    result = identity(conn, good + BAD_IDENTITIES[case])
    assert result.error is not None and result.error.errno == errno.EINVAL, result
    assert not listening.identity_log.exists()
    assert conn.run(["true"]).exit == p.Exit(code=0, signal=None)


def test_identity_in_serve_fd_mode_without_a_log_touches_nothing(agent_path: Path) -> None:
    conn = spawn_agent(agent_path)
    try:
        conn.hello()
        result = identity(conn, fields((Tag.HOSTNAME, "not-this-host")))
        assert result.error is not None and result.error.errno == errno.EOPNOTSUPP
        assert os.uname().nodename != "not-this-host"
    finally:
        conn.sock.close()
        conn.proc.wait(timeout=5)


@pytest.mark.parametrize(
    "kwargs",
    [{"entropy": b"x" * 31}, {"entropy": b"x" * 4097}, {"hostname": "a\0b"}, {"hostname": ""},
     {"hostname": "h" * 65}, {"machine_id": "A" * 32}, {"machine_id": "a" * 31},
     {"time_ns": -1}, {"time_ns": 1 << 63}],
)  # fmt: skip
def test_the_host_codec_refuses_what_the_agent_would(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        p.IdentityRequest(**kwargs)  # type: ignore[arg-type]


# --- the host's client against the real agent ----------------------------------------


def test_agent_client_adopts_and_sets_identity(listening: ListeningAgent) -> None:
    async def scenario() -> None:
        first = await AgentClient.connect(listening.socket_path, "test")
        await first.hello()
        script = "echo one; sleep 0.4; echo two"
        request = p.ExecRequest(["sh", "-c", script], {"PATH": "/usr/bin:/bin"}, detached=True)
        channel = await first.exec(request)
        pid = await channel.started()
        listening.pids.append(pid)
        assert await channel.read() == (STDOUT, b"one\n")
        await first.close()
        second = await AgentClient.connect(listening.socket_path, "test")
        await second.hello()
        adopted = await second.adopt(pid)
        assert (adopted.pid, adopted.dropped) == (pid, 0)
        assert await adopted.read() == (STDOUT, b"two\n")
        assert (await adopted.wait()).code == 0
        with pytest.raises(AdoptError) as refused:
            await second.adopt(pid)
        assert refused.value.errno == errno.ESRCH and refused.value.pid == pid
        await second.set_identity(hostname="vmr-x", machine_id="f" * 32)
        assert listening.identity_log.read_text() == f"hostname vmr-x\nmachine_id {'f' * 32}\n"
        # A log the agent cannot append to stands for a step that fails in the guest.
        listening.identity_log.unlink()
        listening.identity_log.mkdir()
        with pytest.raises(IdentityError) as failed:
            await second.set_identity(hostname="vmr-y")
        assert failed.value.errno == errno.EISDIR
        await second.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
