"""QEMU as the VMM: ``-M microvm`` with non-legacy virtio-mmio and shared memfd memory.

Who calls it: :mod:`vmruntime.vm.sandbox`, through :class:`vmruntime.vm.driver.VmmDriver`.
What it promises: the command line docs/sandboxes.md describes (TCG here, KVM where
the CPU allows it); QEMU runs in its own process group with stdin closed and its
own messages in ``vmm_log``; a non-detached QEMU gets SIGKILL from the kernel
when the thread that booted it dies (``PR_SET_PDEATHSIG``), so a crashed host
process leaves no VM behind; control goes over QMP with the ``qemu.qmp`` library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from vmruntime._child import die_with_parent
from vmruntime.errors import VmmError
from vmruntime.vm.driver import MachineSpec, VmHandle, VmmDriver
from vmruntime.vm.state import process_alive

QEMU_BINARY = "qemu-system-x86_64"


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        hint = "run scripts/setup.sh (apt-get install qemu-system-x86)"
        raise VmmError(f"{QEMU_BINARY} not found; {hint}")
    return path


def qemu_argv(spec: MachineSpec) -> list[str]:
    """The full QEMU command line for ``spec``."""
    accel = spec.accelerator
    argv = [
        qemu_binary(),
        "-M", f"microvm,accel={accel},memory-backend=mem",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on",
        # Legacy virtio-mmio hides VERSION_1, which vhost-user-fs needs.
        "-global", "virtio-mmio.force-legacy=false",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initramfs),
        "-append", spec.cmdline,
        "-chardev", f"file,id=console,path={spec.console_log}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={spec.control_socket},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    for index, disk in enumerate(spec.disks):
        drive = f"id=disk{index},file={_escape(str(disk.path))},format=raw,if=none"
        drive += ",readonly=on" if disk.readonly else ",discard=unmap,detect-zeroes=unmap"
        if not disk.locking:
            drive += ",file.locking=off"
        argv += ["-drive", drive]
        argv += ["-device", f"virtio-blk-device,drive=disk{index},serial={disk.serial}"]
    if spec.console_ports:
        argv += ["-device", "virtio-serial-device"]
    for index, port in enumerate(spec.console_ports):
        argv += ["-chardev", f"socket,id=port{index},path={port.socket},server=on,wait=off"]
        argv += ["-device", f"virtserialport,chardev=port{index},name={port.name}"]
    for index, share in enumerate(spec.vhost_user_fs):
        argv += ["-chardev", f"socket,id=fs{index},path={_escape(str(share.socket))}"]
        argv += ["-device", f"vhost-user-fs-device,chardev=fs{index},tag={share.tag}"]
    return argv


def _escape(value: str) -> str:
    """A value inside a QEMU option list, where a comma must be doubled."""
    return value.replace(",", ",,")


class QemuVm(VmHandle):
    """A QEMU this process started (``process``) or found running (adopted, no ``process``)."""

    def __init__(self, pid: int, control_socket: Path,
                 process: subprocess.Popen[bytes] | None = None,
                 start_time: int | None = None) -> None:  # fmt: skip
        self.pid = pid
        self._control_socket = control_socket
        self._process = process
        self._start_time = start_time

    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return process_alive(self.pid, self._start_time)

    async def wait(self, timeout: float | None = None) -> int | None:
        if not self.running():
            return self._process.wait() if self._process is not None else 0
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self._process.wait() if self._process is not None else 0
        try:
            loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
            try:
                await asyncio.wait_for(exited, timeout)
            except TimeoutError:
                return None
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        return self._process.wait() if self._process is not None else 0

    async def quit(self) -> None:
        from qemu.qmp import QMPClient

        client = QMPClient(f"vmruntime-{self.pid}")
        try:
            await asyncio.wait_for(client.connect(str(self._control_socket)), 5)
            with contextlib.suppress(Exception):  # QEMU may close the socket before replying
                await asyncio.wait_for(client.execute("quit"), 5)
        except Exception as exc:  # qemu.qmp's errors share no base with OSError
            raise VmmError(f"QMP quit failed: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    def kill(self) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait()
            return
        # Not our child, so it cannot be reaped here: wait (briefly) until it is gone.
        deadline = time.monotonic() + 2
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.02)


def adopt_vm(pid: int, start_time: int | None, control_socket: Path) -> VmHandle:
    """A handle on a QEMU started by another (possibly gone) process."""
    return QemuVm(pid, control_socket, start_time=start_time)


class QemuDriver(VmmDriver):
    name = "qemu"

    async def boot(self, spec: MachineSpec, *, detached: bool = False) -> VmHandle:
        argv = qemu_argv(spec)
        parent = os.getpid()
        with open(spec.vmm_log, "ab") as log:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    pass_fds=spec.pass_fds,
                    preexec_fn=None if detached else lambda: die_with_parent(parent),
                )
            except OSError as exc:
                raise VmmError(f"cannot start QEMU: {exc}", argv) from exc
        return QemuVm(process.pid, spec.control_socket, process)
