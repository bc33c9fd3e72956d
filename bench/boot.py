"""Benchmark: what a sandbox costs on top of a bare boot of the same VM.

Not a test: it prints timings and ratios measured in the same run, on this machine.

It measures, ``--runs`` times each (default 5), interleaved (a, b, c, d, a, ...)
after one warm-up round that is not counted:

(a) a bare QEMU boot of the sandbox's own machine: the ``MachineSpec`` that
    ``AsyncSandbox.create`` builds (same kernel, initramfs, accelerator, cpus,
    memory, kernel command line from ``kernel_cmdline``, the image's layers as
    read-only disks, a writable-layer disk, the agent's console port) plus
    ``vmr.bare=1``, on which the agent reboots as soon as it starts (see
    docs/agent-protocol.md, "Boot"). Timed from ``QemuDriver.boot`` to QEMU's
    exit, which must be status 0, within ``--bare-timeout``, with no panic or
    agent error on the console;
(b) ``AsyncSandbox.create`` of the default image, exec ``true``, ``stop``, end
    to end;
(c) the same, exec ``python3 -c 'print(1)'`` (stdout must be ``1``);
(d) the same, exec a heavier program (``import json, email, http.client, numpy``),
    of which the exec alone counts: code that touches much different code is what
    a small TCG translation cache slows down.

Under TCG it also reads, after each exec, how often QEMU flushed its translation
cache since boot (``info jit`` over QMP).

It prints the median, min and max of each, the ratios (b)/(a) and (c)/(a) (goal:
(b)/(a) <= 1.3; on a KVM host also (b) < 300 ms), the accelerator, where the time
of (b) and (c) goes (host work before QEMU, ``Sandbox.boot_seconds``, the guest's
uptime at the agent's HELLO, exec, stop), and the host memory one idle sandbox
uses beyond its guest RAM: the PSS of its QEMU without the guest-RAM memfd, plus
its other host processes (brokers; none without mounts), ``--idle-seconds`` after
boot (``--idle-sandboxes N`` also reads N idle together, what a warm pool pays).

``--tb-sizes 16,32,default`` measures all of it for each TCG translation-cache
size (``-accel tcg,tb-size=N``; ``default`` is QEMU's own), the sizes taking
turns within each round, and prints tables: medians, the slowdown against
QEMU's default (or the largest size), the flushes, which sizes never flush in
(b) and (c) (so cost them nothing), which stay within 5% on the timings of (a),
(b) and (c), idle memory and the 40 MiB goal, and the smallest size with no flush.
See ``bench/README.md`` for every line.

Every VM it starts is ended before it exits, also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import hostmem  # noqa: E402  (bench/hostmem.py, beside this script)
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
from vmruntime.vm.qemu import TCG_TB_SIZE_MIB, QemuDriver, qemu_binary  # noqa: E402
from vmruntime.vm.sandbox import console_tail  # noqa: E402

MIB = 1 << 20
KVM_GOAL_SECONDS = 0.300
RATIO_GOAL = 1.3
TRUE_ARGV = ("true",)
PYTHON_ARGV = ("python3", "-c", "print(1)")
# Many modules, pure Python and C (numpy's libraries): much code the TCG cache must hold.
HEAVY_IMPORTS = "json, email, http.client, numpy"
HEAVY_ARGV = ("python3", "-c", f"import {HEAVY_IMPORTS}; print(1)")
HEAVY_LABEL = f"python3 -c 'import {HEAVY_IMPORTS}'"
SLOWDOWN_LIMIT = 0.05  # the issue: a tb-size may cost at most 5% on (a), (b), (c)
MEMORY_GOAL_MIB = 40  # the issue: idle host memory beyond guest RAM, under TCG
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
    jit: JitInfo | None  # TCG's translation cache after the exec (None under KVM)

    @property
    def total(self) -> float:
        return self.create + self.exec + self.stop


@dataclass(frozen=True)
class JitInfo:
    """What QEMU's ``info jit`` says of TCG's translation cache."""

    flushes: int  # times the cache was full and emptied: all code is translated again
    code_bytes: int  # host code in the cache now (since the last flush)
    translations: int  # translated blocks in the cache now ("TB count")


_JIT_FIELDS = {
    "flushes": re.compile(r"^TB flush count\s+(\d+)", re.M),
    "code_bytes": re.compile(r"^gen code size\s+(\d+)/", re.M),
    "translations": re.compile(r"^TB count\s+(\d+)", re.M),
}


async def tcg_jit_info(sandbox: AsyncSandbox) -> JitInfo | None:
    """``info jit`` over the sandbox's QMP socket (free while the sandbox does not use it).

    A run with no flush translated exactly what it would have with a bigger cache,
    so it cannot be slower for the size: that is certain where timings are noisy.
    """
    if sandbox.accelerator != "tcg":
        return None
    from qemu.qmp import QMPClient

    client = QMPClient("vmr-bench-boot")
    await client.connect(str(state.SandboxPaths(sandbox.id).control_socket))
    try:
        text = await client.execute("human-monitor-command", {"command-line": "info jit"})
    finally:
        await client.disconnect()
    values = {}
    for name, pattern in _JIT_FIELDS.items():
        match = pattern.search(str(text))
        if match is None:
            raise BenchError(f"QEMU's info jit has no {name}: {text!r}")
        values[name] = int(match.group(1))
    return JitInfo(**values)


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


async def run_bare(machine: BareMachine, driver: QemuDriver) -> float:
    """Boot (a) once; seconds from ``driver.boot`` to QEMU's exit."""
    run_dir = Path(tempfile.mkdtemp(prefix="bare-", dir=machine.workdir))
    spec = machine.spec(run_dir)
    started = time.perf_counter()
    vm = await driver.boot(spec)
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


# --- (b), (c) and (d): sandboxes -------------------------------------------------------------


async def hello_uptime(sandbox: AsyncSandbox) -> float:
    """The guest uptime in the agent's HELLO, in seconds.

    There is no public accessor for the HELLO; this reads the sandbox's private
    agent client (the HELLO is already there, so awaiting it costs nothing).
    """
    client = sandbox._client
    if client is None:
        return float("nan")
    return (await client.hello()).uptime_ms / 1000


async def run_sandbox(
    args: argparse.Namespace, measure: SandboxSamples, driver: QemuDriver
) -> SandboxRun:
    """create, exec ``measure.argv``, stop; checks the exec's status and stdout."""
    argv, expect = measure.argv, measure.expect_stdout
    started = time.perf_counter()
    sandbox = await AsyncSandbox.create(
        DEFAULT_IMAGE, cpus=args.cpus, memory_mib=args.memory_mib, driver=driver
    )
    created = time.perf_counter()
    try:
        uptime = await hello_uptime(sandbox)
        exec_started = time.perf_counter()
        result = await sandbox.exec(list(argv))
        exec_done = time.perf_counter()
        jit = await tcg_jit_info(sandbox)  # not timed
        stop_started = time.perf_counter()
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
        stop=stopped - stop_started,
        jit=jit,
    )


# --- memory of an idle sandbox ----------------------------------------------------------


@dataclass
class IdleSandbox:
    """A sandbox kept idle for the memory reading, and its host processes besides QEMU."""

    sandbox: AsyncSandbox
    helpers: set[int]  # brokers (one per mounted folder) and anything below them or QEMU


@dataclass(frozen=True)
class SandboxMemory:
    """One sandbox's host memory beyond guest RAM (PSS, KiB): its QEMU and its helpers."""

    qemu: hostmem.ProcessMemory
    helpers: tuple[hostmem.ProcessMemory, ...]

    def part(self, name: str) -> int:
        """``anon``, ``file``, ``shmem`` or ``total``, summed over its processes."""
        return sum(getattr(process, name) for process in (self.qemu, *self.helpers))

    @property
    def total(self) -> int:
        return self.part("total")


@dataclass
class IdleMemory:
    """The idle-memory readings of one translation-cache size."""

    single: SandboxMemory  # one sandbox alone
    pool: list[SandboxMemory]  # each of --idle-sandboxes N idle together (none when N is 1)
    used: SandboxMemory  # the first sandbox again, after (d)'s program ran in it
    qemus: int  # QEMUs on the host at the single reading; they share QEMU's file pages
    host_growth: int  # this process's VmRSS growth from before create (KiB; not counted)
    guest_meminfo: dict[str, int]

    @property
    def guest_in_use(self) -> int:
        return self.guest_meminfo["MemTotal"] - self.guest_meminfo["MemAvailable"]


async def add_idle_sandbox(
    args: argparse.Namespace, driver: QemuDriver, sandboxes: list[IdleSandbox]
) -> None:
    """Create a sandbox (into ``sandboxes`` at once, so it is stopped), exec ``true``.

    Its helpers are the children this process gained during create (a broker starts
    before QEMU), and everything below them, QEMU excepted.
    """
    before = hostmem.children(os.getpid())
    sandbox = await AsyncSandbox.create(
        DEFAULT_IMAGE, cpus=args.cpus, memory_mib=args.memory_mib, driver=driver
    )
    started = hostmem.children(os.getpid()) - before
    sandboxes.append(IdleSandbox(sandbox, hostmem.with_descendants(started) - {sandbox.vmm_pid}))
    (await sandbox.exec(list(TRUE_ARGV))).check()


def read_sandbox_memory(idle: IdleSandbox) -> SandboxMemory:
    helpers = []
    for pid in sorted(idle.helpers):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone: costs nothing
            helpers.append(hostmem.read_process_memory(pid))
    return SandboxMemory(hostmem.read_process_memory(idle.sandbox.vmm_pid), tuple(helpers))


async def measure_idle_memory(args: argparse.Namespace, driver: QemuDriver) -> IdleMemory:
    """One sandbox idle ``--idle-seconds`` after boot + exec ``true``; then, with
    ``--idle-sandboxes N``, N idle together; then the guest's own view; then the first
    again after (d)'s program, since the translation cache keeps what ran."""
    sandboxes: list[IdleSandbox] = []
    before = hostmem.host_rss_kib()
    try:
        await add_idle_sandbox(args, driver, sandboxes)
        await asyncio.sleep(args.idle_seconds)
        single = read_sandbox_memory(sandboxes[0])
        qemus = len(hostmem.qemu_pids())
        growth = hostmem.host_rss_kib() - before
        pool = await measure_pool(args, driver, sandboxes)
        meminfo = (await sandboxes[0].sandbox.exec(["cat", "/proc/meminfo"])).check().stdout
        await stop_all(sandboxes[1:])  # alone again, so "used" compares with "single"
        (await sandboxes[0].sandbox.exec(list(HEAVY_ARGV))).check()
        used = read_sandbox_memory(sandboxes[0])
    finally:
        await stop_all(sandboxes)
    guest = hostmem.read_kib_lines(meminfo.decode())
    return IdleMemory(single, pool, used, qemus, growth, guest)


async def measure_pool(
    args: argparse.Namespace, driver: QemuDriver, sandboxes: list[IdleSandbox]
) -> list[SandboxMemory]:
    """With ``--idle-sandboxes N`` > 1: N - 1 more (one at a time), idle, then each one's."""
    if args.idle_sandboxes < 2:
        return []
    while len(sandboxes) < args.idle_sandboxes:
        await add_idle_sandbox(args, driver, sandboxes)
    await asyncio.sleep(args.idle_seconds)
    return [read_sandbox_memory(idle) for idle in sandboxes]


async def stop_all(sandboxes: list[IdleSandbox]) -> None:
    """Stop every sandbox even when one stop fails; then raise the first failure."""
    failures: list[BaseException] = []
    for idle in sandboxes:
        try:
            await idle.sandbox.stop()
        except Exception as exc:  # the others must still be stopped
            failures.append(exc)
    if failures:
        raise failures[0]


mib = samples.mib


def goal_verdict(kib: float, accel: str) -> str:
    if accel != "tcg":
        return f"not checked: a goal for TCG, this host runs {accel}"
    return "met" if kib <= MEMORY_GOAL_MIB * 1024 else "missed"


def kinds(parts: Callable[[str], float]) -> str:
    return " + ".join(f"{name} {mib(parts(name))}" for name in ("anon", "file", "shmem"))


def print_memory(bench: Bench, args: argparse.Namespace, accel: str) -> None:
    mem = bench.memory
    assert mem is not None
    one, qemu = mem.single, mem.single.qemu
    print(
        f"idle host memory beyond guest RAM [{bench.size.label}]: {mib(one.total)} "
        f"(goal <= {MEMORY_GOAL_MIB} MiB under TCG: {goal_verdict(one.total, accel)}); "
        f"one sandbox alone, read {args.idle_seconds:g} s after its boot + exec true"
    )
    print(
        f"  = QEMU PSS {mib(qemu.total + qemu.guest_ram)} - guest RAM {mib(qemu.guest_ram)} "
        f"(the memfd pages the guest touched) + the sandbox's other host processes: "
        f"{helpers_text(one)}"
    )
    print(f"  by kind: {kinds(one.part)} (PSS, guest RAM left out)")
    print(
        f"  the file part is shared: PSS divides it among the {mem.qemus} QEMU(s) on the host "
        f"at the reading and other processes mapping the same libraries; unshared it is "
        f"{mib(qemu.rss_file)}, with 8 sandboxes at most {mib(qemu.rss_file / 8)} each"
    )
    if mem.pool:
        print_pool(mem.pool, accel)
    print(
        f"  after (d)'s program ran in it: {mib(mem.used.total)} ({kinds(mem.used.part)}): "
        f"the translation cache keeps the code that ran, up to its size"
    )
    print(
        f"  guest reports {mib(mem.guest_in_use)} in use (MemTotal "
        f"{mib(mem.guest_meminfo['MemTotal'])} of -m {args.memory_mib} MiB); this process's "
        f"RSS grew by {mem.host_growth / 1024:+.0f} MiB (the caller's process, not counted)"
    )


def helpers_text(memory: SandboxMemory) -> str:
    if not memory.helpers:
        return "none (no mounts, so no brokers)"
    each = ", ".join(f"{p.comm} {p.pid} {mib(p.total)}" for p in memory.helpers)
    return f"{each} = {mib(sum(p.total for p in memory.helpers))}"


def print_pool(pool: list[SandboxMemory], accel: str) -> None:
    """Per sandbox with N idle together: what each sandbox of a warm pool pays."""
    mean = statistics.mean(memory.total for memory in pool)
    low, high = min(m.total for m in pool), max(m.total for m in pool)
    print(
        f"  with {len(pool)} sandboxes idle together (--idle-sandboxes; a warm pool): "
        f"{mib(mean)} per sandbox (mean; min {mib(low)}, max {mib(high)}; goal: "
        f"{goal_verdict(mean, accel)}) = "
        f"{kinds(lambda name: statistics.mean(m.part(name) for m in pool))}"
    )


# --- translation-cache sizes ------------------------------------------------------------


@dataclass(frozen=True)
class TbSize:
    """One TCG translation-cache size to measure; ``mib=None`` is QEMU's own default."""

    mib: int | None

    @property
    def label(self) -> str:
        return "QEMU default" if self.mib is None else f"{self.mib} MiB"

    @property
    def order(self) -> float:
        return math.inf if self.mib is None else self.mib  # QEMU's: up to 1 GiB, the largest

    def driver(self) -> QemuDriver:
        return QemuDriver(tb_size_mib=self.mib)


def parse_tb_sizes(text: str) -> list[TbSize]:
    """``4,8,16,default`` as sizes, smallest first; ``default`` is QEMU's own."""
    sizes: set[TbSize] = set()
    for item in (part.strip().lower() for part in text.split(",")):
        if item == "default":
            sizes.add(TbSize(None))
        elif item.isdigit() and int(item) >= 1:
            sizes.add(TbSize(int(item)))
        else:
            raise argparse.ArgumentTypeError(f"{item!r} is neither MiB (>= 1) nor 'default'")
    return sorted(sizes, key=lambda size: size.order)


# --- rounds -----------------------------------------------------------------------------


@dataclass
class Bench:
    """Every measurement of one translation-cache size; one sample per counted round."""

    size: TbSize
    bare: Samples
    true_: SandboxSamples
    python: SandboxSamples
    heavy: SandboxSamples
    memory: IdleMemory | None = None

    @property
    def sandboxes(self) -> tuple[SandboxSamples, ...]:
        return (self.true_, self.python, self.heavy)

    def series(self, key: str) -> list[float]:
        """(a), (b), (c) end to end, or (d)'s exec alone, in round order."""
        if key == "a":
            return self.bare.seconds
        if key == "d":
            return [run.exec for run in self.heavy.parts]
        return {"b": self.true_, "c": self.python}[key].samples.seconds

    def flushes(self, key: str) -> list[int]:
        """Translation-cache flushes in each (b), (c) or (d) run, from boot to its exec's end."""
        sandbox = {"b": self.true_, "c": self.python, "d": self.heavy}[key]
        return [run.jit.flushes for run in sandbox.parts if run.jit is not None]


def new_bench(size: TbSize) -> Bench:
    return Bench(
        size=size,
        bare=Samples("boot (a) bare QEMU to init + poweroff"),
        true_=SandboxSamples(Samples("sandbox (b) create + exec true + stop"), TRUE_ARGV, b""),
        python=SandboxSamples(
            Samples("sandbox (c) create + python3 -c print(1) + stop"), PYTHON_ARGV, b"1\n"
        ),
        heavy=SandboxSamples(Samples(f"sandbox (d) {HEAVY_LABEL}"), HEAVY_ARGV, b"1\n"),
    )


async def run_rounds(args: argparse.Namespace, machine: BareMachine, benches: list[Bench]) -> None:
    """One warm-up round, then ``args.runs`` counted rounds; each round measures every
    size, in an order shifted by one each round, so noise and position hit all alike."""
    for round_ in range(args.runs + 1):
        label = "warm-up round (not counted)" if round_ == 0 else f"round {round_}/{args.runs}"
        print(f"{label} ...", flush=True)
        shift = round_ % len(benches)
        for bench in benches[shift:] + benches[:shift]:
            await run_round(args, machine, bench, counted=round_ > 0)


async def run_round(
    args: argparse.Namespace, machine: BareMachine, bench: Bench, *, counted: bool
) -> None:
    """(a), (b), (c), (d) of one size, one after the other."""
    driver = bench.size.driver()
    bare = await run_bare(machine, driver)
    runs = [await run_sandbox(args, sandbox, driver) for sandbox in bench.sandboxes]
    flushes = "/".join("-" if run.jit is None else str(run.jit.flushes) for run in runs)
    print(
        f"  {bench.size.label:>12}: (a) {fmt(bare)}  (b) {fmt(runs[0].total)}  "
        f"(c) {fmt(runs[1].total)}  (d) exec {fmt(runs[2].exec)}  flushes b/c/d {flushes}",
        flush=True,
    )
    if counted:
        bench.bare.seconds.append(bare)
        for sandbox, run in zip(bench.sandboxes, runs, strict=True):
            sandbox.add(run)


# --- one size: the detailed results -----------------------------------------------------


def print_results(bench: Bench, machine: BareMachine, writable_seconds: float) -> None:
    print(bench.bare.line())
    print(bench.true_.samples.line())
    print(bench.python.samples.line())
    print(Samples(f"(d) exec {HEAVY_LABEL} alone", bench.series("d")).line())
    if bench.true_.parts[0].jit is not None:
        cells = "  ".join(f"({key}) {_counts(bench.flushes(key))}" for key in "bcd")
        print(f"TCG translation-cache flushes, boot to the exec's end: {cells}")
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


# --- several sizes: the sweep tables ----------------------------------------------------


def paired_slowdowns(bench: Bench, baseline: Bench, key: str) -> list[float]:
    """Per counted round: this size's time / the baseline's in the same round, minus 1."""
    pairs = zip(bench.series(key), baseline.series(key), strict=True)
    return [mine / theirs - 1 for mine, theirs in pairs]


def slowdown(bench: Bench, baseline: Bench, key: str) -> float:
    return statistics.median(paired_slowdowns(bench, baseline, key))


def within_limit(bench: Bench, baseline: Bench) -> bool:
    """The issue's test on the timings: (a), (b) and (c) at most 5% slower (medians)."""
    return all(slowdown(bench, baseline, key) <= SLOWDOWN_LIMIT for key in "abc")


def never_flushed(bench: Bench, keys: str = "bc") -> bool:
    """No flush in any (b) and (c) run, so nothing translated twice, and (a)'s boot,
    which (b) includes, neither: as fast as any bigger cache, whatever the noise."""
    return all(not any(bench.flushes(key)) for key in keys)


def sweep_baseline(benches: list[Bench]) -> Bench:
    """QEMU's default size if measured, else the largest."""
    return benches[-1]  # sorted smallest first, QEMU's default last


def percent(value: float) -> str:
    return f"{value * 100:+.0f}%"


def _counts(values: list[int]) -> str:
    """Flush counts of the runs: ``0``, or ``1-2`` when they differed."""
    low, high = min(values, default=0), max(values, default=0)
    return str(low) if low == high else f"{low}-{high}"


def print_sweep(benches: list[Bench], accel: str) -> None:
    baseline = sweep_baseline(benches)
    print(
        f"sweep of {len(benches)} translation-cache sizes, {len(baseline.bare.seconds)} rounds; "
        f"medians; Δ = median over rounds of (time / {baseline.size.label}'s in the same "
        f"round) - 1; (d) is its exec alone; flushes: of the translation cache, from boot "
        f"to the exec's end, in every run"
    )
    limit = f"{SLOWDOWN_LIMIT * 100:.0f}%"
    header = f"  {'tb-size':>12}" + "".join(f" {f'({key})':>8}" for key in "abcd")
    header += "".join(f" {'Δ' + key:>6}" for key in "abcd")
    print(header + f"  {'flushes b/c/d':>13}  no-flush-bc  Δabc<={limit}")
    for bench in benches:
        print(sweep_row(bench, baseline))
    print_spreads(benches, baseline)
    print_memory_table(benches, accel)
    print_recommendation(benches, baseline, accel)


def sweep_row(bench: Bench, baseline: Bench) -> str:
    times = [statistics.median(bench.series(key)) for key in "abcd"]
    row = f"  {bench.size.label:>12}" + "".join(f" {fmt(t):>8}" for t in times)
    if bench is baseline:
        row += "".join(f" {'base':>6}" for _ in "abcd")
    else:
        row += "".join(f" {percent(slowdown(bench, baseline, key)):>6}" for key in "abcd")
    flushes = "/".join(_counts(bench.flushes(key)) for key in "bcd")
    same = "yes" if never_flushed(bench) else "no"
    within = "yes" if within_limit(bench, baseline) else "no"
    return row + f"  {flushes:>13}  {same:>11}  {within:>9}"


def print_spreads(benches: list[Bench], baseline: Bench) -> None:
    """How noisy it was: per-round slowdowns (min..max) and the baseline's own spread."""
    print("  per-round Δ, min..max:")
    for bench in benches:
        if bench is not baseline:
            cells = []
            for key in "abcd":
                values = paired_slowdowns(bench, baseline, key)
                cells.append(f"({key}) {percent(min(values))}..{percent(max(values))}")
            print(f"  {bench.size.label:>12}: " + "  ".join(cells))
    spread = "  ".join(
        f"({key}) {(max(s) - min(s)) / statistics.median(s) * 100:.0f}%"
        for key in "abcd"
        for s in [baseline.series(key)]
    )
    print(f"  noise: {baseline.size.label}'s own (max - min) / median: {spread}")


def print_memory_table(benches: list[Bench], accel: str) -> None:
    """Idle memory beyond guest RAM: alone, per sandbox of a pool, after (d) ran."""
    pool = any(bench.memory is not None and bench.memory.pool for bench in benches)
    header = f"  {'memory beyond guest RAM':>24} {'idle':>8}"
    header += f" {'pool':>8}" if pool else ""
    print(header + f" {'used':>8}  idle<={MEMORY_GOAL_MIB} MiB")
    for bench in benches:
        memory = bench.memory
        assert memory is not None
        row = f"  {bench.size.label:>24} {mib(memory.single.total):>8}"
        if pool:
            row += f" {mib(statistics.mean(m.total for m in memory.pool)):>8}"
        row += f" {mib(memory.used.total):>8}  {goal_verdict(memory.single.total, accel)}"
        print(row)
    print(
        "  idle: one sandbox alone; "
        + ("pool: per sandbox, --idle-sandboxes of them idle together; " if pool else "")
        + "used: the idle one again after (d)'s program ran in it"
    )


def print_recommendation(benches: list[Bench], baseline: Bench, accel: str) -> None:
    """The smallest size that provably costs (a), (b), (c) nothing (no flush); and the
    smallest that the timings alone let through, which on a noisy host may be luck."""
    limit = f"{SLOWDOWN_LIMIT * 100:.0f}%"
    by_timing = next(bench for bench in benches if within_limit(bench, baseline))
    print(
        f"by timings alone: {by_timing.size.label} is the smallest size whose (a), (b), (c) "
        f"medians are at most {limit} slower than {baseline.size.label}'s (trust it only "
        f"if that is well outside the noise above)"
    )
    if baseline.true_.parts[0].jit is None:
        return  # KVM: no translation cache to reason about
    chosen = next((bench for bench in benches if never_flushed(bench)), None)
    if chosen is None:
        print("recommended: none; every size measured flushed in (b) or (c): add a bigger one")
        return
    memory = chosen.memory
    assert memory is not None
    heavy = "no flush either" if never_flushed(chosen, "d") else "flushes"
    print(
        f"recommended: {chosen.size.label}, the smallest size with no flush in (b) and (c) "
        f"(so (a), (b), (c) translate exactly what they do with {baseline.size.label}); "
        f"(d): {heavy}, Δd {percent(slowdown(chosen, baseline, 'd'))}; idle "
        f"{mib(memory.single.total)} beyond guest RAM (goal <= {MEMORY_GOAL_MIB} MiB: "
        f"{goal_verdict(memory.single.total, accel)})"
    )


# --- main -------------------------------------------------------------------------------


def print_environment(machine: BareMachine, sizes: list[TbSize]) -> None:
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
    labels = ", ".join(size.label for size in sizes)
    driver_default = TbSize(TCG_TB_SIZE_MIB).label
    print(f"TCG translation cache (tb-size): {labels} (QemuDriver's: {driver_default})")


def check_sizes(sizes: list[TbSize], accel: Accelerator) -> None:
    if accel.name != "tcg" and len(sizes) > 1:
        raise BenchError(
            f"--tb-sizes compares TCG translation caches, but this host runs {accel.name} "
            f"({accel.reason}); VMRUNTIME_ACCEL=tcg forces TCG"
        )


async def bench_main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    ensure_default_image(log=lambda line: print(f"image: {line}"))
    workdir = Path(tempfile.mkdtemp(prefix="vmr-bench-boot-"))
    try:
        machine, writable_seconds = prepare_bare_machine(args, workdir)
        print_environment(machine, args.tb_sizes)
        check_sizes(args.tb_sizes, machine.accel)
        benches = [new_bench(size) for size in args.tb_sizes]
        await run_rounds(args, machine, benches)
        for bench in benches:
            print(f"idle memory [{bench.size.label}] ...", flush=True)
            bench.memory = await measure_idle_memory(args, bench.size.driver())
        print(f"results, {args.runs} run(s) each, interleaved, after one warm-up round:")
        if len(benches) == 1:
            print_results(benches[0], machine, writable_seconds)
        else:
            print_sweep(benches, machine.accel.name)
        for bench in benches:
            print_memory(bench, args, machine.accel.name)
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
        "--idle-seconds", type=float, default=10.0, help="idle time before reading memory"
    )
    parser.add_argument(
        "--idle-sandboxes", type=int, default=1, help="also read N sandboxes idle together"
    )
    parser.add_argument(
        "--tb-sizes", type=parse_tb_sizes, default=[TbSize(TCG_TB_SIZE_MIB)],
        help="TCG translation-cache sizes to compare, MiB or 'default' (QEMU's): 16,32,default",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.runs < 1 or args.cpus < 1 or args.bare_timeout <= 0 or args.idle_seconds < 0:
        parser.error("--runs and --cpus must be >= 1, --bare-timeout > 0, --idle-seconds >= 0")
    if args.idle_sandboxes < 1:
        parser.error("--idle-sandboxes must be >= 1")
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
