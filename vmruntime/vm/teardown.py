"""The one place a sandbox ends: its VM, its brokers, its locks, its files.

Who calls it: :meth:`AsyncSandbox.stop` and :meth:`~AsyncSandbox.kill` (after the
guest has shut down, or not), the exit hook for sandboxes a process forgot to stop,
and ``vmr sandbox stop | rm -f | prune`` for sandboxes other processes own or left.

What it promises: :func:`end_sandbox` leaves no VM process, no broker and no disk
lock of the sandbox; the files stay (marked stopped, runtime directory removed) or go,
as ``keep`` says. It is idempotent and needs no event loop, so an exit hook can call it.
"""

from __future__ import annotations

import contextlib

from vmruntime.errors import VmmError
from vmruntime.vm import state
from vmruntime.vm.driver import VmHandle, VmmDriver
from vmruntime.vm.mounts import SandboxMounts


def end_sandbox(paths: state.SandboxPaths, record: state.SandboxRecord, *,
                vm: VmHandle | None, mounts: SandboxMounts | None, keep: bool) -> None:  # fmt: skip
    """Kill what is left of the VM, end the brokers, release the locks, keep or remove files.

    ``mounts`` is this process's view of the shares (None for a sandbox it adopted: the
    record names the brokers then).
    """
    if vm is not None:
        vm.kill()
    if mounts is not None:
        mounts.close()
    state.end_brokers(record)
    if keep:
        state.mark_stopped(paths)
    else:
        paths.remove()


async def end_from_outside(record: state.SandboxRecord, driver: VmmDriver, *, keep: bool,
                           graceful: bool, timeout: float = 5.0) -> None:  # fmt: skip
    """End a sandbox that another (possibly gone) process started.

    ``graceful`` asks the VMM to quit first (over its control socket) and waits up to
    ``timeout`` seconds before killing.
    """
    paths = state.SandboxPaths(record.id)
    vm = driver.adopt(record.vmm_pid, record.vmm_start, paths.control_socket)
    if graceful and vm.running():
        with contextlib.suppress(VmmError):
            await vm.quit()
        await vm.wait(timeout)
    end_sandbox(paths, record, vm=vm, mounts=None, keep=keep)
