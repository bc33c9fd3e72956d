"""Read-only shares: every mutating operation answers EROFS, on the host side.

Who calls it: :class:`vmruntime.broker.handler.FuseHandler`, which wraps its
:class:`~vmruntime.broker.passthrough.Passthrough` in :class:`ReadOnly` when a
share is read-only. What it promises: nothing the guest sends can change the
share, whatever the guest believes about its mount (a guest that remounts the
share read-write still gets EROFS). Reads pass through untouched.
"""

from __future__ import annotations

import errno
import os
from typing import Any, NoReturn

from vmruntime.broker.passthrough import Passthrough

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT | os.O_APPEND

# The operations that change the share; anything not listed is a read.
MUTATING = frozenset({
    "setattr", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename", "create",
    "write", "fallocate", "copy_file_range", "setxattr", "removexattr",
})  # fmt: skip


def _refuse(*_args: object, **_kwargs: object) -> NoReturn:
    raise OSError(errno.EROFS, "the share is read-only")


class ReadOnly:
    """A :class:`Passthrough` that cannot change anything."""

    def __init__(self, inner: Passthrough) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in MUTATING:
            return _refuse
        return getattr(self._inner, name)

    def open(self, nodeid: int, flags: int) -> Any:
        if flags & _WRITE_FLAGS:
            _refuse()
        return self._inner.open(nodeid, flags)
