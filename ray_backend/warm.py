"""Warm starts for sandbox actors: a memory snapshot of a sandbox whose guest worker has
started and imported what calls need, resumed by each actor instead of a boot.

Who calls it: :class:`ray_backend.actor.SandboxActorBody` when it starts (``warm=True``,
the default, for an actor whose only mounts are host folders and without its own
snapshot), on vmruntime's runtime loop. What it promises:

- **the template**, once per node and key (the image's digest, cpus, memory, where its
  shares are in the guest, the worker bundle and the guest agent build): a sandbox boots
  (its shares, over the console transport, served from empty stand-in folders), starts
  the guest worker detached, has it import cloudpickle and numpy and run one call, and
  is saved as memory snapshot ``ray-warm-<digest>`` in the node's snapshot store (made
  under a lock: actors starting together on a node make it once), reused by later
  actors and later Ray sessions;
- **a warm actor** resumes a copy of it onto its own host folders (a fresh identity:
  RNG, clock, hostname, machine id), adopts the waiting worker, checks its Python
  again, and claims it: the worker reseeds ``random`` and numpy's global generator
  (their state was copied with the memory), takes the actor's environment and working
  directory. Nothing of a caller is in the template: it is made before any caller's
  function or data exists, and its shares are empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cloudpickle

from ray_backend.results import interpret
from ray_backend.worker import GuestWorker, function_key, pickle_call, pickle_function
from vmruntime import images
from vmruntime._blocking import in_thread
from vmruntime.errors import SandboxError
from vmruntime.images.store import ImageStore
from vmruntime.pools import stand_ins
from vmruntime.snapshots import AsyncSandbox, Snapshot, SnapshotStore
from vmruntime.vm import Mount, QemuDriver
from vmruntime.vm.mounts import resolve_mounts

WARM_IMPORTS = ("cloudpickle", "numpy")
_TEMPLATE_TIMEOUT = 300.0


def template_name(image: str, cpus: int, memory_mib: int, shares: Sequence[Mount] = ()) -> str:
    """``ray-warm-<digest>`` of everything the template's memory depends on (blocking)."""
    store = ImageStore()
    digest = images.resolve(image, store).manifest_digest
    initramfs = QemuDriver().guest_assets(store.root).initramfs.name
    text = json.dumps([digest, cpus, memory_mib, initramfs, _bundle_digest(), WARM_IMPORTS,
                       [m.place for m in shares]])  # fmt: skip
    return "ray-warm-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _bundle_digest() -> str:
    """What the worker bundle is made of (the bundle itself is a zip with timestamps)."""
    here = Path(__file__).parent
    names = ("_worker.py", "_wire.py", "_codec.py")
    sources = b"".join((here / name).read_bytes() for name in names)
    version = f"{cloudpickle.__version__} {sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(sources + version.encode()).hexdigest()


async def resume_warm(image: str, cpus: int, memory_mib: int, *, env: Mapping[str, str],
                      workdir: str | None, on_output: Callable[[bytes], None],
                      boot_timeout: float, shares: Sequence[Mount] = (),
                      ) -> tuple[AsyncSandbox, GuestWorker]:  # fmt: skip
    """A sandbox resumed from the template of (image, cpus, memory, share places) onto
    ``shares`` (console-transport host folders: :func:`vmruntime.pools.carried_shares`),
    with its worker adopted and claimed for this actor (see the module)."""
    await in_thread(resolve_mounts, shares)  # a missing folder is named before a template
    template = await ensure_template(image, cpus, memory_mib, boot_timeout, shares)
    sandbox = await AsyncSandbox.create(from_snapshot=template.name, env=env,
                                        mounts=list(shares),
                                        boot_timeout=boot_timeout)  # fmt: skip
    try:
        if workdir:
            await sandbox.exec(["mkdir", "-p", "--", workdir], check=True)
        worker = GuestWorker(sandbox, image, on_output=on_output, cwd=workdir)
        labels = template.manifest.labels
        await worker.adopt(int(labels["pid"]), json.loads(labels["hello"]))
        await call(worker, claim_worker, os.urandom(32), dict(env), workdir)
        # A resumed VM translates its code anew under TCG: one command now, so that the
        # actor's first exec is as quick as its later ones.
        await sandbox.exec(["true"], timeout=60)
    except BaseException:
        with contextlib.suppress(SandboxError):
            await sandbox.kill()
        raise
    return sandbox, worker


async def ensure_template(image: str, cpus: int, memory_mib: int, boot_timeout: float,
                          shares: Sequence[Mount] = ()) -> Snapshot:  # fmt: skip
    store = SnapshotStore()
    name = await in_thread(template_name, image, cpus, memory_mib, shares)
    if await in_thread(store.exists, name):
        return await in_thread(store.get, name)
    lock = await in_thread(_hold_lock, store, name)
    try:
        if await in_thread(store.exists, name):  # another actor made it meanwhile
            return await in_thread(store.get, name)
        with stand_ins(shares) as empty:  # no caller's file is in a template
            making = _make_template(name, image, cpus, memory_mib, boot_timeout, empty)
            return await asyncio.wait_for(making, _TEMPLATE_TIMEOUT)
    finally:
        await in_thread(lock.__exit__, None, None, None)


def _hold_lock(store: SnapshotStore, name: str) -> contextlib.AbstractContextManager[Any]:
    """The node-wide lock of template ``name``, held (blocking until it is free)."""
    lock = store.lock(name)
    lock.__enter__()
    return lock


async def _make_template(name: str, image: str, cpus: int, memory_mib: int,
                         boot_timeout: float, shares: list[Mount]) -> Snapshot:  # fmt: skip
    sandbox = await AsyncSandbox.create(image, cpus=cpus, memory_mib=memory_mib, mounts=shares,
                                        boot_timeout=boot_timeout)  # fmt: skip
    try:
        worker = GuestWorker(sandbox, image, on_output=lambda _data: None)
        hello = await worker.start(detached=True)
        await call(worker, import_modules, WARM_IMPORTS)
        pid = worker.pid
        labels = {"vmruntime.pool": "ray", "pid": str(pid), "hello": json.dumps(hello)[:1024]}
        return await sandbox.snapshot(name, memory=True, labels=labels)
    finally:
        with contextlib.suppress(SandboxError):
            await sandbox.kill()


async def call(worker: GuestWorker, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in ``worker``, on the runtime loop (the actor's own calls go through
    :meth:`SandboxActorBody.call`)."""
    function = pickle_function(fn)
    key = function_key(function)
    payload, buffers = pickle_call(key, function, args, {}, False)
    reply = await worker.call(key, payload, buffers, None)
    return interpret(worker, reply, False)


# Run in the guest worker (pickled by value: they use only the standard library there).


def import_modules(names: tuple[str, ...]) -> list[str]:
    """Import ``names`` (those missing are skipped); the ones imported."""
    import importlib

    imported = []
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
            imported.append(name)
    return imported


def claim_worker(seed: bytes, env: dict[str, str], workdir: str | None) -> None:
    """A resumed worker becomes this actor's: its own random state, env and directory."""
    import os
    import random
    import sys

    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(numpy.frombuffer(seed, dtype=numpy.uint32))
    os.environ.update(env)
    if workdir:
        os.chdir(workdir)
