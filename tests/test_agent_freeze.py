"""FREEZE and THAW (docs/agent-protocol.md, item 10) with the real agent on the host.

Fast tier: the agent runs in ``--serve-fd`` mode with ``--freeze-path`` pointing at a
small ext4 image that the test loop-mounts (root can here; without it the tests that
freeze skip, and the slow tier's snapshot tests freeze a real guest). FIFREEZE on that
mount is the same call the agent makes on the guest's writable layer.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_host import AgentConn, fields

from vmruntime.guest import protocol as p
from vmruntime.guest.build import ensure_agent
from vmruntime.guest.protocol import MsgType, Tag


@pytest.fixture(scope="module")
def agent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_agent(tmp_path_factory.mktemp("agent-cache"))


@pytest.fixture
def ext4_mount(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB journal-less ext4 image (as the writable layer is) mounted on a loop device."""
    image, target = tmp_path / "fs.img", tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-O", "^has_journal", str(image)], check=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(target)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    yield target
    # Never leave a frozen filesystem behind, whatever the test did.
    subprocess.run(["fsfreeze", "-u", str(target)], capture_output=True)
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], check=True)  # a probe still inside


def spawn(binary: Path, *extra: str) -> AgentConn:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([str(binary), "--serve-fd", str(theirs.fileno()), *extra],
                            pass_fds=[theirs.fileno()])  # fmt: skip
    theirs.close()
    conn = AgentConn(proc=proc, sock=ours)
    conn.hello()
    return conn


def close(conn: AgentConn) -> None:
    conn.sock.close()
    conn.proc.wait(timeout=5)


@pytest.fixture
def freezer(agent_path: Path, ext4_mount: Path) -> Iterator[AgentConn]:
    conn = spawn(agent_path, "--freeze-path", str(ext4_mount))
    yield conn
    close(conn)


def request(conn: AgentConn, frame: bytes, channel: int) -> p.GuestError | None:
    """Send a FREEZE/THAW-like request; None for its EXIT 0, else its ERROR."""
    conn.send(frame)
    result = conn.collect(channel)
    if result.error is not None:
        return result.error
    assert result.exit == p.Exit(code=0, signal=None)
    return None


def freeze(conn: AgentConn, timeout_ms: int = 0) -> p.GuestError | None:
    channel = conn.new_id()
    return request(conn, p.freeze(channel, timeout_ms), channel)


def thaw(conn: AgentConn) -> p.GuestError | None:
    channel = conn.new_id()
    return request(conn, p.thaw(channel), channel)


def writable(path: Path, seconds: float = 5.0) -> bool:
    """Whether a write to ``path``'s filesystem completes within ``seconds`` (a write to a
    frozen one blocks; the child is left to finish after the thaw)."""
    writer = subprocess.Popen(["sh", "-c", f"echo x > {path}/probe && sync {path}/probe"])
    try:
        return writer.wait(timeout=seconds) == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        if writer.poll() is None:
            subprocess.run(["fsfreeze", "-u", str(path)], capture_output=True)
            writer.wait(timeout=10)


def test_freeze_holds_writers_until_thaw_and_the_agent_keeps_serving(
    freezer: AgentConn, ext4_mount: Path
) -> None:
    (ext4_mount / "before").write_text("kept")
    assert freeze(freezer, 30_000) is None
    writer = freezer.start(["sh", "-c", f"echo late > {ext4_mount}/late"])
    assert freezer.next(writer).type == MsgType.STARTED
    assert freezer.quiet(writer, 0.5)  # blocked on the frozen filesystem
    # The agent itself still answers: an exec elsewhere, a read of the frozen filesystem.
    assert freezer.run(["echo", "alive"]).stdout == b"alive\n"
    reader = freezer.new_id()
    freezer.send(p.file_read(reader, str(ext4_mount / "before")))
    assert freezer.collect(reader).stdout == b"kept"
    # What would block the agent on the frozen filesystem is refused instead.
    write = freezer.new_id()
    freezer.send(p.file_write(write, str(ext4_mount / "refused"), 0o644))
    assert freezer.error_on(write).errno == errno.EBUSY
    mount = freezer.new_id()
    freezer.send(p.MountRequest("vmr0", "virtiofs", str(ext4_mount / "m")).encode(mount))
    assert freezer.error_on(mount).errno == errno.EBUSY
    again = freeze(freezer)
    assert again is not None and again.errno == errno.EBUSY
    assert thaw(freezer) is None
    assert freezer.collect(writer).exit == p.Exit(code=0, signal=None)
    assert (ext4_mount / "late").read_text() == "late\n"
    assert not (ext4_mount / "refused").exists() and not (ext4_mount / "m").exists()
    not_frozen = thaw(freezer)
    assert not_frozen is not None and not_frozen.errno == errno.EINVAL


def test_a_host_that_disconnects_leaves_the_filesystem_thawed(
    agent_path: Path, ext4_mount: Path
) -> None:
    conn = spawn(agent_path, "--freeze-path", str(ext4_mount))
    assert freeze(conn) is None
    close(conn)
    assert writable(ext4_mount)


def test_a_new_hello_ends_the_old_session_and_its_freeze(freezer: AgentConn,
                                                         ext4_mount: Path) -> None:  # fmt: skip
    assert freeze(freezer) is None
    freezer.hello()
    assert writable(ext4_mount)
    error = thaw(freezer)
    assert error is not None and error.errno == errno.EINVAL


def test_the_guest_thaws_by_itself_after_the_timeout_and_thaw_says_so(
    freezer: AgentConn, ext4_mount: Path
) -> None:
    assert freeze(freezer, 300) is None
    started = time.monotonic()
    assert writable(ext4_mount)
    assert time.monotonic() - started < 5
    error = thaw(freezer)
    assert error is not None and error.errno == errno.ETIMEDOUT
    error = thaw(freezer)  # said once: now it is simply not frozen
    assert error is not None and error.errno == errno.EINVAL


def test_freeze_is_refused_while_a_file_write_is_open(freezer: AgentConn,
                                                      ext4_mount: Path) -> None:  # fmt: skip
    write = freezer.new_id()
    freezer.send(p.file_write(write, str(ext4_mount / "f"), 0o644))
    error = freeze(freezer)
    assert error is not None and error.errno == errno.EBUSY
    freezer.send_stdin(write, b"data")
    freezer.send(p.encode_frame(MsgType.STDIN_EOF, write))
    assert freezer.collect(write).exit == p.Exit(code=0, signal=None)
    assert freeze(freezer) is None
    assert thaw(freezer) is None


def test_bad_freeze_and_thaw_requests_are_refused_on_their_own_id(
    agent_path: Path, ext4_mount: Path
) -> None:
    conn = spawn(agent_path, "--freeze-path", str(ext4_mount))
    try:
        channel = conn.new_id()
        conn.send(p.encode_frame(MsgType.FREEZE, channel, fields((Tag.PATH, "/"))))
        assert conn.error_on(channel).errno == errno.EINVAL
        channel = conn.new_id()
        conn.send(p.encode_frame(MsgType.FREEZE, channel, fields((Tag.TIMEOUT_MS, b"x"))))
        assert conn.error_on(channel).errno == errno.EINVAL
        channel = conn.new_id()
        conn.send(p.encode_frame(MsgType.THAW, channel, b"body"))
        assert conn.error_on(channel).errno == errno.EINVAL
        conn.send(p.freeze(0, 1000))  # channel 0 is the connection's
        assert conn.error_on(0).errno == errno.EINVAL
        assert writable(ext4_mount)  # none of them froze anything
    finally:
        close(conn)


def test_freeze_without_a_writable_layer_is_enodev(agent_path: Path) -> None:
    conn = spawn(agent_path)
    try:
        error = freeze(conn)
        assert error is not None and error.errno == errno.ENODEV
    finally:
        close(conn)


def test_freeze_before_hello_is_refused(agent_path: Path, ext4_mount: Path) -> None:
    ours, theirs = socket.socketpair()
    argv = [str(agent_path), "--serve-fd", str(theirs.fileno()), "--freeze-path", str(ext4_mount)]
    proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
    theirs.close()
    conn = AgentConn(proc=proc, sock=ours)
    try:
        conn.send(p.freeze(2, 1000))
        assert conn.error_on(0).errno == errno.EPROTO
        assert writable(ext4_mount)
    finally:
        close(conn)
