"""Per-sandbox writable layers: sparse ext4 disk images holding ``upper/`` and ``work/``.

Who calls it: the sandbox code (a fresh layer per sandbox) and snapshots (the
layer is what a snapshot keeps).

What it promises:

- :func:`create_writable_layer` gives ``dest`` a new, independent, sparse ext4
  image of exactly ``size`` bytes (apparent), a few MB on disk, with root-owned
  ``upper/`` and ``work/`` directories (overlayfs's upper and work dirs; the
  upper dir's owner and mode become those of ``/`` in the guest);
- one template per size is made with ``mkfs.ext4`` (no journal: the layer dies
  with the sandbox or is snapshotted after a clean shutdown, and the journal
  alone would cost 64 MB on disk) and cached at
  ``<cache>/guest/writable/ext4-<size>.img``; each layer is a sparse (or
  reflink) copy of it, so creating one costs milliseconds;
- the template and ``dest`` appear only complete (temporary name, then rename);
  a failure leaves neither a template nor ``dest`` behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmruntime import _paths
from vmruntime._durable import fsync_dir
from vmruntime._ext4 import check_size, make_ext4, run_e2fs
from vmruntime.errors import DiskImageError, GuestAssetError
from vmruntime.images.store import PruneResult

DEFAULT_SIZE = 4 << 30
LABEL = "vmr-writable"
TEMPLATES_DIR = ("guest", "writable")


def templates_dir(cache_root: Path | None = None) -> Path:
    """``<cache>/guest/writable``: one formatted template per size."""
    return _paths.cache_root(cache_root).joinpath(*TEMPLATES_DIR)


def create_writable_layer(
    dest: Path, size: int = DEFAULT_SIZE, cache_root: Path | None = None
) -> Path:
    """Write a fresh writable layer of ``size`` bytes to ``dest`` (replacing nothing)."""
    template = ensure_template(size, cache_root)
    dest = Path(dest)
    temp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # Under the template's lock, shared: a prune removing unused templates waits.
        with _paths.cache_lock(_lock_name(size), cache_root, shared=True):
            sparse_copy(template, temp)
        os.replace(temp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return dest


def ensure_template(size: int, cache_root: Path | None = None) -> Path:
    """The cached, formatted template for ``size``; made once, under a lock."""
    template = templates_dir(cache_root) / f"ext4-{size}.img"
    check_size(size, template)
    if template.is_file():
        return template
    with _paths.cache_writing(cache_root), _paths.cache_lock(_lock_name(size), cache_root):
        if template.is_file():
            return template
        template.parent.mkdir(parents=True, exist_ok=True)
        temp = _paths.cache_temp(template.name, cache_root)
        try:
            _format(temp, size)
            os.replace(temp, template)
            fsync_dir(template.parent)
        except DiskImageError as exc:
            raise GuestAssetError("writable layer", exc.reason) from None
        finally:
            temp.unlink(missing_ok=True)
    return template


def _lock_name(size: int) -> str:
    return f"writable-{size}"


def _format(image: Path, size: int) -> None:
    """mkfs.ext4 a sparse file of ``size`` bytes with root-owned upper/ and work/."""
    with tempfile.TemporaryDirectory(prefix="vmr-writable-") as seed:
        for name in ("upper", "work"):
            os.mkdir(Path(seed) / name, 0o755)
        make_ext4(image, size, journal=False, label=LABEL, seed=Path(seed))
    # -d copies the seed's owner; when we are not root that would make the guest's
    # "/" (the upper dir) belong to our uid, so set owners and modes explicitly.
    commands = "".join(
        f"sif /{d} uid 0\nsif /{d} gid 0\nsif /{d} mode 040755\n" for d in ("upper", "work")
    )
    run_e2fs(["debugfs", "-w", "-f", "-", str(image)], image, stdin=commands)
    with open(image, "rb+") as f:
        os.fsync(f.fileno())


def sparse_copy(src: Path, dest: Path) -> None:
    """Copy keeping holes (or sharing extents where the filesystem can reflink)."""
    cp = shutil.which("cp")
    if cp is None:
        raise GuestAssetError("writable layer", "cp (coreutils) is not on PATH")
    proc = subprocess.run(
        [cp, "--sparse=always", "--reflink=auto", "--", str(src), str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise GuestAssetError("writable layer", f"copying {src} to {dest}: {proc.stderr.strip()}")
    with open(dest, "rb+") as f:
        os.fsync(f.fileno())


def prune_templates(cache_root: Path | None = None) -> PruneResult:
    """Delete the writable-layer templates that no sandbox is being made from right now.

    Run under the cache's exclusive lock (so no template is being formatted); a template
    being copied holds its lock shared and is skipped. The next sandbox of that size
    formats a new one (about a tenth of a second).
    """
    result = PruneResult()
    directory = templates_dir(cache_root)
    for template in sorted(directory.glob("ext4-*.img")) if directory.is_dir() else []:
        size = template.name.removeprefix("ext4-").removesuffix(".img")
        with _paths.cache_lock(f"writable-{size}", cache_root, blocking=False) as held:
            if held:
                result.add(template)
    return result
