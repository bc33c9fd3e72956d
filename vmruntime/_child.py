"""What every process vmruntime starts (QEMU, the brokers) needs from its parent.

Who calls it: :mod:`vmruntime.vm.qemu`, :mod:`vmruntime.broker.process` and the test
VMM driver.

What it promises: :func:`start_child` starts children on one thread that lives as
long as the process, so a child that asked for the parent-death signal
(:func:`die_with_parent`) dies with the process, not with whichever thread happened
to start it (Linux ties the signal to the forking *thread*: a worker thread of
``asyncio.to_thread`` or an event loop's thread may end long before the process).
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1
_requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_starter: threading.Thread | None = None
_starter_lock = threading.Lock()


def start_child(start: Callable[[], T]) -> T:
    """Run ``start`` (which forks a child) on the process-long starter thread; its result.

    Blocks the calling thread for the fork and exec only (milliseconds). Exceptions
    raised by ``start`` are raised here.
    """
    if threading.current_thread() is _starter:
        return start()
    future: Future[T] = Future()
    _requests.put((start, future))
    _ensure_starter()
    return future.result()


def _ensure_starter() -> None:
    global _starter
    with _starter_lock:
        if _starter is None:
            # A daemon thread ends only with the process: exactly the life we want the
            # parent-death signal to follow.
            _starter = threading.Thread(target=_serve, name="vmruntime-children", daemon=True)
            _starter.start()


def _serve() -> None:
    while True:
        start, future = _requests.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(start())
        except BaseException as exc:  # handed to the caller, who raises it
            future.set_exception(exc)


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
