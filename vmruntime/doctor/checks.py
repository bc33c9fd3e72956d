"""The checks behind ``vmr doctor``.

Who calls it: :mod:`vmruntime.doctor.commands` and people debugging a host.

What it promises: :func:`run_checks` inspects the host without changing it (no
downloads, no builds, no directories created) and returns one :class:`Check`
per requirement; each failing check carries a concrete fix. A check with
``required=False`` is advice (for example KVM, without which VMs still run under
TCG, only slower). :func:`format_report` renders them for a terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from vmruntime._paths import cache_root, runtime_root
from vmruntime.errors import GuestAssetError
from vmruntime.vm.accel import KVM_DEVICE, choose_accelerator, kvm_status

QEMU = "qemu-system-x86_64"
MIN_QEMU = (7, 2)
SETUP = "run scripts/setup.sh"
_TIMEOUT = 30


@dataclass
class Check:
    """One requirement: whether it holds, what was seen, how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def run_checks() -> list[Check]:
    """Every check, in the order a person would fix them."""
    checks: list[Check] = []
    for probe in _PROBES:
        try:
            checks.append(probe())
        except Exception as exc:  # one broken probe must not hide the others
            name = probe.__name__.removeprefix("_check_").replace("_", " ")
            checks.append(Check(name, False, f"the check itself failed: {exc!r}", SETUP))
    return checks


def format_report(checks: list[Check]) -> str:
    """One line per check, fixes indented below failures, and a verdict."""
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"[{mark}] {c.name}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"       fix: {c.fix}")
    failed = [c.name for c in checks if c.required and not c.ok]
    warned = [c.name for c in checks if not c.required and not c.ok]
    if failed:
        lines.append(f"{len(failed)} problem(s): {', '.join(failed)}")
    elif warned:
        lines.append(f"ready; advice above for: {', '.join(warned)}")
    else:
        lines.append("all good")
    return "\n".join(lines) + "\n"


# --- the checks ---------------------------------------------------------------


def _check_qemu() -> Check:
    name, fix = "qemu", "apt-get install qemu-system-x86 (Debian 12 or newer: QEMU >= 7.2)"
    binary = shutil.which(QEMU)
    if binary is None:
        return Check(name, False, f"{QEMU} is not on PATH", fix)
    version_text = _output([binary, "--version"])
    match = re.search(r"version (\d+)\.(\d+)", version_text)
    if match is None:
        return Check(name, False, f"cannot read the version of {binary}", fix)
    version = (int(match.group(1)), int(match.group(2)))
    if version < MIN_QEMU:
        return Check(name, False, f"{binary} is {version[0]}.{version[1]}, need >= 7.2", fix)
    missing = []
    if not re.search(r"^microvm\b", _output([binary, "-machine", "help"]), re.M):
        missing.append("machine microvm")
    if '"vhost-user-fs-device"' not in _output([binary, "-device", "help"]):
        missing.append("device vhost-user-fs-device")
    if missing:
        return Check(name, False, f"{binary} lacks {', '.join(missing)}", fix)
    return Check(name, True, f"{binary} {version[0]}.{version[1]} with microvm, vhost-user-fs")


def _check_accelerator() -> Check:
    accel = choose_accelerator()
    return Check("accelerator", True, f"{accel.name}: {accel.reason}")


def _check_kvm() -> Check:
    usable, why = kvm_status()
    fix = (
        "optional: VMs run under TCG (much slower); for KVM use a host whose CPU shows "
        f"vmx/svm, load kvm_intel or kvm_amd, and give this user read-write {KVM_DEVICE} "
        "(group kvm)"
    )
    return Check("kvm", usable, why, fix, required=False)


def _check_gcc() -> Check:
    return _tool_check("gcc", ["gcc"], "apt-get install gcc libc6-dev", "build the guest agent")


def _check_busybox_static() -> Check:
    from vmruntime.guest.initramfs import HOST_BUSYBOX, require_static_elf

    fix = "apt-get install busybox-static"
    if not HOST_BUSYBOX.is_file():
        return Check("busybox-static", False, f"{HOST_BUSYBOX} is missing", fix)
    try:
        require_static_elf(HOST_BUSYBOX, "busybox", fix)
    except GuestAssetError as exc:
        return Check("busybox-static", False, exc.reason, fix)
    return Check("busybox-static", True, f"{HOST_BUSYBOX} is statically linked")


def _check_mkfs_ext4() -> Check:
    return _tool_check(
        "mkfs.ext4", ["mkfs.ext4", "debugfs"], "apt-get install e2fsprogs", "make writable layers"
    )


def _check_kernel_tools() -> Check:
    return _tool_check(
        "apt-get/dpkg-deb",
        ["apt-get", "dpkg-deb"],
        "run on Debian or Ubuntu (apt and dpkg fetch the guest kernel)",
        "download the guest kernel",
    )


def _check_guest_kernel() -> Check:
    from vmruntime.guest.kernel import cached_kernel

    kernel = cached_kernel(cache_root())
    if kernel is None:
        return Check("guest kernel", False, "not downloaded yet", f"{SETUP} with network access")
    size = kernel.vmlinuz.stat().st_size
    return Check("guest kernel", True, f"{kernel.release} ({size >> 20} MiB) at {kernel.vmlinuz}")


def _check_agent() -> Check:
    from vmruntime.guest.build import AGENT_BINARY_NAME, agent_hash

    fix = f"{SETUP} (or python -m vmruntime.guest prepare)"
    try:
        path = cache_root() / "guest" / "agent" / agent_hash()[:16] / AGENT_BINARY_NAME
    except GuestAssetError as exc:
        return Check("guest agent", False, exc.reason, "apt-get install gcc libc6-dev")
    if not path.is_file():
        return Check("guest agent", False, "not built for the current sources", fix)
    return Check("guest agent", True, str(path))


def _check_cache_dir() -> Check:
    root = cache_root()
    fix = f"make {root} writable, or set VMRUNTIME_CACHE to a writable directory"
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != root:
        ok = os.access(existing, os.W_OK | os.X_OK)
        detail = f"{root} does not exist yet; {existing} is {'' if ok else 'not '}writable"
        return Check("cache dir", ok, detail, fix)
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        return Check("cache dir", False, f"cannot write in {root}: {exc.strerror}", fix)
    return Check("cache dir", True, f"{root} is writable")


def _check_runtime_dir() -> Check:
    path = runtime_root()
    fix = f"rm -rf {path} (it is recreated, mode 0700), or set XDG_RUNTIME_DIR"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return Check("runtime dir", True, f"{path} will be created (mode 0700)")
    if not stat.S_ISDIR(info.st_mode):
        return Check("runtime dir", False, f"{path} exists but is not a directory", fix)
    if info.st_uid != os.getuid():
        detail = f"{path} belongs to uid {info.st_uid}, not {os.getuid()}"
        return Check("runtime dir", False, detail, fix)
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        return Check("runtime dir", False, f"{path} has mode {mode:o}, not 700", fix)
    return Check("runtime dir", True, f"{path} is ours, mode 700")


def _check_fuse() -> Check:
    fix = "modprobe fuse, and give this user read-write /dev/fuse (only the broker's tests need it)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Check("/dev/fuse", False, f"cannot open: {exc.strerror}", fix, required=False)
    os.close(fd)
    return Check("/dev/fuse", True, "opens read-write", required=False)


def _check_memfd() -> Check:
    fix = "use a Linux kernel >= 3.17 (QEMU's shared guest memory for virtio-fs needs memfd)"
    try:
        fd = os.memfd_create("vmr-doctor", os.MFD_CLOEXEC)
    except (OSError, AttributeError) as exc:
        return Check("memfd", False, f"memfd_create failed: {exc}", fix)
    os.close(fd)
    return Check("memfd", True, "memfd_create works")


def _tool_check(name: str, tools: list[str], fix: str, purpose: str) -> Check:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return Check(name, False, f"{', '.join(missing)} not on PATH (needed to {purpose})", fix)
    return Check(name, True, ", ".join(str(shutil.which(t)) for t in tools))


def _output(argv: list[str]) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr


_PROBES: tuple[Callable[[], Check], ...] = (
    _check_qemu,
    _check_accelerator,
    _check_kvm,
    _check_gcc,
    _check_busybox_static,
    _check_mkfs_ext4,
    _check_kernel_tools,
    _check_guest_kernel,
    _check_agent,
    _check_cache_dir,
    _check_runtime_dir,
    _check_fuse,
    _check_memfd,
)
