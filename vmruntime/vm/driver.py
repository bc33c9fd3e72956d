"""The interface between a sandbox and the virtual machine monitor that runs it.

Who calls it: sandbox creation (:mod:`vmruntime.vm.builder`) builds a
:class:`MachineSpec`, attaches disks, console ports and vhost-user sockets to it, and
hands it to a :class:`VmmDriver`, which the caller passes in; stopping and the CLI
reach running VMs through :meth:`VmmDriver.adopt`. What a driver promises: ``boot``
starts the VM as a child in its own process group, holding ``pass_fds`` (and no
other descriptor of ours) for its whole life; ``kill`` ends it at once; and, unless
the VM was booted detached, the VM dies with the host process that booted it. QEMU is
the driver (:mod:`vmruntime.vm.qemu`); the tests have a fake one (``tests/fake_vmm.py``)
whose "VM" is the real agent on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from vmruntime.errors import MemorySnapshotError
from vmruntime.guest.assets import GuestAssets
from vmruntime.vm.state import process_alive

DISK_FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    readonly: bool
    # False: the VMM takes no lock of its own on the image (a read-only attach of a disk
    # that another VM writes; vmruntime's own attach locks decide who may write).
    locking: bool = True
    # How the VMM reads the file: "raw", or "qcow2" (a restored sandbox's writable layer,
    # an overlay whose backing file, a snapshot's layer, the VMM opens read-only).
    format: str = "raw"


@dataclass(frozen=True)
class ConsolePort:
    name: str
    socket: Path


@dataclass(frozen=True)
class VhostUserFs:
    socket: Path
    tag: str


@dataclass(frozen=True)
class MemoryImage:
    """A paused machine, saved: ``ram`` (the guest's RAM, byte for byte, a sparse file) and
    ``state`` (the VMM's device state, without the RAM). A resumed VM maps ``ram``
    private copy-on-write, so any number of VMs resume from one file."""

    ram: Path
    state: Path


@dataclass
class MachineSpec:
    """Everything a VMM needs to boot one sandbox's VM."""

    kernel: Path
    initramfs: Path
    cmdline: str
    cpus: int
    memory_mib: int
    accelerator: str
    console_log: Path
    control_socket: Path
    vmm_log: Path
    disks: list[Disk] = field(default_factory=list)
    console_ports: list[ConsolePort] = field(default_factory=list)
    vhost_user_fs: list[VhostUserFs] = field(default_factory=list)
    # Descriptors the VMM inherits and holds for its whole life (disk attach locks).
    pass_fds: list[int] = field(default_factory=list)

    def attach_disk(self, path: Path, *, serial: str, readonly: bool, locking: bool = True,
                    format: str = "raw") -> None:  # fmt: skip
        if len(serial) > 20:
            raise ValueError(f"virtio-blk serial {serial!r} is longer than 20 characters")
        if format not in DISK_FORMATS:
            raise ValueError(f"disk format {format!r}: want one of {DISK_FORMATS}")
        self.disks.append(Disk(path, serial, readonly, locking, format))

    def attach_console_port(self, name: str, socket: Path) -> None:
        self.console_ports.append(ConsolePort(name, socket))

    def attach_vhost_user_fs(self, socket: Path, tag: str) -> None:
        if not 0 < len(tag.encode()) <= 36:
            raise ValueError(f"virtio-fs tag {tag!r}: want 1 to 36 bytes")
        self.vhost_user_fs.append(VhostUserFs(socket, tag))

    def hold_fds(self, fds: list[int]) -> None:
        self.pass_fds.extend(fds)


class VmHandle(ABC):
    """A booted VM."""

    pid: int

    @abstractmethod
    def running(self) -> bool: ...

    @abstractmethod
    async def wait(self, timeout: float | None = None) -> int | None:
        """The VMM's exit status, or None if it still runs after ``timeout`` seconds."""

    @abstractmethod
    async def quit(self) -> None:
        """Ask the VMM itself to stop the VM now (no guest cooperation)."""

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL the VMM's process group and reap it (nothing if it has ended)."""

    async def pause(self) -> None:
        """Stop the guest's CPUs (its disks flushed) until :meth:`resume`."""
        raise MemorySnapshotError(f"{type(self).__name__} cannot pause a VM")

    async def resume(self) -> None:
        raise MemorySnapshotError(f"{type(self).__name__} cannot resume a VM")

    async def save_memory(self, image: MemoryImage) -> None:
        """While paused: write the guest's RAM and device state to ``image``'s files
        (which must not exist)."""
        raise MemorySnapshotError(f"{type(self).__name__} cannot save a VM's memory")


class ProcessVm(VmHandle):
    """A VM that is one process leading its own process group: one this process started
    (``process``), or one found running (adopted: pid plus start time, never a recycled
    pid). Drivers add :meth:`quit`."""

    def __init__(self, pid: int, process: subprocess.Popen[bytes] | None = None,
                 start_time: int | None = None) -> None:  # fmt: skip
        self.pid = pid
        self._process = process
        self._start_time = start_time

    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return process_alive(self.pid, self._start_time)

    async def wait(self, timeout: float | None = None) -> int | None:
        if not self.running():
            return self._exit_status()
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self._exit_status()
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
        return self._exit_status()

    def _exit_status(self) -> int:
        return self._process.wait() if self._process is not None else 0

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


class VmmDriver(ABC):
    """Boots machines and finds running ones. Passed in to sandbox creation."""

    name: str

    @abstractmethod
    def guest_assets(self, cache_root: Path) -> GuestAssets:
        """The kernel and initramfs this driver boots (made if missing; blocking)."""

    @abstractmethod
    async def boot(self, spec: MachineSpec, *, detached: bool = False) -> VmHandle: ...

    @abstractmethod
    def adopt(self, pid: int, start_time: int | None, control_socket: Path) -> VmHandle:
        """A handle on a VM of this driver started by another (possibly gone) process."""

    async def resume_from(self, spec: MachineSpec, image: MemoryImage, *,
                          detached: bool = False) -> VmHandle:  # fmt: skip
        """Start ``spec``'s machine where ``image`` left it (the devices must be those
        of the machine that was saved), running; as :meth:`boot` otherwise."""
        raise MemorySnapshotError(f"the {self.name} driver cannot resume memory snapshots")
