"""``microvm-provisioner``: jupyter_client runs each kernel of a sandboxed kernelspec in
its own microVM.

Who calls it: jupyter_client's ``KernelManager`` / ``AsyncKernelManager`` (so Jupyter
Server, JupyterLab, nbclient), which finds it through the entry point group
``jupyter_client.kernel_provisioners`` when a kernel.json names it in
``metadata.kernel_provisioner``. What it promises:

* Nothing blocks the caller's event loop: the sandbox lives on vmruntime's runtime
  loop (its own thread), which also serves the kernel's port forwards while the caller's
  loop is idle (a synchronous ``KernelManager`` runs its loop only inside its calls).
* The server's environment stays on the host: only the kernelspec's ``env``, the names
  in ``pass_env`` and Jupyter's own ``JPY_*`` variables reach the guest.
* terminate, kill and signals reach the kernel process (its process group) in the
  guest, never the VM. jupyter_client passes ``restart=False`` to terminate and kill even
  while restarting, so only ``cleanup`` decides: ``cleanup(restart=True)`` keeps the
  sandbox and its files for the next launch, ``cleanup(restart=False)`` ends it.
* Each launch has a fresh session key and fresh host ports (a restart changes both, so
  Jupyter Server re-reads them, as it does after a restart with new ports);
  ``rotate_key_on_restart = False`` keeps both across restarts instead, as jupyter_client's
  local kernels do, so clients that did not ask for the restart carry on.
* A kernel that exits by itself, or whose VM dies, is reported by ``poll``; the next
  launch (jupyter_client's restarter) boots a new VM if the old one is gone.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar, TypeVar

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Bool, Enum, Float, Int, List, Unicode

from kernelprovider.defaults import (
    DEFAULT_CPUS,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY_MIB,
    DEFAULT_STARTUP_TIMEOUT,
)
from kernelprovider.kernel import KernelLaunchError, KernelRequest, KernelSandbox, WarmSource
from kernelprovider.pool import KernelPools, warm_spec
from vmruntime.vm import AsyncSandbox, CreationPlan, Mount, SandboxConfig
from vmruntime.vm.mounts import resolve_mounts
from vmruntime.vm.sync import submit

T = TypeVar("T")
SIGNATURE_SCHEME = "hmac-sha256"

__all__ = ["KernelLaunchError", "MicroVMProvisioner", "guest_environment"]


def guest_environment(server_env: Mapping[str, str], spec_env: Mapping[str, str],
                      pass_env: list[str]) -> dict[str, str]:  # fmt: skip
    """The part of the server's environment a kernel in a sandbox gets (see the module)."""
    wanted = set(spec_env) | set(pass_env)
    return {name: value for name, value in server_env.items()
            if name in wanted or name.startswith("JPY_")}  # fmt: skip


_pools: KernelPools | None = None  # this process's warm pools, made at first use


def _warm_pools() -> KernelPools:
    global _pools
    if _pools is None:
        _pools = KernelPools()
    return _pools


async def _on_runtime_loop(coro: Coroutine[Any, Any, T]) -> T:
    return await asyncio.wrap_future(submit(coro))


class MicroVMProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Runs a kernelspec's ``argv`` in a microVM booted from ``image`` (see the module)."""

    image = Unicode(DEFAULT_IMAGE, config=True, help="OCI image the kernel's VM boots")
    cpus = Int(DEFAULT_CPUS, config=True, help="virtual CPUs of the kernel's VM")
    memory = Int(DEFAULT_MEMORY_MIB, config=True, help="memory of the kernel's VM, in MiB")
    mounts = List(Unicode(), config=True, help="host folders, HOST:GUEST[:ro]")
    volumes = List(Unicode(), config=True, help="named volumes, NAME:GUEST[:ro]")
    disks = List(Unicode(), config=True, help="ext4 disk images, PATH:GUEST[:ro]")
    share_notebook_dir = Enum(
        ["off", "ro", "rw"], "off", config=True,
        help="share the notebook's folder at the same path in the guest and start there",
    )  # fmt: skip
    startup_timeout = Float(DEFAULT_STARTUP_TIMEOUT, config=True,
                            help="seconds for boot + kernel listening")  # fmt: skip
    pass_env = List(Unicode(), config=True, help="server environment variables passed in")
    warm = Bool(
        True, config=True,
        help="start kernels from a memory snapshot of a started kernel (made once per "
        "kernelspec and image, kept in the snapshot store) instead of booting them; only "
        "for an ipykernel whose only mounts are host folders (carried over the console "
        "transport) and which does not share the notebook's folder",
    )  # fmt: skip
    pool_size = Int(
        1, config=True,
        help="warm kernels kept ready for this kernelspec (0: each is resumed when asked for)",
    )  # fmt: skip
    warm_imports = List(Unicode(), ["numpy"], config=True,
                        help="modules a warm kernel imported before it is handed out")  # fmt: skip
    rotate_key_on_restart = Bool(
        True, config=True,
        help="a restart gets a fresh session key and fresh ports (clients must reconnect, "
        "as JupyterLab does after its own restarts); False keeps both, as a local kernel does",
    )  # fmt: skip

    # How sandboxes are made (None: a cold boot under QEMU). A seam, not configuration:
    # the fast tests plug a fake VMM in here, and a warm pool will.
    creation_plan: ClassVar[Callable[[], CreationPlan] | None] = None

    _box: KernelSandbox | None = None
    _sandbox_id = ""
    _exit_expected = False  # a shutdown or a signal that ends it was asked for
    _key = ""

    @property
    def sandbox(self) -> AsyncSandbox | None:
        """The kernel's sandbox while it runs (for tools and benchmarks; it lives on
        vmruntime's runtime loop, so await its methods there)."""
        return self._box.sandbox if self._box is not None else None

    @property
    def sandbox_id(self) -> str:
        """The id of the kernel's last sandbox (kept in the provisioner info)."""
        return self._sandbox_id

    # Launching.

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        # Not km.format_kernel_cmd: it would swap "python3" for the host's interpreter
        # and put the host's connection file path in {connection_file}.
        extra = kwargs.pop("extra_arguments", [])
        kwargs["cmd"] = list(self.kernel_spec.argv) + list(extra)
        return await super().pre_launch(**kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        deadline = time.monotonic() + self.startup_timeout
        if self._box is None:
            factory = type(self).creation_plan  # through the class: a plain function, unbound
            plan = factory() if factory is not None else None
            config = self._sandbox_config(kwargs.get("cwd"))
            warm = self._warm_source(cmd, config, kwargs.get("cwd")) if plan is None else None
            self._box = KernelSandbox(config, self.log, plan, warm)
        keep = bool(self._key) and not self.rotate_key_on_restart
        self._key = self._key if keep else secrets.token_hex(32)
        request = KernelRequest(
            argv=cmd,
            env=guest_environment(kwargs.get("env") or {}, self.kernel_spec.env, self.pass_env),
            cwd=self._kernel_cwd(kwargs.get("cwd")),
            key=self._key,
            signature_scheme=SIGNATURE_SCHEME,
            kernel_name=getattr(self.parent, "kernel_name", "") or "",
            keep_ports=keep,
        )
        self._exit_expected = False
        # A failure propagates: jupyter_client logs it, Jupyter Server reports it.
        info = await _on_runtime_loop(self._box.launch(request, deadline))
        self._sandbox_id = self._box.sandbox_id
        self.connection_info = info
        return info

    def _sandbox_config(self, cwd: str | None) -> SandboxConfig:
        mounts = [Mount.parse(spec, "bind") for spec in self.mounts]
        mounts += [Mount.parse(spec, "volume") for spec in self.volumes]
        mounts += [Mount.parse(spec, "disk") for spec in self.disks]
        if self.share_notebook_dir != "off" and cwd:
            folder = os.path.realpath(cwd)
            mounts.append(Mount(folder, folder, readonly=self.share_notebook_dir == "ro"))
        return SandboxConfig(self.image, cpus=self.cpus, memory_mib=self.memory,
                             mounts=mounts, boot_timeout=self.startup_timeout)  # fmt: skip

    def _warm_source(self, cmd: list[str], config: SandboxConfig,
                     cwd: str | None) -> WarmSource | None:  # fmt: skip
        """The warm pool a first launch claims from, when this kernelspec can have one:
        ``warm``, an ipykernel, and only host folders shared (``mounts``; not the
        notebook's folder, which is another place in the guest for each notebook)."""
        if not self.warm or self._kernel_cwd(cwd) is not None:
            return None
        spec = warm_spec(cmd, self.image, self.cpus, self.memory, self.warm_imports,
                         config.mounts)  # fmt: skip
        if spec is None:
            return None
        resolve_mounts(spec.shares)  # a missing folder is named now, not after a template
        return WarmSource(_warm_pools(), spec, max(0, self.pool_size))

    @classmethod
    def close_pools(cls) -> None:
        """End every warm kernel of this process not handed out (they end with the
        process anyway)."""
        global _pools
        pools, _pools = _pools, None
        if pools is not None:
            submit(pools.close()).result()

    def _kernel_cwd(self, cwd: str | None) -> str | None:
        """The notebook's folder when it is shared; else the image's working directory."""
        if self.share_notebook_dir != "off" and cwd:
            return os.path.realpath(cwd)
        return None

    # The kernel process.

    @property
    def has_process(self) -> bool:
        return self._box is not None and self._box.kernel is not None

    async def poll(self) -> int | None:
        box = self._box
        if box is None or box.kernel is None:
            return 0
        code = box.kernel.exit_code
        if code is not None and not box.kernel.reported and not self._exit_expected:
            box.kernel.reported = True
            self.log.warning("%s", box.death_report())
        return code

    async def wait(self) -> int | None:
        box = self._box
        if box is None or box.kernel is None:
            return 0
        code = await _on_runtime_loop(box.wait())
        box.kernel = None  # has_process is False from now on
        return code

    async def send_signal(self, signum: int) -> None:
        if self._box is not None:
            await _on_runtime_loop(self._box.signal(signum))

    async def terminate(self, restart: bool = False) -> None:
        self._exit_expected = True
        await self.send_signal(signal.SIGTERM)

    async def kill(self, restart: bool = False) -> None:
        self._exit_expected = True
        await self.send_signal(signal.SIGKILL)

    async def shutdown_requested(self, restart: bool = False) -> None:
        self._exit_expected = True

    async def cleanup(self, restart: bool = False) -> None:
        if restart or self._box is None:
            return  # the next launch reuses the sandbox (or boots one if it died)
        box, self._box = self._box, None
        await _on_runtime_loop(box.end())

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 10.0)  # Python exits slowly under software emulation

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, self.startup_timeout)

    # Persistence.

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["sandbox_id"] = self._sandbox_id
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Only the id comes back: a sandbox belongs to the process that made it and ends
        with it, so a new server starts the kernel afresh (``poll`` says it is gone)."""
        await super().load_provisioner_info(provisioner_info)
        self._sandbox_id = provisioner_info.get("sandbox_id", "")
