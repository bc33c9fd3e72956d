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

from vmruntime._durable import fsync_dir
from vmruntime.errors import GuestAssetError
from vmruntime.images.store import ImageStore

DEFAULT_SIZE = 4 << 30
MIN_SIZE = 16 << 20
_MIB = 1 << 20
LABEL = "vmr-writable"
_MKFS_TIMEOUT = 120


def create_writable_layer(
    dest: Path, size: int = DEFAULT_SIZE, cache_root: Path | None = None
) -> Path:
    """Write a fresh writable layer of ``size`` bytes to ``dest`` (replacing nothing)."""
    _check_size(size)
    template = ensure_template(size, cache_root)
    dest = Path(dest)
    temp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        _sparse_copy(template, temp)
        os.replace(temp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return dest


def ensure_template(size: int, cache_root: Path | None = None) -> Path:
    """The cached, formatted template for ``size``; made once, under a lock."""
    _check_size(size)
    store = ImageStore(cache_root)
    template = store.root / "guest" / "writable" / f"ext4-{size}.img"
    if template.is_file():
        return template
    with store.writing(), store.lock(f"writable-{size}"):
        if template.is_file():
            return template
        template.parent.mkdir(parents=True, exist_ok=True)
        temp = store.temp_path(template.name)
        try:
            _format(temp, size)
            os.replace(temp, template)
            fsync_dir(template.parent)
        finally:
            temp.unlink(missing_ok=True)
    return template


def _check_size(size: int) -> None:
    if size < MIN_SIZE or size % _MIB:
        raise ValueError(f"writable layer size {size} must be a multiple of 1 MiB and >= 16 MiB")


def _format(image: Path, size: int) -> None:
    """mkfs.ext4 a sparse file of ``size`` bytes with root-owned upper/ and work/."""
    with open(image, "wb") as f:
        f.truncate(size)
    with tempfile.TemporaryDirectory(prefix="vmr-writable-") as seed:
        for name in ("upper", "work"):
            os.mkdir(Path(seed) / name, 0o755)
        _run(
            [
                "mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0",
                "-m", "0", "-L", LABEL, "-d", seed, str(image),
            ],
            "mkfs.ext4",
        )  # fmt: skip
    # -d copies the seed's owner; when we are not root that would make the guest's
    # "/" (the upper dir) belong to our uid, so set owners and modes explicitly.
    commands = "".join(
        f"sif /{d} uid 0\nsif /{d} gid 0\nsif /{d} mode 040755\n" for d in ("upper", "work")
    )
    _run(["debugfs", "-w", "-f", "-", str(image)], "debugfs", stdin=commands)
    with open(image, "rb+") as f:
        os.fsync(f.fileno())


def _run(argv: list[str], what: str, stdin: str | None = None) -> None:
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_MKFS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestAssetError(
            "writable layer", f"{what}: {exc}; install e2fsprogs (scripts/setup.sh)"
        ) from None
    # debugfs reports failed commands on stderr (after its version banner) but exits 0.
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("debugfs ")]
    if proc.returncode != 0 or (what == "debugfs" and errors):
        tail = "\n".join((errors or proc.stderr.splitlines())[-8:])
        raise GuestAssetError("writable layer", f"{what} failed (exit {proc.returncode}): {tail}")


def _sparse_copy(src: Path, dest: Path) -> None:
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
