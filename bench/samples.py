"""What the benchmarks share: wall-time samples and how a benchmark's main ends.

``python bench/X.py`` finds this module beside the script.
"""

from __future__ import annotations

import asyncio
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


class BenchError(RuntimeError):
    """A measurement did not do what it should; the run stops."""


def leftover_children() -> list[int]:
    """PIDs of this process's children still alive (there should be none)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


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
