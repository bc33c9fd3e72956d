"""Benchmark: what a sandbox costs on top of a bare boot of the same VM.

Not a test: it prints timings and ratios measured in the same run, on this machine.

It measures, ``--runs`` times each (default 5), interleaved (a, b, c, a, b, c, ...)
after one warm-up round that is not counted:

(a) a bare QEMU boot of the sandbox's own machine: the ``MachineSpec`` that
    ``AsyncSandbox.create`` builds (same kernel, initramfs, accelerator, cpus,
    memory, kernel command line from ``kernel_cmdline``, the image's layers as
    read-only disks, a writable-layer disk, the agent's console port) plus
    ``vmr.bare=1``, on which the agent reboots as soon as it starts (see
    docs/agent-protocol.md, "Boot"). Timed from ``QemuDriver().boot`` to QEMU's
    exit, which must be status 0, within ``--bare-timeout``, with no panic or
    agent error on the console;
(b) ``AsyncSandbox.create`` of the default image, exec ``true``, ``stop``, end
    to end;
(c) the same, exec ``python3 -c 'print(1)'`` (stdout must be ``1``).

It prints the median, min and max of each, the ratios (b)/(a) and (c)/(a) (goal:
(b)/(a) <= 1.3; on a KVM host also (b) < 300 ms), the accelerator, where the time
of (b) and (c) goes (host work before QEMU, ``Sandbox.boot_seconds``, the guest's
uptime at the agent's HELLO, exec, stop), and the host memory one idle sandbox
uses beyond its guest RAM (from QEMU's ``/proc/PID/smaps_rollup`` and ``status``,
and this process's RSS). See ``bench/README.md`` for every line.

Every VM it starts is ended before it exits, also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import samples  # noqa: E402  (bench/samples.py, beside this script)

from vmruntime import AsyncSandbox, ImageStore, resolve  # noqa: E402
from vmruntime.guest.assets import GuestAssets, ensure_guest_assets  # noqa: E402
from vmruntime.images.default_image import DEFAULT_IMAGE, ensure_default_image  # noqa: E402
from vmruntime.rootfs.writable import create_writable_layer  # noqa: E402
from vmruntime.vm import state  # noqa: E402
from vmruntime.vm.accel import Accelerator, choose_accelerator  # noqa: E402
from vmruntime.vm.builder import AGENT_PORT, kernel_cmdline  # noqa: E402
from vmruntime.vm.config import DEFAULT_MEMORY_MIB, DEFAULT_WRITABLE_SIZE  # noqa: E402
from vmruntime.vm.driver import MachineSpec  # noqa: E402
from vmruntime.vm.qemu import QemuDriver, qemu_binary  # noqa: E402
from vmruntime.vm.sandbox import console_tail  # noqa: E402

MIB = 1 << 20
KVM_GOAL_SECONDS = 0.300
RATIO_GOAL = 1.3
TRUE_ARGV = ("true",)
PYTHON_ARGV = ("python3", "-c", "print(1)")
# Lines on the console of a bare boot that mean it did not end the way it should.
_CONSOLE_FAILURES = ("Kernel panic", "vmr-agent", "Oops", "BUG:")


BenchError = samples.BenchError


# --- samples ----------------------------------------------------------------------------


def fmt(seconds: float) -> str:
    """Seconds as ``2.41 s``, or ``245 ms`` below one second."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Samples(samples.Samples):
    def line(self) -> str:
        spread = f"min {fmt(self.low)}, max {fmt(self.high)}"
        return f"{self.label}: median {fmt(self.median)} ({spread})"


@dataclass
class SandboxRun:
    """The parts of one (b) or (c) run, in seconds."""

    create: float  # AsyncSandbox.create, called to returned
    boot: float  # Sandbox.boot_seconds: writable layer, QEMU start, ... agent HELLO
    uptime: float  # the guest's uptime when its agent answered HELLO (guest clock)
    exec: float
    stop: float

    @property
    def total(self) -> float:
        return self.create + self.exec + self.stop


@dataclass
class SandboxSamples:
    """(b) or (c): end-to-end samples and their parts."""

    samples: Samples
    argv: tuple[str, ...]
    expect_stdout: bytes
    parts: list[SandboxRun] = field(default_factory=list)

    def add(self, run: SandboxRun) -> None:
        self.samples.seconds.append(run.total)
        self.parts.append(run)

    def median_of(self, part: str) -> float:
        return statistics.median(getattr(run, part) for run in self.parts)


# --- (a): the bare boot -----------------------------------------------------------------


@dataclass
class BareMachine:
    """What (a) boots: the sandbox's machine, on which the agent reboots at once."""

    assets: GuestAssets
    layers: tuple[Path, ...]
    accel: Accelerator
    cpus: int
    memory_mib: int
    writable: Path  # one writable layer for all (a) runs; the bare guest never mounts it
    workdir: Path
    timeout: float

    def spec(self, run_dir: Path) -> MachineSpec:
        """The MachineSpec ``AsyncSandbox.create`` builds, plus ``vmr.bare=1``."""
        cmdline = kernel_cmdline(len(self.layers), state.new_sandbox_id(), self.accel.name)
        spec = MachineSpec(
            kernel=self.assets.kernel,
            initramfs=self.assets.initramfs,
            cmdline=cmdline + " vmr.bare=1",
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            accelerator=self.accel.name,
            console_log=run_dir / "console.log",
            control_socket=run_dir / "qmp.sock",
            vmm_log=run_dir / "vmm.log",
        )
        for index, layer in enumerate(self.layers):
            spec.attach_disk(layer, serial=f"L{index}", readonly=True)
        spec.attach_disk(self.writable, serial="W", readonly=False)
        spec.attach_console_port(AGENT_PORT, run_dir / "agent.sock")
        return spec


def prepare_bare_machine(args: argparse.Namespace, workdir: Path) -> tuple[BareMachine, float]:
    """The machine (a) boots, and the seconds one writable-layer copy took."""
    store = ImageStore()
    image = resolve(DEFAULT_IMAGE, store)
    writable = workdir / "writable.ext4"
    started = time.perf_counter()
    create_writable_layer(writable, DEFAULT_WRITABLE_SIZE, cache_root=store.root)
    writable_seconds = time.perf_counter() - started
    machine = BareMachine(
        assets=ensure_guest_assets(store.root),
        layers=tuple(image.layer_paths),
        accel=choose_accelerator(),
        cpus=args.cpus,
        memory_mib=args.memory_mib,
        writable=writable,
        workdir=workdir,
        timeout=args.bare_timeout,
    )
    return machine, writable_seconds


async def run_bare(machine: BareMachine, run: int) -> float:
    """Boot (a) once; seconds from ``QemuDriver().boot`` to QEMU's exit."""
    run_dir = machine.workdir / f"bare-{run}"
    run_dir.mkdir()
    spec = machine.spec(run_dir)
    started = time.perf_counter()
    vm = await QemuDriver().boot(spec)
    try:
        status = await vm.wait(machine.timeout)
        seconds = time.perf_counter() - started
    finally:
        vm.kill()  # nothing to do if it has exited; SIGKILL and reap otherwise
    try:
        _check_bare_exit(spec, status, machine.timeout)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return seconds


def _check_bare_exit(spec: MachineSpec, status: int | None, timeout: float) -> None:
    console = console_tail(spec.console_log, 30)
    if status is None:
        raise BenchError(
            f"bare boot: QEMU still ran after {timeout:g} s (killed); does the agent in "
            f"{spec.initramfs} know vmr.bare=1? console:\n{console}"
        )
    if status != 0:
        vmm = console_tail(spec.vmm_log, 10)
        raise BenchError(f"bare boot: QEMU exited with status {status}: {vmm}\n{console}")
    if any(marker in console for marker in _CONSOLE_FAILURES):
        raise BenchError(f"bare boot: QEMU exited 0, but the guest failed:\n{console}")


# --- (b) and (c): sandboxes -------------------------------------------------------------


async def hello_uptime(sandbox: AsyncSandbox) -> float:
    """The guest uptime in the agent's HELLO, in seconds.

    There is no public accessor for the HELLO; this reads the sandbox's private
    agent client (the HELLO is already there, so awaiting it costs nothing).
    """
    client = sandbox._client
    if client is None:
        return float("nan")
    return (await client.hello()).uptime_ms / 1000


async def run_sandbox(args: argparse.Namespace, argv: Sequence[str], expect: bytes) -> SandboxRun:
    """create, exec ``argv``, stop; checks the exec's status and stdout."""
    started = time.perf_counter()
    sandbox = await AsyncSandbox.create(DEFAULT_IMAGE, cpus=args.cpus, memory_mib=args.memory_mib)
    created = time.perf_counter()
    try:
        uptime = await hello_uptime(sandbox)
        exec_started = time.perf_counter()
        result = await sandbox.exec(list(argv))
        exec_done = time.perf_counter()
        await sandbox.stop()
        stopped = time.perf_counter()
    finally:
        await sandbox.stop()  # a no-op after the timed stop; ends the VM on errors
    if result.returncode != 0 or result.stdout != expect:
        raise BenchError(
            f"{list(argv)}: exit {result.returncode}, stdout {result.stdout!r} "
            f"(expected {expect!r}), stderr {result.stderr[-500:]!r}"
        )
    return SandboxRun(
        create=created - started,
        boot=sandbox.boot_seconds,
        uptime=uptime,
        exec=exec_done - exec_started,
        stop=stopped - exec_done,
    )


# --- memory of an idle sandbox ----------------------------------------------------------


def read_kib_lines(text: str) -> dict[str, int]:
    """The ``Name: N kB`` lines of a /proc file's text, as {name: N}."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name.strip()] = int(parts[0])
    return fields


def read_kib_fields(path: Path) -> dict[str, int]:
    return read_kib_lines(path.read_text())


def host_rss_kib() -> int:
    return read_kib_fields(Path("/proc/self/status"))["VmRSS"]


@dataclass
class IdleMemory:
    """One idle sandbox, in KiB."""

    qemu_rollup: dict[str, int]  # /proc/PID/smaps_rollup of QEMU
    qemu_status: dict[str, int]  # /proc/PID/status of QEMU (RssAnon, RssFile, RssShmem)
    host_growth: int  # this process's VmRSS growth from before create
    guest_meminfo: dict[str, int]

    @property
    def guest_ram(self) -> int:
        """Guest RAM pages QEMU has touched: the shared memfd, counted as shmem."""
        return self.qemu_status["RssShmem"]

    @property
    def qemu_overhead(self) -> int:
        return self.qemu_rollup["Rss"] - self.guest_ram

    @property
    def guest_in_use(self) -> int:
        return self.guest_meminfo["MemTotal"] - self.guest_meminfo["MemAvailable"]


async def measure_idle_memory(args: argparse.Namespace) -> IdleMemory:
    """Create a sandbox, exec ``true``, idle, then read QEMU's and the guest's memory."""
    before = host_rss_kib()
    sandbox = await AsyncSandbox.create(DEFAULT_IMAGE, cpus=args.cpus, memory_mib=args.memory_mib)
    try:
        (await sandbox.exec(list(TRUE_ARGV))).check()
        await asyncio.sleep(args.idle_seconds)
        proc = Path(f"/proc/{sandbox.vmm_pid}")
        rollup = read_kib_fields(proc / "smaps_rollup")
        status = read_kib_fields(proc / "status")
        growth = host_rss_kib() - before
        meminfo = (await sandbox.exec(["cat", "/proc/meminfo"])).check().stdout
    finally:
        await sandbox.stop()
    guest = read_kib_lines(meminfo.decode())
    return IdleMemory(rollup, status, growth, guest)


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def print_memory(mem: IdleMemory, memory_mib: int, idle: float) -> None:
    r, s = mem.qemu_rollup, mem.qemu_status
    total = mem.qemu_overhead + mem.host_growth
    print(
        f"idle sandbox host memory (after exec true and {idle:g} s idle): QEMU {mib(r['Rss'])} "
        f"RSS of which guest RAM {mib(mem.guest_ram)} (memfd) → overhead beyond guest RAM: "
        f"QEMU {mib(mem.qemu_overhead)} + host process {mem.host_growth / 1024:+.0f} MiB = "
        f"{mib(total)}; guest reports {mib(mem.guest_in_use)} in use "
        f"(MemTotal {mib(mem.guest_meminfo['MemTotal'])} of -m {memory_mib} MiB)"
    )
    print(
        f"  QEMU RSS = anon {mib(s['RssAnon'])} + file {mib(s['RssFile'])} + shmem "
        f"{mib(s['RssShmem'])}; PSS {mib(r['Pss'])} = anon {mib(r['Pss_Anon'])} + file "
        f"{mib(r['Pss_File'])} + shmem {mib(r['Pss_Shmem'])}"
    )
    print(
        f"  each further sandbox costs about guest RAM + QEMU anon ({mib(s['RssAnon'])}); "
        f"the file pages ({mib(s['RssFile'])}: QEMU and its libraries) are shared by all QEMUs"
    )


# --- main -------------------------------------------------------------------------------


@dataclass
class Bench:
    bare: Samples
    true_: SandboxSamples
    python: SandboxSamples


def new_bench() -> Bench:
    return Bench(
        bare=Samples("boot (a) bare QEMU to init + poweroff"),
        true_=SandboxSamples(Samples("sandbox (b) create + exec true + stop"), TRUE_ARGV, b""),
        python=SandboxSamples(
            Samples("sandbox (c) create + python3 -c print(1) + stop"), PYTHON_ARGV, b"1\n"
        ),
    )


async def run_rounds(args: argparse.Namespace, machine: BareMachine, bench: Bench) -> None:
    """One warm-up round, then ``args.runs`` counted rounds of a, b, c."""
    for round_ in range(args.runs + 1):
        label = "warm-up round (not counted)" if round_ == 0 else f"round {round_}/{args.runs}"
        print(f"{label} ...", flush=True)
        bare = await run_bare(machine, round_)
        true_ = await run_sandbox(args, bench.true_.argv, bench.true_.expect_stdout)
        python = await run_sandbox(args, bench.python.argv, bench.python.expect_stdout)
        print(f"  (a) {fmt(bare)}  (b) {fmt(true_.total)}  (c) {fmt(python.total)}", flush=True)
        if round_ == 0:
            continue
        bench.bare.seconds.append(bare)
        bench.true_.add(true_)
        bench.python.add(python)


def print_results(bench: Bench, machine: BareMachine, writable_seconds: float) -> None:
    print(bench.bare.line())
    print(bench.true_.samples.line())
    print(bench.python.samples.line())
    a = bench.bare.median
    for name, sandbox in (("(b)", bench.true_), ("(c)", bench.python)):
        goal = f" (goal <= {RATIO_GOAL})" if name == "(b)" else ""
        ratio = sandbox.samples.median / a
        extra = sandbox.samples.median - a
        print(f"ratio {name}/(a): {ratio:.2f}{goal}; {name} - (a) = {fmt(extra)}")
    print(f"accelerator: {machine.accel.name} ({machine.accel.reason})")
    b = bench.true_.samples.median
    if machine.accel.name == "kvm":
        verdict = "yes" if b < KVM_GOAL_SECONDS else "no"
        print(f"(b) under {fmt(KVM_GOAL_SECONDS)} on KVM: {verdict} ({fmt(b)})")
    else:
        print(f"(b) under {fmt(KVM_GOAL_SECONDS)}: a goal for KVM hosts, not checked under tcg")
    print_breakdown(bench, writable_seconds)


def print_breakdown(bench: Bench, writable_seconds: float) -> None:
    rows = (
        ("host work before boot (create - boot_seconds)", None),
        ("Sandbox.boot_seconds (writable layer .. HELLO)", "boot"),
        ("  guest uptime at HELLO (guest clock)", "uptime"),
        ("  rest: QEMU start, kernel unpack, writable, socket", None),
        ("exec", "exec"),
        ("stop (shutdown, QEMU exit, state removed)", "stop"),
    )
    print("where the time of (b) and (c) goes (medians of each part):")
    print(f"  {'':<52} {'(b)':>8} {'(c)':>8}")
    for label, part in rows:
        cells = [_part(sandbox, label, part) for sandbox in (bench.true_, bench.python)]
        print(f"  {label:<52} {cells[0]:>8} {cells[1]:>8}")
    print(f"  (one writable-layer copy, timed while preparing (a): {fmt(writable_seconds)})")


def _part(sandbox: SandboxSamples, label: str, part: str | None) -> str:
    if part is not None:
        return fmt(sandbox.median_of(part))
    if label.startswith("host work"):
        return fmt(statistics.median(run.create - run.boot for run in sandbox.parts))
    return fmt(statistics.median(run.boot - run.uptime for run in sandbox.parts))


def print_environment(machine: BareMachine) -> None:
    qemu = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True)
    version = qemu.stdout.split("\n", 1)[0].removeprefix("QEMU emulator version ")
    print(
        f"environment: cpus={len(os.sched_getaffinity(0))} python={platform.python_version()} "
        f"qemu={version} host kernel={platform.release()} guest kernel={machine.assets.release}"
    )
    print(
        f"machine: {machine.cpus} vCPU, {machine.memory_mib} MiB, accel={machine.accel.name}, "
        f"image {DEFAULT_IMAGE} ({len(machine.layers)} layer(s)), initramfs "
        f"{machine.assets.initramfs.name} ({machine.assets.initramfs.stat().st_size / MIB:.1f} "
        f"MiB), kernel {machine.assets.kernel.stat().st_size / MIB:.1f} MiB"
    )


async def bench_main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    ensure_default_image(log=lambda line: print(f"image: {line}"))
    workdir = Path(tempfile.mkdtemp(prefix="vmr-bench-boot-"))
    try:
        machine, writable_seconds = prepare_bare_machine(args, workdir)
        print_environment(machine)
        bench = new_bench()
        await run_rounds(args, machine, bench)
        print(f"results, {args.runs} run(s) each, interleaved, after one warm-up round:")
        print_results(bench, machine, writable_seconds)
        memory = await measure_idle_memory(args)
        print_memory(memory, args.memory_mib, args.idle_seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="counted runs of each (median)")
    parser.add_argument("--cpus", type=int, default=1, help="vCPUs (Sandbox's default: 1)")
    parser.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB, help="guest RAM")
    parser.add_argument(
        "--bare-timeout", type=float, default=60.0, help="fail if (a) runs longer (seconds)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=2.0, help="idle time before reading memory"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.cpus < 1 or args.bare_timeout <= 0 or args.idle_seconds < 0:
        parser.error("--runs and --cpus must be >= 1, --bare-timeout > 0, --idle-seconds >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return samples.run(lambda: bench_main(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have ended every VM
        print("interrupted", file=sys.stderr)
        sys.exit(130)
