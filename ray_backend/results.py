"""What a guest worker's reply becomes on the host: a value, or an exception to raise.

Who calls it: :class:`ray_backend.actor.SandboxActor`. What it promises: nothing the guest
sent is unpickled unless the actor was made with ``trust_results=True``; an exception is
rebuilt as its own type only for Python's built-in exceptions (their constructors store
their arguments and do nothing else), otherwise it is a :class:`SandboxTaskError`. Text
that reaches the caller's terminal (messages, tracebacks, the guest's prints) has its
control characters escaped, so the guest cannot drive that terminal.
"""

from __future__ import annotations

import builtins
import pickle
import re
from typing import Any

from ray_backend import _wire
from ray_backend.errors import SandboxTaskError, UntrustedResultError, WorkerProtocolError
from ray_backend.worker import GuestWorker, Reply

_MAX_TEXT = 64 << 10
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Built-in exceptions that mean something to the interpreter itself, not to a caller.
_NOT_REBUILT = {"SystemExit", "KeyboardInterrupt", "GeneratorExit", "StopIteration",
                "StopAsyncIteration", "BaseExceptionGroup", "ExceptionGroup"}  # fmt: skip


def printable(text: str, limit: int = _MAX_TEXT) -> str:
    """``text`` with control characters (but newlines and tabs) escaped, and cut to
    ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + f"\n[... {len(text) - limit} more characters]"
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def interpret(worker: GuestWorker, reply: Reply, trust_results: bool) -> Any:
    """The value of ``reply``; raises the guest's exception, or refuses the result."""
    if reply.kind == _wire.Kind.RESULT:
        return worker.decode(reply)
    if reply.kind == _wire.Kind.PICKLED_RESULT and trust_results:
        return pickle.loads(reply.body, buffers=reply.buffers)  # the caller asked for this
    if reply.kind == _wire.Kind.REFUSED:
        refusal = _fields(worker, reply, ("type", "message"))
        raise UntrustedResultError(printable(refusal["type"], 200))
    if reply.kind == _wire.Kind.ERROR:
        info = _fields(worker, reply, ("type", "message", "traceback"))
        raise guest_exception(info, info.get("args"))
    raise WorkerProtocolError(worker.sandbox_id, f"unexpected message kind {reply.kind}")


def _fields(worker: GuestWorker, reply: Reply, names: tuple[str, ...]) -> dict[str, Any]:
    value = worker.decode(reply)
    if not isinstance(value, dict) or not all(isinstance(value.get(n), str) for n in names):
        raise WorkerProtocolError(worker.sandbox_id, f"a reply without {', '.join(names)}")
    return value


def guest_exception(info: dict[str, Any], args: Any) -> BaseException:
    """The exception the guest reported: its own built-in type where that is safe, with
    the guest's traceback as a note; else a :class:`SandboxTaskError`."""
    type_name = printable(info["type"], 200)
    message = printable(info["message"])
    guest_traceback = printable(info["traceback"])
    rebuilt = _rebuild_builtin(type_name, args, message)
    if rebuilt is None:
        return SandboxTaskError(type_name, message, guest_traceback)
    rebuilt.add_note("--- traceback in the sandbox ---\n" + guest_traceback.rstrip())
    return rebuilt


def _rebuild_builtin(type_name: str, args: Any, message: str) -> BaseException | None:
    module, _, name = type_name.rpartition(".")
    kind = getattr(builtins, name, None)
    if module != "builtins" or name in _NOT_REBUILT or not (
            isinstance(kind, type) and issubclass(kind, Exception)):  # fmt: skip
        return None
    arguments = tuple(args) if isinstance(args, tuple | list) else (message,)
    if any(isinstance(a, str) for a in arguments):
        arguments = tuple(printable(a) if isinstance(a, str) else a for a in arguments)
    try:
        return kind(*arguments)
    except Exception:  # e.g. UnicodeDecodeError wants exactly five arguments
        return None
