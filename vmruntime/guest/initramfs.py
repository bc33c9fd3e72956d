"""The guest initramfs: agent as /init, static busybox, the boot modules.

Who calls it: :func:`vmruntime.guest.assets.ensure_guest_assets`; the tests use
:func:`write_cpio` and :func:`initramfs_entries` directly.

What it promises:

- :func:`write_cpio` writes a ``newc`` cpio archive in pure Python, so device
  nodes and root ownership need no root privileges (they are only header fields);
- :func:`ensure_initramfs` returns ``<cache>/guest/initramfs/<hash16>.cpio``, an
  uncompressed archive (the kernel unpacks it faster under TCG than it inflates
  gzip) with the layout of ``docs/agent-protocol.md`` ("Boot"): ``/init`` is the
  agent, ``/bin/busybox`` + ``/bin/sh``, ``/lib/modules/<name>.ko`` (flat) and
  ``/lib/modules/load.order``, the empty mount points and ``/dev/console``,
  ``/dev/null``;
- the archive is deterministic (sorted, mtime 0, uid/gid 0) and named by the
  sha256 of everything that goes into it plus :data:`FORMAT_VERSION`, so equal
  inputs reuse one cached file, and it is written to a temporary file and
  renamed, so no half-written archive is ever visible.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmruntime import _paths
from vmruntime._durable import fsync_dir
from vmruntime.errors import GuestAssetError
from vmruntime.guest.kernel import ON_DEMAND_MODULES, GuestKernel, module_load_order

# Bump when the layout or the writer changes, so old cached archives are not reused.
FORMAT_VERSION = 1
# Debian's busybox-static; found on PATH (usr-merged or not), checked static where used.
HOST_BUSYBOX = Path(shutil.which("busybox") or "/bin/busybox")
MOUNT_POINTS = ("dev", "proc", "sys", "newroot", "layers", "tmp", "run")
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; ``data`` is the file content or a symlink's target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def write_cpio(out: BinaryIO, entries: Iterable[CpioEntry]) -> None:
    """Write ``entries`` sorted by name (parents first) as a newc archive, then the trailer."""
    ordered = sorted(entries, key=lambda e: e.name)
    names = [e.name for e in ordered]
    if len(set(names)) != len(names):
        raise ValueError("duplicate names in cpio entries")
    for ino, entry in enumerate(ordered, start=1):
        _write_member(out, entry, ino)
    _write_member(out, CpioEntry(_TRAILER, 0), 0)


def _write_member(out: BinaryIO, entry: CpioEntry, ino: int) -> None:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + name + _pad(len(header) + len(name)))
    out.write(entry.data + _pad(len(entry.data)))


def _pad(length: int) -> bytes:
    # newc aligns both the header+name and the data to 4 bytes.
    return b"\0" * (-length % 4)


# --- the initramfs ------------------------------------------------------------


def initramfs_entries(
    kernel: GuestKernel, agent: Path, busybox: Path = HOST_BUSYBOX
) -> list[CpioEntry]:
    """Everything the initramfs holds, in no particular order."""
    require_static_elf(busybox, "busybox", "apt-get install busybox-static")
    require_static_elf(agent, "agent", "rebuild it with `python -m vmruntime.guest prepare`")
    entries = [directory(d) for d in ("bin", "lib", "lib/modules", *MOUNT_POINTS) if d != "tmp"]
    entries.append(directory("tmp", 0o1777))
    entries += [
        regular("init", agent.read_bytes(), 0o755),
        regular("bin/busybox", busybox.read_bytes(), 0o755),
        symlink("bin/sh", "busybox"),
        char_device("dev/console", 5, 1, 0o600),
        char_device("dev/null", 1, 3, 0o666),
    ]
    order = module_load_order(kernel)
    flat = [Path(rel).name for rel in order]
    if len(set(flat)) != len(flat):
        raise GuestAssetError("initramfs", f"two modules share a file name: {flat}")
    for rel, name in zip(order, flat, strict=True):
        entries.append(regular(f"lib/modules/{name}", (kernel.modules_dir / rel).read_bytes()))
    entries.append(regular("lib/modules/load.order", load_order_text(flat).encode()))
    return entries


def load_order_text(modules: list[str]) -> str:
    """``load.order``: boot modules first, then one ``[group]`` section per on-demand group.

    ``modules`` is in dependency order; a section keeps that order, and a module of
    a group that a boot module needs stays in the boot part.
    """
    grouped = {f"{name}.ko": group for group, names in ON_DEMAND_MODULES.items() for name in names}
    boot = [m for m in modules if m not in grouped]
    text = "".join(f"{m}\n" for m in boot)
    for group in ON_DEMAND_MODULES:
        text += f"[{group}]\n" + "".join(f"{m}\n" for m in modules if grouped.get(m) == group)
    return text


def entries_digest(entries: Iterable[CpioEntry]) -> str:
    """sha256 over the format version and every entry's name, type, device and content."""
    h = hashlib.sha256(f"vmruntime-initramfs-v{FORMAT_VERSION}\n".encode())
    for e in sorted(entries, key=lambda e: e.name):
        content = hashlib.sha256(e.data).hexdigest()
        h.update(f"{e.name}\0{e.mode:o}\0{e.rdev[0]}:{e.rdev[1]}\0{content}\n".encode())
    return h.hexdigest()


def initramfs_dir(cache_root: Path | None = None) -> Path:
    """``<cache>/guest/initramfs``: one archive per set of inputs."""
    return _paths.cache_root(cache_root) / "guest" / "initramfs"


def ensure_initramfs(
    kernel: GuestKernel,
    agent: Path,
    cache_root: Path | None = None,
    *,
    busybox: Path = HOST_BUSYBOX,
) -> Path:
    """The cached initramfs for these inputs; built (atomically) if missing."""
    entries = initramfs_entries(kernel, agent, busybox)
    dest = initramfs_dir(cache_root) / f"{entries_digest(entries)[:16]}.cpio"
    if dest.is_file():
        return dest
    with _paths.cache_writing(cache_root):
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = _paths.cache_temp(dest.name, cache_root)
        try:
            with open(temp, "wb") as f:
                write_cpio(f, entries)
                f.flush()
                os.fsync(f.fileno())
            # Equal inputs give equal bytes, so a concurrent builder's rename is harmless.
            os.replace(temp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            raise GuestAssetError("initramfs", f"writing {dest}: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)
    return dest


def require_static_elf(path: Path, what: str, fix: str) -> None:
    """The guest has no libc of its own at /init time: dynamic binaries cannot run."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                raise GuestAssetError(what, f"{path} is not an ELF64 executable; {fix}")
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as exc:
        raise GuestAssetError(what, f"{path}: {exc.strerror or exc}; {fix}") from None
    pt_interp = 3
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == pt_interp:
            raise GuestAssetError(what, f"{path} is dynamically linked; {fix}")
