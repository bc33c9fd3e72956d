"""A VMM driver for the fast tier, in the spirit of httpx's ``MockTransport``.

``FakeDriver(handler)`` boots no VM: for each :class:`MachineSpec` it starts the
process ``handler(spec)`` names, in its own process group, dying with us, its output
in the spec's VMM log, exactly as QEMU would be started. The default handler's
process is the real guest agent (``vmr-agent --serve-fd``) on the host, behind the
spec's agent socket, so creation, exec, files, port forwards and shutdown run the
real code paths end to end; other handlers stand in for a QEMU that fails, exits
during boot or never answers. Commands "in the guest" run on the host, as the test
user: only tests use this.

No kernel, initramfs or QEMU is involved; guest assets are placeholders.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vmruntime._child import die_with_parent, start_child
from vmruntime.errors import VmmError
from vmruntime.guest.assets import GuestAssets
from vmruntime.guest.build import ensure_agent
from vmruntime.vm.driver import MachineSpec, ProcessVm, VmHandle, VmmDriver

Handler = Callable[[MachineSpec], list[str]]

# Listens where QEMU's agent chardev would and, like it, serves one connection at a time:
# each is handed to a fresh agent process (a reconnecting host finds a new agent, where a
# real guest keeps its agent; no test here depends on the difference).
_AGENT_BEHIND_SOCKET = """
import socket, subprocess, sys
path, agent = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(1)
while True:
    conn, _ = server.accept()
    subprocess.run([agent, "--serve-fd", str(conn.fileno())], pass_fds=[conn.fileno()])
    conn.close()
"""


def agent_socket(spec: MachineSpec) -> Path:
    (port,) = spec.console_ports
    return port.socket


def real_agent(agent: Path) -> Handler:
    """The compiled ``agent`` serving the sandbox's agent socket."""
    return lambda spec: [sys.executable, "-c", _AGENT_BEHIND_SOCKET, str(agent_socket(spec)),
                         str(agent)]  # fmt: skip


def exits_during_boot(message: str = "qemu-system-x86_64: the machine fell over") -> Handler:
    """A VMM that writes ``message`` to its log and exits 1 before opening any socket."""
    return lambda spec: ["sh", "-c", f"echo '{message}' >&2; exit 1"]


def never_answers(spec: MachineSpec) -> list[str]:
    """A VMM that listens on the agent socket but whose guest never says HELLO."""
    script = ("import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\n"
              "s.bind(sys.argv[1]); s.listen(1); c, _ = s.accept(); time.sleep(3600)")  # fmt: skip
    return [sys.executable, "-c", script, str(agent_socket(spec))]


class FakeVm(ProcessVm):
    async def quit(self) -> None:
        if self.running():
            os.killpg(self.pid, signal.SIGTERM)


class FakeDriver(VmmDriver):
    """Boots ``handler(spec)`` instead of a VM (default: the real agent, compiled once into
    ``agent_cache``); ``boot_error`` makes every boot fail."""

    name = "fake"

    def __init__(self, handler: Handler | None = None, *, agent_cache: Path | None = None,
                 boot_error: VmmError | None = None) -> None:  # fmt: skip
        self.handler = handler or real_agent(ensure_agent(agent_cache))
        self.boot_error = boot_error
        self.specs: list[MachineSpec] = []
        self.started: list[int] = []

    def guest_assets(self, cache_root: Path) -> GuestAssets:
        return GuestAssets(kernel=Path("/dev/null"), initramfs=Path("/dev/null"), release="fake")

    async def boot(self, spec: MachineSpec, *, detached: bool = False) -> VmHandle:
        self.specs.append(spec)
        if self.boot_error is not None:
            raise self.boot_error
        argv = self.handler(spec)
        parent = os.getpid()

        def start() -> subprocess.Popen[bytes]:
            with open(spec.vmm_log, "ab") as log:
                return subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, pass_fds=spec.pass_fds,
                    preexec_fn=None if detached else lambda: die_with_parent(parent),
                )  # fmt: skip

        process = await asyncio.to_thread(start_child, start)
        self.started.append(process.pid)
        return FakeVm(process.pid, process)

    def adopt(self, pid: int, start_time: int | None, control_socket: Path) -> VmHandle:
        return FakeVm(pid, start_time=start_time)
