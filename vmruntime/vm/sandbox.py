"""Sandboxes: one microVM each, booted from a cached image, driven through its agent.

Who calls it: users of ``vmruntime.Sandbox`` / ``vmruntime.AsyncSandbox``, the
``vmr`` CLI, the Jupyter provisioner and the Ray actor. What it promises:

- the guest sees exactly the image's layers (attached read-only, shared by every
  sandbox, never copied) plus a private writable layer, with no network device,
  plus the mounts the caller asks for (:mod:`vmruntime.vm.mounts`), each mounted
  before ``create`` returns or the creation fails with the guest's reason;
- creation runs in steps (:mod:`vmruntime.vm.builder`) that undo what they made on
  any failure, and never blocks the caller's event loop;
- every exit path (an error during create, ``stop``, ``kill``, leaving the
  ``with`` block, a crashed host process) ends the VM and its brokers and
  releases its disk locks (:mod:`vmruntime.vm.teardown`); an ephemeral sandbox
  (the default) also leaves no files behind;
- failures are errors, never hangs: an unknown image suggests ``vmr image
  pull``; a VM that dies reports the tail of its console; a timeout raises
  :class:`ExecTimeoutError`, not an exit code; ``check=True`` raises
  :class:`~vmruntime.errors.CommandFailedError` with the return code and output.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from weakref import WeakSet

from vmruntime._blocking import in_thread
from vmruntime._child import log_tail
from vmruntime.errors import (
    AgentDiedError,
    AgentProtocolError,
    BootError,
    CommandFailedError,
    ExecStartError,
    ExecTimeoutError,
    GuestOutOfMemoryError,
    MemorySnapshotError,
    MountError,
    SandboxError,
    VmmError,
)
from vmruntime.guest import protocol as p
from vmruntime.images.store import ImageStore
from vmruntime.vm import state
from vmruntime.vm.builder import CreationPlan, build_machine
from vmruntime.vm.client import STDERR, AgentClient, Channel, _GuestChannelError
from vmruntime.vm.config import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_MEMORY_MIB,
    DEFAULT_WRITABLE_SIZE,
    ExecDefaults,
    Ports,
    SandboxConfig,
)
from vmruntime.vm.driver import MemoryImage, VmHandle, VmmDriver
from vmruntime.vm.forwards import PortForwards
from vmruntime.vm.mounts import Mount, SandboxMounts
from vmruntime.vm.qemu import QemuDriver
from vmruntime.vm.teardown import end_sandbox

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How long a freeze may hold before the guest thaws by itself (a host that hangs).
DEFAULT_FREEZE_TIMEOUT = 60.0
# Renewing the agent session for a memory snapshot: tries, the pause before each (times
# the try's number) and how long each waits for the agent's answer.
_RECONNECT_ATTEMPTS, _RECONNECT_PAUSE, _RECONNECT_TIMEOUT = 3, 0.1, 20.0
# After the agent's own timeout, how long the host waits before it gives up on it.
_TIMEOUT_GRACE = 30.0
_CONSOLE_TAIL_LINES = 60
# What the guest kernel prints when memory exhaustion is what killed it.
_OUT_OF_MEMORY_SIGNS = ("Out of memory", "oom-kill", "deadlocked on memory", "out_of_memory")
# What runs while a sandbox's VM is paused for a memory snapshot (the layer's copy).
PausedWork = Callable[[], Awaitable[None]]
# Sandboxes this process owns and has not ended; see _end_owned_sandboxes_at_exit.
_live: WeakSet[AsyncSandbox] = WeakSet()


@dataclass(frozen=True)
class ExecResult:
    """How a finished exec ended; ``returncode`` is negative for a signal, as in subprocess."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    oom_killed: bool = False
    sandbox_id: str = "-"

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    def check(self) -> ExecResult:
        """This result, or :class:`CommandFailedError` (return code, stdout, stderr) if the
        command did not exit 0."""
        if self.returncode != 0:
            raise CommandFailedError(self.sandbox_id, list(self.argv), self.returncode,
                                     self.stdout, self.stderr)  # fmt: skip
        return self


def console_tail(path: Path, lines: int = _CONSOLE_TAIL_LINES) -> str:
    return log_tail(path, lines)


class AsyncProcess:
    """A running exec with streamed stdio (from :meth:`AsyncSandbox.exec_stream`)."""

    def __init__(self, sandbox: AsyncSandbox, channel: Channel, argv: Sequence[str],
                 timeout: float | None) -> None:  # fmt: skip
        self._sandbox = sandbox
        self._channel = channel
        self.argv = tuple(argv)
        self._timeout = timeout

    @property
    def pid(self) -> int | None:
        return self._channel.pid

    @property
    def dropped(self) -> int:
        """From :meth:`AsyncSandbox.adopt`: how many bytes of output the guest dropped
        (oldest first) while no connection read them; 0 otherwise."""
        return self._channel.dropped

    async def write(self, data: bytes) -> None:
        await self._sandbox._guard(self._channel.write(data))

    async def close_stdin(self) -> None:
        await self._sandbox._guard(self._channel.close_stdin())

    async def read(self) -> tuple[str, bytes] | None:
        """The next ``("stdout" | "stderr", bytes)``, or None when the process has ended."""
        item = await self._sandbox._guard(self._channel.read())
        if item is None:
            return None
        return ("stderr" if item[0] == STDERR else "stdout"), item[1]

    async def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        while (item := await self.read()) is not None:
            yield item

    async def signal(self, signo: int, group: bool = False) -> None:
        await self._sandbox._guard(self._channel.signal(signo, group))

    async def resize(self, rows: int, cols: int) -> None:
        await self._sandbox._guard(self._channel.resize(rows, cols))

    async def wait(self) -> ExecResult:
        """Wait for the exit (the caller must keep reading output, or it stalls)."""
        limit = None if self._timeout is None else self._timeout + _TIMEOUT_GRACE
        try:
            exit_ = await self._sandbox._guard(asyncio.wait_for(self._channel.wait(), limit))
        except TimeoutError:
            raise ExecTimeoutError(self._sandbox.id, list(self.argv), self._timeout or 0) from None
        if exit_.timed_out:
            raise ExecTimeoutError(self._sandbox.id, list(self.argv), self._timeout or 0)
        code = exit_.code if exit_.code is not None else -(exit_.signal or 0)
        return ExecResult(self.argv, code, oom_killed=exit_.oom_killed,
                          sandbox_id=self._sandbox.id)  # fmt: skip


class AsyncGuestFiles:
    """``sandbox.fs``: whole-file reads and atomic writes inside the guest."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def read(self, path: str) -> bytes:
        return await self._sandbox._guard(self._sandbox._agent().read_file(path))

    async def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        await self._sandbox._guard(self._sandbox._agent().write_file(path, data, mode))


class AsyncSandbox:
    """One microVM running an image; create with :meth:`create` (or :meth:`from_config`) or
    reach a detached one with :meth:`attach`.

    Every method runs on the caller's event loop and never blocks it.
    """

    def __init__(self, paths: state.SandboxPaths, record: state.SandboxRecord,
                 defaults: ExecDefaults, vm: VmHandle,
                 mounts: SandboxMounts | None = None) -> None:  # fmt: skip
        self._paths = paths
        self._record = record
        self._defaults = defaults
        self._vm = vm
        self._mounts = mounts  # None when attached: the record names its brokers
        self._client: AgentClient | None = None
        self._lock_file: IO[bytes] | None = None
        self._forwards = PortForwards(lambda port: self._agent().connect_port(port))
        self._closed = False
        self.fs = AsyncGuestFiles(self)
        self.ports: dict[int, int] = {}
        self.kernel_release = ""
        self.boot_seconds = 0.0

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def accelerator(self) -> str:
        return self._record.accelerator

    @property
    def console_log(self) -> Path:
        return self._paths.console_log

    @property
    def vmm_pid(self) -> int:
        return self._vm.pid

    @property
    def running(self) -> bool:
        """True while the VM runs and its agent answers (False once it died or ended)."""
        client = self._client
        return (not self._closed and client is not None and client.failure is None
                and self._vm.running())  # fmt: skip

    @property
    def exec_defaults(self) -> ExecDefaults:
        """What commands run with unless they say otherwise: the image's env (with the
        sandbox's on top), working directory, user, entrypoint and cmd."""
        return self._defaults

    # Creating and attaching.

    @classmethod
    async def create(
        cls,
        image: str,
        *,
        cpus: int = 1,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        env: Mapping[str, str] | None = None,
        ports: Ports | None = None,
        mounts: Sequence[Mount | str] | None = None,
        name: str = "",
        writable_size: int = DEFAULT_WRITABLE_SIZE,
        detached: bool = False,
        keep: bool = False,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        store: ImageStore | None = None,
        driver: VmmDriver | None = None,
    ) -> AsyncSandbox:
        """Boot a sandbox of ``image`` (a reference or a manifest digest).

        The keywords are those of :class:`~vmruntime.vm.config.SandboxConfig`, checked
        before anything is made. ``ports`` maps guest ports to host ports on 127.0.0.1
        (0 picks a free one); a list forwards each guest port from a free host port;
        ``.ports`` then says which host port serves each guest port. ``mounts`` are
        :class:`Mount` values (or ``"HOST:GUEST[:ro]"`` strings), all mounted in the
        guest before this returns. A ``detached`` sandbox outlives this process
        (``vmr sandbox exec|stop`` reach it, and its brokers live on with it); a
        ``keep`` sandbox keeps its writable layer and logs after ``stop``.
        """
        config = SandboxConfig(
            image, cpus=cpus, memory_mib=memory_mib, env=env or {}, ports=ports or (),
            mounts=mounts or (), name=name, writable_size=writable_size, detached=detached,
            keep=keep, boot_timeout=boot_timeout,
        )  # fmt: skip
        return await cls.from_config(config, plan=CreationPlan(driver or QemuDriver(), store=store))

    @classmethod
    async def from_config(cls, config: SandboxConfig,
                          plan: CreationPlan | None = None) -> AsyncSandbox:  # fmt: skip
        """Create the sandbox ``config`` describes; ``plan`` replaces steps of creation
        (the VMM driver, where the writable layer comes from, how the machine starts)."""
        plan = plan or CreationPlan()
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as undo:
            machine = await build_machine(config, plan, undo)  # steps 1-5
            sandbox = cls(machine.paths, machine.record, machine.defaults, machine.vm,
                          machine.mounts)  # fmt: skip
            await sandbox._connect(config.boot_timeout)  # 6: the agent
            undo.push_async_callback(sandbox._disconnect)
            if plan.start.resumes:  # its mounts are there; its identity is the original's
                await sandbox.renew_identity()
            else:
                await sandbox._mount_all(started + config.boot_timeout)
            sandbox.boot_seconds = time.monotonic() - started
            undo.push_async_callback(sandbox._forwards.close)
            try:  # 7: the per-caller settings
                await sandbox.personalize(env=config.env, ports=config.port_map, name=config.name)
            except OSError as exc:  # e.g. a host port already taken
                raise SandboxError(sandbox.id, f"cannot prepare the sandbox: {exc}") from exc
            undo.pop_all()  # made it: nothing to undo
        if not config.detached:
            _live.add(sandbox)
        return sandbox

    @classmethod
    async def attach(cls, id_or_name: str, *, driver: VmmDriver | None = None) -> AsyncSandbox:
        """Connect to a running detached sandbox (one connection at a time).

        Commands run with the image's env, working directory and user, as they did for
        the process that created it (sandbox record version 3 and later).
        """
        record = state.find_record(id_or_name)
        if not record.vm_running:
            raise SandboxError(record.id, f"is {record.status}, not running")
        driver = driver or QemuDriver()
        if record.vmm != driver.name:
            raise SandboxError(record.id, f"runs under {record.vmm!r}, not {driver.name!r}")
        paths = state.SandboxPaths(record.id)
        vm = driver.adopt(record.vmm_pid, record.vmm_start, paths.control_socket)
        defaults = ExecDefaults.from_json(record.exec_defaults)
        sandbox = cls(paths, record, defaults, vm)
        await sandbox._connect(DEFAULT_BOOT_TIMEOUT)
        return sandbox

    async def personalize(self, *, env: Mapping[str, str] | None = None,
                          ports: Mapping[int, int] | None = None,
                          name: str = "") -> None:  # fmt: skip
        """Apply the per-caller settings to a running sandbox: ``env`` over the image's for
        every later command, ``ports`` forwarded (guest → host, 0: any free), ``name``.

        Creation calls it last; a warm pool calls it when it hands a sandbox out.
        """
        self._defaults = self._defaults.with_env(env or {})
        await self._forward_ports(ports or {})
        record = self._record
        record.exec_defaults = self._defaults.to_json()
        record.ports = {str(guest): host for guest, host in self.ports.items()}
        record.name = name or record.name
        await asyncio.to_thread(state.write_record, self._paths, record)

    async def _connect(self, timeout: float) -> None:
        self._take_agent_lock()
        try:
            await self._connect_locked(timeout)
        except BaseException:
            await self._disconnect()  # a failed attach must not keep others out
            raise

    async def _disconnect(self) -> None:
        """Close the agent connection and let others connect."""
        if self._client is not None:
            await self._client.close()
        self._release_lock()

    async def _connect_locked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._client = await self._open_agent_socket(deadline)
        try:
            hello_task = asyncio.ensure_future(self._client.hello())
            exited = asyncio.ensure_future(self._vm.wait())
            done, _ = await asyncio.wait(
                {hello_task, exited}, timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            exited.cancel()
            if hello_task not in done:
                hello_task.cancel()
                reason = "the VM exited during boot" if exited in done else "no agent answer"
                raise BootError(self.id, f"{reason} (after {timeout:g} s at most)", self._tail())
            hello = hello_task.result()
        except (OSError, SandboxError) as exc:
            if isinstance(exc, BootError):
                raise
            raise BootError(self.id, f"cannot reach the agent: {exc}", self._tail()) from exc
        self.kernel_release = hello.kernel

    async def _mount_all(self, deadline: float) -> None:
        """Have the agent mount every share and disk; the first failure is a MountError."""
        if self._mounts is None:
            return
        client = self._agent()
        for mount, request in self._mounts.requests():
            # A virtio-fs mount waits for the broker's answer to FUSE_INIT inside the
            # guest's mount(2): bound it, so a server that never answers is an error.
            left = max(0.0, deadline - time.monotonic())
            try:
                error = await self._guard(asyncio.wait_for(client.mount(request), left))
            except TimeoutError:
                raise MountError(str(mount), "the guest did not finish mounting it") from None
            if error is not None:
                name = errno.errorcode.get(error.errno, str(error.errno))
                raise MountError(str(mount), f"in the guest: {error.message} ({name})")

    async def _open_agent_socket(self, deadline: float) -> AgentClient:
        """Connect once QEMU listens; a QEMU that died on the way is a BootError."""
        while True:
            # QEMU binds the socket before it listens: the file alone is not enough, and a
            # refused connection means "not yet" while QEMU lives.
            if self._paths.agent_socket.exists():
                try:
                    return await AgentClient.connect(
                        self._paths.agent_socket, self.id, self._on_agent_failure
                    )
                except ConnectionRefusedError:
                    pass
                except OSError as exc:
                    reason = f"cannot reach the agent: {exc}"
                    raise BootError(self.id, reason, self._tail()) from exc
            await self._check_boot_alive(deadline)
            await asyncio.sleep(0.005)

    async def _check_boot_alive(self, deadline: float) -> None:
        if not self._vm.running():
            await self._vm.wait(1)
            reason = "QEMU exited during boot: " + self._vmm_log_tail()
            raise BootError(self.id, reason, self._tail())
        if time.monotonic() > deadline:
            raise BootError(self.id, "QEMU never opened the agent socket", self._tail())

    def _take_agent_lock(self) -> None:
        lock = open(self._paths.agent_lock, "wb")  # noqa: SIM115 - held for the connection's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            reason = "another process is connected to this sandbox's agent"
            raise SandboxError(self.id, reason) from None
        self._lock_file = lock

    def _tail(self) -> str:
        return console_tail(self._paths.console_log)

    def _vmm_log_tail(self) -> str:
        return console_tail(self._paths.vmm_log, 5) or "(no message)"

    def _on_agent_failure(self, exc: SandboxError) -> None:
        # A guest that breaks the protocol is ended; so is one whose agent vanished.
        if not self._closed and self._vm.running():
            self._vm.kill()

    def _agent(self) -> AgentClient:
        if self._closed or self._client is None:
            raise SandboxError(self.id, "the sandbox is stopped")
        return self._client

    async def _guard(self, awaitable):  # type: ignore[no-untyped-def]
        """Await ``awaitable``; if the VM died meanwhile, say so with its console."""
        try:
            return await awaitable
        except ExecTimeoutError:
            raise
        except SandboxError as exc:
            raise await self._death_error(exc) from exc

    async def _death_error(self, cause: SandboxError) -> SandboxError:
        client = self._client
        if client is None or client.failure is None:
            return cause  # one channel failed; the sandbox itself is fine
        if self._vm.running():
            await self._vm.wait(5)  # a panicking guest takes a moment to end QEMU
        tail = self._tail()
        if isinstance(client.failure, AgentProtocolError):
            return AgentProtocolError(self.id, client.failure.reason, tail)
        if any(sign in tail for sign in _OUT_OF_MEMORY_SIGNS):
            return GuestOutOfMemoryError(self.id, "the guest ran out of memory and died", tail)
        return AgentDiedError(self.id, f"the VM died ({client.failure.reason})", tail)

    # Running things.

    def _exec_request(self, argv: Sequence[str], *, env: Mapping[str, str] | None, cwd: str | None,
                      user: str | None, tty: bool, rows: int, cols: int, stdin: bool,
                      timeout: float | None, rlimits: Mapping[int, tuple[int, int]] | None,
                      detached: bool = False) -> p.ExecRequest:  # fmt: skip
        if isinstance(argv, str | bytes) or not argv:
            raise ValueError("argv must be a non-empty list of strings")
        merged = dict(self._defaults.env)
        merged.update(env or {})
        merged.setdefault("PATH", DEFAULT_PATH)
        effective_user = user if user is not None else self._defaults.user
        if effective_user in ("", "root", "0", "0:0"):
            merged.setdefault("HOME", "/root")
        if tty:
            merged.setdefault("TERM", "xterm")
        limits = tuple((res, soft, hard) for res, (soft, hard) in (rlimits or {}).items())
        return p.ExecRequest(
            argv=[str(a) for a in argv],
            env=merged,
            cwd=cwd or self._defaults.cwd,
            user=effective_user,
            tty=tty,
            rows=rows,
            cols=cols,
            rlimits=limits,
            timeout_ms=0 if timeout is None else max(1, int(timeout * 1000)),
            stdin=stdin,
            detached=detached,
        )

    async def exec_stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: bool = True,
        timeout: float | None = None,
        rlimits: Mapping[int, tuple[int, int]] | None = None,
        detached: bool = False,
    ) -> AsyncProcess:
        """Start ``argv``; stream its stdio through the returned process.

        A ``detached`` process outlives this connection (:meth:`detach`, a crashed host,
        a clone restored from a memory snapshot): the guest keeps it running and keeps
        its last MiB of output until a later connection takes it over with
        :meth:`adopt` (its pid is ``.pid``). Any other process is killed when the
        connection ends. At most 64 detached processes exist at once in a guest.
        """
        request = self._exec_request(
            argv, env=env, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols, stdin=stdin,
            timeout=timeout, rlimits=rlimits, detached=detached,
        )  # fmt: skip
        channel = await self._guard(self._agent().exec(request))
        try:
            await self._guard(channel.started())
        except _GuestChannelError as exc:  # e.g. its working directory does not exist
            raise ExecStartError(self.id, request.argv, exc.error.errno,
                                 exc.error.message) from None  # fmt: skip
        return AsyncProcess(self, channel, request.argv, timeout)

    async def adopt(self, pid: int) -> AsyncProcess:
        """Take over the detached process ``pid`` that an earlier connection started
        (:meth:`exec_stream` with ``detached=True``): read the output it wrote meanwhile
        (``.dropped`` says how much was lost beyond the guest's 1 MiB), then its live
        output; wait for it (at once if it already exited), signal it, write to its stdin
        if it was started with one. :class:`~vmruntime.errors.AdoptError` if the guest
        has no such process waiting."""
        channel = await self._guard(self._agent().adopt(pid))
        return AsyncProcess(self, channel, (f"<adopted pid {pid}>",), None)

    async def renew_identity(self, hostname: str | None = None) -> None:
        """Give the guest a fresh identity, as a clone restored from a memory snapshot
        needs before anything else runs in it: its RNG reseeded with 64 random bytes from
        the host, its clock set to the host's, ``hostname`` (default ``vmr-<id>``) and a
        new ``/etc/machine-id``. :class:`~vmruntime.errors.IdentityError` if the guest
        refuses a part (the parts before it stay applied)."""
        await self._guard(self._agent().set_identity(
            entropy=os.urandom(64), time_ns=time.time_ns(),
            hostname=hostname or f"vmr-{self.id}", machine_id=uuid.uuid4().hex,
        ))  # fmt: skip

    async def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        rlimits: Mapping[int, tuple[int, int]] | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run ``argv`` to completion and collect its output (like ``subprocess.run``)."""
        process = await self.exec_stream(
            argv, env=env, cwd=cwd, user=user, stdin=input is not None, timeout=timeout,
            rlimits=rlimits,
        )  # fmt: skip
        feeder = asyncio.ensure_future(_feed(process, input)) if input is not None else None
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            async for stream, data in process:
                (err if stream == "stderr" else out).append(data)
            result = await process.wait()
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, SandboxError):
                    await feeder
        result = ExecResult(process.argv, result.returncode, b"".join(out), b"".join(err),
                            result.oom_killed, self.id)  # fmt: skip
        return result.check() if check else result

    def default_command(self, args: Sequence[str] = ()) -> list[str]:
        """The image's Entrypoint + (``args`` or its Cmd), as ``docker run`` does."""
        entrypoint = list(self._defaults.entrypoint)
        cmd = list(args) or list(self._defaults.cmd)
        return entrypoint + cmd or ["/bin/sh"]

    # The root filesystem.

    async def readonly_root(self, writable: Sequence[str] = ()) -> None:
        """Make the guest's root read-only for everything that runs from now on, as a
        container's read-only root filesystem: each of ``writable`` (absolute guest paths,
        made if missing) stays writable, and so do the tmpfs mounts (``/tmp``, ``/run``,
        ``/dev/shm``) and the sandbox's shares and disks. Guest root can undo it (it only
        protects the guest from itself); snapshots still capture the layer."""
        for path in writable:
            await self._bind(path, path, readonly=False)
        await self._bind("/", "/", readonly=True)

    async def _bind(self, source: str, path: str, *, readonly: bool) -> None:
        request = p.MountRequest(source, "bind", path, readonly)
        error = await self._guard(self._agent().mount(request))
        if error is not None:
            raise SandboxError(self.id, f"cannot bind {source} on {path}: {error.message}")

    # Ports.

    async def port_open(self, guest_port: int) -> bool:
        """Whether something in the guest accepts connections on ``guest_port`` (it is
        connected to once, through the agent, and the connection closed at once)."""
        try:
            channel = await self._agent().connect_port(guest_port)
        except SandboxError as exc:
            if not self.running:
                raise await self._death_error(exc) from exc
            return False
        await channel.close_stdin()
        with contextlib.suppress(SandboxError):
            while await channel.read() is not None:
                pass
        return True

    async def request(self, guest_port: int, data: bytes, *, limit: int = 1 << 20,
                      timeout: float = 30.0) -> bytes:  # fmt: skip
        """Send ``data`` to a service on the guest's 127.0.0.1:``guest_port``, close the
        sending side and return what it answers until it closes (at most ``limit`` bytes:
        the answer is the guest's, so it is bounded). A front door's one-shot exchange
        with something it started in the guest, without a host port."""
        channel = await self._guard(self._agent().connect_port(guest_port))
        answer = bytearray()

        async def exchange() -> None:
            await channel.write(data)
            await channel.close_stdin()
            while (item := await channel.read()) is not None:
                answer.extend(item[1])
                if len(answer) > limit:
                    raise SandboxError(self.id, f"guest port {guest_port} answered more "
                                                f"than {limit} bytes")  # fmt: skip

        try:
            await self._guard(asyncio.wait_for(exchange(), timeout))
        except TimeoutError:
            raise SandboxError(self.id, f"guest port {guest_port} did not answer within "
                                        f"{timeout:g} s") from None  # fmt: skip
        finally:
            if not channel.done:
                with contextlib.suppress(SandboxError):
                    await channel.abort()
        return bytes(answer)

    async def unforward(self, guest_ports: Iterable[int]) -> None:
        """Stop forwarding ``guest_ports``: their host listeners close, and so does every
        connection made through them."""
        ports = set(guest_ports)
        await self._forwards.stop(ports)
        for guest_port in ports:
            self.ports.pop(guest_port, None)

    async def _forward_ports(self, ports: Mapping[int, int]) -> None:
        for guest_port, host_port in ports.items():
            if not (0 < guest_port < 65536 and 0 <= host_port < 65536):
                raise SandboxError(self.id, f"bad port forward {host_port} -> {guest_port}")
            if guest_port in self._forwards:
                raise SandboxError(self.id, f"guest port {guest_port} is already forwarded")
        for guest_port, host_port in ports.items():
            self.ports[guest_port] = await self._forwards.listen(guest_port, host_port)

    # Holding the disk still.

    @contextlib.asynccontextmanager
    async def frozen(self, timeout: float = DEFAULT_FREEZE_TIMEOUT) -> AsyncIterator[None]:
        """Hold the guest's writable layer still for the block (``async with sb.frozen():``).

        The agent syncs the layer's filesystem and freezes it (FIFREEZE) before the block
        starts, and thaws it after: inside, the layer's disk image on the host is
        consistent and does not change, and guest processes that write to the root block
        until the thaw (readers go on; ``fs.write`` is refused). The guest thaws by
        itself after ``timeout`` seconds or if this connection ends, so it is never left
        frozen; a thaw that finds the timeout passed raises
        :class:`~vmruntime.errors.FreezeError`
        (``ETIMEDOUT``), since the block's view may not have held to its end.
        """
        client = self._agent()
        await self._guard(client.freeze(timeout))
        try:
            yield
        except BaseException:
            with contextlib.suppress(SandboxError):  # the block's own error comes first
                await client.thaw()
            raise
        await self._guard(client.thaw())

    # Saving the whole machine.

    async def save_machine(self, image: MemoryImage, during: PausedWork | None = None) -> None:
        """Save the running machine (guest RAM and device state) to ``image``'s files, for
        a memory snapshot; ``during`` runs while the VM is paused after the save (the
        caller copies the writable layer there: QEMU flushed it at the pause).

        The agent's session is renewed first, as a resumed copy's will be: commands this
        connection runs end (their process groups are killed), detached ones go on, and
        so do port forwards (connections open through them end). The VM runs on
        afterwards. Shares over the console transport are carried; refused for a sandbox
        with vhost-user-fs shares or disks: vhost-user-fs cannot migrate, and a resumed
        copy cannot share a disk its original writes.
        """
        self._check_machine_saveable()
        await self._renew_session()
        vm = self._vm
        await self._guard(vm.pause())
        try:
            await vm.save_memory(image)
            if during is not None:
                await during()
        finally:
            await vm.resume()

    def _check_machine_saveable(self) -> None:
        if not self.running:
            raise SandboxError(self.id, "is not running: only a running sandbox's memory is saved")
        disks = [d.resolved.mount for d in self._mounts.disks] if self._mounts else []
        unsaveable = [m for m in self.mounts if not m.migrates or m in disks]
        if unsaveable:
            reason = ("its mounts " + ", ".join(map(str, unsaveable)) + " cannot be carried: "
                      "a vhost-user-fs share cannot be migrated by QEMU (share the folder "
                      "with transport='console'), and a resumed copy cannot write a disk its "
                      "original holds")  # fmt: skip
            raise MemorySnapshotError(f"sandbox {self.id}: cannot save its memory: {reason}")

    @property
    def mounts(self) -> tuple[Mount, ...]:
        """What the sandbox was created with (its shares, volumes and disks)."""
        if not self._record.config:
            return ()
        return tuple(SandboxConfig.from_json(self._record.config).mounts)

    async def _renew_session(self) -> None:
        """A new agent connection, so that nothing of the old session is in flight when
        the machine is saved: a resumed copy starts from a quiet, handshaken agent."""
        await self._disconnect()
        for attempt in range(_RECONNECT_ATTEMPTS):
            # Let the guest see the port close before the next host opens it: the close
            # reaches it as a control message it may handle after the next host's HELLO,
            # and the agent then drops its answer as the old session's.
            await asyncio.sleep(_RECONNECT_PAUSE * (attempt + 1))
            try:
                await self._connect(_RECONNECT_TIMEOUT)
                return
            except BootError:
                if attempt == _RECONNECT_ATTEMPTS - 1 or not self._vm.running():
                    raise

    @property
    def writable_layer(self) -> Path:
        """The host file of this sandbox's writable layer (a raw, sparse ext4 image)."""
        return self._paths.writable

    @property
    def record(self) -> state.SandboxRecord:
        """What ``sandbox.json`` holds: image reference and digest, layer format, etc."""
        return self._record

    # Ending.

    async def stop(self, timeout: float = 10.0, *, keep: bool | None = None) -> None:
        """Shut the guest down cleanly (the VM is killed if it does not comply).

        ``keep`` overrides, for this stop, whether the sandbox's files stay behind.
        """
        if keep is not None:
            self._record.keep = keep
        if self._closed:
            return
        await self._forwards.close()  # its clients see their connections end, quietly
        client = self._client
        acknowledged = False
        if client is not None and client.failure is None and self._vm.running():
            acknowledged = await client.shutdown(timeout)
        if acknowledged:
            # The agent acknowledges only after every guest process is gone and the
            # writable layer is synced and read-only: nothing is left to lose, so the
            # guest's reboot (and QEMU's teardown of it) is not worth waiting for.
            self._vm.kill()
        elif await self._vm.wait(timeout) is None:
            with contextlib.suppress(VmmError):
                await self._vm.quit()
            if await self._vm.wait(5) is None:
                self._vm.kill()
        await self._finish()

    async def kill(self) -> None:
        """End the VM at once."""
        if self._closed:
            return
        await self._forwards.close()
        self._vm.kill()
        await self._finish()

    async def detach(self) -> None:
        """Drop this process's connection; the (detached) sandbox keeps running."""
        await self._forwards.close()  # they relay through this connection
        await self._disconnect()
        if self._mounts is not None:
            self._mounts.release_locks()  # QEMU holds its own copies for the VM's life
        self._closed = True

    async def _finish(self) -> None:
        self._closed = True
        _live.discard(self)
        await self._disconnect()
        # Ending brokers may wait seconds, and removing a layer is disk work: not on the loop.
        await in_thread(self._end)

    def _end(self) -> None:
        """Everything but the guest: see :func:`vmruntime.vm.teardown.end_sandbox`."""
        end_sandbox(self._paths, self._record, vm=self._vm, mounts=self._mounts,
                    keep=self._record.keep)  # fmt: skip

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


@atexit.register
def _end_owned_sandboxes_at_exit() -> None:
    """A process that exits without stopping its sandboxes still leaves nothing behind.

    The parent-death signal would end QEMU anyway; this also removes the files of
    ephemeral sandboxes (it needs no event loop: ending is synchronous).
    """
    for sandbox in list(_live):
        sandbox._end()


async def _feed(process: AsyncProcess, data: bytes) -> None:
    await process.write(data)
    await process.close_stdin()
