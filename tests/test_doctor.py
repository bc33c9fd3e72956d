"""vmr doctor: every check reports, and a failing one says how to fix it.

The fast tests do not depend on what this machine has: a healthy machine is built
from stubs (a PATH of shell scripts answering as the tools do, a cache holding a
kernel and an agent, a static ELF as busybox, a working memfd) and each broken case
takes one piece away. KVM and /dev/fuse are read from the real machine, so only
their being advice (never a failure) is asserted. The slow test runs the doctor on
the real machine after scripts/setup.sh.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import USER_CACHE

import vmruntime.doctor.checks as doctor
from vmruntime.cli import main
from vmruntime.doctor import Check, format_report, run_checks
from vmruntime.guest.build import AGENT_BINARY_NAME, agent_hash

NAMES = (
    "qemu", "accelerator", "kvm", "gcc", "busybox-static", "mkfs.ext4", "apt-get/dpkg-deb",
    "guest kernel", "guest agent", "cache dir", "runtime dir", "/dev/fuse", "memfd",
)  # fmt: skip
MACHINE_ADVICE = {"kvm", "/dev/fuse"}  # read from the real machine; never required
QEMU_VERSION = "QEMU emulator version 7.2.0 (stub)"
QEMU_MACHINES = "Supported machines are:\nmicrovm              microvm (i386)\n"
QEMU_DEVICES = 'name "vhost-user-fs-device", bus virtio-bus\n'
PLAIN_TOOLS = ("gcc", "mkfs.ext4", "debugfs", "apt-get", "dpkg-deb")
PT_LOAD, PT_INTERP = 1, 3


def write_tool(bin_dir: Path, name: str, body: str = "exit 0\n") -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}")
    path.chmod(0o755)


def write_qemu(bin_dir: Path, version: str = QEMU_VERSION, machines: str = QEMU_MACHINES) -> None:
    """A qemu-system-x86_64 that prints what doctor parses: version, machines, devices."""
    write_tool(bin_dir, doctor.QEMU, (
        'case "$1" in\n'
        f"  --version) printf '%s\\n' '{version}' ;;\n"
        f"  -machine) printf '%s' '{machines}' ;;\n"
        f"  -device) printf '%s' '{QEMU_DEVICES}' ;;\n"
        "esac\n"
    ))  # fmt: skip


def write_elf(path: Path, *, dynamic: bool = False) -> Path:
    """An ELF64 header and program headers: all that the static-binary check reads."""
    kinds = [PT_INTERP, PT_LOAD] if dynamic else [PT_LOAD]
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, len(kinds), 0, 0, 0)
    table = b"".join(struct.pack("<IIQQQQQQ", kind, 4, 0, 0, 0, 0, 0, 8) for kind in kinds)
    path.write_bytes(ident + header + table)
    return path


def fake_memfd(name: str, flags: int = 0) -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


@dataclass(frozen=True)
class Machine:
    root: Path
    bin: Path  # the whole PATH
    patch: pytest.MonkeyPatch

    @property
    def kernel(self) -> Path:
        return self.root / "cache" / "guest" / "kernel" / "6.1.0-1-cloud-amd64"

    @property
    def busybox(self) -> Path:
        return self.root / "busybox"


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Machine:
    """A healthy machine from stubs (tools, cache, busybox, memfd, accelerator choice)."""
    machine = Machine(tmp_path, tmp_path / "bin", monkeypatch)
    machine.bin.mkdir()
    write_qemu(machine.bin)
    for tool in PLAIN_TOOLS:
        write_tool(machine.bin, tool)
    (machine.kernel / "modules").mkdir(parents=True)
    (machine.kernel / "vmlinuz").write_bytes(b"stub kernel")
    agent = tmp_path / "cache" / "guest" / "agent" / agent_hash()[:16] / AGENT_BINARY_NAME
    agent.parent.mkdir(parents=True)
    write_elf(agent)
    monkeypatch.setenv("PATH", str(machine.bin))
    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("VMRUNTIME_ACCEL", "tcg")
    monkeypatch.setattr("vmruntime.guest.initramfs.HOST_BUSYBOX", write_elf(machine.busybox))
    monkeypatch.setattr(os, "memfd_create", fake_memfd)
    return machine


def failures(checks: list[Check]) -> set[str]:
    return {c.name for c in checks if not c.ok and c.required}


def test_report_names_every_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "cache"))
    checks = run_checks()
    assert [c.name for c in checks] == list(NAMES)
    report = format_report(checks)
    for name in NAMES:
        assert f"] {name}: " in report
    by_name = {c.name: c for c in checks}
    assert by_name["guest kernel"].ok is False  # an empty cache: nothing downloaded
    assert "scripts/setup.sh" in by_name["guest kernel"].fix
    assert by_name["accelerator"].ok  # TCG always works: the choice is reported, never failed
    for name in MACHINE_ADVICE:  # whatever this machine has, these only advise
        assert by_name[name].ok or not by_name[name].required
    assert not by_name["kvm"].required


def test_report_verdicts() -> None:
    good = [Check("qemu", True, "fine"), Check("kvm", True, "fine", required=False)]
    assert format_report(good).splitlines()[-1] == "all good"
    advice = [good[0], Check("kvm", False, "absent", "load kvm", required=False)]
    assert format_report(advice).splitlines()[-2:] == [
        "       fix: load kvm", "ready; advice above for: kvm"]  # fmt: skip
    failed = [Check("qemu", False, "absent", "install it"), Check("gcc", False, "absent")]
    assert format_report([*failed, advice[1]]).splitlines() == [
        "[FAIL] qemu: absent", "       fix: install it", "[FAIL] gcc: absent",
        "[warn] kvm: absent", "       fix: load kvm", "2 problem(s): qemu, gcc",
    ]  # fmt: skip


def test_a_healthy_machine_passes_every_required_check(machine: Machine) -> None:
    checks = run_checks()
    assert failures(checks) == set(), format_report(checks)
    by_name = {c.name: c for c in checks}
    assert by_name["qemu"].detail == f"{machine.bin}/{doctor.QEMU} 7.2 with microvm, vhost-user-fs"
    assert by_name["accelerator"].detail.startswith("tcg: forced by VMRUNTIME_ACCEL=tcg")
    assert by_name["gcc"].detail == f"{machine.bin}/gcc"


def test_vmr_doctor_on_a_healthy_machine(machine: Machine, capsys: pytest.CaptureFixture) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out
    assert_verdict(out)


def assert_verdict(report: str) -> None:
    """No failure; advice only about what is read from the machine, and named at the end."""
    lines = report.rstrip("\n").splitlines()
    advice = [line.removeprefix("[warn] ").split(": ")[0] for line in lines
              if line.startswith("[warn] ")]  # fmt: skip
    assert set(advice) <= MACHINE_ADVICE, report
    assert lines[-1] == (f"ready; advice above for: {', '.join(advice)}" if advice
                         else "all good")  # fmt: skip


def remove(name: str) -> Callable[[Machine], None]:
    return lambda machine: (machine.bin / name).unlink()


def old_qemu(machine: Machine) -> None:
    write_qemu(machine.bin, version="QEMU emulator version 7.1.0")


def qemu_without_microvm(machine: Machine) -> None:
    write_qemu(machine.bin, machines="Supported machines are:\npc   Standard PC\n")


def no_kernel(machine: Machine) -> None:
    (machine.kernel / "vmlinuz").unlink()


def no_agent(machine: Machine) -> None:
    for agent in (machine.root / "cache" / "guest" / "agent").glob(f"*/{AGENT_BINARY_NAME}"):
        agent.unlink()


def dynamic_busybox(machine: Machine) -> None:
    write_elf(machine.busybox, dynamic=True)


def no_busybox(machine: Machine) -> None:
    machine.busybox.unlink()


def shared_runtime_dir(machine: Machine) -> None:
    runtime = machine.root / "run" / "vmruntime"
    runtime.mkdir(parents=True)
    runtime.chmod(0o755)


def no_memfd(machine: Machine) -> None:
    def failing(name: str, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    machine.patch.setattr(os, "memfd_create", failing)


BROKEN = {
    "no qemu": (remove(doctor.QEMU), "qemu", "apt-get install qemu-system-x86"),
    "qemu 7.1": (old_qemu, "qemu", "apt-get install qemu-system-x86"),
    "qemu without microvm": (qemu_without_microvm, "qemu", "apt-get install qemu-system-x86"),
    "no gcc": (remove("gcc"), "gcc", "apt-get install gcc"),
    "no debugfs": (remove("debugfs"), "mkfs.ext4", "apt-get install e2fsprogs"),
    "no mkfs.ext4": (remove("mkfs.ext4"), "mkfs.ext4", "apt-get install e2fsprogs"),
    "no apt-get": (remove("apt-get"), "apt-get/dpkg-deb", "Debian"),
    "no dpkg-deb": (remove("dpkg-deb"), "apt-get/dpkg-deb", "Debian"),
    "no busybox": (no_busybox, "busybox-static", "apt-get install busybox-static"),
    "dynamic busybox": (dynamic_busybox, "busybox-static", "apt-get install busybox-static"),
    "no kernel": (no_kernel, "guest kernel", "scripts/setup.sh"),
    "no agent": (no_agent, "guest agent", "scripts/setup.sh"),
    "runtime dir 755": (shared_runtime_dir, "runtime dir", "rm -rf"),
    "no memfd": (no_memfd, "memfd", "Linux kernel >= 3.17"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_one_missing_piece_fails_one_check_with_its_fix(machine: Machine, case: str) -> None:
    breakage, name, fix = BROKEN[case]
    breakage(machine)
    checks = run_checks()
    assert failures(checks) == {name}, format_report(checks)
    [failed] = [c for c in checks if c.name == name]
    assert failed.required and fix in failed.fix
    assert f"[FAIL] {name}: " in format_report(checks)


def test_vmr_doctor_fails_for_a_missing_piece(
    machine: Machine, capsys: pytest.CaptureFixture
) -> None:
    (machine.bin / "gcc").unlink()
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] gcc: gcc not on PATH" in out and "fix: apt-get install gcc" in out
    assert out.rstrip("\n").splitlines()[-1] == "1 problem(s): gcc"


def test_missing_qemu_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    checks = {c.name: c for c in run_checks()}
    assert not checks["qemu"].ok
    assert "apt-get install qemu-system-x86" in checks["qemu"].fix
    assert not checks["gcc"].ok and "apt-get install gcc" in checks["gcc"].fix
    report = format_report(list(checks.values()))
    assert "[FAIL] qemu:" in report and "fix: apt-get install qemu-system-x86" in report


def run_vmr_doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmruntime", "doctor"],
                          env={**os.environ, **env}, capture_output=True, text=True)  # fmt: skip


def test_python_m_vmruntime_doctor_exits_1_without_qemu(tmp_path: Path) -> None:
    broken = run_vmr_doctor({"PATH": str(tmp_path / "empty")})
    assert broken.returncode == 1 and "[FAIL] qemu:" in broken.stdout


@pytest.mark.slow
def test_this_machine_is_healthy_after_setup() -> None:
    """The real tools and the cache scripts/setup.sh filled; KVM at most warns."""
    healthy = run_vmr_doctor({"VMRUNTIME_CACHE": str(USER_CACHE)})
    assert healthy.returncode == 0, healthy.stdout
    assert "[FAIL]" not in healthy.stdout
    assert_verdict(healthy.stdout)
