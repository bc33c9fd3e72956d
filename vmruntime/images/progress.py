"""Per-layer progress bars on a terminal; silence when output is not a terminal."""

from __future__ import annotations

import shutil
import sys
import threading

from vmruntime.images.ingest import Progress, ProgressFactory, no_progress
from vmruntime.images.manifest import Descriptor


class _TqdmProgress:
    def __init__(self, bar) -> None:
        self.bar = bar

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def reset(self) -> None:
        self.bar.reset()

    def done(self, status: str) -> None:
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.n = self.bar.total or self.bar.n
        self.bar.close()


def terminal_progress() -> ProgressFactory:
    """Bars on stderr when it is a terminal; otherwise nothing at all."""
    if not sys.stderr.isatty():
        return no_progress
    from tqdm import tqdm

    # A terminal that reports no size (a bare pty) would make tqdm print nothing.
    size = shutil.get_terminal_size()
    width, height = min(size.columns, 120), size.lines
    lock = threading.Lock()
    positions = iter(range(10_000))

    def factory(desc: Descriptor, label: str) -> Progress:
        with lock:
            position = next(positions)
        bar = tqdm(
            total=desc.size,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            position=position,
            leave=True,
            file=sys.stderr,
            ncols=width,
            nrows=height,
        )
        return _TqdmProgress(bar)

    return factory
