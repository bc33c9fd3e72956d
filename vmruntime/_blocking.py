"""Blocking work off the event loop, without losing what it made to a cancellation.

Who calls it: sandbox creation and the QEMU driver, which run on their caller's event
loop (the Jupyter server's, say) and must never stall it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args: Any,
                    discard: Callable[[T], object] | None = None) -> T:  # fmt: skip
    """``fn(*args)`` in a worker thread.

    A thread cannot be interrupted: if the caller is cancelled meanwhile, this waits
    for ``fn`` to return, hands its result to ``discard`` (say, to kill a process it
    started), and only then lets the cancellation go on. So cleanup that runs on
    cancellation always sees everything ``fn`` made.
    """
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            result = await work
            if discard is not None:
                discard(result)
        raise
