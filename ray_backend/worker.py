"""The host's side of the guest worker: ships the worker into the guest, starts it, sends
calls and reads replies as attacker input.

Who calls it: :class:`ray_backend.actor.SandboxActor`, on vmruntime's loop thread. What it
promises: a reply is returned only if it is a well-formed message within the size limit;
anything else ends the worker and raises. A call that times out kills the worker's whole
process group in the guest; the next :meth:`GuestWorker.call` starts a fresh worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import pickle
import py_compile
import signal
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cloudpickle

from ray_backend import _codec, _wire
from ray_backend.errors import (
    PythonMismatchError,
    SandboxTimeoutError,
    WorkerDiedError,
    WorkerProtocolError,
)
from vmruntime.errors import SandboxError
from vmruntime.vm import AsyncProcess, AsyncSandbox

BUNDLE_PATH = "/run/vmruntime-worker.zip"
_BOOT = (f"import sys; sys.path.insert(0, {BUNDLE_PATH!r}); "
         "from ray_backend._worker import main; main()")  # fmt: skip
_OUTPUT_TAIL = 4096
_COMMAND_NOT_FOUND = 127  # the agent's exit status for a program that is not there
# How many functions a worker keeps loaded (the host resends any beyond them each time).
_KNOWN_FUNCTIONS = 256
# A worker that does not say hello in this long (importing cloudpickle under TCG takes
# about a second) is broken.
DEFAULT_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Reply:
    kind: int
    body: bytearray
    buffers: list[bytearray]


@cache
def worker_bundle() -> bytes:
    """A zip of what the guest worker imports: ``ray_backend._worker``, ``_wire``,
    ``_codec`` (and a stub package around them) and the host's own cloudpickle, so both
    sides pickle with one version. Compiled for the host's Python, which the guest's must
    match; the sources are in too, so a mismatch still starts and is reported."""
    here = Path(__file__).parent
    files = {f"ray_backend/{name}": here / name for name in ("_worker.py", "_wire.py", "_codec.py")}
    cloudpickle_dir = Path(cloudpickle.__file__).parent
    for source in sorted(cloudpickle_dir.glob("*.py")):
        files[f"cloudpickle/{source.name}"] = source
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as bundle, \
            tempfile.TemporaryDirectory() as scratch:  # fmt: skip
        bundle.writestr("ray_backend/__init__.py", '"""The guest worker\'s package."""\n')
        for name, source in files.items():
            bundle.write(source, name)
            compiled = Path(scratch) / (name.replace("/", "_") + "c")
            py_compile.compile(str(source), str(compiled), dfile=name, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            bundle.write(compiled, name + "c")
    return out.getvalue()


def host_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _reduce_for_guest(pickler: Any, obj: Any) -> Any:
    reduced = _codec.reduce_argument(obj)
    if reduced is NotImplemented:
        return cloudpickle.Pickler.reducer_override(pickler, obj)
    return reduced


class _CallPickler(cloudpickle.Pickler):
    reducer_override = _reduce_for_guest


def pickle_function(fn: Callable[..., Any]) -> bytes:
    """``fn`` as the guest loads it: its own module travels by value unless it is installed
    (the guest cannot import the caller's modules)."""
    out = io.BytesIO()
    with _by_value(getattr(fn, "__module__", None)):
        _CallPickler(out, protocol=5).dump(fn)
    return out.getvalue()


def function_key(function: bytes) -> bytes:
    return hashlib.blake2b(function, digest_size=16).digest()


def pickle_call(key: bytes, function: bytes | None, args: Sequence[Any], kwargs: dict[str, Any],
                pickled_result: bool) -> tuple[bytes, list[memoryview]]:  # fmt: skip
    """A CALL's body and out-of-band buffers: the function's key, the pickled function
    (None if the worker has it already), and the arguments as a protocol 5 pickle in which
    arrays and frames travel as :mod:`ray_backend._codec` rebuilds them."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _CallPickler(out, protocol=5, buffer_callback=buffers.append).dump(
        (key, function, tuple(args), dict(kwargs), pickled_result))
    return out.getvalue(), [b.raw() for b in buffers]


@contextlib.contextmanager
def _by_value(module_name: str | None) -> Any:
    module = sys.modules.get(module_name or "")
    if module is None or module_name == "__main__" or _is_installed(module):
        yield
        return
    top = sys.modules.get(module_name.split(".")[0], module)
    cloudpickle.register_pickle_by_value(top)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(top)


def _is_installed(module: Any) -> bool:
    """Whether ``module`` comes with Python or from site-packages (the guest has its own
    copy, or should), rather than from the caller's own code."""
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) or getattr(module, "__file__", None)
    if origin in (None, "built-in", "frozen"):
        return True
    import sysconfig

    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    resolved = str(Path(origin).resolve())
    return any(resolved.startswith(str(Path(root).resolve()) + "/") for root in roots)


class _Inbox:
    """The worker's stdout as a byte stream; its stderr goes to ``on_output`` as it comes."""

    def __init__(self, process: AsyncProcess, on_output: Callable[[bytes], None]) -> None:
        self._process = process
        self._on_output = on_output
        self._pending = memoryview(b"")
        self.tail = bytearray()

    async def read_into(self, target: memoryview) -> bool:
        """Fill ``target``; False if the worker's output ended first."""
        filled = 0
        while filled < target.nbytes:
            if not self._pending:
                chunk = await self._next_stdout()
                if chunk is None:
                    return False
                self._pending = memoryview(chunk)
            count = min(target.nbytes - filled, self._pending.nbytes)
            target[filled:filled + count] = self._pending[:count]
            self._pending = self._pending[count:]
            filled += count
        return True

    async def _next_stdout(self) -> bytes | None:
        while (item := await self._process.read()) is not None:
            stream, data = item
            if stream == "stdout":
                return data
            self._keep_tail(data)
            self._on_output(data)
        return None

    def _keep_tail(self, data: bytes) -> None:
        self.tail += data
        del self.tail[:-_OUTPUT_TAIL]


class GuestWorker:
    """One warm Python process in ``sandbox`` that runs the calls, one at a time."""

    def __init__(self, sandbox: AsyncSandbox, image: str, *,
                 on_output: Callable[[bytes], None],
                 max_result_bytes: int = _wire.DEFAULT_MAX_MESSAGE,
                 cwd: str | None = None) -> None:  # fmt: skip
        self._sandbox = sandbox
        self._image = image
        self._on_output = on_output
        self._max_result_bytes = max_result_bytes
        self._cwd = cwd
        self._process: AsyncProcess | None = None
        self._inbox: _Inbox | None = None
        self._shipped = False
        self._known: set[bytes] = set()
        self.hello: dict[str, Any] = {}

    @property
    def sandbox_id(self) -> str:
        return self._sandbox.id

    @property
    def running(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        """The running worker's pid in the guest."""
        return self._process.pid if self._process is not None else None

    async def start(self, timeout: float = DEFAULT_START_TIMEOUT, *,
                    detached: bool = False) -> dict[str, Any]:  # fmt: skip
        """Start the worker (if it is not running) and check its Python; its hello.
        ``detached``: the worker outlives this agent connection (a warm template's, which
        a resumed copy :meth:`adopt` s)."""
        if self._process is not None:
            return self.hello
        if not self._shipped:
            await self._sandbox.fs.write(BUNDLE_PATH, worker_bundle())
            self._shipped = True
        process = await self._sandbox.exec_stream(["python3", "-c", _BOOT], cwd=self._cwd,
                                                  detached=detached)  # fmt: skip
        self._process = process
        self._inbox = _Inbox(process, self._on_output)
        try:
            reply = await asyncio.wait_for(self._receive(), timeout)
            self.hello = self._check_hello(reply)
        except WorkerDiedError as exc:
            await self.stop()
            if exc.returncode == _COMMAND_NOT_FOUND:
                raise PythonMismatchError(self._image, "none (no python3 on its PATH)",
                                          host_python()) from exc  # fmt: skip
            raise
        except BaseException:
            await self.stop()
            raise
        return self.hello

    async def adopt(self, pid: int, hello: dict[str, Any]) -> None:
        """Take over the worker ``pid`` that a template started detached (its bundle is
        in place and its ``hello``, read by the template, is checked again here)."""
        process = await self._sandbox.adopt(pid)
        self._process, self._inbox = process, _Inbox(process, self._on_output)
        self._shipped = True
        try:
            self.hello = self._check_hello_document(hello)
        except BaseException:
            await self.stop()
            raise

    def _check_hello(self, reply: Reply) -> dict[str, Any]:
        if reply.kind != _wire.Kind.HELLO:
            raise self._protocol_error(f"expected a hello, got message kind {reply.kind}")
        return self._check_hello_document(self.decode(reply))

    def _check_hello_document(self, hello: Any) -> dict[str, Any]:
        python = hello.get("python") if isinstance(hello, dict) else None
        if not (isinstance(python, list) and len(python) >= 2
                and all(type(part) is int for part in python)):  # fmt: skip
            raise self._protocol_error(f"a hello without a Python version: {hello!r:.200}")
        guest = f"{python[0]}.{python[1]}"
        if guest != host_python():
            raise PythonMismatchError(self._image, ".".join(map(str, python)), host_python())
        return hello

    def knows(self, key: bytes) -> bool:
        """Whether the running worker has the function of ``key`` loaded (a call may then
        leave the function out). False while no worker runs: the next call starts one."""
        return key in self._known

    async def call(self, key: bytes, payload: bytes, buffers: Sequence[memoryview],
                   timeout: float | None) -> Reply:  # fmt: skip
        """Send one call and wait for its reply, starting a fresh worker first if none
        runs (a call made for it carries its function, since :meth:`knows` was False)."""
        await self.start()
        process = self._process
        assert process is not None
        try:
            reply = await asyncio.wait_for(self._exchange(process, payload, buffers), timeout)
            if reply.kind != _wire.Kind.ERROR and len(self._known) < _KNOWN_FUNCTIONS:
                self._known.add(key)  # it ran, so the worker has it (an error may mean not)
            return reply
        except TimeoutError:
            await self.stop()
            raise SandboxTimeoutError("the call", timeout or 0) from None
        except BaseException:
            await self.stop()
            raise

    async def _exchange(self, process: AsyncProcess, payload: bytes,
                        buffers: Sequence[memoryview]) -> Reply:  # fmt: skip
        await process.write(_wire.encode_header(_wire.Kind.CALL, payload, buffers))
        await process.write(payload)
        for buffer in buffers:
            await process.write(buffer)
        return await self._receive()

    async def _receive(self) -> Reply:
        inbox = self._inbox
        assert inbox is not None
        raw = bytearray(_wire.HEADER.size)
        if not await inbox.read_into(memoryview(raw)):
            raise await self._died()
        try:
            header = _wire.parse_header(bytes(raw))
            lengths_raw = bytearray(8 * header.buffer_count)
            if not await inbox.read_into(memoryview(lengths_raw)):
                raise await self._died()
            budget = self._max_result_bytes - header.body_length
            lengths = _wire.parse_lengths(bytes(lengths_raw), header.buffer_count, budget)
        except _wire.WireError as exc:
            raise self._protocol_error(str(exc)) from None
        body = bytearray(header.body_length)
        buffers = [bytearray(length) for length in lengths]
        for part in (body, *buffers):
            if not await inbox.read_into(memoryview(part)):
                raise await self._died()
        return Reply(header.kind, body, buffers)

    def decode(self, reply: Reply) -> Any:
        """The plain data in ``reply``; a :class:`WorkerProtocolError` if it is malformed
        (the caller then ends this worker with :meth:`stop`)."""
        try:
            return _codec.decode(reply.body, reply.buffers)
        except _codec.CodecError as exc:
            raise self._protocol_error(str(exc)) from None

    def _protocol_error(self, detail: str) -> WorkerProtocolError:
        return WorkerProtocolError(self.sandbox_id, detail)

    def _forget(self) -> tuple[AsyncProcess | None, _Inbox | None]:
        """Drop the running worker (and what it had loaded); it and its inbox."""
        process, inbox = self._process, self._inbox
        self._process = self._inbox = None
        self._known = set()
        return process, inbox

    async def _died(self) -> WorkerDiedError:
        process, inbox = self._forget()
        returncode: int | None = None
        oom = False
        if process is not None:
            with contextlib.suppress(SandboxError, TimeoutError):
                result = await asyncio.wait_for(process.wait(), 10)
                returncode, oom = result.returncode, result.oom_killed
        tail = bytes(inbox.tail).decode("utf-8", "replace") if inbox else ""
        return WorkerDiedError(self._sandbox.id, returncode, oom, tail)

    async def stop(self) -> None:
        """End the worker (its whole process group) if it runs."""
        process, _ = self._forget()
        if process is None:
            return
        with contextlib.suppress(SandboxError, TimeoutError, ProcessLookupError):
            await process.signal(signal.SIGKILL, group=True)
            await asyncio.wait_for(_drain(process), 10)
            await asyncio.wait_for(process.wait(), 10)


async def _drain(process: AsyncProcess) -> None:
    while await process.read() is not None:
        pass

