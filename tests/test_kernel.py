"""Guest kernel cache: offline first, and an apt failure is either survived or explained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmruntime.errors import GuestAssetError
from vmruntime.guest.kernel import ensure_kernel


@pytest.fixture
def failing_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An apt-get that records each call and fails like an offline machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    script = bin_dir / "apt-get"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        "echo 'E: Failed to fetch http://mirror.invalid/x  Temporary failure resolving' >&2\n"
        "exit 100\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def cache_kernel(cache: Path, release: str) -> None:
    directory = cache / "guest" / "kernel" / release
    (directory / "modules").mkdir(parents=True)
    (directory / "modules" / "modules.dep").write_text("")
    (directory / "vmlinuz").write_bytes(b"kernel")


def test_cached_kernel_needs_no_apt(tmp_path: Path, failing_apt: Path) -> None:
    cache = tmp_path / "cache"
    cache_kernel(cache, "6.1.0-9-cloud-amd64")
    cache_kernel(cache, "6.1.0-10-cloud-amd64")
    kernel = ensure_kernel(cache)
    assert kernel.release == "6.1.0-10-cloud-amd64"  # numeric, not string, ordering
    assert kernel.vmlinuz == cache / "guest/kernel/6.1.0-10-cloud-amd64/vmlinuz"
    assert not failing_apt.exists()
    # Refresh asks apt, and when apt fails the cached kernel still wins.
    assert ensure_kernel(cache, refresh=True) == kernel
    assert "download linux-image-cloud-amd64" in failing_apt.read_text()


def test_nothing_cached_and_offline_explains(tmp_path: Path, failing_apt: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(GuestAssetError) as info:
        ensure_kernel(cache)
    assert info.value.asset == "kernel"
    assert "Temporary failure resolving" in info.value.reason
    assert "scripts/setup.sh" in info.value.reason
    assert list((cache / "tmp").iterdir()) == []
    assert not (cache / "guest" / "kernel").exists() or not any(
        (cache / "guest" / "kernel").iterdir()
    )
