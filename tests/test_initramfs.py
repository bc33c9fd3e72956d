"""The initramfs: newc layout readable by busybox cpio, device nodes, module order, caching."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import setup_kernel
from vm_support import static_busybox

from vmruntime.errors import GuestAssetError
from vmruntime.guest.initramfs import ensure_initramfs
from vmruntime.guest.kernel import (
    NEEDED_MODULES,
    GuestKernel,
    module_load_order,
    read_modinfo,
    read_modules_dep,
)

# Deliberately not in load order: the writer must sort dependencies first.
FAKE_DEP = """\
fs/erofs.ko: lib/libcrc32c.ko
drv/virtio_mmio.ko: drv/virtio.ko drv/virtio_ring.ko
fs/virtiofs.ko: fs/fuse.ko drv/virtio.ko drv/virtio_ring.ko
drv/virtio.ko: drv/virtio_ring.ko
drv/virtio_ring.ko:
fs/fuse.ko:
lib/libcrc32c.ko:
"""


@pytest.fixture
def kernel(tmp_path: Path) -> GuestKernel:
    root = tmp_path / "kernel"
    modules = root / "modules"
    for rel in read_modules_dep_text(FAKE_DEP):
        (modules / rel).parent.mkdir(parents=True, exist_ok=True)
        (modules / rel).write_bytes(f"module {rel}".encode())
    (modules / "modules.dep").write_text(FAKE_DEP)
    (root / "vmlinuz").write_bytes(b"kernel")
    return GuestKernel("6.1.0-test", root / "vmlinuz", modules)


@pytest.fixture
def busybox() -> Path:
    return static_busybox()


@pytest.fixture
def agent(tmp_path: Path, busybox: Path) -> Path:
    # Any static binary will do as /init for packing; busybox-static is one.
    path = tmp_path / "agent"
    shutil.copyfile(busybox, path)
    return path


def read_modules_dep_text(text: str) -> list[str]:
    return [line.split(":")[0] for line in text.splitlines()]


def cpio_listing(archive: Path, busybox: Path) -> list[str]:
    out = subprocess.run(
        [busybox, "cpio", "-t"], stdin=archive.open("rb"), capture_output=True, check=True
    )
    return out.stdout.decode().split()


def extract(archive: Path, dest: Path, busybox: Path) -> None:
    dest.mkdir()
    with archive.open("rb") as f:
        subprocess.run(
            [busybox, "cpio", "-i", "-d"], stdin=f, cwd=dest, capture_output=True, check=True
        )


def test_layout_is_what_the_agent_expects(
    kernel: GuestKernel, agent: Path, busybox: Path, tmp_path: Path
) -> None:
    archive = ensure_initramfs(kernel, agent, tmp_path / "cache", busybox=busybox)
    assert archive.parent == tmp_path / "cache" / "guest" / "initramfs"
    assert archive.name.endswith(".cpio") and len(archive.stem) == 16
    assert archive.read_bytes()[:6] == b"070701"  # uncompressed newc
    names = cpio_listing(archive, busybox)
    assert names == sorted(names)
    for expected in (
        "init", "bin/busybox", "bin/sh", "dev/console", "dev/null", "lib/modules/load.order",
        "dev", "proc", "sys", "newroot", "layers", "tmp", "run",
    ):  # fmt: skip
        assert expected in names
    assert "lib/modules/erofs.ko" in names and "lib/modules/virtio_ring.ko" in names


@pytest.mark.skipif(os.geteuid() != 0, reason="extracting device nodes needs root")
def test_extracted_files_nodes_and_modes(
    kernel: GuestKernel, agent: Path, busybox: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x"
    extract(ensure_initramfs(kernel, agent, tmp_path / "cache", busybox=busybox), out, busybox)
    console, null = os.lstat(out / "dev/console"), os.lstat(out / "dev/null")
    assert stat.S_ISCHR(console.st_mode) and os.major(console.st_rdev) == 5
    assert os.minor(console.st_rdev) == 1
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(os.stat(out / "init").st_mode) == 0o755
    assert (out / "init").read_bytes() == agent.read_bytes()
    assert os.readlink(out / "bin/sh") == "busybox"
    assert stat.S_IMODE(os.stat(out / "tmp").st_mode) == 0o1777
    assert (out / "lib/modules/erofs.ko").read_bytes() == b"module fs/erofs.ko"


def test_load_order_puts_dependencies_first(
    kernel: GuestKernel, agent: Path, busybox: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x"
    extract(ensure_initramfs(kernel, agent, tmp_path / "cache", busybox=busybox), out, busybox)
    lines = (out / "lib/modules/load.order").read_text().split()
    assert lines[lines.index("[virtiofs]") + 1 :] == ["fuse.ko", "virtiofs.ko"]
    order = [line for line in lines if not line.startswith("[")]
    deps = {Path(m).name: [Path(d).name for d in ds] for m, ds in read_modules_dep(
        kernel.modules_dir / "modules.dep").items()}  # fmt: skip
    assert sorted(order) == sorted(deps)
    for position, module in enumerate(order):
        for dep in deps[module]:
            assert order.index(dep) < position, f"{module} loads before its dependency {dep}"
    assert all((out / "lib/modules" / name).is_file() for name in order)


def test_output_is_deterministic_and_cached(
    kernel: GuestKernel, agent: Path, busybox: Path, tmp_path: Path
) -> None:
    first = ensure_initramfs(kernel, agent, tmp_path / "a", busybox=busybox)
    other = ensure_initramfs(kernel, agent, tmp_path / "b", busybox=busybox)
    assert first.name == other.name and first.read_bytes() == other.read_bytes()
    before = first.stat().st_mtime_ns
    assert ensure_initramfs(kernel, agent, tmp_path / "a", busybox=busybox) == first
    assert first.stat().st_mtime_ns == before
    assert list((tmp_path / "a" / "tmp").iterdir()) == []
    # A different agent is a different input, hence a different archive.
    with agent.open("ab") as f:
        f.write(b"\0")
    assert ensure_initramfs(kernel, agent, tmp_path / "a", busybox=busybox) != first


def test_dynamic_agent_is_refused(kernel: GuestKernel, busybox: Path, tmp_path: Path) -> None:
    dynamic = Path(sys.executable).resolve()  # CPython loads its extension modules: dynamic
    with pytest.raises(GuestAssetError, match="dynamically linked"):
        ensure_initramfs(kernel, dynamic, tmp_path / "cache", busybox=busybox)
    assert not (tmp_path / "cache" / "guest" / "initramfs").exists()


@pytest.mark.slow
def test_real_kernel_modules_and_order() -> None:
    kernel = setup_kernel()  # the one scripts/setup.sh downloaded into the user's cache
    order = module_load_order(kernel)
    names = [Path(rel).name.removesuffix(".ko") for rel in order]
    assert set(NEEDED_MODULES) <= set(names)
    assert names.index("libcrc32c") < names.index("erofs")
    for position, rel in enumerate(order):
        info = read_modinfo(kernel.modules_dir / rel)
        for dep in filter(None, info.get("depends", [""])[0].split(",")):
            assert names.index(dep) < position
