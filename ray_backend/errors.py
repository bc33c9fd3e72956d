"""Errors of the Ray front door: part of vmruntime's one hierarchy
(:class:`vmruntime.errors.VmruntimeError`), and of Ray's own sandbox errors
(``ray.experimental.sandbox.SandboxError`` and its kinds), so code written against Ray's
sandboxes catches them unchanged.

Every error carries the offending value as attributes and pickles with them, since Ray
carries it from the actor to the caller.
"""

from __future__ import annotations

from typing import Any

from ray.experimental.sandbox import exceptions as ray_errors

from vmruntime.errors import VmruntimeError


class RaySandboxError(VmruntimeError, ray_errors.SandboxError):
    """Root of the Ray front door's errors (they pickle as every vmruntime error does)."""


class SandboxTaskError(RaySandboxError):
    """A function raised an exception in the guest whose type is not safe to rebuild on the
    host (anything but Python's built-in exceptions); it says which, with the guest's
    message and traceback."""

    def __init__(self, type_name: str, message: str, guest_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}\n--- traceback in the sandbox ---\n"
                         f"{guest_traceback}")  # fmt: skip
        self.type_name = type_name
        self.guest_message = message
        self.guest_traceback = guest_traceback


class UntrustedResultError(RaySandboxError, TypeError):
    """A result that is not plain data (its type is ``type_name``); the host refuses to
    build it, since that could run guest code on the host."""

    def __init__(self, type_name: str, detail: str = "") -> None:
        super().__init__(
            f"the sandbox returned a {type_name}{' (' + detail + ')' if detail else ''}, which "
            "is not plain data: results must be None, bool, int, float, complex, str, bytes, "
            "list, tuple, dict, set, numpy arrays or pandas frames and series. Pass "
            "trust_results=True to the actor to unpickle anything (that runs code the "
            "guest chose on the host)")  # fmt: skip
        self.type_name = type_name


class WorkerProtocolError(RaySandboxError):
    """The guest worker sent bytes that break the worker protocol; the worker is ended."""

    def __init__(self, sandbox_id: str, detail: str) -> None:
        super().__init__(f"sandbox {sandbox_id}: the guest worker broke the protocol: {detail}")
        self.sandbox_id = sandbox_id
        self.detail = detail


class WorkerDiedError(RaySandboxError):
    """The guest worker ended during a call (exit, signal, the guest's OOM killer); the actor
    goes on and the next call starts a fresh worker."""

    def __init__(self, sandbox_id: str, returncode: int | None, oom_killed: bool,
                 output_tail: str) -> None:  # fmt: skip
        if oom_killed:
            how = "was killed by the guest's out-of-memory killer"
        elif returncode is None:
            how = "stopped answering"
        elif returncode < 0:
            how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode}"
        message = f"sandbox {sandbox_id}: the guest worker {how} during the call"
        if output_tail:
            message += f"\n--- its last output ---\n{output_tail}"
        super().__init__(message)
        self.sandbox_id = sandbox_id
        self.returncode = returncode
        self.oom_killed = oom_killed


class SandboxTimeoutError(RaySandboxError, ray_errors.SandboxTimeoutError, TimeoutError):
    """A call or command ran past its ``timeout`` and was killed (the actor goes on)."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what} timed out after {timeout:g} s and was killed")
        self.what = what
        self.timeout = timeout


class PythonMismatchError(RaySandboxError):
    """The image's Python cannot load what the host pickles (another minor version, or
    none): cloudpickle needs the same Python minor version on both sides."""

    def __init__(self, image: str, guest: str, host: str) -> None:
        super().__init__(
            f"image {image!r} has Python {guest}, the host runs Python {host}: functions "
            "travel by value with cloudpickle, which needs the same minor version on both "
            "sides; use an image with Python " + host)  # fmt: skip
        self.image = image
        self.guest = guest
        self.host = host


class UnsupportedOptionError(RaySandboxError, ray_errors.SandboxCreationError, ValueError):
    """An option of Ray's sandboxes that a microVM sandbox cannot honour."""

    def __init__(self, option: str, value: Any, reason: str) -> None:
        super().__init__(f"{option}={value!r}: {reason}")
        self.option = option
        self.value = value


class SandboxGoneError(RaySandboxError, ray_errors.SandboxNotFoundError):
    """The actor's sandbox was deleted or terminated (or its TTL ran out)."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id} was deleted or terminated")
        self.sandbox_id = sandbox_id


class GuestFileError(RaySandboxError):
    """Reading or writing a file in the guest failed: ``path``, the ``exit_code`` of the
    guest command that tried (``cat``, ``sh``) and its message."""

    def __init__(self, path: str, exit_code: int, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.exit_code = exit_code
