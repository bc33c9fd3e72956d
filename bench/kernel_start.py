"""Benchmark: a Jupyter kernel in a microVM against the same ipykernel on the host.

Not a test: it prints timings and ratios measured in the same run, on this machine.

Two kernelspecs are written to a temporary ``JUPYTER_PATH``: ``local`` runs
``sys.executable -m ipykernel_launcher`` through jupyter_client's ``LocalProvisioner``,
``microvm`` runs ``python3 -m ipykernel_launcher`` in a sandbox of
``vmruntime/default:latest`` through ``microvm-provisioner`` (kernelprovider). Each is
driven by jupyter_client's real ``AsyncKernelManager`` and ``AsyncKernelClient``, as
nbclient and a Jupyter server drive a kernel. After one warm-up round (not counted),
``--runs`` rounds each run both kernels, one after the other (who goes first
alternates), and measure for each:

- start: from ``start_kernel`` to the first ``execute_reply`` (``start_kernel``, then a
  client's ``start_channels`` + ``wait_for_ready``, then a trivial execute);
- round trip: the median over ``--executes`` trivial executes (``pass``) of sending the
  ``execute_request`` to receiving its ``execute_reply``;
- restart: from ``restart_kernel`` to the next ``execute_reply`` (a fresh client, as
  the key may change);
- host memory per running kernel: the PSS of every host process the kernel has (the
  kernel process and its children; for the microVM QEMU, guest RAM included, and any
  broker), read after the round trips;
- shutdown: ``shutdown_kernel``, and that no process of the kernel is left.

It prints the median, min and max of each, the ratio microvm / local of each, and the
accelerator. These are the cold numbers (every start boots a VM); a warm pool is
measured against them. See ``bench/README.md`` for every line.

Every kernel it starts is shut down before it exits, also on Ctrl-C, SIGTERM and
errors, and its temporary directory is removed.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import hostmem  # noqa: E402  (bench/hostmem.py, beside this script)
import samples  # noqa: E402  (bench/samples.py, beside this script)
from jupyter_client import AsyncKernelManager  # noqa: E402
from jupyter_client import __version__ as jupyter_client_version  # noqa: E402
from jupyter_client.asynchronous import AsyncKernelClient  # noqa: E402

from vmruntime import ImageStore  # noqa: E402
from vmruntime.guest.assets import ensure_guest_assets  # noqa: E402
from vmruntime.images.default_image import DEFAULT_IMAGE, ensure_default_image  # noqa: E402
from vmruntime.vm import state  # noqa: E402
from vmruntime.vm.accel import choose_accelerator  # noqa: E402

LOCAL, MICROVM = "local", "microvm"
KERNELS = (LOCAL, MICROVM)
SPEC_PREFIX = "vmr-bench-"  # kernelspec names: vmr-bench-local, vmr-bench-microvm
TRIVIAL_CODE = "pass"
MARKER = "vmr_bench_before_restart"  # a variable set before the restart, gone after it
# Evaluated by the kernel in an execute_request's user_expressions (untimed checks).
WHERE_EXPRESSIONS = {
    "pid": "__import__('os').getpid()",
    "release": "__import__('platform').release()",
    "python": "__import__('platform').python_version()",
    "ipykernel": "__import__('ipykernel').__version__",
}
FRESH_EXPRESSION = {"fresh": f"{MARKER!r} not in globals()"}

BenchError = samples.BenchError


# --- samples ----------------------------------------------------------------------------


fmt = samples.seconds_text
mib = samples.mib
Samples = samples.Samples


@dataclass(frozen=True)
class KernelMemory:
    """The PSS of a running kernel's host processes, in KiB (guest RAM included)."""

    processes: tuple[hostmem.ProcessMemory, ...]

    def part(self, name: str) -> int:
        """``anon``, ``file``, ``shmem`` (guest RAM left out) or ``guest_ram``, summed."""
        return sum(getattr(process, name) for process in self.processes)

    @property
    def total(self) -> int:
        """Every page the kernel's processes map, shared ones divided: its host memory."""
        return self.part("total") + self.part("guest_ram")

    def describe(self) -> str:
        each = ", ".join(f"{p.comm} {p.pid} {mib(p.total + p.guest_ram)}" for p in self.processes)
        kinds = " + ".join(
            f"{name} {mib(self.part(name))}" for name in ("guest_ram", "anon", "file", "shmem")
        )
        return f"{each}; by kind: {kinds}"


@dataclass
class KernelRun:
    """One counted or warm-up run of one kernel, in seconds and KiB."""

    launched: float  # start_kernel, called to returned (the provisioner's launch)
    ready: float  # start_channels + wait_for_ready (kernel_info answered, iopub connected)
    first_execute: float  # the first trivial execute, sent to replied
    round_trips: list[float]
    restart: float  # restart_kernel, a fresh client ready, a trivial execute replied
    shutdown: float  # shutdown_kernel, called to returned
    memory: KernelMemory
    where: dict[str, Any]  # WHERE_EXPRESSIONS as the kernel evaluated them

    @property
    def start(self) -> float:
        return self.launched + self.ready + self.first_execute

    @property
    def round_trip(self) -> float:
        return statistics.median(self.round_trips)


@dataclass
class KernelSide:
    """Everything measured of one kind of kernel; one sample per counted run."""

    name: str
    start: Samples
    round_trip: Samples
    restart: Samples
    shutdown: Samples
    runs: list[KernelRun] = field(default_factory=list)
    accelerator: str | None = None  # the microVM's, as its sandbox recorded it
    machine: str = ""  # the microVM's vCPUs and memory, as its sandbox recorded them

    @property
    def spec_name(self) -> str:
        return SPEC_PREFIX + self.name

    @property
    def memory(self) -> list[int]:
        return [run.memory.total for run in self.runs]

    def add(self, run: KernelRun) -> None:
        self.runs.append(run)
        self.start.seconds.append(run.start)
        self.round_trip.seconds.append(run.round_trip)
        self.restart.seconds.append(run.restart)
        self.shutdown.seconds.append(run.shutdown)

    def median_of(self, part: str) -> float:
        return statistics.median(getattr(run, part) for run in self.runs)


def new_side(name: str, executes: int) -> KernelSide:
    return KernelSide(
        name=name,
        start=Samples(f"start_kernel to first execute_reply [{name}]"),
        round_trip=Samples(f"round trip of a trivial execute (median of {executes}) [{name}]"),
        restart=Samples(f"restart_kernel to the next execute_reply [{name}]"),
        shutdown=Samples(f"shutdown_kernel [{name}]"),
    )


# --- kernelspecs ------------------------------------------------------------------------


def local_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "argv": [args.local_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (local, vmruntime bench)",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }


def microvm_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The sandboxed kernelspec; cpus and memory only when given (else the provisioner's)."""
    config: dict[str, Any] = {"image": args.image, "startup_timeout": args.startup_timeout}
    if args.cpus is not None:
        config["cpus"] = args.cpus
    if args.memory_mib is not None:
        config["memory"] = args.memory_mib
    return {
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 (sandboxed: {args.image}, vmruntime bench)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": "microvm-provisioner", "config": config},
        },
    }


def write_kernelspecs(args: argparse.Namespace, root: Path) -> None:
    """Both specs under ``root/kernels``; ``root`` goes first on ``JUPYTER_PATH``, and
    connection files go to ``root/runtime`` instead of the user's runtime directory."""
    specs = {LOCAL: local_spec(args), MICROVM: microvm_spec(args)}
    for name in args.kernels:
        spec_dir = root / "kernels" / (SPEC_PREFIX + name)
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps(specs[name], indent=1))
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), previous]))
    os.environ["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")


# --- one kernel -------------------------------------------------------------------------


async def connect(km: AsyncKernelManager, timeout: float) -> AsyncKernelClient:
    """A client of the kernel's current connection info, ready as nbclient waits for it."""
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
    except BaseException:
        client.stop_channels()
        raise
    return client


async def execute(
    client: AsyncKernelClient,
    timeout: float,
    code: str = TRIVIAL_CODE,
    expressions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Execute ``code`` and wait for its ``execute_reply`` (not for iopub); the values
    of ``expressions``, which must all evaluate."""
    reply = await client.execute(
        code, user_expressions=expressions or {}, reply=True, timeout=timeout
    )
    content = reply["content"]
    if content["status"] != "ok":
        raise BenchError(f"execute {code!r}: {content.get('ename')}: {content.get('evalue')}")
    values = {}
    for name, result in content.get("user_expressions", {}).items():
        if result.get("status") != "ok":
            raise BenchError(f"user expression {name}: {result.get('evalue')}")
        values[name] = ast.literal_eval(result["data"]["text/plain"])
    return values


async def sandbox_record(km: AsyncKernelManager) -> state.SandboxRecord:
    """The microVM kernel's sandbox record, found by the id the provisioner reports."""
    assert km.provisioner is not None
    sandbox_id = (await km.provisioner.get_provisioner_info()).get("sandbox_id")
    if not sandbox_id:
        raise BenchError(f"the microVM kernel's provisioner reports no sandbox id: {sandbox_id!r}")
    return state.read_record(state.SandboxPaths(sandbox_id))


def kernel_pids(
    km: AsyncKernelManager, record: state.SandboxRecord | None, started: set[int]
) -> set[int]:
    """Every host process of the kernel: what this process started during
    ``start_kernel`` and what the provisioner names (the local kernel's process, or the
    sandbox's QEMU and brokers), with everything below them."""
    if record is None:
        named = {km.provisioner.pid}  # type: ignore[union-attr]
    else:
        named = {record.vmm_pid} | {pid for pid, _ in record.brokers if pid}
    return hostmem.with_descendants(started | named)


@contextlib.contextmanager
def kernel_output(name: str, log_dir: Path) -> Iterator[dict[str, Any]]:
    """``start_kernel``'s keywords for the kernel's output: the local kernel's stdout
    and stderr (ipykernel's warnings) go to ``LOG_DIR/local.log``, appended, instead of
    this benchmark's output. The microVM kernel's output is the provisioner's to place."""
    if name != LOCAL:
        yield {}
        return
    path = log_dir / f"{name}.log"
    with path.open("ab") as log:
        try:
            yield {"stdout": log, "stderr": log}
        except Exception:  # not on Ctrl-C or SIGTERM: the kernel's output is no cause
            log.flush()
            tail = path.read_text(errors="replace").splitlines()[-20:]
            print(f"{name} kernel's output, last lines:", *tail, sep="\n  ", file=sys.stderr)
            raise


def still_running(pid: int) -> bool:
    """Alive and not a zombie (an exited child not yet reaped holds no memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_kernel_memory(pids: set[int]) -> KernelMemory:
    processes = []
    for pid in sorted(pids):
        try:
            processes.append(hostmem.read_process_memory(pid))
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise BenchError(f"kernel process {pid} is gone while the kernel runs") from exc
    return KernelMemory(tuple(processes))


def check_where(name: str, km: AsyncKernelManager, where: dict[str, Any], guest: str) -> None:
    """The kernel runs where it should: on the host as the process measured, or in a
    guest with the guest kernel."""
    if name == LOCAL:
        pid = km.provisioner.pid  # type: ignore[union-attr]
        if where["pid"] != pid or where["release"] != platform.release():
            raise BenchError(f"local kernel: expected pid {pid} on the host; it says {where}")
    elif where["release"] != guest:
        raise BenchError(f"microVM kernel: expected guest kernel {guest}; it says {where}")


async def run_kernel(
    args: argparse.Namespace, side: KernelSide, guest: str, log_dir: Path
) -> KernelRun:
    """Start, execute, restart and shut down one kernel of ``side``, timing each."""
    km = AsyncKernelManager(kernel_name=side.spec_name)
    before = hostmem.children(os.getpid())
    pids: set[int] = set()
    with kernel_output(side.name, log_dir) as output:
        try:
            run, pids = await _measure_kernel(args, side, km, before, guest, output)
        finally:
            if km.has_kernel:  # an error or Ctrl-C: end it without measuring
                await km.shutdown_kernel(now=True)
    if left := [pid for pid in pids if still_running(pid)]:
        raise BenchError(f"{side.name}: processes left after shutdown_kernel: {left}")
    return run


async def _measure_kernel(
    args: argparse.Namespace,
    side: KernelSide,
    km: AsyncKernelManager,
    before: set[int],
    guest: str,
    output: dict[str, Any],
) -> tuple[KernelRun, set[int]]:
    timeout = args.startup_timeout
    started = time.perf_counter()
    await km.start_kernel(**output)
    launched = time.perf_counter()
    record = await sandbox_record(km) if side.name == MICROVM else None
    pids = kernel_pids(km, record, hostmem.children(os.getpid()) - before)
    client = await connect(km, timeout)
    try:
        ready = time.perf_counter()
        await execute(client, timeout)
        first_reply = time.perf_counter()
        trips = [await timed_execute(client, args.reply_timeout) for _ in range(args.executes)]
        where = await execute(client, timeout, f"{MARKER} = 1", WHERE_EXPRESSIONS)
        check_where(side.name, km, where, guest)
        memory = read_kernel_memory(pids)
    finally:
        client.stop_channels()
    if record is not None:
        side.accelerator = record.accelerator
        side.machine = f"{record.cpus} vCPU, {record.memory_mib} MiB"
    restart = await timed_restart(km, timeout)
    shutdown_started = time.perf_counter()
    await km.shutdown_kernel()
    shutdown = time.perf_counter() - shutdown_started
    run = KernelRun(
        launched=launched - started,
        ready=ready - launched,
        first_execute=first_reply - ready,
        round_trips=trips,
        restart=restart,
        shutdown=shutdown,
        memory=memory,
        where=where,
    )
    return run, pids


async def timed_execute(client: AsyncKernelClient, timeout: float) -> float:
    started = time.perf_counter()
    await execute(client, timeout)
    return time.perf_counter() - started


async def timed_restart(km: AsyncKernelManager, timeout: float) -> float:
    """``restart_kernel`` to the next ``execute_reply``, through a fresh client (a
    restart may change the key); then, untimed, that the kernel's variables are gone."""
    started = time.perf_counter()
    await km.restart_kernel()
    client = await connect(km, timeout)
    try:
        await execute(client, timeout)
        seconds = time.perf_counter() - started
        if not (await execute(client, timeout, TRIVIAL_CODE, FRESH_EXPRESSION))["fresh"]:
            raise BenchError(f"after restart_kernel, {MARKER} is still defined")
    finally:
        client.stop_channels()
    return seconds


# --- rounds -----------------------------------------------------------------------------


async def run_rounds(
    args: argparse.Namespace, sides: list[KernelSide], guest: str, log_dir: Path
) -> None:
    """One warm-up round, then ``args.runs`` counted rounds; who goes first alternates."""
    for round_ in range(args.runs + 1):
        label = "warm-up round (not counted)" if round_ == 0 else f"round {round_}/{args.runs}"
        print(f"{label} ...", flush=True)
        shift = round_ % len(sides)
        for side in sides[shift:] + sides[:shift]:
            run = await run_kernel(args, side, guest, log_dir)
            print(f"  {side.name:>8}: {run_line(run)}", flush=True)
            if round_ > 0:
                side.add(run)


def run_line(run: KernelRun) -> str:
    return (
        f"start {fmt(run.start)} (start_kernel {fmt(run.launched)}, ready {fmt(run.ready)}, "
        f"execute {fmt(run.first_execute)}), round trip {fmt(run.round_trip)}, restart "
        f"{fmt(run.restart)}, memory {mib(run.memory.total)}, shutdown {fmt(run.shutdown)}"
    )


# --- results ----------------------------------------------------------------------------


def print_results(args: argparse.Namespace, sides: list[KernelSide]) -> None:
    print(f"results, {args.runs} run(s) of each kernel, interleaved, after one warm-up round:")
    for measure in ("start", "round_trip", "restart", "shutdown"):
        for side in sides:
            print(getattr(side, measure).line())
    for side in sides:
        memory = side.memory
        print(
            f"host memory per running kernel [{side.name}]: median {mib(statistics.median(memory))}"
            f" (min {mib(min(memory))}, max {mib(max(memory))})"
        )
    print_breakdown(sides)
    print_memory(sides)


def print_breakdown(sides: list[KernelSide]) -> None:
    rows = (
        ("start_kernel (the provisioner's launch)", "launched"),
        ("start_channels + wait_for_ready (kernel_info)", "ready"),
        ("first trivial execute", "first_execute"),
    )
    print("where the time to the first reply goes (medians of each part):")
    print(f"  {'':<48}" + "".join(f" {side.name:>9}" for side in sides))
    for label, part in rows:
        print(f"  {label:<48}" + "".join(f" {fmt(side.median_of(part)):>9}" for side in sides))


def print_memory(sides: list[KernelSide]) -> None:
    """The processes of the last counted run of each kernel, and what their PSS is made of."""
    print("host memory of the last run's kernel, per process (PSS; guest RAM is what the")
    print("guest touched since boot, part of the microVM's memory):")
    for side in sides:
        print(f"  {side.name:>8}: {side.runs[-1].memory.describe()}")
    qemus = len(hostmem.qemu_pids())
    print(
        f"  PSS divides shared file pages among the processes mapping them (the local kernel "
        f"shares Python's with this process if it runs the same Python; QEMUs share QEMU's: "
        f"{qemus} other QEMU(s) on the host now, this benchmark's are shut down)"
    )


RATIO_LINES: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("start to first reply", "start", fmt),
    ("round trip", "round_trip", fmt),
    ("restart to next reply", "restart", fmt),
)


def ratios(sides: dict[str, KernelSide]) -> list[tuple[str, float, str]]:
    """(label, microvm / local, microvm - local as text) of each measurement's medians."""
    local, microvm = sides[LOCAL], sides[MICROVM]
    found = []
    for label, measure, show in RATIO_LINES:
        mine, theirs = getattr(microvm, measure).median, getattr(local, measure).median
        found.append((label, mine / theirs, show(mine - theirs)))
    mine, theirs = statistics.median(microvm.memory), statistics.median(local.memory)
    found.append(("host memory per kernel", mine / theirs, mib(mine - theirs)))
    return found


def print_ratios(sides: dict[str, KernelSide]) -> list[tuple[str, float, str]]:
    found = ratios(sides)
    for label, ratio, extra in found:
        print(f"ratio {label}, microvm/local: {ratio:.1f}; microvm - local = {extra}")
    return found


def print_accelerator(sides: dict[str, KernelSide]) -> str:
    accel = choose_accelerator()
    microvm = sides.get(MICROVM)
    if microvm is None:
        print(f"accelerator: no microVM kernel measured (this host would use {accel.name}: "
              f"{accel.reason})")  # fmt: skip
        return accel.name
    used = microvm.accelerator or "?"
    note = "" if used == accel.name else f"; choose_accelerator() now says {accel.name}"
    print(f"accelerator: {used} ({accel.reason}{note})")
    return used


def print_summary(
    args: argparse.Namespace,
    sides: dict[str, KernelSide],
    accel: str,
    found: list[tuple[str, float, str]],
) -> None:
    cells = []
    for side in sides.values():
        memory = mib(statistics.median(side.memory))
        cells.append(
            f"{side.name}: start {fmt(side.start.median)}, round trip "
            f"{fmt(side.round_trip.median)}, restart {fmt(side.restart.median)}, {memory}"
        )
    ratio_text = ", ".join(f"{label} x{ratio:.1f}" for label, ratio, _ in found)
    print(f"summary: accel={accel} runs={args.runs}; " + "; ".join(cells)
          + (f"; microvm/local: {ratio_text}" if ratio_text else ""))  # fmt: skip


# --- main -------------------------------------------------------------------------------


def guest_release(args: argparse.Namespace) -> str:
    """The guest kernel's release, which the microVM kernel must report ('' without one)."""
    if MICROVM not in args.kernels:
        return ""
    return ensure_guest_assets(ImageStore().root).release


def print_environment(args: argparse.Namespace, guest: str) -> None:
    import ipykernel

    print(
        f"environment: cpus={len(os.sched_getaffinity(0))} python={platform.python_version()} "
        f"jupyter_client={jupyter_client_version} ipykernel={ipykernel.__version__} "
        f"host kernel={platform.release()}" + (f" guest kernel={guest}" if guest else "")
    )
    machine = []
    if args.cpus is not None:
        machine.append(f"{args.cpus} vCPU")
    if args.memory_mib is not None:
        machine.append(f"{args.memory_mib} MiB")
    vm = ", ".join(machine) or "the provisioner's default vCPUs and memory"
    print(
        f"kernels: {', '.join(args.kernels)}; local: {args.local_python} -m ipykernel_launcher; "
        f"microvm: python3 -m ipykernel_launcher in {args.image} ({vm}); "
        f"{args.executes} round trips per run"
    )


def print_versions(sides: list[KernelSide]) -> None:
    for side in sides:
        where = side.runs[-1].where
        print(
            f"kernel [{side.name}]: ipykernel {where['ipykernel']}, Python {where['python']}, "
            f"kernel release {where['release']}" + (f"; VM {side.machine}" if side.machine else "")
        )
    versions = {(side.runs[-1].where["ipykernel"], side.runs[-1].where["python"]) for side in sides}
    if len(versions) > 1:
        print(
            "  the two kernels run different ipykernel or Python versions (the image's and "
            "--local-python's): the same program, not the same build"
        )


async def bench_main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if MICROVM in args.kernels and args.image == DEFAULT_IMAGE:
        ensure_default_image(log=lambda line: print(f"image: {line}"))
    guest = guest_release(args)
    print_environment(args, guest)
    root = Path(tempfile.mkdtemp(prefix="vmr-bench-kernel-"))
    try:
        write_kernelspecs(args, root)
        sides = [new_side(name, args.executes) for name in args.kernels]
        await run_rounds(args, sides, guest, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_results(args, sides)
    print_versions(sides)
    by_name = {side.name: side for side in sides}
    found = print_ratios(by_name) if len(sides) == 2 else []
    accel = print_accelerator(by_name)
    print_summary(args, by_name, accel, found)
    return 0


def parse_kernels(text: str) -> tuple[str, ...]:
    return samples.parse_subset(text, KERNELS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="counted runs of each (median)")
    parser.add_argument(
        "--executes", type=int, default=30, help="trivial executes per run (their median)"
    )
    parser.add_argument(
        "--kernels", type=parse_kernels, default=KERNELS,
        help="which kernels: local,microvm (default both; ratios need both)",
    )  # fmt: skip
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="the microVM kernel's image")
    parser.add_argument(
        "--local-python", default=sys.executable,
        help="the local kernel's Python, with ipykernel (default: this one)",
    )  # fmt: skip
    parser.add_argument("--cpus", type=int, help="the microVM's vCPUs (the provisioner's)")
    parser.add_argument("--memory-mib", type=int, help="the microVM's RAM (the provisioner's)")
    parser.add_argument(
        "--startup-timeout", type=float, default=120.0,
        help="seconds for a kernel to start or restart and answer",
    )  # fmt: skip
    parser.add_argument(
        "--reply-timeout", type=float, default=60.0, help="seconds for one execute's reply"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.executes < 1:
        parser.error("--runs and --executes must be >= 1")
    if (args.cpus is not None and args.cpus < 1) or (
        args.memory_mib is not None and args.memory_mib < 1
    ):
        parser.error("--cpus and --memory-mib must be >= 1")
    if args.startup_timeout <= 0 or args.reply_timeout <= 0:
        parser.error("--startup-timeout and --reply-timeout must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return samples.run(lambda: bench_main(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have shut every kernel down
        print("interrupted", file=sys.stderr)
        sys.exit(130)
