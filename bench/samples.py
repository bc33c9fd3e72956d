"""What the benchmarks share: wall-time samples and how a benchmark's main ends.

``python bench/X.py`` finds this module beside the script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import statistics
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Samples:
    """Wall times of one measurement, one per counted run."""

    label: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def low(self) -> float:
        return min(self.seconds)

    @property
    def high(self) -> float:
        return max(self.seconds)

    def line(self) -> str:
        spread = f"min {seconds_text(self.low)}, max {seconds_text(self.high)}"
        return f"{self.label}: median {seconds_text(self.median)} ({spread})"


def parse_subset(text: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A command line's comma-separated subset of ``choices``, in the order of ``choices``
    (for ``type=`` of an argparse option)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if not names or names - set(choices):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated subset of {choices}")
    return tuple(name for name in choices if name in names)


def seconds_text(seconds: float) -> str:
    """Seconds as ``2.41 s``, ``245 ms``, or ``2.1 ms`` below 10 ms."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.010:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.1f} ms"


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


class BenchError(RuntimeError):
    """A measurement did not do what it should; the run stops."""


def leftover_children() -> list[int]:
    """PIDs of this process's children still alive (there should be none)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants, so :func:`leftover_children` sees them.

    A tool that daemonises a helper (podman's pause process, conmon) leaves it to init
    when its own process exits; as a subreaper, this process gets it instead.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


def _process_state(pid: int) -> str:
    """``Z`` for a zombie, ``?`` for a process already gone, else its state letter."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _describe(pid: int) -> str:
    try:
        return f"{pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})"
    except OSError:
        return str(pid)


def reap_zombie_children(comm: str) -> int:
    """Reap the dead children named ``comm``; how many.

    As a subreaper this process adopts the orphans of processes that die, e.g. the QEMU
    of a killed Ray actor; when an orphan dies it stays a zombie until reaped here, and is
    still listed in ``/proc`` (a process to count, but with no memory to read).
    """
    reaped = 0
    for pid in leftover_children():
        if _process_state(pid) == "Z" and _describe(pid) == f"{pid} ({comm})":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
                reaped += 1
    return reaped


def end_leftover_children() -> list[str]:
    """Reap zombie children, kill and reap live ones; the live ones, described.

    Only for the end of a benchmark: by then every child it started has been waited
    for, so what is left is a leak (or a descendant adopted as a subreaper).
    """
    live = []
    for pid in leftover_children():
        if _process_state(pid) != "Z":
            live.append(_describe(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return live


class _Terminated(BaseException):
    """SIGTERM arrived; raised in the main thread so every finally block runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def run_blocking(bench: Callable[[], int]) -> int:
    """:func:`run` for a benchmark that is plain blocking code: its exit status.

    Ctrl-C and SIGTERM unwind it through its finally blocks (which end what it
    started); then, whatever happened, any child process still alive is reported
    and killed, and makes the status nonzero.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = _status_of(bench)
    finally:
        signal.signal(signal.SIGTERM, previous)
        live = end_leftover_children()
        if live:
            print(f"warning: child processes still alive, now killed: {live}", file=sys.stderr)
    return status or (1 if live else 0)


def _status_of(bench: Callable[[], int]) -> int:
    try:
        return bench()
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


def run(bench: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a benchmark's coroutine; its exit status, and a warning if it left children."""
    try:
        status = asyncio.run(bench())
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        status = 1
    except asyncio.CancelledError:  # SIGTERM: the benchmark's finally blocks ended everything
        print("terminated", file=sys.stderr)
        status = 128 + signal.SIGTERM
    if children := leftover_children():
        print(f"warning: child processes still alive: {children}", file=sys.stderr)
    return status
