"""Creating a sandbox's machine, as named steps over shared ``attach_*`` helpers.

Who calls it: :meth:`AsyncSandbox.from_config` (and through it ``create``, ``vmr run``,
the Jupyter provisioner and Ray actors), which runs :func:`build_machine` (steps 1-5)
and then the sandbox's own steps 6-7. The steps, in order:

1. **inputs**: resolve the image (building missing layer images), the driver's guest
   assets, the accelerator, the mounts' host side, the device budget;
2. **directories**: the sandbox's state and runtime directories and its record;
3. **writable layer**: from the plan's :class:`WritableLayerSource` (a fresh layer, or
   a qcow2 overlay over a snapshot's layer: ``vmruntime.snapshots.SnapshotLayer``);
4. **mounts**: attach locks and one broker per share;
5. **machine**: the spec (layers, writable layer, mounts, agent port) started by the
   plan's :class:`MachineStart` (:class:`ColdBoot`, or :class:`Resume` from a saved
   machine) with the plan's :class:`~vmruntime.vm.driver.VmmDriver`;
6. **agent** (the sandbox's): connect, handshake, mount the shares and disks (a resumed
   guest has them mounted already: it gets a fresh identity instead);
7. **personalise** (the sandbox's): the per-caller settings (env, ports, name), which a
   warm pool cannot know when it boots a sandbox.

What it promises: each step that makes something registers its undo as it makes it
(on the caller's exit stack), so a failure or a cancellation at any step removes
exactly what was made (no directory, layer, broker, lock or VM is left); blocking
work (resolving and rebuilding layers, building guest assets, copying the layer,
starting brokers, writing the record) runs in worker threads, never on the caller's
event loop (the Jupyter provisioner runs on the Jupyter server's loop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmruntime._blocking import in_thread
from vmruntime.errors import SandboxConfigError, SandboxError
from vmruntime.guest.assets import GuestAssets
from vmruntime.images import ImageRecord, ImageStore
from vmruntime.rootfs.bootable import resolve
from vmruntime.rootfs.writable import create_writable_layer
from vmruntime.vm import state
from vmruntime.vm.accel import Accelerator, choose_accelerator
from vmruntime.vm.config import ExecDefaults, SandboxConfig
from vmruntime.vm.driver import MachineSpec, MemoryImage, VmHandle, VmmDriver
from vmruntime.vm.mounts import Mount, ResolvedMount, SandboxMounts, guest_owner, resolve_mounts
from vmruntime.vm.qemu import QemuDriver

AGENT_PORT = "org.vmruntime.agent"
# microvm's virtio-mmio transports (QEMU 7.2): layers + writable + console + mounts.
VIRTIO_SLOTS = 24


@dataclass(frozen=True)
class MadeLayer:
    """What a :class:`WritableLayerSource` made: how the VMM must open it, and where it
    came from (recorded in the sandbox's record; a snapshot of the sandbox names it as
    its parent)."""

    format: str = "raw"  # "raw", or "qcow2" (an overlay over a read-only backing file)
    origin: str = ""  # e.g. the manifest digest of the snapshot it was restored from


class WritableLayerSource(Protocol):
    """Where a new sandbox's writable layer comes from (step 3)."""

    def make(self, dest: Path, config: SandboxConfig, cache_root: Path) -> MadeLayer | None:
        """Create ``dest`` (blocking; runs in a worker thread). On failure, leave nothing.
        None means a raw layer of no particular origin."""


@dataclass(frozen=True)
class FreshLayer:
    """An empty layer of ``config.writable_size``, cloned from the cached template."""

    def make(self, dest: Path, config: SandboxConfig, cache_root: Path) -> MadeLayer | None:
        create_writable_layer(dest, config.writable_size, cache_root=cache_root)
        return MadeLayer()


class MachineStart(Protocol):
    """How the machine comes up (step 5)."""

    # True: the guest goes on from a saved machine (its mounts are already in place; it
    # needs a fresh identity); False: it boots, and everything is done after the boot.
    resumes: bool

    async def start(self, driver: VmmDriver, spec: MachineSpec, *, detached: bool) -> VmHandle:
        """The started machine; the agent is connected afterwards, whatever the start."""


@dataclass(frozen=True)
class ColdBoot:
    """Boot the guest kernel from the start."""

    resumes: bool = field(default=False, init=False)

    async def start(self, driver: VmmDriver, spec: MachineSpec, *, detached: bool) -> VmHandle:
        return await driver.boot(spec, detached=detached)


@dataclass(frozen=True)
class Resume:
    """Go on from a saved machine (a memory snapshot's RAM and device state). The
    config's cpus, memory and mounts must be those of the machine that was saved."""

    image: MemoryImage
    resumes: bool = field(default=True, init=False)

    async def start(self, driver: VmmDriver, spec: MachineSpec, *, detached: bool) -> VmHandle:
        return await driver.resume_from(spec, self.image, detached=detached)


@dataclass(frozen=True)
class CreationPlan:
    """The replaceable steps of creation; the defaults make a fresh, cold-booted sandbox."""

    driver: VmmDriver = field(default_factory=QemuDriver)
    layer: WritableLayerSource = field(default_factory=FreshLayer)
    start: MachineStart = field(default_factory=ColdBoot)
    store: ImageStore | None = None


@dataclass(frozen=True)
class RestorePlan:
    """What a snapshot gives a sandbox restored from it (made by ``vmruntime.snapshots``,
    which vm must not import): the image, the writable layer's source, how the machine
    starts, and for a memory snapshot the machine's shape (a saved machine resumes only
    with the cpus and memory it was saved with)."""

    image: str
    layer: WritableLayerSource
    start: MachineStart = field(default_factory=ColdBoot)
    cpus: int | None = None
    memory_mib: int | None = None
    # A saved machine's shares, ``GUEST[:ro]`` in order (None: not a saved machine).
    shares: tuple[str, ...] | None = None

    def creation_plan(self, driver: VmmDriver, store: ImageStore | None = None) -> CreationPlan:
        return CreationPlan(driver, layer=self.layer, start=self.start, store=store)

    def shape(self, cpus: int | None, memory_mib: int | None) -> tuple[int | None, int | None]:
        """The cpus and memory to create with: the saved machine's; asking for others is a
        :class:`~vmruntime.errors.SandboxConfigError` (None: the caller did not ask)."""
        for what, asked, saved in (("cpus", cpus, self.cpus),
                                   ("memory_mib", memory_mib, self.memory_mib)):  # fmt: skip
            if saved is not None and asked is not None and asked != saved:
                reason = (f"the memory snapshot's machine has {what}={saved}; a resumed "
                          "sandbox keeps it")  # fmt: skip
                raise SandboxConfigError(what, asked, reason)
        return (self.cpus if self.cpus is not None else cpus,
                self.memory_mib if self.memory_mib is not None else memory_mib)  # fmt: skip

    def mounts_for(self, mounts: Sequence[Mount | str]) -> list[Mount | str]:
        """The mounts to create with: as given; for a saved machine, host folders for
        exactly its shares (same guest paths, same order, same read-only), carried over
        the console transport, which its guest's FUSE sessions go on through."""
        if self.shares is None:
            return list(mounts)
        parsed = [m if isinstance(m, Mount) else Mount.parse(m) for m in mounts]
        places = tuple(m.place for m in parsed)
        if places != self.shares or not all(m.kind in ("bind", "volume") for m in parsed):
            reason = (f"the memory snapshot's machine has shares at {list(self.shares)}: give "
                      "a host folder (or directory volume) for each, in that order")  # fmt: skip
            raise SandboxConfigError("mounts", [str(m) for m in parsed], reason)
        return [dataclasses.replace(m, transport="console") for m in parsed]


@dataclass(frozen=True)
class _Inputs:
    """What step 1 found: everything later steps need from the disk."""

    image: ImageRecord
    assets: GuestAssets
    accelerator: Accelerator
    mounts: list[ResolvedMount]
    cache_root: Path


@dataclass(frozen=True)
class Machine:
    """What steps 1-5 made: a started machine and everything a sandbox needs to drive it."""

    paths: state.SandboxPaths
    record: state.SandboxRecord
    defaults: ExecDefaults
    vm: VmHandle
    mounts: SandboxMounts


async def build_machine(config: SandboxConfig, plan: CreationPlan,
                        undo: contextlib.AsyncExitStack) -> Machine:  # fmt: skip
    """Steps 1-5, each registering its undo on ``undo`` as it makes something."""
    inputs = await in_thread(_find_inputs, config, plan)
    paths = await in_thread(_make_directories, undo)
    try:
        record = _first_record(paths, config, inputs, plan.driver)
        await in_thread(state.write_record, paths, record)
        layer = await in_thread(_make_layer, plan.layer, paths, config, inputs, undo)
        record.writable_format, record.layer_origin = layer.format, layer.origin
        mounts = await in_thread(_start_mounts, inputs, paths, config, undo, plan.start.resumes)
        record.mounts, record.brokers = mounts.describe(), mounts.broker_processes
        spec = machine_spec(config, paths, inputs, mounts, writable_format=layer.format)
        vm = await plan.start.start(plan.driver, spec, detached=config.detached)
        undo.callback(vm.kill)
        record.vmm_pid, record.vmm_start = vm.pid, state.process_start_time(vm.pid)
        await in_thread(state.write_record, paths, record)
    except OSError as exc:  # e.g. a full disk while copying the layer
        raise SandboxError(paths.id, f"cannot prepare the sandbox: {exc}") from exc
    return Machine(paths, record, ExecDefaults.from_image(inputs.image.config), vm, mounts)


def _find_inputs(config: SandboxConfig, plan: CreationPlan) -> _Inputs:
    resolved = resolve_mounts(config.mounts)  # a bad mount fails before anything is made
    store = plan.store or ImageStore()
    image = resolve(config.image, store)
    check_device_budget(len(image.layer_paths), len(resolved))
    assets = plan.driver.guest_assets(store.root)
    return _Inputs(image, assets, choose_accelerator(), resolved, store.root)


def _make_directories(undo: contextlib.AsyncExitStack) -> state.SandboxPaths:
    paths = state.SandboxPaths(state.new_sandbox_id())
    try:
        paths.create()
    except OSError as exc:
        paths.remove()
        raise SandboxError(paths.id, f"cannot create its directories: {exc}") from exc
    undo.callback(paths.remove)
    return paths


def _first_record(paths: state.SandboxPaths, config: SandboxConfig, inputs: _Inputs,
                  driver: VmmDriver) -> state.SandboxRecord:  # fmt: skip
    image = inputs.image
    defaults = ExecDefaults.from_image(image.config).with_env(config.env)
    return state.SandboxRecord(
        id=paths.id,
        image=image.reference,
        manifest_digest=image.manifest_digest,
        created=time.time(),
        cpus=config.cpus,
        memory_mib=config.memory_mib,
        accelerator=inputs.accelerator.name,
        detached=config.detached,
        owner_pid=os.getpid(),
        owner_start=state.process_start_time(os.getpid()),
        name=config.name,
        keep=config.keep or config.detached,
        config=config.to_json(),
        exec_defaults=defaults.to_json(),
        vmm=driver.name,
    )


def _make_layer(source: WritableLayerSource, paths: state.SandboxPaths, config: SandboxConfig,
                inputs: _Inputs, undo: contextlib.AsyncExitStack) -> MadeLayer:  # fmt: skip
    undo.callback(paths.writable.unlink, missing_ok=True)
    return source.make(paths.writable, config, inputs.cache_root) or MadeLayer()


def _start_mounts(inputs: _Inputs, paths: state.SandboxPaths, config: SandboxConfig,
                  undo: contextlib.AsyncExitStack, resume: bool) -> SandboxMounts:  # fmt: skip
    # Before the machine: QEMU connects to the brokers' sockets as it starts. A resumed
    # guest's shares are mounted already: their brokers carry on its FUSE sessions.
    owner = guest_owner(inputs.image.config.user)
    mounts = SandboxMounts.prepare(inputs.mounts, paths, owner=owner, detached=config.detached,
                                   resume=resume)  # fmt: skip
    undo.callback(mounts.close)
    return mounts


def machine_spec(config: SandboxConfig, paths: state.SandboxPaths, inputs: _Inputs,
                 mounts: SandboxMounts, *,
                 writable_format: str = "raw") -> MachineSpec:  # fmt: skip
    """The machine of step 5: kernel and command line, then every device."""
    layers = inputs.image.layer_paths
    cmdline = kernel_cmdline(len(layers), paths.id, inputs.accelerator.name,
                             shares=bool(mounts.shares))  # fmt: skip
    spec = MachineSpec(
        kernel=inputs.assets.kernel,
        initramfs=inputs.assets.initramfs,
        cmdline=cmdline,
        cpus=config.cpus,
        memory_mib=config.memory_mib,
        accelerator=inputs.accelerator.name,
        console_log=paths.console_log,
        control_socket=paths.control_socket,
        vmm_log=paths.vmm_log,
    )
    attach_image_layers(spec, layers)
    attach_writable_layer(spec, paths.writable, writable_format)
    mounts.attach(spec)
    attach_agent_port(spec, paths.agent_socket)
    return spec


def attach_image_layers(spec: MachineSpec, layers: tuple[Path, ...]) -> None:
    """Read-only, shared by every sandbox of the image; serials L0… bottom first."""
    for index, layer in enumerate(layers):
        spec.attach_disk(layer, serial=f"L{index}", readonly=True)


def attach_writable_layer(spec: MachineSpec, layer: Path, format: str = "raw") -> None:
    spec.attach_disk(layer, serial="W", readonly=False, format=format)


def attach_agent_port(spec: MachineSpec, socket: Path) -> None:
    spec.attach_console_port(AGENT_PORT, socket)


def check_device_budget(layers: int, mounts: int) -> None:
    used = layers + 2 + mounts  # + the writable layer and the console
    if used > VIRTIO_SLOTS:
        reason = (f"{layers} layers + {mounts} mounts need {used} virtio devices; the"
                  f" microVM has {VIRTIO_SLOTS}")  # fmt: skip
        raise SandboxError("-", reason)


def kernel_cmdline(layers: int, sandbox_id: str, accelerator: str, *, shares: bool = False) -> str:
    # reboot=t: microvm has no reset device, so the agent's reboot (and panic=-1)
    # must triple-fault for QEMU's -no-reboot to end the VM.
    args = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
    if accelerator == "tcg" and (khz := host_tsc_khz()):
        # Under TCG the guest's TSC is the host's; calibrating it against the emulated
        # PIT sometimes hangs early boot, so the kernel is told the rate instead.
        args.append(f"tsc_early_khz={khz}")
    args += [f"vmr.layers={layers}", "vmr.writable=1", f"vmr.hostname=vmr-{sandbox_id}"]
    if shares:
        args.append("vmr.modules=virtiofs")  # fuse + virtiofs cost boot time: only on demand
    if os.environ.get("VMRUNTIME_GUEST_DEBUG"):
        args.append("vmr.debug=1")  # the agent logs each boot step to the console
    return " ".join(args)


def host_tsc_khz() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None
