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

from vmruntime.errors import GuestAssetError
from vmruntime.guest.build import AGENT_BINARY_NAME, agent_hash, agents_dir, ensure_agent
from vmruntime.guest.initramfs import (
    HOST_BUSYBOX,
    ensure_initramfs,
    entries_digest,
    initramfs_dir,
    initramfs_entries,
)
from vmruntime.guest.kernel import cached_kernel, ensure_kernel, kernel_cache_dir
from vmruntime.images.store import PruneResult


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


def prune_guest_assets(cache_root: Path | None = None) -> PruneResult:
    """Delete the kernels, agent builds and initramfs archives that the next sandbox
    would not boot from: all but the newest kernel, the agent of the current sources,
    and the initramfs made of those two.

    Run under the cache's exclusive lock (builders of assets hold it shared). A running
    sandbox is not disturbed: QEMU read its kernel and initramfs when it started.
    When the current initramfs cannot be named (no busybox-static), none is deleted.
    """
    result = PruneResult()
    kernel = cached_kernel(cache_root)
    kernels = kernel_cache_dir(cache_root)
    keep_kernel = kernel.vmlinuz.parent if kernel is not None else None
    _remove_all_but(result, kernels, keep_kernel)
    agents = agents_dir(cache_root)
    current_agent = agents / agent_hash()[:16]
    _remove_all_but(result, agents, current_agent)
    agent = current_agent / AGENT_BINARY_NAME
    if kernel is not None and agent.is_file():
        try:
            digest = entries_digest(initramfs_entries(kernel, agent, HOST_BUSYBOX))
        except (GuestAssetError, OSError):
            return result
        archives = initramfs_dir(cache_root)
        _remove_all_but(result, archives, archives / f"{digest[:16]}.cpio")
    return result


def _remove_all_but(result: PruneResult, directory: Path, keep: Path | None) -> None:
    if not directory.is_dir():
        return
    for entry in sorted(directory.iterdir()):
        # Dot entries are the builders' own (their lock file, builds in progress).
        if entry != keep and not entry.name.startswith("."):
            result.add(entry)
