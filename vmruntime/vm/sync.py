"""The synchronous facade over :class:`AsyncSandbox`, for scripts, notebooks and Ray tasks.

Who calls it: users of ``vmruntime.Sandbox``. What it promises: the same
behaviour as the async API, run on one private event loop thread that lives as
long as the process (QEMU's parent-death signal is tied to the thread that
started it, so that thread must not end before the process does).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from vmruntime.vm.sandbox import AsyncProcess, AsyncSandbox, ExecResult

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="vmruntime-loop", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the facade's loop and wait for it (Ctrl-C cancels it)."""
    future = asyncio.run_coroutine_threadsafe(coro, _event_loop())
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise


class Process:
    """A running exec (from :meth:`Sandbox.exec_stream`); iterate for ``(stream, bytes)``."""

    def __init__(self, inner: AsyncProcess) -> None:
        self._inner = inner

    @property
    def pid(self) -> int | None:
        return self._inner.pid

    def write(self, data: bytes) -> None:
        run(self._inner.write(data))

    def close_stdin(self) -> None:
        run(self._inner.close_stdin())

    def read(self) -> tuple[str, bytes] | None:
        return run(self._inner.read())

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while (item := self.read()) is not None:
            yield item

    def signal(self, signo: int, group: bool = False) -> None:
        run(self._inner.signal(signo, group))

    def resize(self, rows: int, cols: int) -> None:
        run(self._inner.resize(rows, cols))

    def wait(self) -> ExecResult:
        return run(self._inner.wait())


class GuestFiles:
    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner

    def read(self, path: str) -> bytes:
        return run(self._inner.fs.read(path))

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        run(self._inner.fs.write(path, data, mode))


class Sandbox:
    """One microVM running an image (synchronous API; see :class:`AsyncSandbox`)."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner
        self.fs = GuestFiles(inner)

    @classmethod
    def create(cls, image: str, **options: Any) -> Sandbox:
        """Boot a sandbox; options as for :meth:`AsyncSandbox.create`."""
        return cls(run(AsyncSandbox.create(image, **options)))

    @classmethod
    def attach(cls, id_or_name: str) -> Sandbox:
        return cls(run(AsyncSandbox.attach(id_or_name)))

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def accelerator(self) -> str:
        return self._inner.accelerator

    @property
    def ports(self) -> dict[int, int]:
        return self._inner.ports

    @property
    def kernel_release(self) -> str:
        return self._inner.kernel_release

    @property
    def vmm_pid(self) -> int:
        return self._inner.vmm_pid

    @property
    def asynchronous(self) -> AsyncSandbox:
        return self._inner

    def exec(self, argv: Sequence[str], **options: Any) -> ExecResult:
        return run(self._inner.exec(argv, **options))

    def exec_stream(self, argv: Sequence[str], **options: Any) -> Process:
        return Process(run(self._inner.exec_stream(argv, **options)))

    def default_command(self, args: Sequence[str] = ()) -> list[str]:
        return self._inner.default_command(args)

    def stop(self, timeout: float = 10.0, *, keep: bool | None = None) -> None:
        run(self._inner.stop(timeout, keep=keep))

    def kill(self) -> None:
        run(self._inner.kill())

    def detach(self) -> None:
        run(self._inner.detach())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
