"""The guest worker: runs the functions a ``SandboxActor`` sends, one at a time, and stays
warm between calls.

It runs inside the guest only, started by the agent with the worker bundle (this module,
``_wire``, ``_codec`` and the host's own cloudpickle) first on ``sys.path``. Standard
library only, besides the shipped cloudpickle. Its stdin and stdout carry the messages of
``_wire``; the function's own prints go to stderr, which the host shows in the actor's
log. Nothing here is trusted by the host: a hostile function can write anything to these
pipes, and the host checks every byte.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import os
import pickle
import sys
import traceback
from typing import Any, BinaryIO

from ray_backend import _codec, _wire


class _NumpyCoreAlias(importlib.abc.MetaPathFinder):
    """Lets numpy 1.x load pickles that numpy 2 made (``numpy._core.*`` was ``numpy.core``)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "numpy._core" and not name.startswith("numpy._core."):
            return None
        import numpy

        if hasattr(numpy, "_core") or int(numpy.__version__.split(".")[0]) >= 2:
            return None
        return importlib.util.spec_from_loader(name, _AliasLoader("numpy.core" + name[11:]))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:
        pass


def _read_exactly(stream: BinaryIO, size: int) -> bytearray | None:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        count = stream.readinto(view[got:])
        if not count:
            return None
        got += count
    return data


def _read_message(stream: BinaryIO) -> tuple[int, bytearray, list[bytearray]] | None:
    raw = _read_exactly(stream, _wire.HEADER.size)
    if raw is None:
        return None
    header = _wire.parse_header(bytes(raw))
    lengths_raw = _read_exactly(stream, 8 * header.buffer_count) if header.buffer_count else b""
    if lengths_raw is None:
        return None
    lengths = _wire.parse_lengths(bytes(lengths_raw), header.buffer_count, 1 << 62)
    body = _read_exactly(stream, header.body_length)
    buffers = [_read_exactly(stream, length) for length in lengths]
    if body is None or any(buffer is None for buffer in buffers):
        return None
    return header.kind, body, buffers  # type: ignore[return-value]


def _send(stream: BinaryIO, kind: _wire.Kind, body: bytes, buffers: list[Any] = ()) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    stream.write(_wire.encode_header(kind, body, views))
    stream.write(body)
    for view in views:
        stream.write(view)
    stream.flush()


def _describe_error(exc: BaseException) -> bytes:
    kind = type(exc)
    try:
        _, buffers = _codec.encode(tuple(exc.args))
        args: tuple[Any, ...] | None = None if buffers else tuple(exc.args)
    except Exception:  # args that are not plain data (or whose encoding fails)
        args = None
    text = "".join(traceback.format_exception(exc))
    body, _ = _codec.encode({
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "args": args,
        "message": _safe_str(exc),
        "traceback": text,
    })  # fmt: skip
    return body


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose str() failed>"


def _answer(stream: BinaryIO, body: bytearray, buffers: list[bytearray],
            functions: dict[bytes, Any]) -> None:  # fmt: skip
    try:
        key, function, args, kwargs, pickled_result = pickle.loads(body, buffers=buffers)
        if function is not None:
            functions[key] = pickle.loads(function)
        fn = functions[key]
    except BaseException as exc:  # the call itself did not unpickle: say why
        _send(stream, _wire.Kind.ERROR, _describe_error(exc))
        return
    del body, buffers
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        _flush_user_output()
        _send(stream, _wire.Kind.ERROR, _describe_error(exc))
        return
    _flush_user_output()
    if pickled_result:
        import cloudpickle

        out: list[pickle.PickleBuffer] = []
        data = cloudpickle.dumps(result, protocol=5, buffer_callback=out.append)
        _send(stream, _wire.Kind.PICKLED_RESULT, data, [b.raw() for b in out])
        return
    try:
        encoded, arrays = _codec.encode(result)
    except _codec.UnsupportedTypeError as exc:
        refusal, _ = _codec.encode({"type": exc.type_name, "message": str(exc)})
        _send(stream, _wire.Kind.REFUSED, refusal)
        return
    _send(stream, _wire.Kind.RESULT, encoded, arrays)


def _flush_user_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _take_protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """The message pipes, moved off fds 0 and 1 so that the function's own reads see an
    empty stdin and its prints go to stderr instead of into the messages."""
    incoming = os.fdopen(os.dup(0), "rb", buffering=0)
    outgoing = os.fdopen(os.dup(1), "wb", buffering=1 << 20)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True)  # noqa: SIM115
    return incoming, outgoing  # type: ignore[return-value]


def main() -> None:
    sys.meta_path.append(_NumpyCoreAlias())
    incoming, outgoing = _take_protocol_streams()
    hello, _ = _codec.encode({
        "protocol": _wire.VERSION,
        "python": list(sys.version_info[:3]),
        "implementation": sys.implementation.name,
        "pid": os.getpid(),
    })  # fmt: skip
    _send(outgoing, _wire.Kind.HELLO, hello)
    functions: dict[bytes, Any] = {}  # loaded once, kept warm like Ray's remote functions
    while (message := _read_message(incoming)) is not None:
        kind, body, buffers = message
        if kind != _wire.Kind.CALL:
            return
        _answer(outgoing, body, buffers, functions)


if __name__ == "__main__":
    main()
