"""Starting and stopping one broker process (``python -m vmruntime.broker serve``)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vmruntime._child import die_with_parent, log_tail, start_child
from vmruntime.errors import BrokerError

# Generous: a broker is listening ~0.2 s after exec, but CI machines are slow.
START_TIMEOUT = 15.0
_LOG_TAIL_BYTES = 4096
_LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class ShareConfig:
    """One host folder as a guest sees it (the options of docs/broker.md)."""

    root: Path
    readonly: bool = False
    identity: str = "virtual"
    uid: int = 0
    gid: int = 0
    containment: str = "auto"
    max_handles: int = 1024

    def argv(self) -> list[str]:
        args = ["--root", str(self.root), "--identity", self.identity, "--uid", str(self.uid),
                "--gid", str(self.gid), "--containment", self.containment,
                "--max-handles", str(self.max_handles)]  # fmt: skip
        return [*args, "--readonly"] if self.readonly else args


class BrokerProcess:
    """A running broker serving one share on one vhost-user socket, or on a console port.

    Who calls it: :mod:`vmruntime.vm.sandbox`, one per share per sandbox, before
    QEMU is started with ``-chardev socket,path=SOCKET``. With ``transport="console"``
    QEMU listens at SOCKET for a virtio-console port and the broker connects to it
    (retrying until QEMU is there); ``resume=True`` starts a broker for a guest whose
    FUSE session an earlier broker began (a restored memory snapshot). Promises:
    ``start`` returns only once the socket listens (console: once the share is open), or
    raises :class:`BrokerError` naming the share root with the tail of ``log``; the broker
    exits by itself when QEMU disconnects; a non-detached broker runs in its own process
    group and gets SIGKILL from the kernel when this process dies (it is started on
    :func:`vmruntime._child.start_child`'s thread, so any thread may call ``start``, which
    blocks until the socket listens); a detached one is in its own session
    and outlives us. ``stop`` and ``kill`` reap it and are idempotent.
    """

    def __init__(self, share: ShareConfig, socket: Path, log: Path,
                 process: subprocess.Popen[bytes]) -> None:  # fmt: skip
        self.share = share
        self.socket = socket
        self.log = log
        self._process = process
        self.pid = process.pid

    @classmethod
    def start(cls, share: ShareConfig, socket: Path, *, log: Path, detached: bool = False,
              transport: str = "vhost-user", resume: bool = False) -> BrokerProcess:  # fmt: skip
        argv = [sys.executable, "-m", "vmruntime.broker", "serve", "--socket", str(socket),
                "--transport", transport, *share.argv()]  # fmt: skip
        if resume:
            argv.append("--resume")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            parent = os.getpid()
            with open(log, "ab") as log_file:
                process = start_child(lambda: subprocess.Popen(
                    [*argv, "--ready-fd", str(ready_w)],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    pass_fds=(ready_w,), start_new_session=detached,
                    process_group=None if detached else 0,
                    preexec_fn=None if detached else lambda: die_with_parent(parent),
                ))  # fmt: skip
        except OSError as exc:
            os.close(ready_r)
            raise BrokerError(share.root, f"cannot start the broker: {exc}") from exc
        finally:
            os.close(ready_w)
        broker = cls(share, socket, log, process)
        try:
            broker._wait_ready(ready_r)
        finally:
            os.close(ready_r)
        return broker

    def _wait_ready(self, ready: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise BrokerError(self.share.root, self._failure("did not listen in time"))
            readable, _, _ = select.select([ready], [], [], left)
            if readable:
                break
        if os.read(ready, 1) == b"\x01":
            return
        # EOF: the broker exited (or closed the pipe) before it listened.
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self._process.returncode
        raise BrokerError(self.share.root, self._failure(f"exited with status {code}"))

    def _failure(self, what: str) -> str:
        tail = log_tail(self.log, _LOG_TAIL_LINES, _LOG_TAIL_BYTES)
        return f"the broker {what}" + (f":\n{tail}" if tail else " (its log is empty)")

    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps the process."""
        if self.running():
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.running():
            self._signal(signal.SIGKILL)
        self._process.wait()

    def _signal(self, signo: int) -> None:
        # The broker leads its own process group (or session) whose id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signo)
