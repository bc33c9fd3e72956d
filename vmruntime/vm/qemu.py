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
import shutil
import subprocess
from pathlib import Path

from vmruntime._blocking import in_thread
from vmruntime._child import die_with_parent, start_child
from vmruntime.errors import VmmError
from vmruntime.guest.assets import GuestAssets, ensure_guest_assets
from vmruntime.vm.driver import MachineSpec, ProcessVm, VmHandle, VmmDriver

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


def qemu_argv(spec: MachineSpec, *, tb_size_mib: int | None = TCG_TB_SIZE_MIB) -> list[str]:
    """The full QEMU command line for ``spec``; ``tb_size_mib`` applies under TCG only."""
    accel = spec.accelerator
    argv = [
        qemu_binary(),
        "-M", "microvm,memory-backend=mem",
        "-accel", _accel_option(accel, tb_size_mib),
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
    return argv


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
                 start_time: int | None = None) -> None:  # fmt: skip
        super().__init__(pid, process, start_time)
        self._control_socket = control_socket

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
        argv = qemu_argv(spec, tb_size_mib=self.tb_size_mib)
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
        return QemuVm(process.pid, spec.control_socket, process)

    def adopt(self, pid: int, start_time: int | None, control_socket: Path) -> VmHandle:
        return QemuVm(pid, control_socket, start_time=start_time)


def _kill_started(process: subprocess.Popen[bytes]) -> None:
    """A QEMU started for a creation that was cancelled meanwhile."""
    QemuVm(process.pid, Path(), process).kill()
