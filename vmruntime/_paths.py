"""Where vmruntime keeps things on the host, and the locks and private directories there.

Who calls it: every package that touches the disk (images, rootfs, guest, volumes, vm,
doctor). It sits below all of them, so none needs another package just for a path.

What it promises:

- three roots, each overridable by the environment (docs/cache-layout.md,
  docs/sandboxes.md): the **cache** (``$VMRUNTIME_CACHE``, else
  ``$XDG_CACHE_HOME/vmruntime``, else ``~/.cache/vmruntime``) holds what can be made
  again: image blobs, layer images, guest assets, writable-layer templates; the
  **state** (``$VMRUNTIME_STATE``, else ``$XDG_STATE_HOME/vmruntime``, else
  ``~/.local/state/vmruntime``) holds what cannot: sandboxes and volumes; the
  **runtime** root (``$XDG_RUNTIME_DIR/vmruntime``, else ``/tmp/vmruntime-<uid>``)
  holds sockets and lock sidecars that die with the machine;
- :func:`private_dir` makes a directory mode 0700 or checks that an existing one is
  ours and 0700: sockets of agents and brokers live only in such directories;
- cache locks are ``flock`` on ``<cache>/locks/<name>.lock``: every writer of the cache
  holds ``cache`` shared (:func:`cache_writing`), and pruning holds it exclusively
  (:func:`cache_exclusive`), so a prune never deletes beneath a writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from vmruntime.errors import UnsafeDirectoryError

ENV_CACHE = "VMRUNTIME_CACHE"
ENV_STATE = "VMRUNTIME_STATE"
LOCKS_DIR = "locks"
TMP_DIR = "tmp"
_CACHE_LOCK = "cache"


def cache_root(root: Path | str | None = None) -> Path:
    """``root`` if given, else ``$VMRUNTIME_CACHE``, ``$XDG_CACHE_HOME/vmruntime``,
    ``~/.cache/vmruntime``."""
    if root is not None:
        return Path(root)
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vmruntime"


def state_root() -> Path:
    """``$VMRUNTIME_STATE``, else ``$XDG_STATE_HOME/vmruntime``, else
    ``~/.local/state/vmruntime``."""
    if os.environ.get(ENV_STATE):
        return Path(os.environ[ENV_STATE])
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "vmruntime"


def runtime_root() -> Path:
    """``$XDG_RUNTIME_DIR/vmruntime``, else ``/tmp/vmruntime-<uid>`` (checked by
    :func:`ensure_runtime_root`, never trusted)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "vmruntime" if xdg else Path(f"/tmp/vmruntime-{os.getuid()}")


def ensure_runtime_root() -> Path:
    """The runtime root, made (or checked to be) ours and mode 0700."""
    root = runtime_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    return private_dir(root)


def private_dir(path: Path) -> Path:
    """Create ``path`` mode 0700, or check that an existing one is ours and 0700."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=False)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UnsafeDirectoryError(path, f"not a directory owned by uid {os.getuid()}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        raise UnsafeDirectoryError(path, f"has mode {stat.S_IMODE(info.st_mode):o}, not 700")
    return path


@contextlib.contextmanager
def flock(path: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """An advisory lock on the file ``path`` (created if missing) for the block's length.

    Yields whether the lock is held: always True when ``blocking``; False when it is
    not and someone else holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def cache_lock(name: str, root: Path | str | None = None, *, shared: bool = False,
               blocking: bool = True) -> contextlib.AbstractContextManager[bool]:  # fmt: skip
    """``flock`` on ``<cache>/locks/<name>.lock``."""
    locks = cache_root(root) / LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    return flock(locks / f"{name}.lock", shared=shared, blocking=blocking)


def cache_writing(root: Path | str | None = None) -> contextlib.AbstractContextManager[bool]:
    """Held (shared) by every writer of the cache, so that a prune never runs beneath one."""
    return cache_lock(_CACHE_LOCK, root, shared=True)


def cache_exclusive(root: Path | str | None = None) -> contextlib.AbstractContextManager[bool]:
    """Held by a prune: no writer is at work while it is."""
    return cache_lock(_CACHE_LOCK, root)


def cache_temp(label: str, root: Path | str | None = None) -> Path:
    """A fresh path under ``<cache>/tmp/`` whose name says which process owns it.

    Files there of processes that are gone are garbage (the image store removes them).
    """
    tmp = cache_root(root) / TMP_DIR
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp / f"{os.getpid()}.{secrets.token_hex(4)}.{label}"
