"""Which accelerator QEMU should use: KVM when it can run our guest, else TCG.

Who calls it: sandbox creation (the QEMU driver's ``-accel``) and ``vmr doctor``.

What it promises: :func:`choose_accelerator` picks ``kvm`` only when ``/dev/kvm``
opens read-write, answers ``KVM_GET_API_VERSION`` with 12 and the CPU flags show
hardware virtualisation (``vmx`` or ``svm``). Hosts whose KVM is paravirtual
(``kvm_pvm``) pass the first two tests but cannot run an ordinary guest kernel,
which is why the flags are checked too. Otherwise it picks ``tcg`` and says why.
``VMRUNTIME_ACCEL=kvm|tcg`` overrides the choice (the reason then says whether
KVM looked usable). It never raises.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ENV_ACCEL = "VMRUNTIME_ACCEL"
KVM_DEVICE = Path("/dev/kvm")
CPUINFO = Path("/proc/cpuinfo")
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO=0xAE, 0x00)
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Accelerator:
    """The accelerator to use and why it was chosen."""

    name: Literal["kvm", "tcg"]
    reason: str


def choose_accelerator() -> Accelerator:
    """KVM if usable for an ordinary guest, else TCG; honours ``VMRUNTIME_ACCEL``."""
    usable, why = kvm_status()
    forced = os.environ.get(ENV_ACCEL, "").strip().lower()
    if forced == "kvm":
        state = "KVM looks usable" if usable else f"KVM looks unusable: {why}"
        return Accelerator("kvm", f"forced by {ENV_ACCEL}=kvm ({state})")
    if forced == "tcg":
        return Accelerator("tcg", f"forced by {ENV_ACCEL}=tcg")
    if usable:
        return Accelerator("kvm", why)
    return Accelerator("tcg", f"software emulation because {why}")


def kvm_status() -> tuple[bool, str]:
    """(usable, explanation) for hardware-accelerated KVM on this host."""
    if not KVM_DEVICE.exists():
        return False, f"{KVM_DEVICE} does not exist (no KVM module loaded, or not exposed)"
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{KVM_DEVICE} cannot be opened read-write ({exc.strerror})"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"KVM_GET_API_VERSION on {KVM_DEVICE} failed ({exc.strerror})"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"{KVM_DEVICE} reports KVM API version {version}, not {KVM_API_VERSION}"
    flags = cpu_flags()
    if not flags & {"vmx", "svm"}:
        return False, (
            f"{KVM_DEVICE} is present but the CPU shows neither vmx nor svm "
            "(paravirtual KVM such as kvm_pvm cannot run an ordinary guest kernel)"
        )
    return True, f"{KVM_DEVICE} is usable and the CPU has {'vmx' if 'vmx' in flags else 'svm'}"


def cpu_flags() -> set[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty if unreadable)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()
