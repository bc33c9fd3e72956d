"""The real compiled guest agent, run on the host in ``--serve-fd`` mode over a socketpair.

Fast tier: no VM. The agent's boot code is not exercised here; everything after it (the
protocol, processes, files, ports, flow control, hostile frames) is the same code that
runs as PID 1 in the guest. Every guest frame is checked with the host codec, and the
harness fails any test in which the agent sends beyond the window it was granted.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmruntime.guest import protocol as p
from vmruntime.guest.build import ensure_agent
from vmruntime.guest.protocol import Frame, MsgType, Tag

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV = {"PATH": PATH}


@dataclass
class Result:
    pid: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    exit: p.Exit | None = None
    error: p.GuestError | None = None


@dataclass
class AgentConn:
    """Host side of one agent: frame I/O, per-channel queues and window bookkeeping."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    decoder: p.FrameDecoder = field(default_factory=p.FrameDecoder)
    queued: list[Frame] = field(default_factory=list)
    out_credit: dict[int, int] = field(default_factory=dict)  # what the agent may still send
    in_credit: dict[int, int] = field(default_factory=dict)  # what we may still send
    next_id: int = 1
    auto_grant: set[int] = field(default_factory=set)  # channels whose output we take at once

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        if not data:
            raise EOFError("agent closed the connection")
        for frame in self.decoder.feed(data):
            self._check(frame)
            self.queued.append(frame)
            data_frame = frame.type in (MsgType.STDOUT, MsgType.STDERR)
            if data_frame and frame.body and frame.channel in self.auto_grant:
                self.grant(frame.channel, len(frame.body))
        return True

    def _check(self, frame: Frame) -> None:
        p.check_frame(frame)
        if frame.type in (MsgType.STDOUT, MsgType.STDERR):
            credit = self.out_credit.setdefault(frame.channel, p.WINDOW) - len(frame.body)
            assert credit >= 0, f"agent overran its window on channel {frame.channel}"
            self.out_credit[frame.channel] = credit
        elif frame.type == MsgType.WINDOW:
            self.in_credit[frame.channel] = self.in_credit.get(
                frame.channel, p.WINDOW
            ) + p.parse_window(frame.body)

    def next(self, channel: int | None = None, timeout: float = 10.0) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self.queued):
                if channel is None or frame.channel == channel:
                    return self.queued.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no frame for channel {channel} within {timeout} s")
            self._receive(remaining)

    def quiet(self, channel: int, seconds: float) -> bool:
        """True if no frame for channel arrives within seconds."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(f.channel == channel for f in self.queued):
                return False
            self._receive(max(0.0, deadline - time.monotonic()))
        return not any(f.channel == channel for f in self.queued)

    def new_id(self) -> int:
        self.next_id += 1
        self.out_credit[self.next_id] = p.WINDOW
        self.in_credit[self.next_id] = p.WINDOW
        return self.next_id

    def hello(self) -> p.Hello:
        self.send(p.hello())
        frame = self.next(0)
        assert frame.type == MsgType.HELLO, frame
        return p.parse_hello(frame.body)

    def grant(self, channel: int, nbytes: int) -> None:
        self.out_credit[channel] += nbytes
        self.send(p.window(channel, nbytes))

    def start(self, argv: list[str], env: dict[str, str] | None = None, **kw: object) -> int:
        channel = self.new_id()
        request = p.ExecRequest(argv=argv, env=ENV if env is None else env, **kw)  # type: ignore[arg-type]
        self.send(request.encode(channel))
        return channel

    def send_stdin(self, channel: int, data: bytes) -> None:
        """Send data within the agent's window, waiting for WINDOW credit as needed."""
        view = memoryview(data)
        while view:
            while self.in_credit[channel] <= 0:
                self._receive(10.0)
            n = min(len(view), p.MAX_DATA, self.in_credit[channel])
            self.send(p.encode_frame(MsgType.STDIN, channel, bytes(view[:n])))
            self.in_credit[channel] -= n
            view = view[n:]

    def collect(self, channel: int, grant: bool = True, timeout: float = 10.0) -> Result:
        """Frames of channel until its EXIT or ERROR, re-granting the window as we consume."""
        result = Result()
        while True:
            frame = self.next(channel, timeout)
            if frame.type == MsgType.STARTED:
                result.pid = p.parse_started(frame.body)
            elif frame.type in (MsgType.STDOUT, MsgType.STDERR):
                if frame.type == MsgType.STDOUT:
                    result.stdout += frame.body
                else:
                    result.stderr += frame.body
                if grant and frame.body:
                    self.grant(channel, len(frame.body))
            elif frame.type == MsgType.EXIT:
                result.exit = p.parse_exit(frame.body)
                return result
            elif frame.type == MsgType.ERROR:
                result.error = p.parse_error(frame.body)
                return result
            elif frame.type != MsgType.WINDOW:
                raise AssertionError(f"unexpected frame {frame}")

    def run(self, argv: list[str], stdin: bytes | None = None, **kw: object) -> Result:
        channel = self.start(argv, stdin=stdin is not None, **kw)
        if stdin is not None:
            self.send_stdin(channel, stdin)
            self.send(p.encode_frame(MsgType.STDIN_EOF, channel))
        return self.collect(channel)

    def error_on(self, channel: int) -> p.GuestError:
        frame = self.next(channel)
        assert frame.type == MsgType.ERROR, frame
        return p.parse_error(frame.body)


def fields(*pairs: tuple[int, int | bytes | str]) -> bytes:
    return p.encode_fields(pairs)


def host_tool(name: str) -> str:
    """``name``'s absolute path on this host, for commands run without a PATH search."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH")
    return os.path.abspath(path)


def alive(pid: int) -> bool:
    """A pid that exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_agent(tmp_path_factory.mktemp("agent-cache"))


def spawn_agent(binary: Path) -> AgentConn:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [str(binary), "--serve-fd", str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    return AgentConn(proc=proc, sock=ours)


@pytest.fixture
def raw_agent(agent_binary: Path) -> Iterator[AgentConn]:
    conn = spawn_agent(agent_binary)
    yield conn
    conn.sock.close()
    try:
        conn.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        conn.proc.kill()
        conn.proc.wait()
        raise AssertionError("the agent did not exit at EOF of its fd") from None


@pytest.fixture
def agent(raw_agent: AgentConn) -> AgentConn:
    raw_agent.hello()
    return raw_agent


# --- handshake ---------------------------------------------------------------


def test_handshake_reports_version_kernel_and_uptime(raw_agent: AgentConn) -> None:
    hello = raw_agent.hello()
    assert hello.version == 1
    assert hello.agent.startswith("vmr-agent")
    assert hello.kernel == os.uname().release
    assert hello.uptime_ms > 0


def test_unsupported_version_range_is_refused_and_a_good_hello_still_works(
    raw_agent: AgentConn,
) -> None:
    body = fields((Tag.VERSION_MIN, 2), (Tag.VERSION_MAX, 7))
    raw_agent.send(p.encode_frame(MsgType.HELLO, 0, body))
    assert raw_agent.error_on(0).errno == errno.EPROTONOSUPPORT
    assert raw_agent.quiet(0, 0.2)  # "and nothing else"
    assert raw_agent.hello().version == 1


def test_requests_before_hello_are_refused(raw_agent: AgentConn) -> None:
    raw_agent.start(["true"])
    assert raw_agent.error_on(0).errno == errno.EPROTO
    raw_agent.hello()
    assert raw_agent.run(["true"]).exit == p.Exit(code=0, signal=None)


# --- exec --------------------------------------------------------------------


def test_echo_stdout_and_exit_code(agent: AgentConn) -> None:
    result = agent.run(["echo", "hello", "world"])
    assert result.pid and result.pid > 1
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert result.exit == p.Exit(code=0, signal=None)
    assert agent.run(["sh", "-c", "exit 42"]).exit == p.Exit(code=42, signal=None)


def test_exit_by_signal(agent: AgentConn) -> None:
    result = agent.run(["sh", "-c", "kill -TERM $$"])
    assert result.exit == p.Exit(code=None, signal=signal.SIGTERM)


def test_stderr_is_separate(agent: AgentConn) -> None:
    result = agent.run(["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert result.stdout == b"out\nout2\n"
    assert result.stderr == b"err\n"


def test_large_stdin_round_trip_respects_both_windows(agent: AgentConn) -> None:
    data = os.urandom(10 * 1024 * 1024)
    channel = agent.start(["cat"], stdin=True)
    assert agent.next(channel).type == MsgType.STARTED
    # Without credit the agent sends exactly one window of output, then waits.
    agent.send_stdin(channel, data[: p.WINDOW * 3 // 2])
    received = bytearray()
    while len(received) < p.WINDOW:
        frame = agent.next(channel)
        if frame.type == MsgType.STDOUT:
            received += frame.body
    time.sleep(0.3)
    while agent._receive(0.05):
        pass
    assert len(received) == p.WINDOW and agent.out_credit[channel] == 0
    assert not [f for f in agent.queued if f.channel == channel and f.type == MsgType.STDOUT]
    # Then a consumer that takes everything at once; the harness checks every frame.
    agent.auto_grant.add(channel)
    agent.grant(channel, len(received))
    agent.send_stdin(channel, data[p.WINDOW * 3 // 2 :])
    agent.send(p.encode_frame(MsgType.STDIN_EOF, channel))
    rest = agent.collect(channel, grant=False, timeout=30)
    assert rest.exit == p.Exit(code=0, signal=None)
    assert bytes(received) + rest.stdout == data


def test_concurrent_execs_are_independent(agent: AgentConn) -> None:
    channels = [agent.start(["sh", "-c", f"read x; echo {i}:$x"], stdin=True) for i in range(4)]
    for channel in channels:
        assert agent.next(channel).type == MsgType.STARTED
    # A silent channel must not hold up the others: answer them in reverse order.
    for i, channel in reversed(list(enumerate(channels))):
        agent.send_stdin(channel, f"line{i}\n".encode())
        agent.send(p.encode_frame(MsgType.STDIN_EOF, channel))
        result = agent.collect(channel)
        assert result.stdout == f"{i}:line{i}\n".encode()
        assert result.exit == p.Exit(code=0, signal=None)


def test_signal_to_process_and_to_group(agent: AgentConn) -> None:
    channel = agent.start(["sleep", "30"])
    assert agent.next(channel).type == MsgType.STARTED
    agent.send(p.signal(channel, signal.SIGKILL))
    assert agent.collect(channel).exit == p.Exit(code=None, signal=signal.SIGKILL)

    channel = agent.start(["sh", "-c", "trap '' TERM; sleep 30 & echo $!; wait"])
    started = agent.next(channel)
    child = int(agent.next(channel).body)
    agent.send(p.signal(channel, signal.SIGKILL, group=True))
    result = agent.collect(channel)
    assert result.exit == p.Exit(code=None, signal=signal.SIGKILL)
    assert p.parse_started(started.body) > 1
    deadline = time.monotonic() + 2
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child), "the group signal missed the background child"


def test_timeout_kills_and_reports_timed_out(agent: AgentConn) -> None:
    started = time.monotonic()
    result = agent.run(["sleep", "30"], timeout_ms=300)
    assert result.exit == p.Exit(code=None, signal=signal.SIGKILL, timed_out=True)
    assert time.monotonic() - started < 5


def test_command_not_found_and_not_executable(agent: AgentConn, tmp_path: Path) -> None:
    result = agent.run(["no-such-command-xyz"])
    assert result.exit == p.Exit(code=127, signal=None)
    assert result.stderr == b"vmr-agent: no-such-command-xyz: No such file or directory\n"
    script = tmp_path / "data.txt"
    script.write_text("not a program")
    result = agent.run([str(script)])
    assert result.exit == p.Exit(code=126, signal=None)
    assert b"Permission denied" in result.stderr


def test_cwd_env_and_path_search_are_exactly_as_given(agent: AgentConn, tmp_path: Path) -> None:
    env = {"A": "1", "B": "x y", "EMPTY": ""}
    result = agent.run([host_tool("env")], env=env, cwd=str(tmp_path))
    assert result.stdout == b"A=1\nB=x y\nEMPTY=\n"
    pwd = agent.run([host_tool("pwd")], env={}, cwd=str(tmp_path))
    assert pwd.stdout == f"{tmp_path}\n".encode()
    tool = tmp_path / "bin" / "mytool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho mytool ran\n")
    tool.chmod(0o755)
    path = f"{tool.parent}:{PATH}"
    assert agent.run(["mytool"], env={"PATH": path}).stdout == b"mytool ran\n"
    assert agent.run(["mytool"]).exit == p.Exit(code=127, signal=None)
    missing = agent.run(["true"], cwd=str(tmp_path / "missing"))
    assert missing.error is not None and missing.error.errno == errno.ENOENT


def test_user_resolution_and_rlimits(agent: AgentConn) -> None:
    result = agent.run(["sh", "-c", "id -u; id -g; id -G"], user="nobody")
    assert result.stdout.split() == [b"65534", b"65534", b"65534"]
    result = agent.run(["sh", "-c", "id -u; id -g"], user="1234:5678")
    assert result.stdout.split() == [b"1234", b"5678"]
    result = agent.run(["true"], user="no-such-user")
    assert result.error is not None and result.error.errno == errno.ENOENT
    nofile = 7  # RLIMIT_NOFILE
    result = agent.run(["sh", "-c", "ulimit -n"], rlimits=((nofile, 64, 128),))
    assert result.stdout == b"64\n"


def test_tty_mode_and_resize(agent: AgentConn) -> None:
    result = agent.run(["tty"], stdin=b"", tty=True)
    assert result.stdout.startswith(b"/dev/pts/")
    assert agent.run(["stty", "size"], stdin=b"", tty=True, rows=30, cols=100).stdout == (
        b"30 100\r\n"
    )
    channel = agent.start(["sh", "-c", "read x; stty size"], stdin=True, tty=True)
    assert agent.next(channel).type == MsgType.STARTED
    agent.send(p.resize(channel, 40, 120))
    agent.send_stdin(channel, b"go\n")
    result = agent.collect(channel)
    assert result.stdout.endswith(b"40 120\r\n")
    assert result.exit == p.Exit(code=0, signal=None)


def test_exit_waits_for_all_output_but_not_for_orphans(agent: AgentConn) -> None:
    script = "head -c 600000 /dev/zero; sleep 30 & echo $! >&2; echo done"
    started = time.monotonic()
    result = agent.run(["sh", "-c", script])
    os.kill(int(result.stderr), signal.SIGKILL)  # the orphan outlives its exec, by design
    assert len(result.stdout) == 600000 + len(b"done\n")
    assert result.exit == p.Exit(code=0, signal=None)
    assert time.monotonic() - started < 5


# --- files and ports ---------------------------------------------------------


def test_file_write_then_read_round_trip(agent: AgentConn, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    target.parent.mkdir()
    data = os.urandom(700_000)
    channel = agent.new_id()
    agent.send(p.file_write(channel, str(target), 0o640))
    agent.send_stdin(channel, data)
    agent.send(p.encode_frame(MsgType.STDIN_EOF, channel))
    assert agent.collect(channel).exit == p.Exit(code=0, signal=None)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(os.listdir(target.parent)) == ["file.bin"]  # no temporary left behind

    channel = agent.new_id()
    agent.send(p.file_read(channel, str(target)))
    result = agent.collect(channel)
    assert result.exit == p.Exit(code=0, signal=None)
    assert result.stdout == data


def test_file_errors(agent: AgentConn, tmp_path: Path) -> None:
    channel = agent.new_id()
    agent.send(p.file_read(channel, str(tmp_path / "missing")))
    assert agent.error_on(channel).errno == errno.ENOENT
    channel = agent.new_id()
    agent.send(p.file_read(channel, str(tmp_path)))
    assert agent.error_on(channel).errno == errno.EISDIR
    channel = agent.new_id()
    agent.send(p.file_write(channel, str(tmp_path / "no-dir" / "f"), 0o644))
    assert agent.error_on(channel).errno == errno.ENOENT
    channel = agent.new_id()
    agent.send(p.file_read(channel, "relative/path"))
    assert agent.error_on(channel).errno == errno.EINVAL


def test_port_connect_round_trip_and_refused(agent: AgentConn) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve_once() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    channel = agent.new_id()
    agent.send(p.port_connect(channel, port))
    agent.send_stdin(channel, b"hello port")
    agent.send(p.encode_frame(MsgType.STDIN_EOF, channel))
    result = agent.collect(channel)
    assert result.pid == 0
    assert result.stdout == b"HELLO PORT"
    assert result.exit == p.Exit(code=0, signal=None)
    thread.join(5)
    server.close()  # now nothing listens there
    channel = agent.new_id()
    agent.send(p.port_connect(channel, port))
    assert agent.error_on(channel).errno == errno.ECONNREFUSED


def test_abort_resets_a_port_connection_whose_peer_keeps_writing(agent: AgentConn) -> None:
    """The host gives up a forwarded connection (its client is gone): the guest service,
    blocked writing into a window the host no longer opens, sees a reset at once."""
    server = socket.create_server(("127.0.0.1", 0))
    ended: list[BaseException] = []

    def stream_until_reset() -> None:
        conn, _ = server.accept()
        with conn:
            try:
                while True:
                    conn.sendall(b"x" * 65536)
            except OSError as exc:
                ended.append(exc)

    thread = threading.Thread(target=stream_until_reset, daemon=True)
    thread.start()
    channel = agent.new_id()
    agent.send(p.port_connect(channel, server.getsockname()[1]))
    assert agent.next(channel).type == MsgType.STARTED
    assert agent.next(channel).type == MsgType.STDOUT  # up to the window, never granted more
    agent.send(p.encode_frame(MsgType.ABORT, channel))
    error = agent.collect(channel, grant=False).error
    assert error is not None and error.errno == errno.ECONNABORTED
    thread.join(5)
    assert isinstance(ended[0], ConnectionResetError | BrokenPipeError)
    agent.send(p.encode_frame(MsgType.ABORT, channel))  # no longer open: ignored
    assert agent.quiet(channel, 0.2)
    server.close()


def test_abort_kills_an_exec_and_refuses_a_body(agent: AgentConn) -> None:
    channel = agent.start(["sleep", "30"])
    pid = p.parse_started(agent.next(channel).body)
    agent.send(p.encode_frame(MsgType.ABORT, channel, b"why"))
    assert agent.error_on(0).errno == errno.EINVAL
    agent.send(p.encode_frame(MsgType.ABORT, channel))
    error = agent.collect(channel).error
    assert error is not None and error.errno == errno.ECONNABORTED
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(pid)
    assert agent.run(["echo", "still here"]).stdout == b"still here\n"


# --- mounts --------------------------------------------------------------------
# A successful MOUNT needs the guest's devices: tests/test_sandbox_mounts.py (slow) has
# those. Here: every refusal, answered on the request's own id, and nothing is created.


def test_mount_requests_that_break_the_spec_are_refused(agent: AgentConn, tmp_path: Path) -> None:
    target = str(tmp_path / "never")
    good = [(Tag.SOURCE, "vmr0"), (Tag.FSTYPE, "virtiofs"), (Tag.PATH, target)]
    bodies = {
        "no SOURCE": fields(*good[1:]),
        "no FSTYPE": fields(good[0], good[2]),
        "no PATH": fields(*good[:2]),
        "relative PATH": fields(*good[:2], (Tag.PATH, "mnt/x")),
        "unknown FSTYPE": fields(good[0], (Tag.FSTYPE, "nfs"), good[2]),
        "empty SOURCE": fields((Tag.SOURCE, ""), *good[1:]),
        "SOURCE with a slash": fields((Tag.SOURCE, "/dev/vda"), *good[1:]),
        "READONLY not 0/1": fields(*good, (Tag.READONLY, 2)),
        "repeated PATH": fields(*good, (Tag.PATH, target)),
        "unknown tag": fields(*good, (Tag.ARG, "x")),
        "NUL in PATH": fields(*good[:2], (Tag.PATH, b"/a\0b")),
    }
    for reason, body in bodies.items():
        channel = agent.new_id()
        agent.send(p.encode_frame(MsgType.MOUNT, channel, body))
        error = agent.error_on(channel)
        assert error.errno == errno.EINVAL, reason
        assert error.message.startswith("MOUNT: "), (reason, error.message)
    assert not Path(target).exists()
    agent.send(p.MountRequest("vmr0", "virtiofs", target).encode(0))  # channel 0: not a request id
    assert agent.error_on(0).errno == errno.EINVAL
    assert agent.run(["echo", "still here"]).stdout == b"still here\n"


def test_mount_of_a_missing_disk_names_the_serial_and_creates_nothing(
    agent: AgentConn, tmp_path: Path
) -> None:
    target = tmp_path / "a" / "b"
    channel = agent.new_id()
    agent.send(p.MountRequest("D9", "ext4", str(target), readonly=True).encode(channel))
    error = agent.error_on(channel)
    assert error.errno == errno.ENODEV
    assert str(target) in error.message and "serial D9" in error.message
    assert not (tmp_path / "a").exists()


def test_mount_before_hello_is_refused(raw_agent: AgentConn, tmp_path: Path) -> None:
    raw_agent.send(p.MountRequest("D0", "ext4", str(tmp_path / "m")).encode(2))
    assert raw_agent.error_on(0).errno == errno.EPROTO
    raw_agent.hello()


# --- hostile host ------------------------------------------------------------


def test_hostile_frames_get_errors_and_the_agent_keeps_serving(agent: AgentConn) -> None:
    agent.send(p.encode_frame(99, 0))
    assert agent.error_on(0).errno == errno.EINVAL
    agent.send(p.encode_frame(MsgType.STDOUT, 0, b"x"))  # a guest-only type
    assert agent.error_on(0).errno == errno.EINVAL
    bad_flags = p.HEADER.pack(0, MsgType.EXEC, 1, 0, 77)
    agent.send(bad_flags)
    assert agent.error_on(0).errno == errno.EINVAL

    bodies = {
        "unknown tag": fields((Tag.ARG, "true"), (999, b"?")),
        "truncated field": fields((Tag.ARG, "true")) + b"\x0a\x00\x05\x00\x00\x00ab",
        "truncated header": fields((Tag.ARG, "true")) + b"\x0a\x00",
        "no ARG": fields((Tag.ENV, "A=1")),
        "huge length": struct.pack("<HI", Tag.ARG, 0xFFFFFFFF) + b"true",
        "NUL in ARG": fields((Tag.ARG, b"tr\0ue")),
        "bad u64": fields((Tag.ARG, "true"), (Tag.TTY, b"\x01")),
        "TTY not 0/1": fields((Tag.ARG, "true"), (Tag.TTY, 5)),
        "repeated CWD": fields((Tag.ARG, "true"), (Tag.CWD, "/"), (Tag.CWD, "/")),
        "bad RLIMIT": fields((Tag.ARG, "true"), (Tag.RLIMIT, b"\0" * 23)),
    }
    for reason, body in bodies.items():
        channel = agent.new_id()
        agent.send(p.encode_frame(MsgType.EXEC, channel, body))
        assert agent.error_on(channel).errno == errno.EINVAL, reason

    agent.send(p.ExecRequest(argv=["true"], env=ENV).encode(0))  # channel 0 is not a channel
    assert agent.error_on(0).errno == errno.EINVAL
    busy = agent.start(["sleep", "30"])
    assert agent.next(busy).type == MsgType.STARTED
    agent.send(p.ExecRequest(argv=["true"], env=ENV).encode(busy))  # id in use
    assert agent.error_on(0).errno == errno.EEXIST
    agent.send(p.encode_frame(MsgType.WINDOW, busy, fields((Tag.PORT, 1))))
    assert agent.error_on(0).errno == errno.EINVAL
    agent.send(p.encode_frame(MsgType.STDIN, busy, b"no stdin here"))
    assert agent.error_on(0).errno == errno.EINVAL
    agent.send(p.encode_frame(MsgType.STDIN, 4242, b"late"))  # unknown channel: ignored
    agent.send(p.signal(busy, signal.SIGKILL))
    assert agent.collect(busy).exit == p.Exit(code=None, signal=signal.SIGKILL)

    assert agent.run(["echo", "still here"]).stdout == b"still here\n"


def test_stdin_beyond_the_window_is_refused(agent: AgentConn) -> None:
    channel = agent.start(["sleep", "30"], stdin=True)
    assert agent.next(channel).type == MsgType.STARTED
    # sleep never reads: once its pipe is full, the agent's credit stops coming back.
    while True:
        agent.send_stdin(channel, b"x" * agent.in_credit[channel])
        time.sleep(0.2)
        while agent._receive(0.05):
            pass
        if agent.in_credit[channel] == 0:
            break
    agent.send(p.encode_frame(MsgType.STDIN, channel, b"over"))
    assert agent.error_on(0).errno == errno.EOVERFLOW
    agent.send(p.signal(channel, signal.SIGKILL))
    assert agent.collect(channel).exit == p.Exit(code=None, signal=signal.SIGKILL)


def test_oversized_frame_loses_the_connection_state(agent: AgentConn) -> None:
    channel = agent.start(["sleep", "30"])
    pid = p.parse_started(agent.next(channel).body)
    agent.send(p.HEADER.pack(p.MAX_BODY + 1, MsgType.EXEC, 0, 0, 5))
    assert agent.error_on(0).errno == errno.EMSGSIZE
    assert agent.quiet(0, 0.2)  # from now on, input is ignored until the host goes away
    agent.send(p.hello())
    assert agent.quiet(0, 0.2)
    assert not alive(pid)


# --- end of the connection ---------------------------------------------------


def test_eof_kills_the_execs_and_ends_the_agent(agent: AgentConn) -> None:
    channel = agent.start(["sh", "-c", "sleep 60 & sleep 60"])
    pid = p.parse_started(agent.next(channel).body)
    assert alive(pid)
    agent.sock.close()
    assert agent.proc.wait(timeout=5) == 0
    assert not alive(pid)


def test_shutdown_answers_and_exits(agent: AgentConn) -> None:
    channel = agent.start(["sleep", "60"])
    pid = p.parse_started(agent.next(channel).body)
    agent.send(p.encode_frame(MsgType.SHUTDOWN, 0))
    assert agent.next(0).type == MsgType.SHUTDOWN
    assert agent.proc.wait(timeout=5) == 0
    assert not alive(pid)
