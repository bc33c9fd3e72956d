"""The public sandbox classes with snapshots: ``vmruntime.Sandbox`` / ``vmruntime.AsyncSandbox``.

Who calls it: users (``vmruntime.Sandbox.create(from_snapshot=…)``, ``sb.snapshot(…)``),
through the package's exports. What it promises: everything
:class:`vmruntime.vm.AsyncSandbox` / :class:`vmruntime.vm.Sandbox` do, plus
``snapshot(name, seal=False, labels=None)`` (:mod:`.capture`) and
``create(from_snapshot=NAME)`` (:mod:`.restore`).

Why subclasses here: the layers contract puts snapshots above ``vmruntime.vm`` (a
snapshot is made of a sandbox, and vm must not know the store), so vm offers the seams
(``frozen()``, ``writable_layer``, ``record``, a plan's ``WritableLayerSource``) and the
entry points that tie them to the store live here. ``vmruntime.vm``'s classes stay
snapshot-free for the front doors that do not need them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from vmruntime import vm
from vmruntime._blocking import in_thread
from vmruntime.errors import SandboxConfigError
from vmruntime.images.store import ImageStore
from vmruntime.snapshots.capture import capture_memory, capture_running
from vmruntime.snapshots.restore import restore_source
from vmruntime.snapshots.store import Snapshot, SnapshotStore
from vmruntime.vm.config import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_MEMORY_MIB,
    DEFAULT_WRITABLE_SIZE,
    Ports,
    SandboxConfig,
)
from vmruntime.vm.sync import run


class AsyncSandbox(vm.AsyncSandbox):
    """:class:`vmruntime.vm.AsyncSandbox` with :meth:`snapshot` and ``create(from_snapshot=)``."""

    @classmethod
    async def create(  # type: ignore[override]  # image becomes optional
        cls,
        image: str | None = None,
        *,
        from_snapshot: str | None = None,
        cpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        ports: Ports | None = None,
        mounts: Sequence[vm.Mount | str] | None = None,
        name: str = "",
        writable_size: int = DEFAULT_WRITABLE_SIZE,
        detached: bool = False,
        keep: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        store: ImageStore | None = None,
        driver: vm.VmmDriver | None = None,
        snapshots: SnapshotStore | None = None,
    ) -> AsyncSandbox:
        """Boot a sandbox of ``image``, or restored from snapshot ``from_snapshot`` (its
        image comes from the snapshot's manifest; its writable layer starts as the
        snapshot's, copy-on-write, and is as big as the snapshot's; a memory snapshot's
        machine resumes where it was saved, with its own cpus and memory, and gets a fresh
        identity). ``cpus`` defaults to 1 and ``memory_mib`` to
        :data:`~vmruntime.vm.config.DEFAULT_MEMORY_MIB`. The other keywords are
        :meth:`vmruntime.vm.AsyncSandbox.create`'s; ``snapshots`` is the store (default:
        the local one)."""
        driver = driver or vm.QemuDriver()
        plan = vm.CreationPlan(driver, store=store)
        if from_snapshot is not None:
            if image is not None:
                reason = "give an image or from_snapshot, not both (the snapshot names its image)"
                raise SandboxConfigError("image", image, reason)
            restored = await in_thread(
                functools.partial(restore_source, store=snapshots, image_store=store),
                from_snapshot)  # fmt: skip
            image, plan = restored.image, restored.creation_plan(driver, store)
            cpus, memory_mib = restored.shape(cpus, memory_mib)
            mounts = restored.mounts_for(mounts or ())
        if image is None:
            raise SandboxConfigError("image", None, "want an image reference or from_snapshot")
        config = SandboxConfig(
            image, cpus=cpus or 1, memory_mib=memory_mib or DEFAULT_MEMORY_MIB, env=env or {},
            ports=ports or (),
            mounts=mounts or (), name=name, writable_size=writable_size, detached=detached,
            keep=keep, boot_timeout=boot_timeout,
        )  # fmt: skip
        sandbox = await cls.from_config(config, plan=plan)
        assert isinstance(sandbox, AsyncSandbox)
        return sandbox

    async def snapshot(self, name: str, seal: bool = False,
                       labels: Mapping[str, str] | None = None, *, memory: bool = False,
                       snapshots: SnapshotStore | None = None) -> Snapshot:  # fmt: skip
        """Keep this sandbox's writable layer as snapshot ``name`` (see
        :func:`~vmruntime.snapshots.capture.capture_running`): the guest holds its layer
        frozen during the copy and goes on afterwards. ``seal`` adds a content digest.
        ``memory=True`` keeps the whole machine too (RAM and devices, see
        :func:`~vmruntime.snapshots.capture.capture_memory`): sandboxes created from it
        resume where this one was."""
        capture = capture_memory if memory else capture_running
        return await capture(self, name, seal=seal, labels=labels, store=snapshots)


class Sandbox(vm.Sandbox):
    """:class:`vmruntime.vm.Sandbox` with :meth:`snapshot` and ``create(from_snapshot=)``."""

    @classmethod
    def create(  # type: ignore[override]  # image becomes optional
        cls,
        image: str | None = None,
        *,
        from_snapshot: str | None = None,
        cpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        ports: Ports | None = None,
        mounts: Sequence[vm.Mount | str] | None = None,
        name: str = "",
        writable_size: int = DEFAULT_WRITABLE_SIZE,
        detached: bool = False,
        keep: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        store: ImageStore | None = None,
        driver: vm.VmmDriver | None = None,
        snapshots: SnapshotStore | None = None,
    ) -> Sandbox:
        """Boot a sandbox of ``image`` or from a snapshot (see :meth:`AsyncSandbox.create`)."""
        return cls(run(AsyncSandbox.create(
            image, from_snapshot=from_snapshot, cpus=cpus, memory_mib=memory_mib, env=env,
            ports=ports, mounts=mounts, name=name, writable_size=writable_size,
            detached=detached, keep=keep, boot_timeout=boot_timeout, store=store,
            driver=driver, snapshots=snapshots,
        )))  # fmt: skip

    def snapshot(self, name: str, seal: bool = False, labels: Mapping[str, str] | None = None,
                 *, memory: bool = False,
                 snapshots: SnapshotStore | None = None) -> Snapshot:  # fmt: skip
        """Keep this sandbox's writable layer (and with ``memory=True`` its whole machine) as
        snapshot ``name`` (see :meth:`AsyncSandbox.snapshot`)."""
        capture = capture_memory if memory else capture_running
        return run(capture(self._inner, name, seal=seal, labels=labels, store=snapshots))
