"""The synchronous facade over :class:`AsyncSandbox`, for scripts, notebooks and Ray tasks.

Who calls it: users of ``vmruntime.Sandbox``. What it promises: the same behaviour
and signatures as the async API. Every call runs its coroutine on one private event
loop, ``vmruntime-loop``, in a daemon thread started on first use and kept for the
life of the process (one loop for every facade object, so sandboxes created by
different threads share it), and waits for the result in the calling thread; Ctrl-C
in the caller cancels the coroutine. Child processes (QEMU, brokers) do not depend on
that thread: they die with the process (:func:`vmruntime._child.start_child`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from vmruntime.images.store import ImageStore
from vmruntime.vm.builder import CreationPlan
from vmruntime.vm.config import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_MEMORY_MIB,
    DEFAULT_WRITABLE_SIZE,
    ExecDefaults,
    Ports,
    SandboxConfig,
)
from vmruntime.vm.driver import VmmDriver
from vmruntime.vm.mounts import Mount
from vmruntime.vm.sandbox import DEFAULT_FREEZE_TIMEOUT, AsyncProcess, AsyncSandbox, ExecResult

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


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Start ``coro`` on the facade's loop; for async callers on another loop, which
    await ``asyncio.wrap_future(submit(...))`` (cancelling that cancels ``coro``)."""
    return asyncio.run_coroutine_threadsafe(coro, _event_loop())


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

    @property
    def dropped(self) -> int:
        return self._inner.dropped

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
    def create(
        cls,
        image: str,
        *,
        cpus: int = 1,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        env: Mapping[str, str] | None = None,
        ports: Ports | None = None,
        mounts: Sequence[Mount | str] | None = None,
        name: str = "",
        writable_size: int = DEFAULT_WRITABLE_SIZE,
        detached: bool = False,
        keep: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        store: ImageStore | None = None,
        driver: VmmDriver | None = None,
    ) -> Sandbox:
        """Boot a sandbox of ``image``; the keywords are :meth:`AsyncSandbox.create`'s."""
        return cls(run(AsyncSandbox.create(
            image, cpus=cpus, memory_mib=memory_mib, env=env, ports=ports, mounts=mounts,
            name=name, writable_size=writable_size, detached=detached, keep=keep,
            boot_timeout=boot_timeout, store=store, driver=driver,
        )))  # fmt: skip

    @classmethod
    def from_config(cls, config: SandboxConfig, plan: CreationPlan | None = None) -> Sandbox:
        """Create the sandbox ``config`` describes (see :meth:`AsyncSandbox.from_config`)."""
        return cls(run(AsyncSandbox.from_config(config, plan)))

    @classmethod
    def attach(cls, id_or_name: str, *, driver: VmmDriver | None = None) -> Sandbox:
        """Connect to a running detached sandbox (see :meth:`AsyncSandbox.attach`)."""
        return cls(run(AsyncSandbox.attach(id_or_name, driver=driver)))

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def name(self) -> str:
        return self._inner.name

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
    def exec_defaults(self) -> ExecDefaults:
        return self._inner.exec_defaults

    @property
    def asynchronous(self) -> AsyncSandbox:
        """The :class:`AsyncSandbox` behind this one (use it on the facade's loop only)."""
        return self._inner

    def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        rlimits: Mapping[int, tuple[int, int]] | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run ``argv`` to completion and collect its output (like ``subprocess.run``)."""
        return run(self._inner.exec(argv, input=input, env=env, cwd=cwd, user=user,
                                    timeout=timeout, rlimits=rlimits, check=check))  # fmt: skip

    def exec_stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: bool = True,
        timeout: float | None = None,
        rlimits: Mapping[int, tuple[int, int]] | None = None,
        detached: bool = False,
    ) -> Process:
        """Start ``argv``; stream its stdio through the returned :class:`Process` (see
        :meth:`AsyncSandbox.exec_stream`, also for ``detached``)."""
        return Process(run(self._inner.exec_stream(
            argv, env=env, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols, stdin=stdin,
            timeout=timeout, rlimits=rlimits, detached=detached,
        )))  # fmt: skip

    def adopt(self, pid: int) -> Process:
        """Take over a detached process an earlier connection started (see
        :meth:`AsyncSandbox.adopt`)."""
        return Process(run(self._inner.adopt(pid)))

    def renew_identity(self, hostname: str | None = None) -> None:
        """Fresh RNG seed, clock, hostname and machine-id (see
        :meth:`AsyncSandbox.renew_identity`)."""
        run(self._inner.renew_identity(hostname))

    def personalize(self, *, env: Mapping[str, str] | None = None,
                    ports: Mapping[int, int] | None = None, name: str = "") -> None:  # fmt: skip
        """See :meth:`AsyncSandbox.personalize`."""
        run(self._inner.personalize(env=env, ports=ports, name=name))

    @property
    def running(self) -> bool:
        return self._inner.running

    def port_open(self, guest_port: int) -> bool:
        return run(self._inner.port_open(guest_port))

    def unforward(self, guest_ports: Iterable[int]) -> None:
        run(self._inner.unforward(guest_ports))

    def readonly_root(self, writable: Sequence[str] = ()) -> None:
        run(self._inner.readonly_root(writable))

    def default_command(self, args: Sequence[str] = ()) -> list[str]:
        return self._inner.default_command(args)

    @contextlib.contextmanager
    def frozen(self, timeout: float = DEFAULT_FREEZE_TIMEOUT) -> Iterator[None]:
        """Hold the guest's writable layer still for the block (see
        :meth:`AsyncSandbox.frozen`)."""
        manager = self._inner.frozen(timeout)
        run(manager.__aenter__())
        try:
            yield
        except BaseException as exc:
            if not run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            run(manager.__aexit__(None, None, None))

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
