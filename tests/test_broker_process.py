"""The broker as a process: start, readiness, failures, and every way it ends."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmruntime.broker.process import BrokerProcess, ShareConfig
from vmruntime.errors import BrokerError

pytestmark = pytest.mark.timeout(60)

GET_FEATURES = 1
VERSION_1 = 1 << 32


@pytest.fixture
def share(tmp_path: Path) -> ShareConfig:
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_text("hi\n")
    return ShareConfig(root)


@pytest.fixture
def brokers() -> Iterator[list[BrokerProcess]]:
    started: list[BrokerProcess] = []
    yield started
    for broker in started:
        broker.kill()


def gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` is no process (or an unreaped zombie, which is dead too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def get_features(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(os.fspath(path))
        conn.sendall(struct.pack("<III", GET_FEATURES, 1, 0))
        reply = b""
        while len(reply) < 20:
            chunk = conn.recv(20 - len(reply))
            assert chunk
            reply += chunk
    request, flags, size, features = struct.unpack("<IIIQ", reply)
    assert (request, flags, size) == (GET_FEATURES, 0x5, 8)
    return features


def test_start_serve_and_exit_when_front_end_leaves(
    tmp_path: Path, share: ShareConfig, brokers: list[BrokerProcess]
) -> None:
    socket_path, log = tmp_path / "fs.sock", tmp_path / "broker.log"
    started = time.monotonic()
    broker = BrokerProcess.start(share, socket_path, log=log)
    brokers.append(broker)
    assert time.monotonic() - started < 1.0 or os.environ.get("CI")
    assert socket_path.exists() and broker.running()
    assert os.getpgid(broker.pid) == broker.pid  # its own process group
    assert get_features(socket_path) & VERSION_1
    # That front-end has gone: the broker ends by itself, successfully, and cleans up.
    assert broker._process.wait(5) == 0
    assert not socket_path.exists()
    assert "front-end closed the connection" in log.read_text()
    broker.stop()  # idempotent on an exited broker


def test_stop_sends_sigterm(tmp_path: Path, share: ShareConfig,
                            brokers: list[BrokerProcess]) -> None:  # fmt: skip
    broker = BrokerProcess.start(share, tmp_path / "fs.sock", log=tmp_path / "log")
    brokers.append(broker)
    broker.stop()
    assert not broker.running()
    assert broker._process.returncode == 0  # SIGTERM is a clean exit
    assert not (tmp_path / "fs.sock").exists()
    broker.stop()
    broker.kill()


def test_stop_while_serving(tmp_path: Path, share: ShareConfig,
                            brokers: list[BrokerProcess]) -> None:  # fmt: skip
    socket_path = tmp_path / "fs.sock"
    broker = BrokerProcess.start(share, socket_path, log=tmp_path / "log")
    brokers.append(broker)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(os.fspath(socket_path))
        broker.stop(timeout=5)
        assert broker._process.returncode == 0


@pytest.mark.parametrize("problem", ["missing", "file"])
def test_bad_root_is_a_broker_error(tmp_path: Path, problem: str) -> None:
    root = tmp_path / "nope"
    if problem == "file":
        root.write_text("not a directory")
    with pytest.raises(BrokerError) as caught:
        BrokerProcess.start(ShareConfig(root), tmp_path / "fs.sock", log=tmp_path / "log")
    assert caught.value.root == root
    assert str(root) in str(caught.value)
    assert "not a directory" in caught.value.reason


def test_socket_path_unusable(tmp_path: Path, share: ShareConfig) -> None:
    in_the_way = tmp_path / "fs.sock"
    in_the_way.write_text("a regular file")
    with pytest.raises(BrokerError, match="not a socket"):
        BrokerProcess.start(share, in_the_way, log=tmp_path / "log")
    assert in_the_way.read_text() == "a regular file"


def test_stale_socket_is_replaced(tmp_path: Path, share: ShareConfig,
                                  brokers: list[BrokerProcess]) -> None:  # fmt: skip
    path = tmp_path / "fs.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))
    stale.close()
    broker = BrokerProcess.start(share, path, log=tmp_path / "log")
    brokers.append(broker)
    assert get_features(path) & VERSION_1


def test_options_reach_the_broker(tmp_path: Path, brokers: list[BrokerProcess]) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    share = ShareConfig(root, readonly=True, identity="passthrough", uid=1000, gid=1000,
                        containment="walk", max_handles=7)  # fmt: skip
    broker = BrokerProcess.start(share, tmp_path / "fs.sock", log=tmp_path / "log")
    brokers.append(broker)
    argv = Path(f"/proc/{broker.pid}/cmdline").read_bytes().split(b"\0")
    for expected in (b"--readonly", b"passthrough", b"1000", b"walk", b"7"):
        assert expected in argv


def test_detached_broker_has_its_own_session(tmp_path: Path, share: ShareConfig,
                                             brokers: list[BrokerProcess]) -> None:  # fmt: skip
    broker = BrokerProcess.start(share, tmp_path / "fs.sock", log=tmp_path / "log", detached=True)
    brokers.append(broker)
    assert os.getsid(broker.pid) == broker.pid
    broker.stop()
    assert not broker.running()


def test_nofile_limit_raised(tmp_path: Path, share: ShareConfig,
                             brokers: list[BrokerProcess]) -> None:  # fmt: skip
    broker = BrokerProcess.start(share, tmp_path / "fs.sock", log=tmp_path / "log")
    brokers.append(broker)
    limits = Path(f"/proc/{broker.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard


PARENT = """
import sys, time
from pathlib import Path
from vmruntime.broker.process import BrokerProcess, ShareConfig
root, path, log, mode = sys.argv[1:]
broker = BrokerProcess.start(ShareConfig(Path(root)), Path(path), log=Path(log),
                             detached=mode == "detached")
print(broker.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_parent_death(tmp_path: Path, share: ShareConfig, mode: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(share.root), str(tmp_path / "fs.sock"),
         str(tmp_path / "log"), mode],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    if mode == "attached":
        assert gone(pid), "the broker outlived the process that started it"
    else:
        assert not gone(pid, 0.3), "a detached broker must outlive its starter"
        os.kill(pid, signal.SIGTERM)
        assert gone(pid)


def _fuse_usable() -> bool:
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _fuse_usable(), reason="needs /dev/fuse (root)")
def test_mount_command_serves_a_host_mount_point(tmp_path: Path, share: ShareConfig) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    command = [sys.executable, "-m", "vmruntime.broker", "mount", str(share.root), str(mountpoint),
               "--readonly"]  # fmt: skip
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while f" {mountpoint} " not in Path("/proc/mounts").read_text():
            assert process.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.02)
        assert (mountpoint / "hello.txt").read_text() == "hi\n"
        with pytest.raises(OSError):
            (mountpoint / "new").write_text("refused")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    assert f" {mountpoint} " not in Path("/proc/mounts").read_text()
