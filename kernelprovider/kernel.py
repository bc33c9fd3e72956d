"""One Jupyter kernel's sandbox: the microVM, the kernel process in it, its port forwards.

Who calls it: :class:`kernelprovider.provisioner.MicroVMProvisioner`, always on
vmruntime's runtime loop (``vmruntime.vm.sync.submit``), so the forwards keep serving
whatever loop (or none) the Jupyter side runs. What it promises: one sandbox for the
kernel's whole life, restarts included; at most one kernel process in it at a time;
each launch gets a fresh session key, fresh host ports and a connection file only the
kernel's user can read; a launch that fails ends everything it made and says why,
with the kernel's own output and the tail of the guest console.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kernelprovider.pool import KERNEL_PORTS, KernelPools, WarmKernel, WarmKernelSpec, claim_kernel
from vmruntime.errors import SandboxError, VmruntimeError
from vmruntime.vm import AsyncProcess, AsyncSandbox, CreationPlan, SandboxConfig
from vmruntime.vm.sandbox import console_tail

# ipykernel's five sockets, in connection-file order. Each launch binds the next five
# free guest ports (a killed kernel's ports may linger in TIME_WAIT in the guest).
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
_FIRST_GUEST_PORT = 20000  # below Linux's ephemeral range: a probe never self-connects
_GUEST_PORT_SPAN = 5000
_CONNECTION_DIR = "/tmp/.vmruntime-kernel"  # the guest's own /tmp; made 0700
_OUTPUT_TAIL_BYTES = 8192
_PROBE_INTERVAL = 0.1
# A VM that died takes its kernel with it; report it as a kill, as a host kernel's
# process killed by the OOM killer would be.
VM_DIED_EXIT_CODE = -int(signal.SIGKILL)


class KernelLaunchError(VmruntimeError):
    """A kernel could not be started in its sandbox; the message says why, with the
    kernel's output and the guest console's tail."""

    def __init__(self, sandbox_id: str, reason: str, kernel_output: str = "",
                 console: str = "") -> None:  # fmt: skip
        message = f"sandboxed kernel (sandbox {sandbox_id}): {reason}"
        if kernel_output:
            message += "\n--- last output of the kernel process ---\n" + kernel_output
        if console:
            message += "\n--- last lines of the guest console ---\n" + console
        super().__init__(message)
        self.sandbox_id = sandbox_id
        self.reason = reason
        self.kernel_output = kernel_output


@dataclass(frozen=True)
class KernelRequest:
    """What one launch runs: ``argv`` (``{connection_file}`` not yet replaced), its
    environment, working directory, and the session's key and signature scheme."""

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None
    key: str
    signature_scheme: str
    kernel_name: str
    keep_ports: bool = False  # reuse the previous launch's ports (guest and host) if free


class _KernelProcess:
    """One kernel process in the guest, its output drained (a full pipe would stall it)."""

    def __init__(self, process: AsyncProcess, log: logging.Logger) -> None:
        self.process = process
        self.exit_code: int | None = None
        self.death: SandboxError | None = None
        self.reported = False  # whether the provisioner logged the exit
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._log = log
        self._drained = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            async for _stream, data in self.process:
                self._keep(data)
            self.exit_code = (await self.process.wait()).returncode
        except SandboxError as exc:
            self.death = exc
            self.exit_code = VM_DIED_EXIT_CODE

    def _keep(self, data: bytes) -> None:
        self._log.debug("kernel output: %s", data.decode(errors="replace").rstrip())
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(self._tail[0]) >= _OUTPUT_TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())

    def output_tail(self) -> str:
        return b"".join(self._tail)[-_OUTPUT_TAIL_BYTES:].decode(errors="replace").strip()

    async def wait(self) -> int:
        await asyncio.shield(self._drained)
        assert self.exit_code is not None
        return self.exit_code

    async def signal(self, signum: int) -> None:
        if self.exit_code is None:
            with contextlib.suppress(SandboxError):  # it ended meanwhile
                await self.process.signal(signum, group=True)


@dataclass(frozen=True)
class WarmSource:
    """Where a kernel's first launch takes a warm kernel from: ``pools``' pool for ``spec``
    (of ``size`` members)."""

    pools: KernelPools
    spec: WarmKernelSpec
    size: int


class KernelSandbox:
    """A sandbox that runs one kernel process at a time (see the module's docstring)."""

    def __init__(self, config: SandboxConfig, log: logging.Logger,
                 plan: CreationPlan | None = None,
                 warm: WarmSource | None = None) -> None:  # fmt: skip
        self.config = config
        self._plan = plan
        self._warm = warm
        self.sandbox: AsyncSandbox | None = None
        self.kernel: _KernelProcess | None = None
        self.generation = 0
        self._next_candidate = 0
        self._guest_ports: dict[str, int] = {}
        self._log = log

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.id if self.sandbox is not None else ""

    async def launch(self, request: KernelRequest, deadline: float) -> dict[str, object]:
        """Start a kernel (booting the sandbox first if it is not running) and return
        the host side's connection info once the kernel listens on all its ports.

        If it fails, a sandbox it booted is ended; a sandbox that was already running
        (a restart) keeps its files, and only the new kernel process is ended.
        """
        if self.sandbox is None and self._warm is not None:
            return await self._launch_warm(self._warm, request, deadline)
        booting = self.sandbox is None or not self.sandbox.running
        try:
            await self._ensure_sandbox(deadline)
            ports = await self._ports_for(request)
            path = await self._write_connection_file(request, ports)
            argv = [arg.replace("{connection_file}", path) for arg in request.argv]
            await self._start_kernel(argv, request)
            await self._wait_until_listening(deadline)
        except BaseException:
            await (self.end() if booting else self._abandon_kernel())
            raise
        assert self.sandbox is not None
        host = {f"{name}_port": self.sandbox.ports[port] for name, port in ports.items()}
        return {**host, "ip": "127.0.0.1", "transport": "tcp", "key": request.key.encode(),
                "signature_scheme": request.signature_scheme,
                "kernel_name": request.kernel_name}  # fmt: skip

    async def _launch_warm(self, warm: WarmSource, request: KernelRequest,
                           deadline: float) -> dict[str, object]:  # fmt: skip
        """The first launch: a warm kernel from the pool, claimed with the request's key,
        environment and working directory (its argv is the pool's: the same kernelspec)."""
        claim = warm.pools.pool(warm.spec, warm.size).claim()
        try:
            member = await asyncio.wait_for(claim, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise KernelLaunchError("-", "no warm kernel was ready within the startup timeout "
                                    f"({self.config.boot_timeout:g} s): the first kernel of a "
                                    "kernelspec also makes its template") from None  # fmt: skip
        kernel: WarmKernel = member.payload
        try:
            await claim_kernel(member, key=request.key, env=request.env, cwd=request.cwd)
        except BaseException:
            with contextlib.suppress(SandboxError):
                await member.sandbox.kill()
            raise
        self.sandbox = member.sandbox
        self.kernel = _KernelProcess(kernel.process, self._log)
        self._guest_ports = dict(KERNEL_PORTS)
        self._next_candidate = len(KERNEL_PORTS) + 1  # a restart's ports come after the claim's
        self.generation += 1
        self._log.info("kernel sandbox %s from the warm pool (made in %.1f s, %s)",
                       member.sandbox.id, member.made_seconds,
                       member.sandbox.accelerator)  # fmt: skip
        host = {f"{name}_port": port for name, port in kernel.host_ports.items()}
        return {**host, "ip": "127.0.0.1", "transport": "tcp", "key": request.key.encode(),
                "signature_scheme": request.signature_scheme,
                "kernel_name": request.kernel_name}  # fmt: skip

    async def _ensure_sandbox(self, deadline: float) -> None:
        if self.sandbox is not None and self.sandbox.running:
            return
        if self.sandbox is not None:  # it died: say so, clear it away, boot afresh
            self._log.warning("sandbox %s of the kernel died; booting a new one", self.sandbox_id)
            await self.end()
        timeout = max(1.0, deadline - time.monotonic())
        config = dataclasses.replace(self.config, boot_timeout=timeout)
        self.sandbox = await AsyncSandbox.from_config(config, self._plan)
        self._log.info("kernel sandbox %s booted in %.1f s (%s)", self.sandbox.id,
                       self.sandbox.boot_seconds, self.sandbox.accelerator)  # fmt: skip

    async def _ports_for(self, request: KernelRequest) -> dict[str, int]:
        assert self.sandbox is not None
        previous = list(self._guest_ports.values())
        reusable = request.keep_ports and previous and all(
            port in self.sandbox.ports for port in previous)  # fmt: skip
        if reusable and not any([await self.sandbox.port_open(port) for port in previous]):
            self.generation += 1
            return self._guest_ports
        return await self._next_ports()

    async def _next_ports(self) -> dict[str, int]:
        """Five guest ports nothing in the guest listens on, each forwarded from a free
        host port; the previous launch's forwards end."""
        assert self.sandbox is not None
        await self.sandbox.unforward(self._guest_ports.values())
        chosen: list[int] = []
        candidate = self._next_candidate
        while len(chosen) < len(CHANNELS):
            port = _FIRST_GUEST_PORT + candidate % _GUEST_PORT_SPAN
            candidate += 1
            if not await self.sandbox.port_open(port):  # a guest service may hold it
                chosen.append(port)
        self._next_candidate = candidate
        self.generation += 1
        self._guest_ports = dict(zip(CHANNELS, chosen, strict=True))
        await self.sandbox.personalize(ports={port: 0 for port in chosen})
        return self._guest_ports

    async def _write_connection_file(self, request: KernelRequest, ports: Mapping[str, int]) -> str:
        """Written by the kernel's own user, 0600 in a 0700 directory."""
        assert self.sandbox is not None
        info = {f"{name}_port": port for name, port in ports.items()}
        info.update(ip="127.0.0.1", transport="tcp", key=request.key,
                    signature_scheme=request.signature_scheme,
                    kernel_name=request.kernel_name)  # fmt: skip
        path = f"{_CONNECTION_DIR}/kernel-{self.generation}.json"
        script = 'umask 077 && mkdir -p "$1" && chmod 700 "$1" && cat > "$2"'
        await self.sandbox.exec(["/bin/sh", "-c", script, "sh", _CONNECTION_DIR, path],
                                input=json.dumps(info).encode(), timeout=60,
                                check=True)  # fmt: skip
        return path

    async def _start_kernel(self, argv: list[str], request: KernelRequest) -> None:
        assert self.sandbox is not None
        process = await self.sandbox.exec_stream(argv, env=request.env, cwd=request.cwd,
                                                 stdin=False)  # fmt: skip
        self.kernel = _KernelProcess(process, self._log)

    async def _wait_until_listening(self, deadline: float) -> None:
        assert self.sandbox is not None and self.kernel is not None
        waiting = list(self._guest_ports.values())
        while waiting:
            if self.kernel.exit_code is not None:
                how = self._exit_reason(self.kernel)
                raise KernelLaunchError(self.sandbox_id, f"the kernel {how} before it listened",
                                        self.kernel.output_tail(), self._console())  # fmt: skip
            if time.monotonic() > deadline:
                raise KernelLaunchError(
                    self.sandbox_id, "the kernel did not listen on its ports within the "
                    f"startup timeout ({self.config.boot_timeout:g} s)",
                    self.kernel.output_tail(), self._console())  # fmt: skip
            if await self.sandbox.port_open(waiting[0]):
                waiting.pop(0)
            else:
                await asyncio.sleep(_PROBE_INTERVAL)

    def _exit_reason(self, kernel: _KernelProcess) -> str:
        if kernel.death is not None:
            return f"died with its VM ({kernel.death.reason})"
        code = kernel.exit_code or 0
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def _console(self) -> str:
        return console_tail(self.sandbox.console_log) if self.sandbox is not None else ""

    def death_report(self) -> str:
        """Why the kernel is gone, for the server's log (empty while it runs)."""
        kernel = self.kernel
        if kernel is None or kernel.exit_code is None:
            return ""
        report = f"sandboxed kernel (sandbox {self.sandbox_id}) {self._exit_reason(kernel)}"
        if kernel.death is not None:
            report += "\n--- last lines of the guest console ---\n" + self._console()
        return report

    async def signal(self, signum: int) -> None:
        if self.kernel is not None:
            await self.kernel.signal(signum)

    async def wait(self) -> int:
        assert self.kernel is not None
        return await self.kernel.wait()

    async def _abandon_kernel(self) -> None:
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            await kernel.signal(signal.SIGKILL)
            with contextlib.suppress(SandboxError, TimeoutError):
                await asyncio.wait_for(kernel.wait(), 10)
        if self.sandbox is not None:
            with contextlib.suppress(SandboxError):
                await self.sandbox.unforward(self._guest_ports.values())
        self._guest_ports = {}

    async def end(self) -> None:
        """End the sandbox (its kernel with it); idempotent."""
        sandbox, self.sandbox = self.sandbox, None
        self._guest_ports = {}
        if sandbox is None:
            return
        with contextlib.suppress(SandboxError):
            await sandbox.stop(timeout=5)
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            with contextlib.suppress(SandboxError):
                await kernel.wait()
