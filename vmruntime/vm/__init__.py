"""vm: sandboxes as microVMs: the VMM driver (QEMU), the agent client, the Sandbox API.

Public names: :class:`Sandbox` (synchronous), :class:`AsyncSandbox`, :class:`ExecResult`,
:class:`Mount`.
"""

from vmruntime.vm.mounts import Mount
from vmruntime.vm.sandbox import AsyncProcess, AsyncSandbox, ExecResult
from vmruntime.vm.sync import Process, Sandbox

__all__ = ["AsyncProcess", "AsyncSandbox", "ExecResult", "Mount", "Process", "Sandbox"]
