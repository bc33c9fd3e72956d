"""Support for the tests that boot real microVMs (slow tier).

A small two-layer test image is made from the host's busybox-static (no network),
loaded into a session cache through the real loader, and booted under QEMU with
the real guest kernel, initramfs and agent. The guest assets come from the
cache ``scripts/setup.sh`` prepared, so the session does not download a kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from imagefactory import directory, file, make_layer_tar, symlink, whiteout, write_oci_layout

from vmruntime.errors import GuestAssetError
from vmruntime.guest.initramfs import require_static_elf

BUSYBOX_IMAGE = "test/busybox:1"
IMAGE_MARKER = b"made by tests/vm_support.py\n"
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"


def static_busybox() -> Path:
    """The ``busybox`` on PATH, which must be statically linked (a guest has no libc for
    it: not in the initramfs, not in the test image); skips the test if there is none."""
    found = shutil.which("busybox")
    if found is None:
        pytest.skip("no busybox on PATH (apt-get install busybox-static)")
    try:
        require_static_elf(Path(found), "busybox", "apt-get install busybox-static")
    except GuestAssetError as exc:
        pytest.skip(f"needs a static busybox: {exc.reason}")
    return Path(found)


def busybox_layers() -> list[bytes]:
    """Layer 0: busybox, its applets, /etc; layer 1: a marker, /work, a deletion."""
    busybox = static_busybox()
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    base = [
        directory("bin"),
        file("bin/busybox", busybox.read_bytes(), mode=0o755),
        *(symlink(f"bin/{name}", "busybox") for name in applets if name != "busybox"),
        directory("etc"),
        file("etc/passwd", PASSWD),
        file("etc/group", "root:x:0:\napp:x:1000:\n"),
        file("etc/doomed", "deleted by the upper layer\n"),
        directory("root", mode=0o700),
        directory("home"),
        directory("home/app", uid=1000, gid=1000),
        directory("www"),
        file("www/index.html", "served from the guest\n"),
    ]
    top = [
        directory("etc"),
        file("etc/image-marker", IMAGE_MARKER),
        whiteout("etc/doomed"),
        directory("work"),
    ]
    return [make_layer_tar(base), make_layer_tar(top)]


def load_busybox_image(workdir: Path) -> str:
    from vmruntime import images

    layout = workdir / "busybox-layout"
    write_oci_layout(
        layout,
        busybox_layers(),
        config_overrides={
            "config": {
                "Env": ["PATH=/bin", "GREETING=hello from the image"],
                "WorkingDir": "/work",
                "Cmd": ["sh", "-c", "echo default command ran"],
            }
        },
    )
    images.load(layout, BUSYBOX_IMAGE)
    return BUSYBOX_IMAGE


def processes(program: bytes, marker: str) -> list[int]:
    """Pids of live processes whose command line mentions both ``program`` and ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if program in cmdline and marker.encode() in cmdline and state != b"Z":
            found.append(int(entry.name))
    return found


def qemu_processes(marker: str) -> list[int]:
    """Pids of QEMU processes whose command line mentions ``marker``."""
    return processes(b"qemu-system", marker)


def broker_processes(marker: str) -> list[int]:
    """Pids of virtio-fs brokers whose command line (their socket path) mentions ``marker``."""
    return processes(b"vmruntime.broker", marker)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sh(sandbox: Any, script: str, timeout: float | None = 120) -> str:
    """``sh -c script`` in a (synchronous) sandbox: its stdout; a failure fails the test."""
    result = sandbox.exec(["sh", "-c", script], timeout=timeout)
    assert result.returncode == 0, result
    return result.stdout.decode()


def brokers_of(sandbox: Any) -> list[int]:
    """The pids of a sandbox's brokers, from its record."""
    from vmruntime.vm import state

    record = state.read_record(state.SandboxPaths(sandbox.id))
    return [int(pid) for pid, _ in record.brokers if pid]
