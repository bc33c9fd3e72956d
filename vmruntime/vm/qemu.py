"""QEMU as the VMM: ``-M microvm`` with non-legacy virtio-mmio and shared memfd memory.

Who calls it: :mod:`vmruntime.vm.sandbox`, through :class:`vmruntime.vm.driver.VmmDriver`.
What it promises: the command line docs/sandboxes.md describes (TCG here, KVM where
the CPU allows it); QEMU runs in its own process group with stdin closed and its
own messages in ``vmm_log``; a non-detached QEMU gets SIGKILL from the kernel
when the host process dies (``PR_SET_PDEATHSIG``, set on the starter thread of
:func:`vmruntime._child.start_child`), so a crashed host process leaves no VM
behind; control goes over QMP with the ``qemu.qmp`` library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from vmruntime._blocking import in_thread
from vmruntime._child import die_with_parent, log_tail, start_child
from vmruntime.errors import MemorySnapshotError, VmmError, VmruntimeError
from vmruntime.guest.assets import GuestAssets, ensure_guest_assets
from vmruntime.rootfs.writable import sparse_copy
from vmruntime.vm.driver import MachineSpec, MemoryImage, ProcessVm, VmHandle, VmmDriver

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

QEMU_BINARY = "qemu-system-x86_64"
# TCG's translated-code cache in MiB (``-accel tcg,tb-size=N``; None: QEMU 7.2's
# default, up to 1 GiB). The cache only grows, and when full it is emptied and all
# code translated again. Measured with ``bench/boot.py --tb-sizes`` (docs/sandboxes.md,
# "The VM"): a boot fills ~46 MB, boot + python3 -c print ~70 MB, boot + import numpy
# ~90 MB. 64 MiB flushes in python's start (~+6% on it), 32 MiB in the boot (~+5% on
# it, +8% on python), 16 MiB and less again and again (+15% to +300%). 96 MiB flushes
# in none of them, so it costs nothing, and it caps what a busy sandbox's cache holds
# (QEMU's default lets it grow to 1 GiB). A size small enough to save idle memory
# must flush during the boot. Not used under KVM, which translates nothing.
TCG_TB_SIZE_MIB: int | None = 96


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        hint = "run scripts/setup.sh (apt-get install qemu-system-x86)"
        raise VmmError(f"{QEMU_BINARY} not found; {hint}")
    return path


def qemu_argv(spec: MachineSpec, *, tb_size_mib: int | None = TCG_TB_SIZE_MIB,
              resume_ram: Path | None = None) -> list[str]:  # fmt: skip
    """The full QEMU command line for ``spec``; ``tb_size_mib`` applies under TCG only.

    With ``resume_ram`` (a saved machine's RAM file) the guest's RAM is that file mapped
    private copy-on-write, and QEMU waits for its device state (``-incoming defer``).
    """
    accel = spec.accelerator
    argv = [
        qemu_binary(),
        "-M", "microvm,memory-backend=mem",
        "-accel", _accel_option(accel, tb_size_mib),
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-object", _memory_backend(spec.memory_mib, resume_ram),
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
        drive = f"id=disk{index},file={_escape(str(disk.path))},format={disk.format},if=none"
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
    if resume_ram is not None:
        argv += ["-incoming", "defer"]
    return argv


def _memory_backend(memory_mib: int, resume_ram: Path | None) -> str:
    # A booted guest's RAM is a shared memfd: shared, so that vhost-user backends can
    # map it, and so that saving the machine (x-ignore-shared) leaves the RAM out of the
    # migration stream; it is copied from the memfd instead (QemuVm.save_memory).
    if resume_ram is None:
        return f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"
    path = _escape(str(resume_ram))
    return f"memory-backend-file,id=mem,size={memory_mib}M,mem-path={path},share=off"


def _accel_option(accel: str, tb_size_mib: int | None) -> str:
    """``-accel``'s value. QEMU refuses ``-accel`` next to ``-M ...,accel=``, and KVM
    has no ``tb-size`` property, so the size goes on a TCG ``-accel`` only."""
    if accel != "tcg" or tb_size_mib is None:
        return accel
    return f"tcg,tb-size={tb_size_mib}"


def _escape(value: str) -> str:
    """A value inside a QEMU option list, where a comma must be doubled."""
    return value.replace(",", ",,")


class QemuVm(ProcessVm):
    """A QEMU this process started, or one found running (adopted)."""

    def __init__(self, pid: int, control_socket: Path,
                 process: subprocess.Popen[bytes] | None = None,
                 start_time: int | None = None, memory_mib: int = 0) -> None:  # fmt: skip
        super().__init__(pid, process, start_time)
        self._control_socket = control_socket
        self._memory_mib = memory_mib

    async def quit(self) -> None:
        try:
            async with self._qmp() as client:
                with contextlib.suppress(Exception):  # QEMU may close before replying
                    await asyncio.wait_for(client.execute("quit"), 5)
        except VmmError as exc:
            raise VmmError(f"QMP quit failed: {exc.reason}") from exc

    async def pause(self) -> None:
        await self._command("stop")

    async def resume(self) -> None:
        await self._command("cont")

    async def save_memory(self, image: MemoryImage) -> None:
        ram = self._ram_memfd()  # before the migration: refuse early what cannot work
        async with self._qmp() as client:
            await _execute(client, "migrate-set-capabilities", capabilities=_IGNORE_SHARED)
            command = f"exec:cat > {shlex.quote(str(image.state))}"
            await _execute(client, "migrate", uri=command)
            await _wait_for_migration(client)
        await in_thread(_copy_ram, ram, image.ram)

    def _ram_memfd(self) -> Path:
        """The guest's RAM as a path this process can open: QEMU's memfd."""
        fds = Path(f"/proc/{self.pid}/fd")
        try:
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(_MEMFD_NAME):
                        return fd
        except OSError as exc:
            raise MemorySnapshotError(f"cannot look into QEMU {self.pid}: {exc}") from exc
        raise MemorySnapshotError(
            f"QEMU {self.pid} has no shared RAM to save: a VM resumed from a memory snapshot "
            "maps its RAM privately and cannot be memory-snapshotted again (take a disk "
            "snapshot of it, or a memory snapshot of a freshly booted sandbox)"
        )

    async def _command(self, command: str) -> None:
        async with self._qmp() as client:
            await _execute(client, command)

    @contextlib.asynccontextmanager
    async def _qmp(self) -> AsyncIterator[QMPClient]:
        from qemu.qmp import QMPClient

        client = QMPClient(f"vmruntime-{self.pid}")
        try:
            await asyncio.wait_for(client.connect(str(self._control_socket)), 5)
        except Exception as exc:  # qemu.qmp's errors share no base with OSError
            with contextlib.suppress(Exception):
                await client.disconnect()
            raise VmmError(f"cannot reach QEMU's control socket: {exc}") from exc
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


_MEMFD_NAME = "/memfd:memory-backend-memfd"
_IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
_MIGRATION_TIMEOUT = 60.0


async def _execute(client: QMPClient, command: str, **arguments: object) -> dict[str, object]:
    try:
        reply = await asyncio.wait_for(client.execute(command, arguments or None), 30)
    except Exception as exc:  # ExecuteError carries QEMU's own reason
        raise MemorySnapshotError(f"QEMU refused {command}: {exc}") from exc
    return reply if isinstance(reply, dict) else {}


async def _wait_for_migration(client: QMPClient) -> None:
    """Until QEMU has written (or read) the device state; its error if it failed."""
    deadline = time.monotonic() + _MIGRATION_TIMEOUT
    while time.monotonic() < deadline:
        status = await _execute(client, "query-migrate")
        if status.get("status") == "completed":
            return
        if status.get("status") in ("failed", "cancelled"):
            raise MemorySnapshotError(f"QEMU's migration failed: {status.get('error-desc', '?')}")
        await asyncio.sleep(0.002)
    raise MemorySnapshotError(f"QEMU's migration did not end within {_MIGRATION_TIMEOUT:g} s")


async def _wait_until_paused(client: QMPClient) -> None:
    """An incoming migration has loaded the device state (or failed)."""
    deadline = time.monotonic() + _MIGRATION_TIMEOUT
    while time.monotonic() < deadline:
        status = await _execute(client, "query-status")
        if status.get("status") in ("paused", "postmigrate"):
            return
        migration = await _execute(client, "query-migrate")
        if migration.get("status") in ("failed", "cancelled"):
            reason = migration.get("error-desc", "?")
            raise MemorySnapshotError(f"QEMU could not load the saved device state: {reason}")
        await asyncio.sleep(0.002)
    raise MemorySnapshotError(f"QEMU did not load the device state within {_MIGRATION_TIMEOUT:g} s")


def _copy_ram(source: Path, dest: Path) -> None:
    """A sparse copy (zero pages become holes), 0600: it holds everything the guest held."""
    descriptor = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(descriptor)
    try:
        sparse_copy(source, dest)
    except VmruntimeError as exc:
        raise MemorySnapshotError(f"copying the guest's RAM: {exc}") from exc


class QemuDriver(VmmDriver):
    """Boots with ``qemu_argv``; ``tb_size_mib`` is TCG's translation cache (None:
    QEMU's default); ``bench/boot.py --tb-sizes`` passes its own to compare sizes."""

    name = "qemu"

    def __init__(self, *, tb_size_mib: int | None = TCG_TB_SIZE_MIB) -> None:
        if tb_size_mib is not None and tb_size_mib < 1:  # QEMU reads 0 as its default
            raise ValueError(f"TCG translation cache of {tb_size_mib} MiB: want at least 1")
        self.tb_size_mib = tb_size_mib

    def guest_assets(self, cache_root: Path) -> GuestAssets:
        return ensure_guest_assets(cache_root)

    async def boot(self, spec: MachineSpec, *, detached: bool = False) -> VmHandle:
        return await self._start(qemu_argv(spec, tb_size_mib=self.tb_size_mib), spec, detached)

    async def resume_from(self, spec: MachineSpec, image: MemoryImage, *,
                          detached: bool = False) -> VmHandle:  # fmt: skip
        argv = qemu_argv(spec, tb_size_mib=self.tb_size_mib, resume_ram=image.ram)
        vm = await self._start(argv, spec, detached)
        try:
            await _load_state(vm, spec, image)
        except BaseException:
            vm.kill()
            raise
        return vm

    async def _start(self, argv: list[str], spec: MachineSpec, detached: bool) -> QemuVm:
        parent = os.getpid()

        def start() -> subprocess.Popen[bytes]:
            with open(spec.vmm_log, "ab") as log:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    pass_fds=spec.pass_fds,
                    preexec_fn=None if detached else lambda: die_with_parent(parent),
                )

        try:
            process = await in_thread(start_child, start, discard=_kill_started)
        except OSError as exc:
            raise VmmError(f"cannot start QEMU: {exc}", argv) from exc
        return QemuVm(process.pid, spec.control_socket, process, memory_mib=spec.memory_mib)

    def adopt(self, pid: int, start_time: int | None, control_socket: Path) -> VmHandle:
        return QemuVm(pid, control_socket, start_time=start_time)


async def _load_state(vm: QemuVm, spec: MachineSpec, image: MemoryImage) -> None:
    """Feed a started ``-incoming defer`` QEMU its device state, then run it."""
    deadline = time.monotonic() + 10
    while not spec.control_socket.exists():  # QEMU creates it as it starts
        if not vm.running() or time.monotonic() > deadline:
            raise MemorySnapshotError(f"QEMU exited before it listened: {_log_tail(spec)}")
        await asyncio.sleep(0.002)
    async with vm._qmp() as client:
        await _execute(client, "migrate-set-capabilities", capabilities=_IGNORE_SHARED)
        await _execute(client, "migrate-incoming", uri=f"exec:cat {shlex.quote(str(image.state))}")
        try:
            await _wait_until_paused(client)
        except MemorySnapshotError as exc:
            raise MemorySnapshotError(f"{exc.reason}; QEMU said: {_log_tail(spec)}") from None
        await _execute(client, "cont")


def _log_tail(spec: MachineSpec) -> str:
    return log_tail(spec.vmm_log, 5) or "(nothing)"


def _kill_started(process: subprocess.Popen[bytes]) -> None:
    """A QEMU started for a creation that was cancelled meanwhile."""
    QemuVm(process.pid, Path(), process).kill()
