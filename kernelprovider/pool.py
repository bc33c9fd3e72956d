"""Warm kernels: sandboxed IPython kernels started before anyone asks, handed out at once.

Who calls it: :class:`kernelprovider.provisioner.MicroVMProvisioner` (through
:class:`kernelprovider.kernel.KernelSandbox`), always on vmruntime's runtime loop.
What it promises:

- **the template**, once per :class:`WarmKernelSpec` (image digest, cpus, memory, the
  kernelspec's argv, warm imports, where its shares are in the guest, guest agent
  build): a sandbox boots (its shares, over the console transport, are empty temporary
  folders: no host file is in the template), starts the
  kernel with a random key nobody holds (``_warm_kernel.py``, a detached process), has
  it answer one ``kernel_info`` and run one silent ``pass`` (so the lazy imports of a
  first execution are done), and is saved as a memory snapshot named
  ``jupyter-warm-<key digest>`` in the local store, reused by later servers. No user's
  key, token or environment is ever in it;
- **members** of the :class:`~vmruntime.pools.WarmPool` resume from the template onto
  the kernelspec's host folders (served by their own brokers), get a fresh identity
  (RNG, clock, hostname, machine id), adopt the waiting kernel, forward its five ports
  from free host ports and warm up again (a resumed VM's code is translated anew under
  TCG) with the template's key, silently;
- **a claim** sends the member's kernel the user's fresh key, a new session id, a seed
  for ``random`` and numpy, the environment and working directory, over the guest's
  loopback (no host port); the kernel then stops listening for claims. Each member is
  claimed once (the pool's promise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient

from vmruntime import images
from vmruntime.errors import SandboxError, VmruntimeError
from vmruntime.images.store import ImageStore
from vmruntime.pools import PoolKey, PoolMember, WarmPool, carried_shares, stand_ins
from vmruntime.snapshots import AsyncSandbox as SnapshotSandbox
from vmruntime.snapshots import Snapshot, SnapshotStore
from vmruntime.vm import AsyncProcess, AsyncSandbox, Mount, QemuDriver

LAUNCHER = Path(__file__).with_name("_warm_kernel.py")
_GUEST_LAUNCHER = "/run/vmruntime-warm-kernel.py"
_GUEST_CONNECTION_FILE = "/tmp/.vmruntime-kernel/warm.json"
# The template's ports: its guest is fresh, so nothing else listens there.
KERNEL_PORTS = {"shell": 20000, "iopub": 20001, "stdin": 20002, "control": 20003, "hb": 20004}
CLAIM_PORT = 20005
_WARMUP_TIMEOUT = 120.0
# A claimed kernel's first cells come soon after it starts; its replacement's resume and
# warm-up (a second of CPU under TCG) waits until they are likely done.
REFILL_DELAY = 5.0
_IPYKERNEL_MODULES = ("ipykernel_launcher", "ipykernel")


class WarmKernelError(VmruntimeError):
    """A warm kernel could not be made or claimed (the message says which step and why)."""


@dataclass(frozen=True)
class WarmKernelSpec:
    """What a warm kernel is made of: the kernelspec's ``argv`` (an ipykernel's), the
    sandbox's image, cpus and memory, modules imported ahead, and the host folders it
    shares (bind mounts; members carry them over the console transport)."""

    image: str
    cpus: int
    memory_mib: int
    argv: tuple[str, ...]
    warm_imports: tuple[str, ...] = ()
    shares: tuple[Mount, ...] = ()

    @property
    def places(self) -> tuple[str, ...]:
        """Where the shares are in the guest (``GUEST[:ro]``): all the template's memory
        depends on (their host folders are the members')."""
        return tuple(m.place for m in self.shares)

    def kernel_args(self) -> list[str]:
        """The launcher's arguments: the kernelspec's after ``-m ipykernel_launcher``,
        with the connection file filled in."""
        index = list(self.argv).index("-m") + 2
        return [a.replace("{connection_file}", _GUEST_CONNECTION_FILE) for a in self.argv[index:]]


def warm_spec(argv: Sequence[str], image: str, cpus: int, memory_mib: int,
              warm_imports: Sequence[str] = (),
              shares: Sequence[Mount] = ()) -> WarmKernelSpec | None:  # fmt: skip
    """The warm form of a kernelspec, or None if its kernel cannot be started ahead (only
    an ipykernel started as ``PYTHON -m ipykernel_launcher|ipykernel ... {connection_file}``
    can: the launcher drives ipykernel's own application; only host folders can be
    shared with it: a memory snapshot cannot carry a disk)."""
    argv = list(argv)
    if len(argv) < 3 or argv[1] != "-m" or argv[2] not in _IPYKERNEL_MODULES:
        return None
    if not any("{connection_file}" in arg for arg in argv):
        return None
    carried = carried_shares(shares)
    if carried is None:
        return None
    return WarmKernelSpec(image, cpus, memory_mib, tuple(argv), tuple(warm_imports), carried)


@dataclass
class WarmKernel:
    """A pool member's kernel: its process (adopted) and the host ports of its channels."""

    process: AsyncProcess
    host_ports: dict[str, int]


class KernelPools:
    """The warm pools of one process, one per :class:`WarmKernelSpec` (on the runtime loop)."""

    def __init__(self) -> None:
        self._pools: dict[WarmKernelSpec, WarmPool] = {}
        self._templates: dict[WarmKernelSpec, asyncio.Future[Snapshot]] = {}

    def pool(self, spec: WarmKernelSpec, size: int) -> WarmPool:
        pool = self._pools.get(spec)
        if pool is None:
            shares = tuple(m.spec for m in spec.shares)
            key = PoolKey(f"image:{spec.image}", spec.cpus, spec.memory_mib, shares,
                          purpose="jupyter:" + " ".join(spec.argv))  # fmt: skip
            name = f"jupyter-{key.digest}"
            pool = WarmPool(key, size, lambda: self._make_member(spec), name=name,
                            refill_delay=REFILL_DELAY,
                            make_now=lambda: self._make_member(spec, warm=False))  # fmt: skip
            self._pools[spec] = pool
        pool.size = max(pool.size, size)
        pool.start()
        return pool

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()

    async def _make_member(self, spec: WarmKernelSpec, warm: bool = True) -> PoolMember:
        """A resumed copy of the spec's template, its kernel adopted and its ports
        forwarded; ``warm``: also run a cell (worth it only ahead of a claim)."""
        started = time.monotonic()
        template = await self._template(spec)
        sandbox = await SnapshotSandbox.create(from_snapshot=template.name,
                                               mounts=list(spec.shares))  # fmt: skip
        try:
            labels = template.manifest.labels
            process = await sandbox.adopt(int(labels["pid"]))
            await sandbox.personalize(ports={port: 0 for port in KERNEL_PORTS.values()})
            host_ports = {name: sandbox.ports[port] for name, port in KERNEL_PORTS.items()}
            if warm:
                await warm_up(host_ports, labels["key"])
                # A rehearsal of the claim with the template's key: its code is then
                # translated (TCG), and the real claim answers in a few milliseconds.
                member = PoolMember(sandbox, None)
                await claim_kernel(member, key=labels["key"], env={}, cwd=None, dry_run=True)
        except BaseException:
            with contextlib.suppress(SandboxError):
                await sandbox.kill()
            raise
        return PoolMember(sandbox, WarmKernel(process, host_ports), time.monotonic() - started)

    async def _template(self, spec: WarmKernelSpec) -> Snapshot:
        """The spec's template snapshot: from the store (looked up each time: it may
        have been removed), or made once (concurrent makers of one spec share it)."""
        future = self._templates.get(spec)
        if future is None or future.done():
            future = asyncio.ensure_future(ensure_template(spec))
            self._templates[spec] = future
        return await asyncio.shield(future)


def template_name(spec: WarmKernelSpec, image_store: ImageStore | None = None) -> str:
    """``jupyter-warm-<digest>`` of everything the template's memory depends on."""
    digest = images.resolve(spec.image, image_store or ImageStore()).manifest_digest
    assets = QemuDriver().guest_assets((image_store or ImageStore()).root)
    made_of = [list(spec.argv), list(spec.warm_imports), assets.initramfs.name,
               LAUNCHER.read_bytes().hex()]  # fmt: skip
    key = PoolKey(digest, spec.cpus, spec.memory_mib, spec.places, purpose=json.dumps(made_of))
    return f"jupyter-warm-{key.digest}"


async def ensure_template(spec: WarmKernelSpec) -> Snapshot:
    store = SnapshotStore()
    name = await asyncio.to_thread(template_name, spec)
    if await asyncio.to_thread(store.exists, name):
        return await asyncio.to_thread(store.get, name)
    return await _make_template(spec, name, store)


async def _make_template(spec: WarmKernelSpec, name: str, store: SnapshotStore) -> Snapshot:
    key = secrets.token_hex(32)  # the template's own: no user ever holds it
    with stand_ins(spec.shares) as empty:  # no user's file is in a template
        return await _save_template(spec, name, store, key, empty)


async def _save_template(spec: WarmKernelSpec, name: str, store: SnapshotStore, key: str,
                         shares: list[Mount]) -> Snapshot:  # fmt: skip
    sandbox = await SnapshotSandbox.create(spec.image, cpus=spec.cpus, memory_mib=spec.memory_mib,
                                           mounts=shares)  # fmt: skip
    try:
        pid = await _start_waiting_kernel(sandbox, spec, key)
        await sandbox.personalize(ports={port: 0 for port in KERNEL_PORTS.values()})
        await warm_up({n: sandbox.ports[p] for n, p in KERNEL_PORTS.items()}, key)
        await sandbox.unforward(KERNEL_PORTS.values())
        labels = {"vmruntime.pool": "jupyter", "pid": str(pid), "key": key,
                  "argv": json.dumps(list(spec.argv))[:1024]}  # fmt: skip
        with contextlib.suppress(Exception):
            await asyncio.to_thread(store.remove, name)  # a half-made one of a crash
        return await sandbox.snapshot(name, memory=True, labels=labels)
    finally:
        with contextlib.suppress(SandboxError):
            await sandbox.kill()


async def _start_waiting_kernel(sandbox: AsyncSandbox, spec: WarmKernelSpec, key: str) -> int:
    info = {f"{name}_port": port for name, port in KERNEL_PORTS.items()}
    info.update(ip="127.0.0.1", transport="tcp", key=key, signature_scheme="hmac-sha256",
                kernel_name="")  # fmt: skip
    script = ('umask 077 && mkdir -p "$(dirname "$1")" && chmod 700 "$(dirname "$1")" && '
              'cat > "$1"')  # fmt: skip
    await sandbox.exec(["/bin/sh", "-c", script, "sh", _GUEST_CONNECTION_FILE],
                       input=json.dumps(info).encode(), timeout=60, check=True)  # fmt: skip
    await sandbox.exec(["/bin/sh", "-c", 'cat > "$1" && chmod 644 "$1"', "sh", _GUEST_LAUNCHER],
                       input=LAUNCHER.read_bytes(), user="root", timeout=60,
                       check=True)  # fmt: skip
    argv = [spec.argv[0], _GUEST_LAUNCHER, str(CLAIM_PORT), *spec.kernel_args()]
    env = {"VMR_WARM_IMPORTS": ",".join(spec.warm_imports)}
    process = await sandbox.exec_stream(argv, env=env, stdin=False, detached=True)
    output = bytearray()
    drain = asyncio.ensure_future(_collect(process, output))
    deadline = time.monotonic() + _WARMUP_TIMEOUT
    while not await sandbox.port_open(CLAIM_PORT):
        if drain.done() or time.monotonic() > deadline:
            drain.cancel()
            tail = bytes(output[-4000:]).decode(errors="replace")
            raise WarmKernelError(f"the template's kernel did not start: {tail}")
        await asyncio.sleep(0.1)
    assert process.pid is not None
    return process.pid


async def _collect(process: AsyncProcess, output: bytearray) -> None:
    with contextlib.suppress(SandboxError):
        async for _stream, data in process:
            output.extend(data)
            del output[:-65536]


async def warm_up(host_ports: Mapping[str, int], key: str) -> None:
    """One ``kernel_info`` and one ``pass`` executed as a user's cell would be (history,
    execution count: the claim forgets both), with the template's key, so that what a
    first execution loads and translates is done: under TCG that is most of its time."""
    client = AsyncKernelClient()
    client.load_connection_info({**{f"{n}_port": p for n, p in host_ports.items()},
                                 "ip": "127.0.0.1", "transport": "tcp", "key": key,
                                 "signature_scheme": "hmac-sha256"})  # fmt: skip
    client.start_channels()
    try:
        await client.kernel_info(reply=True, timeout=_WARMUP_TIMEOUT)
        reply = await client.execute("pass", reply=True,
                                     timeout=_WARMUP_TIMEOUT)  # fmt: skip
        if reply["content"].get("status") != "ok":
            raise WarmKernelError(f"the warm-up execution failed: {reply['content']}")
    except TimeoutError:
        raise WarmKernelError("the kernel did not answer its warm-up") from None
    finally:
        client.stop_channels()


async def claim_kernel(member: PoolMember, *, key: str, env: Mapping[str, str],
                       cwd: str | None, dry_run: bool = False) -> dict[str, Any]:  # fmt: skip
    """Make ``member``'s kernel the user's (see the module); its answer. ``dry_run``:
    the pool's rehearsal with the template's key (the kernel stays claimable)."""
    message = {"key": key, "session": str(uuid.uuid4()), "seed": os.urandom(32).hex(),
               "env": dict(env), "cwd": cwd or "", "dry_run": dry_run}  # fmt: skip
    answer = await member.sandbox.request(CLAIM_PORT, json.dumps(message).encode() + b"\n",
                                          limit=65536)  # fmt: skip
    try:
        reply = json.loads(answer)
    except ValueError:
        reply = {"ok": False, "error": f"not JSON: {answer[:200]!r}"}
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        error = reply.get("error") if isinstance(reply, dict) else reply
        raise WarmKernelError(f"sandbox {member.sandbox.id}: the kernel refused its claim: {error}")
    return reply
