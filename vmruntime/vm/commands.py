"""``vmr run`` and ``vmr sandbox …``: the sandbox half of the CLI.

Who calls it: :mod:`vmruntime.cli` registers these commands. What it promises:
``vmr run`` streams stdio and exits with the guest command's status (128+N for
a signal, as a shell reports it) and, unless ``--detach``/``--keep``, leaves
nothing behind; ``vmr sandbox prune`` removes what a crashed host process left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator

from vmruntime._blocking import in_thread
from vmruntime.errors import SandboxError
from vmruntime.vm import state
from vmruntime.vm.builder import CreationPlan, RestorePlan
from vmruntime.vm.config import DEFAULT_MEMORY_MIB, SandboxConfig
from vmruntime.vm.mounts import Mount
from vmruntime.vm.qemu import QemuDriver
from vmruntime.vm.sandbox import AsyncProcess, AsyncSandbox, ExecResult
from vmruntime.vm.teardown import end_from_outside

# For `vmr run --snapshot NAME`: how a sandbox restored from snapshot NAME is made. The
# CLI passes vmruntime.snapshots' (vm must not import snapshots).
Restorer = Callable[[str], RestorePlan]


def add_commands(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                 restore: Restorer | None = None) -> None:  # fmt: skip
    run = commands.add_parser("run", help="run a command in a new sandbox")
    _exec_options(run)
    run.add_argument("--cpus", type=int, help="vCPUs (default 1; a memory snapshot's own)")
    run.add_argument("--memory", type=int, help=f"guest RAM in MiB (default {DEFAULT_MEMORY_MIB};"
                     " a memory snapshot's own)")  # fmt: skip
    run.add_argument("-p", "--publish", action="append", default=[], metavar="[HOST:]GUEST",
                     help="forward 127.0.0.1:HOST here to GUEST in the sandbox")  # fmt: skip
    run.add_argument("--name", default="")
    run.add_argument("-d", "--detach", action="store_true",
                     help="leave the sandbox running (see `vmr sandbox exec`)")  # fmt: skip
    run.add_argument("--keep", action="store_true", help="keep the stopped sandbox's files")
    run.add_argument("--writable-size", type=int, default=4096, help="writable layer, MiB")
    run.add_argument("--mount", action="append", default=[], metavar="HOST:GUEST[:ro]",
                     help="share the host directory HOST at GUEST (through a broker)")  # fmt: skip
    run.add_argument("--volume", action="append", default=[], metavar="NAME:GUEST[:ro]",
                     help="mount the named volume NAME (see `vmr volume`) at GUEST")  # fmt: skip
    run.add_argument("--disk", action="append", default=[], metavar="PATH:GUEST[:ro]",
                     help="attach the raw ext4 disk image PATH and mount it at GUEST")  # fmt: skip
    if restore is not None:
        run.add_argument("--snapshot", metavar="NAME",
                         help="restore snapshot NAME (its image; give no IMAGE then)")  # fmt: skip
    run.add_argument("image", nargs="?" if restore is not None else None,
                     help="image reference (none with --snapshot)")  # fmt: skip
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(handler=_run, restore=restore)

    sandbox = commands.add_parser("sandbox", help="manage sandboxes")
    sub = sandbox.add_subparsers(title="sandbox commands")
    ls = sub.add_parser("ls", help="list sandboxes")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=_ls)
    exec_ = sub.add_parser("exec", help="run a command in a running detached sandbox")
    _exec_options(exec_)
    exec_.add_argument("sandbox")
    exec_.add_argument("command", nargs=argparse.REMAINDER)
    exec_.set_defaults(handler=_exec)
    stop = sub.add_parser("stop", help="stop sandboxes (their files stay until rm)")
    stop.add_argument("sandboxes", nargs="+")
    stop.set_defaults(handler=_stop)
    rm = sub.add_parser("rm", help="remove stopped sandboxes")
    rm.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    rm.add_argument("sandboxes", nargs="+")
    rm.set_defaults(handler=_rm)
    logs = sub.add_parser("logs", help="print a sandbox's guest console log")
    logs.add_argument("sandbox")
    logs.set_defaults(handler=_logs)
    prune = sub.add_parser("prune", help="remove stopped sandboxes and those of dead processes")
    prune.set_defaults(handler=_prune)
    sandbox.set_defaults(handler=lambda _args: sandbox.print_help() or 2)


def _exec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="send stdin (automatic when stdin is not a terminal)")  # fmt: skip
    parser.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("-w", "--workdir")
    parser.add_argument("-u", "--user")
    parser.add_argument("--timeout", type=float, help="kill the command after this many seconds")


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    return command[1:] if command[:1] == ["--"] else command


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            value = os.environ.get(name, "")
        env[name] = value
    return env


def _ports(specs: list[str]) -> dict[int, int]:
    ports = {}
    for spec in specs:
        host, _, guest = spec.rpartition(":")
        try:
            ports[int(guest)] = int(host) if host else 0
        except ValueError:
            raise SandboxError("-", f"bad --publish {spec!r}: want GUEST or HOST:GUEST") from None
    return ports


def _mounts(args: argparse.Namespace) -> list[Mount]:
    """--mount, --volume and --disk, in that order (each keeps the order given)."""
    mounts = [Mount.parse(spec, "bind") for spec in args.mount]
    mounts += [Mount.parse(spec, "volume") for spec in args.volume]
    return mounts + [Mount.parse(spec, "disk") for spec in args.disk]


def _run(args: argparse.Namespace) -> int:
    return asyncio.run(_run_async(args))


async def _run_async(args: argparse.Namespace) -> int:
    image, plan = args.image, CreationPlan()
    cpus, memory_mib, mounts = args.cpus, args.memory, _mounts(args)
    if getattr(args, "snapshot", None):
        # The snapshot names the image: what argparse took for IMAGE is the command's start.
        args.command = [args.image, *args.command] if args.image else args.command
        restored: RestorePlan = await in_thread(args.restore, args.snapshot)
        image, plan = restored.image, restored.creation_plan(QemuDriver())
        cpus, memory_mib = restored.shape(args.cpus, args.memory)
        mounts = restored.mounts_for(mounts)
    elif image is None:
        raise SandboxError("-", "vmr run needs an IMAGE (or --snapshot NAME)")
    command = _command(args)
    if args.detach and command:
        hint = "--detach starts an idle sandbox; run commands with `vmr sandbox exec`"
        raise SandboxError("-", hint)
    config = SandboxConfig(
        image, cpus=cpus or 1, memory_mib=memory_mib or DEFAULT_MEMORY_MIB, env=_env(args.env),
        ports=_ports(args.publish), mounts=mounts, name=args.name,
        writable_size=args.writable_size << 20, detached=args.detach, keep=args.keep,
    )  # fmt: skip
    sandbox = await AsyncSandbox.from_config(config, plan)
    if args.detach:
        await sandbox.detach()
        print(sandbox.id)
        return 0
    try:
        for guest, host in sandbox.ports.items():
            print(f"vmr: forwarding 127.0.0.1:{host} -> sandbox port {guest}", file=sys.stderr)
        result = await _interact(sandbox, sandbox.default_command(command), args)
    finally:
        await sandbox.stop()
    return _status(result)


def _exec(args: argparse.Namespace) -> int:
    return asyncio.run(_exec_async(args))


async def _exec_async(args: argparse.Namespace) -> int:
    command = _command(args)
    if not command:
        raise SandboxError(args.sandbox, "no command given (vmr sandbox exec ID -- CMD …)")
    sandbox = await AsyncSandbox.attach(args.sandbox)
    try:
        result = await _interact(sandbox, command, args)
    finally:
        await sandbox.detach()
    return _status(result)


def _status(result: ExecResult) -> int:
    return 128 + result.signal if result.signal else result.returncode


async def _interact(sandbox: AsyncSandbox, argv: list[str], args: argparse.Namespace) -> ExecResult:
    """Run ``argv`` with this terminal's stdio; a tty if asked for and we have one."""
    use_tty = args.tty and os.isatty(0)
    send_stdin = args.interactive or use_tty or not os.isatty(0)
    size = _terminal_size()
    process = await sandbox.exec_stream(
        argv, env=_env(args.env), cwd=args.workdir, user=args.user, tty=use_tty,
        rows=size.lines, cols=size.columns, stdin=send_stdin, timeout=args.timeout,
    )  # fmt: skip
    with _raw_terminal(use_tty), _forward_winch(process, use_tty):
        feeder = asyncio.ensure_future(_pump_stdin(process)) if send_stdin else None
        try:
            async for stream, data in process:
                out = sys.stderr.buffer if stream == "stderr" else sys.stdout.buffer
                out.write(data)
                out.flush()
            return await process.wait()
        finally:
            if feeder is not None:
                feeder.cancel()


async def _pump_stdin(process: AsyncProcess) -> None:
    """Copy our stdin to the process; a daemon thread reads, since stdin may be any file."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def reader() -> None:
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            if not data:
                return

    threading.Thread(target=reader, name="vmr-stdin", daemon=True).start()
    while data := await queue.get():
        await process.write(data)
    await process.close_stdin()


def _terminal_size() -> os.terminal_size:
    # Our terminal's own size: COLUMNS/LINES in the environment may describe another.
    try:
        return os.get_terminal_size(0)
    except OSError:
        return shutil.get_terminal_size()


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forward_winch(process: AsyncProcess, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[None]] = set()

    def resized() -> None:
        size = _terminal_size()
        future = asyncio.ensure_future(process.resize(size.lines, size.columns))
        pending.add(future)
        future.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGWINCH, resized)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


def _ls(args: argparse.Namespace) -> int:
    records = state.list_records()
    if args.json:
        rows = [{**record.__dict__, "status": record.status} for record in records]
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'ID':<13} {'NAME':<16} {'STATUS':<9} {'ACCEL':<5} {'CREATED':<20} IMAGE")
    for record in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        print(
            f"{record.id:<13} {record.name or '-':<16} {record.status:<9} "
            f"{record.accelerator:<5} {created:<20} {record.image}"
        )
    return 0


def _stop(args: argparse.Namespace) -> int:
    for name in args.sandboxes:
        record = state.find_record(name)
        asyncio.run(_stop_one(record))
        print(f"stopped {record.id}")
    return 0


async def _stop_one(record: state.SandboxRecord) -> None:
    """A clean shutdown through the agent when we can have it; else the VMM's own quit."""
    if record.vm_running:
        try:
            sandbox = await AsyncSandbox.attach(record.id)
        except SandboxError:
            pass  # its owner holds the agent: stop the VM from outside instead
        else:
            await sandbox.stop(keep=True)  # `stop` keeps files; `rm` removes them
            return
    await end_from_outside(record, QemuDriver(), keep=True, graceful=True)


def _rm(args: argparse.Namespace) -> int:
    for name in args.sandboxes:
        record = state.find_record(name)
        if record.vm_running and not args.force:
            raise SandboxError(record.id, "is running; stop it first or use rm -f")
        asyncio.run(end_from_outside(record, QemuDriver(), keep=False, graceful=False))
        print(f"removed {record.id}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    record = state.find_record(args.sandbox)
    path = state.SandboxPaths(record.id).console_log
    try:
        sys.stdout.buffer.write(path.read_bytes())
    except FileNotFoundError:
        raise SandboxError(record.id, "has no console log (yet)") from None
    return 0


def _prune(args: argparse.Namespace) -> int:
    removed = prune_sandboxes()
    for record in removed:
        print(f"removed {record.id} ({record.status})")
    print(f"pruned {len(removed)} sandboxes")
    return 0


async def end_abandoned_sandboxes() -> list[state.SandboxRecord]:
    """Remove what owners that died left: ephemeral (not detached, not kept) sandboxes whose
    owning process is gone and whose VM is no longer running. Front doors call it when
    they start, so that killed owners (a Ray actor under ``ray.kill``) leave no files."""
    return await _end_records(lambda record: not (
        record.detached or record.keep or record.owner_alive or record.vm_running))


async def _end_records(
        should_end: Callable[[state.SandboxRecord], bool]) -> list[state.SandboxRecord]:
    """End and remove every sandbox whose record ``should_end`` picks; their records."""
    removed = []
    for record in await asyncio.to_thread(state.list_records):
        if should_end(record):
            await end_from_outside(record, QemuDriver(), keep=False, graceful=False)
            removed.append(record)
    return removed


def prune_sandboxes() -> list[state.SandboxRecord]:
    """Remove stopped sandboxes and kill + remove those whose owning process died."""
    return asyncio.run(_end_records(lambda record: record.status in ("stopped", "orphaned")))
