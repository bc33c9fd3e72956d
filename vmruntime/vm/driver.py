"""The interface between a sandbox and the virtual machine monitor that runs it.

Who calls it: :mod:`vmruntime.vm.sandbox` builds a :class:`MachineSpec`, attaches
disks, console ports and vhost-user sockets to it, and hands it to a
:class:`VmmDriver`. What a driver promises: ``boot`` starts the VM as a child in
its own process group, holding ``pass_fds`` (and no other descriptor of ours) for
its whole life; ``kill`` ends it at once; and, unless the VM was booted detached,
the VM dies with the host process that booted it. QEMU is the only
driver today (:mod:`vmruntime.vm.qemu`); another VMM goes beside it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    readonly: bool
    # False: the VMM takes no lock of its own on the image (a read-only attach of a disk
    # that another VM writes; vmruntime's own attach locks decide who may write).
    locking: bool = True


@dataclass(frozen=True)
class ConsolePort:
    name: str
    socket: Path


@dataclass(frozen=True)
class VhostUserFs:
    socket: Path
    tag: str


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

    def attach_disk(self, path: Path, *, serial: str, readonly: bool, locking: bool = True) -> None:
        if len(serial) > 20:
            raise ValueError(f"virtio-blk serial {serial!r} is longer than 20 characters")
        self.disks.append(Disk(path, serial, readonly, locking))

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
        """SIGKILL the VMM's process group and reap it."""


class VmmDriver(ABC):
    name: str

    @abstractmethod
    async def boot(self, spec: MachineSpec, *, detached: bool = False) -> VmHandle: ...
