"""The Ray front door: untrusted functions and commands in microVM sandboxes.

``SandboxActor`` owns one sandbox (``run(fn, ...)``, ``exec``, files, ``snapshot``);
``create`` makes one as ``ray.experimental.sandbox.create`` does (a job moves from
gVisor to microVMs by changing one import); ``SandboxPool`` spreads calls over several;
``WarmActorPool`` keeps actors started ahead, each claimed once.
Results come back as plain data only (see :mod:`ray_backend.results`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmruntime._lazy import lazy_exports

_EXPORTS = {
    "SandboxActor": "ray_backend.actor",
    "SandboxActorBody": "ray_backend.actor",
    "create": "ray_backend.actor",
    "DEFAULT_IMAGE": "ray_backend.actor",
    "SandboxPool": "ray_backend.pool",
    "WarmActorPool": "ray_backend.warm_pool",
    "RaySandboxError": "ray_backend.errors",
    "SandboxTaskError": "ray_backend.errors",
    "UntrustedResultError": "ray_backend.errors",
    "WorkerDiedError": "ray_backend.errors",
    "WorkerProtocolError": "ray_backend.errors",
    "SandboxTimeoutError": "ray_backend.errors",
    "PythonMismatchError": "ray_backend.errors",
    "UnsupportedOptionError": "ray_backend.errors",
    "SandboxGoneError": "ray_backend.errors",
    "GuestFileError": "ray_backend.errors",
}
__all__ = [
    "DEFAULT_IMAGE",
    "GuestFileError",
    "PythonMismatchError",
    "RaySandboxError",
    "SandboxActor",
    "SandboxActorBody",
    "SandboxGoneError",
    "SandboxPool",
    "SandboxTaskError",
    "SandboxTimeoutError",
    "UnsupportedOptionError",
    "UntrustedResultError",
    "WarmActorPool",
    "WorkerDiedError",
    "WorkerProtocolError",
    "create",
]

__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from ray_backend.actor import DEFAULT_IMAGE, SandboxActor, SandboxActorBody, create
    from ray_backend.errors import (
        GuestFileError,
        PythonMismatchError,
        RaySandboxError,
        SandboxGoneError,
        SandboxTaskError,
        SandboxTimeoutError,
        UnsupportedOptionError,
        UntrustedResultError,
        WorkerDiedError,
        WorkerProtocolError,
    )
    from ray_backend.pool import SandboxPool
    from ray_backend.warm_pool import WarmActorPool
