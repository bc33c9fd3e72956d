"""vmr doctor: every check reports, and a failing one says how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmruntime.doctor import format_report, run_checks

NAMES = (
    "qemu", "accelerator", "kvm", "gcc", "busybox-static", "mkfs.ext4", "apt-get/dpkg-deb",
    "guest kernel", "guest agent", "cache dir", "runtime dir", "/dev/fuse", "memfd",
)  # fmt: skip


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
    assert by_name["memfd"].ok and by_name["accelerator"].ok


def test_missing_qemu_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    checks = {c.name: c for c in run_checks()}
    assert not checks["qemu"].ok
    assert "apt-get install qemu-system-x86" in checks["qemu"].fix
    assert not checks["gcc"].ok and "apt-get install gcc" in checks["gcc"].fix
    report = format_report(list(checks.values()))
    assert "[FAIL] qemu:" in report and "fix: apt-get install qemu-system-x86" in report


def test_vmr_doctor_fails_only_for_required_checks(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from vmruntime.images.store import default_cache_dir

    def doctor(path: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": path, "VMRUNTIME_CACHE": str(default_cache_dir())}
        return subprocess.run([sys.executable, "-m", "vmruntime", "doctor"], env=env,
                              capture_output=True, text=True)  # fmt: skip

    # This machine has everything; KVM at most warns (VMs run under TCG then).
    healthy = doctor(os.environ["PATH"])
    assert healthy.returncode == 0, healthy.stdout
    assert "[FAIL]" not in healthy.stdout
    verdict = healthy.stdout.rstrip("\n").splitlines()[-1]
    assert verdict == ("ready; advice above for: kvm" if "[warn] kvm" in healthy.stdout
                       else "all good")  # fmt: skip
    broken = doctor(str(tmp_path / "empty"))
    assert broken.returncode == 1 and "[FAIL] qemu:" in broken.stdout
