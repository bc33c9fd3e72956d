"""What every process vmruntime starts (QEMU, the brokers) needs from its parent.

Who calls it: :mod:`vmruntime.vm.qemu` and :mod:`vmruntime.broker.process`.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: SIGKILL when the starting thread dies.

    ``parent`` is the starting process's pid, read before the fork: if it died
    before ``prctl`` took effect, no signal would ever come, so the child ends now.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def log_tail(path: Path, lines: int, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` non-blank lines of a log (read from its last ``max_bytes``)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])
