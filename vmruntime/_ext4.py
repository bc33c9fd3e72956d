"""Sparse ext4 disk images: the one place that knows their size rule and runs mkfs.ext4.

Who calls it: :mod:`vmruntime.rootfs.writable` (writable-layer templates, no journal)
and :mod:`vmruntime.volumes.store` (disk volumes, with a journal).

What it promises: :func:`check_size` accepts whole MiB of at least 16 MiB and nothing
else; :func:`make_ext4` formats a new sparse file of exactly that size, root-owned at
its top, or raises :class:`~vmruntime.errors.DiskImageError` with mkfs's own words
(the caller removes the file it named).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vmruntime.errors import DiskImageError

MIB = 1 << 20
MIN_SIZE = 16 * MIB
_MKFS_TIMEOUT = 120
_INSTALL_HINT = "install e2fsprogs (apt-get install e2fsprogs)"


def size_problem(size: object) -> str | None:
    """Why ``size`` cannot be an image's size in bytes, or None if it can."""
    if isinstance(size, bool) or not isinstance(size, int):
        return "want a whole number of bytes"
    if size < MIN_SIZE or size % MIB:
        return "want a whole number of MiB, at least 16 MiB"
    return None


def check_size(size: object, path: Path | str) -> int:
    """``size`` if it is a valid image size, else DiskImageError naming ``path``."""
    problem = size_problem(size)
    if problem is not None:
        raise DiskImageError(path, f"size {size!r}: {problem}")
    assert isinstance(size, int)
    return size


def make_ext4(image: Path, size: int, *, journal: bool, label: str = "",
              seed: Path | None = None) -> None:  # fmt: skip
    """Create ``image`` (which must not exist) as a sparse ext4 filesystem of ``size`` bytes.

    ``journal=False`` leaves the journal out (a layer that dies with its sandbox);
    with one, ``lazy_journal_init`` skips zeroing it, since a fresh sparse file reads as
    zeros anyway (a 4 GiB image then costs about 2 MB on disk, not 67 MB). No blocks
    are reserved for root (``-m 0``): the whole size is the user's. ``seed`` is a
    directory whose contents become the filesystem's (``mkfs.ext4 -d``).
    """
    check_size(size, image)
    with open(image, "xb") as f:
        f.truncate(size)
    extended = "root_owner=0:0" + ("" if not journal else ",lazy_journal_init=1")
    argv = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", extended]
    if not journal:
        argv += ["-O", "^has_journal"]
    if label:
        argv += ["-L", label]
    if seed is not None:
        argv += ["-d", str(seed)]
    run_e2fs([*argv, str(image)], image)
    with open(image, "rb+") as f:
        os.fsync(f.fileno())


def run_e2fs(argv: list[str], image: Path, stdin: str | None = None) -> None:
    """Run an e2fsprogs tool on ``image``; DiskImageError with its last words if it fails.

    debugfs reports failed commands on stderr (after its banner) but exits 0, so any
    other line there counts as a failure too.
    """
    tool = argv[0]
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=_MKFS_TIMEOUT, check=False)  # fmt: skip
    except FileNotFoundError:
        raise DiskImageError(image, f"{tool} not found: {_INSTALL_HINT}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskImageError(image, f"{tool}: {exc}") from None
    errors = [line for line in proc.stderr.splitlines() if not line.startswith(f"{tool} ")]
    if proc.returncode != 0 or (tool == "debugfs" and errors):
        tail = " ".join(" ".join(errors or proc.stdout.splitlines()).split())[-400:]
        raise DiskImageError(image, f"{tool} failed (exit {proc.returncode}): {tail}")
