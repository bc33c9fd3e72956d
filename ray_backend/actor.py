"""``SandboxActor``: a Ray actor that owns one microVM sandbox and runs untrusted functions
and commands in it.

Who calls it: Ray jobs, as ``SandboxActor.options(...).remote(...)`` or through
:func:`ray_backend.create` (the drop-in for ``ray.experimental.sandbox.create``). What it
promises:

* the sandbox starts with the actor, sized from what Ray assigned to it: resumed from a
  memory snapshot of a sandbox whose worker is started and warm (``warm=True``, the
  default, when its only mounts are host folders: :mod:`ray_backend.warm`), booted
  (``warm=False``), or restored from ``snapshot``; it ends with the actor: a killed
  actor's QEMU and brokers die with its process;
* ``run(fn, *args, **kwargs)`` runs ``fn`` in a warm Python worker in the guest and
  returns its result as plain data (see :mod:`ray_backend.results`); a timeout or a dying
  worker costs that worker, never the actor;
* the methods of Ray's own sandboxes (``exec``, ``write_file``, ``read_file``,
  ``upload_file``, ``download_file``, ``get_status``, ``delete``, ``terminate``) take the
  same arguments and give the same results;
* the guest has no network and sees nothing of the host but the folders given as
  ``mounts``; the host's environment and Ray's do not reach it.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.experimental.sandbox import ExecResult, SandboxStatus

from ray_backend import snapshots as actor_snapshots
from ray_backend.errors import (
    GuestFileError,
    RaySandboxError,
    SandboxGoneError,
    SandboxTimeoutError,
    UnsupportedOptionError,
    WorkerProtocolError,
)
from ray_backend.results import interpret, printable
from ray_backend.warm import resume_warm
from ray_backend.worker import GuestWorker, function_key, pickle_call, pickle_function
from vmruntime.errors import ExecStartError, ExecTimeoutError
from vmruntime.pools import carried_shares
from vmruntime.snapshots import AsyncSandbox
from vmruntime.vm import sync
from vmruntime.vm.commands import end_abandoned_sandboxes
from vmruntime.vm.config import DEFAULT_BOOT_TIMEOUT, DEFAULT_MEMORY_MIB

DEFAULT_IMAGE = "vmruntime/default:latest"
DEFAULT_SHELL = "/bin/bash"
_NETWORK_MODES = ("none", "public", "host", "sandbox")
_CANNOT_START = 128  # the exit code Ray's sandboxes give a command that cannot start


def memory_mib(memory: str | int | float | None, assigned: Mapping[str, float]) -> int:
    """The guest's memory: ``memory`` (bytes, or a string such as ``"1Gi"`` as Ray's
    sandboxes take it), else the ``memory`` Ray assigned to the actor, else 512 MiB."""
    from ray.experimental.sandbox.config import parse_memory_bytes

    size = parse_memory_bytes(memory) if memory is not None else None
    if not size and assigned.get("memory", 0) > 0:
        size = int(assigned["memory"])
    if not size:
        return DEFAULT_MEMORY_MIB
    if size < 128 << 20:
        raise UnsupportedOptionError("memory", memory, "a microVM needs at least 128 MiB")
    return size >> 20


def vcpus(cpu: float | None, assigned: Mapping[str, float]) -> int:
    """The guest's vCPUs: ``cpu``, else the CPUs Ray assigned, rounded up; at least one and
    at most the host's."""
    wanted = cpu if cpu is not None and cpu > 0 else assigned.get("CPU", 0)
    return max(1, min(math.ceil(wanted or 1), os.cpu_count() or 1))


def check_options(network: str, dns: Sequence[str] | None,
                  capabilities: Sequence[str] | None, rootless: bool = True) -> None:  # fmt: skip
    """Refuse the options of Ray's sandboxes that a microVM here cannot honour."""
    if rootless is not True:
        raise UnsupportedOptionError(
            "rootless", rootless, "a microVM sandbox runs without host root privileges "
            "always; there is no root mode to ask for")  # fmt: skip
    if network not in _NETWORK_MODES:
        raise UnsupportedOptionError("network", network, f"expected one of {_NETWORK_MODES}")
    if network != "none":
        raise UnsupportedOptionError(
            "network", network, "sandboxes here have no network device; only 'none' is offered")
    if dns is not None:
        raise UnsupportedOptionError("dns", dns, "there is no network to resolve names on")
    if capabilities is not None:
        raise UnsupportedOptionError(
            "capabilities", capabilities,
            "the guest has its own kernel: its root user has every capability there, and "
            "none on the host; capability sets are not offered")  # fmt: skip


class SandboxActorBody:
    """The class behind :data:`SandboxActor` (see the module's docstring)."""

    def __init__(
        self,
        image: str | None = None,
        *,
        snapshot: str | None = None,
        mounts: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        cpu: float | None = None,
        memory: str | int | float | None = None,
        ttl_seconds: float | None = None,
        timeout_seconds: float = DEFAULT_BOOT_TIMEOUT,
        network: str = "none",
        readonly: bool = False,
        trust_results: bool = False,
        check_python: bool = True,
        shell: str = DEFAULT_SHELL,
        rootless: bool = True,
        dns: Sequence[str] | None = None,
        capabilities: Sequence[str] | None = None,
        warm: bool = True,
    ) -> None:
        check_options(network, dns, capabilities, rootless)
        if snapshot is not None and image is not None:
            raise UnsupportedOptionError("image", image, "give an image or a snapshot, not both")
        assigned = _assigned_resources()
        self._image = image or DEFAULT_IMAGE
        self._trust_results = trust_results
        self._shell = shell
        self._workdir = workdir
        self._ended = False
        self._lock = threading.RLock()
        self._snapshot_source = actor_snapshots.restart_source(snapshot)
        sync.run(end_abandoned_sandboxes())  # what actors killed on this node left
        shape = {"cpus": vcpus(cpu, assigned), "memory_mib": memory_mib(memory, assigned)}
        shares = carried_shares(mounts) if warm else None
        if shares is not None and self._snapshot_source is None:
            self._sandbox, self._worker = sync.run(resume_warm(
                self._image, **shape, env=env or {}, workdir=workdir, shares=shares,
                on_output=_show_guest_output, boot_timeout=timeout_seconds,
            ))  # fmt: skip
            self._warm = True
        else:
            self._sandbox = sync.run(self._create(env=env, mounts=mounts, **shape,
                                                  boot_timeout=timeout_seconds))  # fmt: skip
            self._worker = GuestWorker(self._sandbox, self._image, on_output=_show_guest_output,
                                       cwd=workdir)  # fmt: skip
            self._warm = False
        self._image = self._sandbox.record.image or self._image
        try:
            sync.run(self._prepare(readonly))
            if check_python:
                sync.run(self._worker.start())
        except BaseException:
            self._end()
            raise
        self._ttl = _start_ttl(ttl_seconds, self._end)

    async def _create(self, **options: Any) -> AsyncSandbox:
        if self._snapshot_source is not None:
            name = await actor_snapshots.local_snapshot(self._snapshot_source)
            return await AsyncSandbox.create(from_snapshot=name, **options)
        return await AsyncSandbox.create(self._image, **options)

    async def _prepare(self, readonly: bool) -> None:
        """Make the working directory, and the root read-only if asked (as Ray's sandboxes
        do: only the working directory and the tmpfs mounts stay writable)."""
        if readonly:
            await self._sandbox.readonly_root(writable=[self._workdir] if self._workdir else [])
        elif self._workdir:
            await self._sandbox.exec(["mkdir", "-p", "--", self._workdir], check=True)

    # --- untrusted functions ---------------------------------------------------------

    def run(self, fn: Callable[..., Any], /, *args: Any, timeout: float | None = None,
            **kwargs: Any) -> Any:  # fmt: skip
        """``fn(*args, **kwargs)`` in the guest; its result, or its exception re-raised.

        ``timeout`` (seconds) kills the guest worker if the call runs longer and raises
        :class:`~ray_backend.errors.SandboxTimeoutError`; the next call gets a fresh
        worker. (A keyword argument of ``fn`` named ``timeout`` has to go in a ``dict``
        through :meth:`call`.)
        """
        return self.call(fn, args, kwargs, timeout=timeout)

    def call(self, fn: Callable[..., Any], args: Sequence[Any] = (),
             kwargs: Mapping[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:  # fmt: skip
        """:meth:`run` with the arguments as a sequence and a mapping."""
        with self._lock:
            self._require_alive()
            function = pickle_function(fn)
            key = function_key(function)
            payload, buffers = pickle_call(key, None if self._worker.knows(key) else function,
                                           args, dict(kwargs or {}), self._trust_results)
            reply = sync.run(self._worker.call(key, payload, buffers, timeout))
            del payload, buffers
            try:
                return interpret(self._worker, reply, self._trust_results)
            except WorkerProtocolError:
                sync.run(self._worker.stop())  # its stream can no longer be trusted
                raise

    def python_version(self) -> str:
        """The guest worker's Python version (it is started if it is not running)."""
        hello = sync.run(self._worker.start())
        return ".".join(str(part) for part in hello["python"])

    # --- snapshots -------------------------------------------------------------------

    def snapshot(self, name: str, push_to: str | None = None, *, seal: bool = False,
                 labels: Mapping[str, str] | None = None) -> str:  # fmt: skip
        """Keep the sandbox's disk as snapshot ``name`` (and push it, with its image, to the
        store at ``push_to`` so any node can restore it); what ``snapshot=`` takes to
        restore it. A restarted actor restores its last one."""
        with self._lock:
            self._require_alive()
            sync.run(self._sandbox.snapshot(name, seal=seal, labels=labels))
            spec = actor_snapshots.publish(name, push_to) if push_to else name
            actor_snapshots.remember_for_restart(spec)
            return spec

    # --- Ray's sandbox API -----------------------------------------------------------

    def exec(self, command: str | Sequence[str], timeout: float | None = None,
             cwd: str | None = None, env: Mapping[str, str] | None = None,
             shell: str | None = None) -> ExecResult:  # fmt: skip
        """Run ``command`` (a list, or a string through ``shell``, default /bin/bash). A
        command that cannot start (no such program or working directory) exits 128 with
        the reason on stderr, as in Ray's sandboxes."""
        argv = [shell or self._shell, "-c", command] if isinstance(command, str) else list(command)
        with self._lock:
            self._require_alive()
            started = time.monotonic()
            try:
                if not argv:
                    raise ExecStartError(self._sandbox.id, argv, 0, "no command given")
                result = sync.run(self._sandbox.exec(argv, env=env, cwd=cwd or self._workdir,
                                                     timeout=timeout))  # fmt: skip
            except ExecTimeoutError:
                raise SandboxTimeoutError(f"command {argv!r}", timeout or 0) from None
            except ExecStartError as exc:
                return ExecResult(exit_code=_CANNOT_START, stdout="",
                                  stderr=printable(exc.message) + "\n",
                                  duration_seconds=time.monotonic() - started)  # fmt: skip
        code = result.returncode if result.returncode >= 0 else 128 - result.returncode
        return ExecResult(exit_code=code,
                          stdout=result.stdout.decode("utf-8", "replace"),
                          stderr=result.stderr.decode("utf-8", "replace"),
                          duration_seconds=time.monotonic() - started)  # fmt: skip

    def write_file(self, path: str, content: str | bytes) -> None:
        """Write ``content`` to ``path`` in the guest (parents made), as the image's user."""
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        self._file_command(["/bin/sh", "-c", script, "sh", path], path, data)

    def read_file(self, path: str) -> bytes:
        """The bytes of ``path`` in the guest, read as the image's user."""
        return self._file_command(["cat", "--", path], path, None)

    def upload_file(self, local_path: str, remote_path: str) -> None:
        """Copy a file of the actor's node into the guest."""
        with open(local_path, "rb") as source:
            self.write_file(remote_path, source.read())

    def download_file(self, remote_path: str, local_path: str) -> None:
        """Copy a file of the guest to the actor's node (parent directories made)."""
        content = self.read_file(remote_path)
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        with open(local_path, "wb") as target:
            target.write(content)

    def _file_command(self, argv: list[str], path: str, data: bytes | None) -> bytes:
        with self._lock:
            self._require_alive()
            result = sync.run(self._sandbox.exec(argv, input=data, cwd=self._workdir))
        if result.returncode != 0:
            raise GuestFileError(path, result.returncode,
                                 printable(result.stderr.decode("utf-8", "replace").strip()))
        return result.stdout

    def get_status(self) -> SandboxStatus:
        if self._ended:
            return SandboxStatus.TERMINATED
        return SandboxStatus.RUNNING if self._sandbox.running else SandboxStatus.ERROR

    def get_instance_id(self) -> str:
        return self._sandbox.id

    def delete(self) -> None:
        """End the sandbox (the actor stays, answering that the sandbox is gone)."""
        self._end()

    def terminate(self) -> None:
        """End the sandbox (as :meth:`delete`)."""
        self._end()

    # --- ending ----------------------------------------------------------------------

    def _require_alive(self) -> None:
        if self._ended:
            raise SandboxGoneError(self._sandbox.id)

    def _end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        ttl = getattr(self, "_ttl", None)
        if ttl is not None:
            ttl.cancel()
        sync.run(self._sandbox.stop(timeout=5))


def _assigned_resources() -> dict[str, float]:
    try:
        return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # not in a Ray worker (the class used directly)
        return {}


def _start_ttl(ttl_seconds: float | None, end: Callable[[], None]) -> threading.Timer | None:
    if ttl_seconds is None or ttl_seconds <= 0:
        return None
    timer = threading.Timer(ttl_seconds, end)
    timer.daemon = True
    timer.start()
    return timer


def _show_guest_output(data: bytes) -> None:
    """The guest worker's prints, in the actor's log (which Ray shows the driver)."""
    sys.stderr.write(printable(data.decode("utf-8", "replace")))
    sys.stderr.flush()


SandboxActor = ray.remote(SandboxActorBody)
SandboxActor.__doc__ = __doc__


def create(
    image: str | None,
    cpu: float | None = None,
    memory: str | int | float | None = None,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    ttl_seconds: int | None = None,
    timeout_seconds: float = 30.0,
    rootless: bool = True,
    network: str = "none",
    dns: Sequence[str] | None = None,
    capabilities: Sequence[str] | None = None,
    resources: Mapping[str, float] | None = None,
    readonly: bool = True,
    **kwargs: Any,
) -> ray.actor.ActorHandle:
    """A :data:`SandboxActor` made as ``ray.experimental.sandbox.create`` makes its
    sandboxes: the same keywords (the actor's Ray options from ``cpu``, ``memory`` and
    ``resources``), the same methods and results, plus :meth:`SandboxActorBody.run`.
    Options a microVM cannot honour (``network`` other than ``"none"``, ``dns``,
    ``capabilities``) are refused here, before an actor is made. ``timeout_seconds`` bounds
    the boot, which takes longer than a gVisor start under software emulation: it is
    raised to at least 120 s. ``warm`` (and ``shell``, ``mounts``, ``snapshot``,
    ``trust_results``) are :data:`SandboxActor`'s own."""
    from ray.experimental.sandbox.config import parse_memory_bytes

    check_options(network, dns, capabilities, rootless)
    options: dict[str, Any] = {}
    if cpu is not None and cpu >= 0:
        options["num_cpus"] = cpu
    memory_bytes = parse_memory_bytes(memory) if memory is not None else None
    if memory_bytes:
        options["memory"] = memory_bytes
    if resources:
        options["resources"] = dict(resources)
    unknown = set(kwargs) - {"shell", "mounts", "snapshot", "trust_results", "warm"}
    if unknown:
        raise UnsupportedOptionError(sorted(unknown)[0], kwargs[sorted(unknown)[0]],
                                     "not an option of ray_backend.create")  # fmt: skip
    if kwargs.get("snapshot") is not None:
        image = None  # the snapshot names its image
    return SandboxActor.options(**options).remote(
        image, cpu=cpu, memory=memory, env=env, workdir=workdir, ttl_seconds=ttl_seconds,
        timeout_seconds=max(timeout_seconds, DEFAULT_BOOT_TIMEOUT), rootless=rootless,
        network=network, readonly=readonly, check_python=False, **kwargs,
    )  # fmt: skip


__all__ = ["DEFAULT_IMAGE", "RaySandboxError", "SandboxActor", "SandboxActorBody", "create"]
