"""Everything a sandbox boots from, made ready in one call.

Who calls it: the QEMU driver before each boot (cheap when cached: hashing the
initramfs inputs is the only work) and ``python -m vmruntime.guest prepare``,
which ``scripts/setup.sh`` runs so that the download and the compile happen at
setup time rather than at the first sandbox.

What it promises: :func:`ensure_guest_assets` returns paths to a complete guest
kernel and an initramfs holding the current agent and that kernel's modules; it
downloads or builds only what is missing and raises
:class:`~vmruntime.errors.GuestAssetError` naming the asset that cannot be made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmruntime.guest.build import ensure_agent
from vmruntime.guest.initramfs import ensure_initramfs
from vmruntime.guest.kernel import ensure_kernel


@dataclass(frozen=True)
class GuestAssets:
    """The ``-kernel`` and ``-initrd`` of a sandbox VM."""

    kernel: Path
    initramfs: Path
    release: str


def ensure_guest_assets(cache_root: Path | None = None) -> GuestAssets:
    """Kernel (download once), agent (compile once), initramfs (pack once per inputs)."""
    kernel = ensure_kernel(cache_root)
    agent = ensure_agent(cache_root)
    initramfs = ensure_initramfs(kernel, agent, cache_root)
    return GuestAssets(kernel=kernel.vmlinuz, initramfs=initramfs, release=kernel.release)
