"""Accelerator choice: KVM only when it can run an ordinary guest, else TCG, and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmruntime.vm import accel


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(accel.ENV_ACCEL, raising=False)


def test_missing_device_means_tcg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")
    chosen = accel.choose_accelerator()
    assert chosen.name == "tcg"
    assert "does not exist" in chosen.reason


def test_no_vmx_or_svm_means_tcg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not accel.KVM_DEVICE.exists():
        pytest.skip("needs /dev/kvm")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 hypervisor\n")
    monkeypatch.setattr(accel, "CPUINFO", cpuinfo)
    chosen = accel.choose_accelerator()
    assert chosen.name == "tcg"
    # Either /dev/kvm itself is unusable, or the flags are what rules KVM out.
    assert "neither vmx nor svm" in chosen.reason or "/dev/kvm" in chosen.reason


def test_usable_kvm_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_status", lambda: (True, "/dev/kvm is usable"))
    assert accel.choose_accelerator() == accel.Accelerator("kvm", "/dev/kvm is usable")


def test_env_forces_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_status", lambda: (False, "no vmx"))
    monkeypatch.setenv(accel.ENV_ACCEL, "kvm")
    forced = accel.choose_accelerator()
    assert (
        forced.name == "kvm" and "forced" in forced.reason and "unusable: no vmx" in forced.reason
    )
    monkeypatch.setattr(accel, "kvm_status", lambda: (True, "fine"))
    monkeypatch.setenv(accel.ENV_ACCEL, "tcg")
    assert accel.choose_accelerator().name == "tcg"


def test_cpu_flags_parsing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vmx sse\n\nprocessor\t: 1\nflags\t: fpu\n")
    monkeypatch.setattr(accel, "CPUINFO", cpuinfo)
    assert accel.cpu_flags() == {"fpu", "vmx", "sse"}
    monkeypatch.setattr(accel, "CPUINFO", tmp_path / "missing")
    assert accel.cpu_flags() == set()


def test_this_host_gets_an_answer_with_a_reason() -> None:
    chosen = accel.choose_accelerator()
    assert chosen.name in ("kvm", "tcg") and chosen.reason
