"""vm: sandboxes as microVMs: the Sandbox API, its creation in steps, the VMM driver (QEMU),
the agent client, sandbox state, and ``vmr run`` / ``vmr sandbox``.

Who uses it: people (``vmruntime.Sandbox``), the CLI, and the front doors (the Jupyter
provisioner and Ray actors), which build a :class:`SandboxConfig` and create from it.
Public names: :class:`Sandbox` (synchronous), :class:`AsyncSandbox`,
:class:`SandboxConfig`, :class:`ExecResult`, :class:`Mount`.
"""

from vmruntime.vm.builder import (
    ColdBoot,
    CreationPlan,
    FreshLayer,
    MadeLayer,
    RestorePlan,
    Resume,
    WritableLayerSource,
)
from vmruntime.vm.config import ExecDefaults, SandboxConfig
from vmruntime.vm.driver import MemoryImage, VmmDriver
from vmruntime.vm.mounts import Mount
from vmruntime.vm.qemu import QemuDriver
from vmruntime.vm.sandbox import AsyncProcess, AsyncSandbox, ExecResult
from vmruntime.vm.sync import Process, Sandbox

__all__ = [
    "AsyncProcess",
    "AsyncSandbox",
    "ColdBoot",
    "CreationPlan",
    "ExecDefaults",
    "ExecResult",
    "FreshLayer",
    "MadeLayer",
    "MemoryImage",
    "Mount",
    "Process",
    "QemuDriver",
    "RestorePlan",
    "Resume",
    "Sandbox",
    "SandboxConfig",
    "VmmDriver",
    "WritableLayerSource",
]
