"""Benchmark: the virtio-fs broker against Debian's virtiofsd, same guest workload.

Not a test: it prints timings and ratios measured in the same run, on this machine.

Three sandboxes of the default image boot once each. Two from QEMU command lines that
are identical except the vhost-user socket (checked and printed): one shares a host
folder through our broker (``Mount(host, guest)``), the other through Debian's
``virtiofsd`` served by ``../shared/peers/virtiofsd-peer.sh``
(``Mount.external(socket, guest)``). The third shares it through our broker on the
console transport (``Mount(host, guest, transport="console")``: FUSE over a
virtio-console port, relayed by the guest's agent; the transport memory snapshots
need), unless ``--no-console``. Each share holds its own identical copy of a
generated tree. Then one warm-up round (not counted) and ``--runs`` rounds, the two
servers taking turns going first, run these steps in each guest, each in its own
exec, timed on the guest's clock (bash's ``$EPOCHREALTIME``, which forks nothing),
with the guest's page, dentry and inode caches dropped before each step but delete:

- walk: ``find TREE -printf '%s\\n'``, a stat of each of 3,017 entries;
- read: ``cat`` of the tree's 2,944 small files (2.5 MB) by one ``xargs``;
- write: ``dd`` of 100 MiB in 1 MiB writes with ``conv=fsync``;
- read back: ``dd`` of that file to ``/dev/null``;
- create + delete: ``touch`` of 1,000 new files by one process, then ``rm`` of them
  by one process and ``rmdir`` of their directory.

It prints the median, min and max of each step for every server, the throughput
ratios (virtiofsd's time / ours: 1 or more means the broker is faster; goal 0.5 on
every line and 1.0 on the two large sequential lines for vhost-user, 0.5 on every
line for the console transport), each server's host CPU time
per step, and the accelerator. With ``--profile``, one more round runs on the broker
while ``py-spy`` samples it. See ``bench/README.md`` for every line.

Every VM, server, py-spy and bind mount it starts is ended before it exits, also on
Ctrl-C, SIGTERM and errors, and its temporary directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import samples  # noqa: E402  (bench/samples.py, beside this script)

from vmruntime import AsyncSandbox  # noqa: E402
from vmruntime.images.default_image import DEFAULT_IMAGE, ensure_default_image  # noqa: E402
from vmruntime.vm.accel import Accelerator, choose_accelerator  # noqa: E402
from vmruntime.vm.config import DEFAULT_MEMORY_MIB  # noqa: E402
from vmruntime.vm.qemu import qemu_binary  # noqa: E402

MB = 10**6
# The peer script lives beside the repository (../shared/peers), shared by the team.
PEER_SCRIPT = (
    Path(os.environ.get("VMR_PEERS", REPO_ROOT.parent / "shared/peers")) / "virtiofsd-peer.sh"
)
PEER_ROOT = Path(os.environ.get("PEER_CACHE", Path.home() / ".cache/vmruntime-peers")) / "trixie"
GUEST_MOUNT = "/mnt/share"
GUEST_FILE_LIST = "/tmp/bench-files.txt"  # outside the share, so listing costs no FUSE request
# The tree: 8 top directories of 8 subdirectories of 46 files each, plus the directories:
# 1 + 8 + 64 + 2,944 = 3,017 entries, about the size of a Python package tree (a walk
# of 3,259 entries was the first measurement of virtiofsd on these machines).
TREE_FANOUT = (8, 8)
FILES_PER_DIR = 46
TREE_BYTES = 2_500_000
TREE_SEED = 20240611
CREATE_FILES = 1000  # by one touch process, then one rm (see STEPS for why)
EXEC_TIMEOUT = 900.0
PROFILE_HZ = 100

# The guest side: one exec per step, so the host can read the servers' CPU time around
# each. The clock is read inside the guest (bash's $EPOCHREALTIME forks nothing), so
# an exec's own cost is not timed. Before a step marked ``settle`` another exec
# removes the previous round's files, flushes dirty data and drops the page, dentry
# and inode caches: each step goes to the server instead of measuring the guest's
# caches (whose lifetimes the servers choose differently); the short sleep lets the
# FORGETs the drop sends reach the server first. Each step prints "start end count",
# and the host checks the count.
PRELUDE = "set -euo pipefail; share=$1 list=$2 big_mb=$3 nfiles=$4\n"
SETTLE = "sync; echo 3 >/proc/sys/vm/drop_caches; sleep 0.2"


@dataclass(frozen=True)
class Step:
    name: str
    before: str  # untimed, in the settle exec; "" and settle=False: none
    body: str  # sets a (start), b (end) and n (the count to check)
    settle: bool = True


STEPS = (
    Step("walk", "", """a=$EPOCHREALTIME; n=$(find "$share/tree" -printf '%s\\n' | wc -l)
b=$EPOCHREALTIME"""),
    # One xargs, one cat: the files' cost, not the guest's fork and exec (slow under TCG).
    Step("read", "", """cd "$share"
a=$EPOCHREALTIME; n=$(xargs -d '\\n' -a "$list" cat -- | wc -c); b=$EPOCHREALTIME"""),
    Step("write", 'rm -f "$share/big"', """a=$EPOCHREALTIME
dd if=/dev/zero of="$share/big" bs=1M count="$big_mb" conv=fsync status=none
b=$EPOCHREALTIME; n=$(stat -c %s "$share/big")"""),
    # dd's own count, not a pipe to wc: a pipe would add two guest copies of 100 MB.
    Step("readback", "", """a=$EPOCHREALTIME; r=$(dd if="$share/big" of=/dev/null bs=1M 2>&1)
b=$EPOCHREALTIME; r=${r##*$'\\n'}; n=${r%% *}"""),
    # One touch, one rm: Python would cost about a second to start in a TCG guest, and
    # a shell loop 1,000 forks, either more than the 1,000 creates it should measure.
    # touch and rm fail (and so the step) if any file fails.
    Step("create", 'rm -rf "$share/cd"; mkdir "$share/cd"', """cd "$share/cd"
a=$EPOCHREALTIME; seq -f f%04g "$nfiles" | xargs touch --; b=$EPOCHREALTIME; n=$nfiles"""),
    # Right after create, caches kept: create then delete is the natural sequence.
    Step("delete", "", """cd "$share/cd"
a=$EPOCHREALTIME; seq -f f%04g "$nfiles" | xargs rm --; cd ..; rmdir cd; b=$EPOCHREALTIME
n=0""", settle=False),
)  # fmt: skip


BenchError = samples.BenchError


def fmt(seconds: float) -> str:
    """Seconds as ``2.41 s``, or ``245 ms`` below one second."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --- the share --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    entries: int  # what find lists: the tree's root, directories and files
    files: tuple[str, ...]  # paths relative to the share root, in the order they are read
    bytes: int


def file_sizes(count: int, total: int, seed: int) -> list[int]:
    """``count`` sizes summing to ``total``, log-uniform like a source tree's small files."""
    rng = random.Random(seed)
    raw = [2 ** rng.uniform(6, 12) for _ in range(count)]  # 64 B .. 4 KiB before scaling
    scale = total / sum(raw)
    sizes = [max(1, int(size * scale)) for size in raw]
    sizes[-1] += total - sum(sizes)
    return sizes


def make_tree(share: Path) -> Tree:
    """Write the tree under ``share/tree``; the same bytes for every share (fixed seed)."""
    top, sub = TREE_FANOUT
    rng = random.Random(TREE_SEED)
    sizes = iter(file_sizes(top * sub * FILES_PER_DIR, TREE_BYTES, TREE_SEED))
    files: list[str] = []
    for i in range(top):
        for j in range(sub):
            rel = f"tree/d{i}/d{j}"
            (share / rel).mkdir(parents=True)
            for k in range(FILES_PER_DIR):
                name = f"{rel}/f{k:03d}.txt"
                (share / name).write_bytes(rng.randbytes(next(sizes)))
                files.append(name)
    return Tree(entries=1 + top + top * sub + len(files), files=tuple(files), bytes=TREE_BYTES)


# --- virtiofsd, the peer ----------------------------------------------------------------


class Peer:
    """``virtiofsd-peer.sh SHARE SOCKET``: virtiofsd in a Debian 13 chroot, one VM's server.

    The script bind-mounts the share into its chroot and undoes that on exit (also on
    SIGTERM). It runs in its own session, so Ctrl-C on the benchmark does not reach it
    before ``stop`` does; if it dies without its own cleanup, ``stop`` unmounts and
    removes what it left.
    """

    def __init__(self, share: Path, socket: Path, log: Path, options: list[str]) -> None:
        self.share, self.socket, self.log = share, socket, log
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None  # the script's peer.XXXXXX inside the chroot

    def start(self, timeout: float) -> None:
        if not (PEER_ROOT / "usr/libexec/virtiofsd").exists():
            print(f"peer: building the Debian 13 chroot in {PEER_ROOT} (about 2 minutes) ...")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["bash", str(PEER_SCRIPT), str(self.share), str(self.socket), *self.options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        # The script links SOCKET to virtiofsd's socket once it listens: QEMU connects
        # once, at start, so the VM may boot only after that.
        while not self.socket.is_socket():
            if self.socket.is_symlink() and self.workdir is None:
                self.workdir = Path(os.readlink(self.socket)).parent
            if self.process.poll() is not None:
                raise BenchError(f"virtiofsd-peer.sh exited early: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"no virtiofsd socket after {timeout:g} s: {self.log_tail()}")
            time.sleep(0.05)
        self.workdir = Path(os.readlink(self.socket)).parent

    def virtiofsd_pid(self) -> int:
        """virtiofsd itself: the process named so in the script's process group."""
        assert self.process is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                comm, rest = (entry / "stat").read_text().rsplit(")", 1)
                if comm.endswith("(virtiofsd") and int(rest.split()[2]) == self.process.pid:
                    return int(entry.name)
        raise BenchError(f"virtiofsd is not running: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """End the script (and virtiofsd); it exits by itself once its VM is gone."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)  # virtiofsd exits when QEMU disconnects
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # bash runs its EXIT trap
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process is not None:
            # virtiofsd is in the script's group; make sure nothing of it outlives us.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        if self.workdir is not None and self.workdir.parent == PEER_ROOT / "tmp":
            mounted = self.workdir / "share"
            if str(mounted) in _mount_points():
                subprocess.run(["umount", str(mounted)], check=False)
            if str(mounted) not in _mount_points():
                shutil.rmtree(self.workdir, ignore_errors=True)
            # The chroot's /proc is the script's too; leave it only if another peer runs.
            proc = str(PEER_ROOT / "proc")
            others = [p for p in (PEER_ROOT / "tmp").glob("peer.*") if p != self.workdir]
            if proc in _mount_points() and not others:
                subprocess.run(["umount", proc], check=False)
        if self.socket.is_symlink():
            self.socket.unlink()


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as info:
        return {line.split()[4] for line in info}


def virtiofsd_version() -> str:
    cmd = ["chroot", str(PEER_ROOT), "/usr/libexec/virtiofsd", "--version"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return result.stdout.strip() or "virtiofsd (version unknown)"


# --- the two sandboxes ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Side:
    """One server, its share and its sandbox, and what each step cost per counted round."""

    name: str
    share: Path
    sandbox: AsyncSandbox | None = None
    server_pid: int = 0  # virtiofsd, or our broker process
    seconds: dict[str, list[float]] = field(default_factory=dict)  # guest clock
    server_cpu: dict[str, list[float]] = field(default_factory=dict)
    qemu_cpu: dict[str, list[float]] = field(default_factory=dict)
    exec_seconds: dict[str, list[float]] = field(default_factory=dict)  # host clock
    idle_qemu_cpu: list[float] = field(default_factory=list)  # while the other side ran

    def running(self) -> AsyncSandbox:
        assert self.sandbox is not None
        return self.sandbox


async def boot(side: Side, mount: object, args: argparse.Namespace, tree: Tree) -> None:
    side.sandbox = await AsyncSandbox.create(
        DEFAULT_IMAGE, cpus=args.cpus, memory_mib=args.memory_mib, mounts=[mount]
    )
    await side.sandbox.fs.write(GUEST_FILE_LIST, "".join(f"{f}\n" for f in tree.files).encode())


def qemu_cmdline(sandbox: AsyncSandbox) -> list[str]:
    """QEMU's argv, the sandbox's id replaced, so two sandboxes' lines can be compared."""
    raw = Path(f"/proc/{sandbox.vmm_pid}/cmdline").read_bytes()
    return [arg.replace(sandbox.id, "<id>") for arg in raw.decode().split("\0") if arg]


def compare_cmdlines(ours: AsyncSandbox, peer: AsyncSandbox) -> str:
    a, b = qemu_cmdline(ours), qemu_cmdline(peer)
    if len(a) != len(b):
        return f"DIFFERENT lengths ({len(a)} vs {len(b)} args):\n  broker: {a}\n  peer: {b}"
    differ = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    if not differ:
        return "identical"
    sockets = all(x.startswith("socket,id=fs") and y.startswith("socket,id=fs") for x, y in differ)
    detail = "; ".join(f"broker {x!r} vs virtiofsd {y!r}" for x, y in differ)
    return ("identical except the vhost-user socket: " if sockets else "DIFFERENT: ") + detail


# --- one round --------------------------------------------------------------------------


async def guest_exec(side: Side, script: str, args: argparse.Namespace) -> str:
    argv = ["bash", "-c", PRELUDE + script, "bench", GUEST_MOUNT, GUEST_FILE_LIST]
    argv += [str(args.big_mb), str(CREATE_FILES)]
    result = await side.running().exec(argv, timeout=EXEC_TIMEOUT)
    out = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        err = result.stderr.decode(errors="replace")[-1500:]
        raise BenchError(f"{side.name}: {script!r} exited {result.returncode}: {out}{err}")
    return out


@dataclass(frozen=True)
class StepResult:
    seconds: float  # guest clock
    server_cpu: float
    qemu_cpu: float
    exec_seconds: float  # the whole exec, host clock


async def run_step(side: Side, step: Step, args: argparse.Namespace, tree: Tree) -> StepResult:
    """One step (settled first), its count checked."""
    if step.settle:
        await guest_exec(side, f"{step.before}\n{SETTLE}", args)
    server, qemu = cpu_seconds(side.server_pid), cpu_seconds(side.running().vmm_pid)
    started = time.perf_counter()
    out = await guest_exec(side, f'{step.body}\necho "$a $b $n"', args)
    exec_seconds = time.perf_counter() - started
    server = cpu_seconds(side.server_pid) - server
    qemu = cpu_seconds(side.running().vmm_pid) - qemu
    expected = {
        "walk": tree.entries,
        "read": tree.bytes,
        "write": args.big_mb << 20,
        "readback": args.big_mb << 20,
        "create": CREATE_FILES,
        "delete": 0,
    }[step.name]
    try:
        start, end, count = out.split()
        seconds = float(end) - float(start)
    except ValueError:
        raise BenchError(f"{side.name}: {step.name} printed {out!r}") from None
    if int(count) != expected:
        raise BenchError(f"{side.name}: {step.name} counted {count}, expected {expected}")
    return StepResult(seconds, server, qemu, exec_seconds)


async def run_round(side: Side, args: argparse.Namespace, tree: Tree, count: bool) -> str:
    """Every step once; the results are kept if ``count``. Returns a one-line summary."""
    cells = []
    for step in STEPS:
        result = await run_step(side, step, args, tree)
        cells.append(f"{step.name} {fmt(result.seconds)}")
        if count:
            side.seconds.setdefault(step.name, []).append(result.seconds)
            side.server_cpu.setdefault(step.name, []).append(result.server_cpu)
            side.qemu_cpu.setdefault(step.name, []).append(result.qemu_cpu)
            side.exec_seconds.setdefault(step.name, []).append(result.exec_seconds)
    return f"{side.name}: " + " ".join(cells)


async def run_rounds(args: argparse.Namespace, sides: tuple[Side, ...], tree: Tree) -> None:
    """One warm-up round, then ``args.runs`` rounds; who goes first rotates."""
    for round_ in range(args.runs + 1):
        label = "warm-up round (not counted)" if round_ == 0 else f"round {round_}/{args.runs}"
        shift = round_ % len(sides)
        order = sides[shift:] + sides[:shift]
        cells = []
        idle_cpu = {side.name: 0.0 for side in sides}
        for active in order:
            # The idle VMs share the host's 2 cores with the measured one: keep their cost
            # in view.
            idle = [side for side in sides if side is not active]
            before = [cpu_seconds(side.running().vmm_pid) for side in idle]
            cells.append(await run_round(active, args, tree, count=round_ > 0))
            for side, cpu in zip(idle, before, strict=True):
                idle_cpu[side.name] += cpu_seconds(side.running().vmm_pid) - cpu
        if round_ > 0:
            for side in sides:
                side.idle_qemu_cpu.append(idle_cpu[side.name])
        print(f"{label}:\n  " + "\n  ".join(cells), flush=True)


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    label: str
    steps: tuple[str, ...]  # summed per run
    amount: float  # per run, in ``unit``
    unit: str
    goal: float | None


def result_lines(args: argparse.Namespace, tree: Tree) -> tuple[Line, ...]:
    big = args.big_mb * (1 << 20) / MB
    return (
        Line(f"walk {tree.entries:,} entries (find, stat each)", ("walk",), tree.entries,
             "entries", 0.5),
        Line(f"read {len(tree.files):,} small files ({tree.bytes / MB:.1f} MB)", ("read",),
             tree.bytes / MB, "MB", 0.5),
        Line(f"write {args.big_mb} MiB sequentially + fsync", ("write",), big, "MB", 1.0),
        Line(f"read the {args.big_mb} MiB back", ("readback",), big, "MB", 1.0),
        Line(f"create + delete {CREATE_FILES:,} files", ("create", "delete"), CREATE_FILES,
             "files", 0.5),
        Line("  of which create (touch)", ("create",), CREATE_FILES, "files", None),
        Line("  of which delete (rm, rmdir)", ("delete",), CREATE_FILES, "files", None),
    )  # fmt: skip


def per_run(table: dict[str, list[float]], line: Line) -> list[float]:
    """The line's value in each counted round: the sum of its steps."""
    return [sum(parts) for parts in zip(*(table[step] for step in line.steps), strict=True)]


def median(values: list[float]) -> float:
    return samples.Samples("", values).median


def cell(values: list[float], amount: float, unit: str) -> str:
    """``849 ms (812..901) 3,555 entries/s``: median (min..max), throughput of the median."""
    mid = median(values)
    scale, digits, suffix = (1000, 0, "ms") if mid < 1 else (1, 2, "s")
    low, high = (f"{value * scale:.{digits}f}" for value in (min(values), max(values)))
    rate = amount / mid
    rate_text = f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"
    return f"{mid * scale:.{digits}f} {suffix} ({low}..{high}) {rate_text} {unit}/s"


def print_results(args: argparse.Namespace, tree: Tree, mine: tuple[Side, ...],
                  peer: Side) -> list[str]:  # fmt: skip
    """The tables; returns the labels of the lines whose goal was missed."""
    print(
        f"results: median (min..max) of {args.runs} run(s), guest clock; ratio = "
        f"virtiofsd's time / ours (throughput ratio, >= 1: ours is faster)"
    )
    head = "".join(f" {side.name:<38}" for side in (peer, *mine))
    print(f"  {'step':<38}{head} " + " ".join(f"{'ratio ' + s.name:>14}" for s in mine))
    missed: list[str] = []
    lines = result_lines(args, tree)
    for line in lines:
        theirs = per_run(peer.seconds, line)
        cells, ratios = [cell(theirs, line.amount, line.unit)], []
        for side in mine:
            values = per_run(side.seconds, line)
            cells.append(cell(values, line.amount, line.unit))
            ratio = median(theirs) / median(values)
            goal = line.goal if side.name == "broker" else (0.5 if line.goal else None)
            mark = ""
            if goal is not None:
                met = ratio >= goal
                mark = f" (>={goal:.1f} {'met' if met else 'MISSED'})"
                if not met:
                    missed.append(f"{side.name}: {line.label.strip()}")
            ratios.append(f"{ratio:>5.2f}{mark}")
        row = "".join(f" {text:<38}" for text in cells)
        print(f"  {line.label:<38}{row}  " + "  ".join(ratios))
    print(
        "host CPU seconds per step, medians: the server process (all threads), and QEMU "
        "(the emulated guest and its device loop)"
    )
    sides = (peer, *mine)
    print(f"  {'step':<38}" + "".join(f" {s.name:>10} {'QEMU':>6}" for s in sides))
    for line in lines:
        server = [median(per_run(s.server_cpu, line)) for s in sides]
        qemu = [median(per_run(s.qemu_cpu, line)) for s in sides]
        row = "".join(f" {a:>10.2f} {b:>6.2f}" for a, b in zip(server, qemu, strict=True))
        print(f"  {line.label:<38}{row}")
    for side in sides:
        guest = sum(median(values) for values in side.seconds.values())
        host = sum(median(values) for values in side.exec_seconds.values())
        print(
            f"{side.name}'s round: steps {fmt(guest)} on the guest clock, their execs "
            f"{fmt(host)} on the host clock (the rest: exec round trips); its QEMU used "
            f"{median(side.idle_qemu_cpu):.2f} s CPU while idle in a round"
        )
    return missed


def print_environment(accel: Accelerator, args: argparse.Namespace, tree: Tree) -> None:
    qemu = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True)
    version = qemu.stdout.split("\n", 1)[0].removeprefix("QEMU emulator version ")
    print(
        f"environment: cpus={len(os.sched_getaffinity(0))} python={platform.python_version()} "
        f"qemu={version} host kernel={platform.release()} peer={virtiofsd_version()} "
        f"peer options: {args.peer_options or '(none)'}"
    )
    print(f"accelerator: {accel.name} ({accel.reason})")
    print(
        f"machine: {args.cpus} vCPU, {args.memory_mib} MiB, image {DEFAULT_IMAGE}; share: "
        f"{tree.entries:,} entries ({len(tree.files):,} files, {tree.bytes / MB:.2f} MB), "
        f"a {args.big_mb} MiB file, {CREATE_FILES:,} files to create; under {args.tmp_dir}"
    )


# --- profiling the broker ---------------------------------------------------------------


def broker_pid(sandbox: AsyncSandbox) -> int:
    """The broker process serving ``sandbox``'s one share."""
    pids = broker_pids()
    if len(pids) == 1:
        return pids[0]
    # Not our descendant (or several): ask the sandbox, whose mounts know their brokers.
    known = [pid for pid, _ in sandbox._mounts.broker_processes] if sandbox._mounts else []
    if len(known) != 1 or not isinstance(known[0], int):
        raise BenchError(f"cannot tell the broker's process: descendants {pids}, sandbox {known}")
    return known[0]


def broker_pids() -> list[int]:
    """This process's descendants whose command line names the broker."""
    found: list[int] = []
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"vmruntime.broker" in cmdline and pid != os.getpid():
                found.append(pid)
    return found


@contextlib.contextmanager
def py_spy(pid: int, out: Path) -> Iterator[subprocess.Popen[bytes] | None]:
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        print("profile: py-spy not found (.venv/bin/pip install py-spy); skipped")
        yield None
        return
    # --nonblocking: pausing the broker for each sample (the default, and --native)
    # lands most samples in the syscall it interrupted and slows every request.
    cmd = [spy, "record", "--pid", str(pid), "--rate", str(PROFILE_HZ), "--format", "raw"]
    cmd += ["--nonblocking", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # let py-spy attach
        yield proc if proc.poll() is None else None
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


# A sample goes to the category of its innermost frame that matches, checked in this
# order. Waiting is the event loop's epoll with nothing to do. The eventfd write that
# interrupts the guest wakes QEMU, which often preempts the broker on the spot: py-spy
# then sees the broker in that write although it is not on a CPU (perf on the broker
# showed about 4% of its CPU time in eventfd_write), so it gets its own category.
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("in epoll: waiting for a kick, or woken and waiting for a CPU", ("select (selectors.py",)),
    ("interrupting the guest (eventfd write, mostly preempted)", ("_signal (",)),
    ("filesystem operations (passthrough, containment, identity, inodes)",
     ("passthrough.py", "containment.py", "identity.py", "inodes.py", "readonly.py")),
    ("FUSE decoding and replies (handler, abi)", ("handler.py", "abi.py")),
    ("descriptor chains and guest memory (virtqueue)", ("virtqueue.py",)),
    ("event loop and dispatch (vhost_user, selectors)", ("vhost_user.py", "selectors.py")),
)  # fmt: skip
_WAITING, _NOTIFY = _CATEGORIES[0][0], _CATEGORIES[1][0]


def _classify(frames: list[str]) -> str:
    for frame in reversed(frames):
        for category, needles in _CATEGORIES:
            if any(needle in frame for needle in needles):
                return category
    return "other"


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds on a CPU and seconds runnable but waiting for one, summed over all threads."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "schedstat").read_text().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
    return run / 1e9, wait / 1e9


def print_profile(out: Path, seconds: float, cpu: float, top: int) -> None:
    """Where the broker's samples went: categories, then the busiest lines."""
    categories: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    for line in out.read_text(errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = [f for f in stack_text.split(";") if f and not f.startswith("thread (")]
        category = _classify(frames)
        categories[category] += int(count_text)
        if category not in (_WAITING, _NOTIFY) and frames:
            lines[frames[-1]] += int(count_text)
    total = sum(categories.values())
    work = total - categories[_WAITING] - categories[_NOTIFY]
    print(
        f"profile: one more broker round under py-spy ({PROFILE_HZ} Hz, --nonblocking) took "
        f"{fmt(seconds)}; the broker used {cpu:.2f} s CPU; py-spy saw {total / PROFILE_HZ:.2f} s "
        f"of samples, {work / PROFILE_HZ:.2f} s of them working:"
    )
    for category, count in categories.most_common():
        share = f"{100 * count / work:5.1f}% of work" if category not in (_WAITING, _NOTIFY) else ""
        print(f"  {category:<68} {count / PROFILE_HZ:6.2f} s  {share}")
    print(f"  busiest lines while working (top {top}):")
    for frame, count in lines.most_common(top):
        print(f"    {count / PROFILE_HZ:6.2f} s {100 * count / max(work, 1):5.1f}%  {frame}")


async def profile_round(args: argparse.Namespace, ours: Side, tree: Tree) -> None:
    out = args.tmp_dir / "broker.pyspy.txt"
    with py_spy(ours.server_pid, out) as proc:
        if proc is None:
            return
        cpu, (run, wait) = cpu_seconds(ours.server_pid), schedstat(ours.server_pid)
        started = time.perf_counter()
        summary = await run_round(ours, args, tree, count=False)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(ours.server_pid) - cpu
        run_after, wait_after = schedstat(ours.server_pid)
    print(f"profile round, {summary}")
    print(
        f"  the broker's scheduling meanwhile: {run_after - run:.2f} s on a CPU, "
        f"{wait_after - wait:.2f} s runnable but waiting for one (py-spy counts both as busy)"
    )
    if out.exists():
        print_profile(out, seconds, cpu, args.profile_top)
        if args.keep_profile is not None:
            shutil.copy(out, args.keep_profile)
            print(f"  raw stacks copied to {args.keep_profile}")


# --- main -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(side: Side, mount: object, args: argparse.Namespace,
                  tree: Tree) -> AsyncIterator[Side]:  # fmt: skip
    try:
        await boot(side, mount, args, tree)
        yield side
    finally:
        if side.sandbox is not None:
            await side.sandbox.stop()


async def bench_main(args: argparse.Namespace) -> int:
    from vmruntime.vm.mounts import Mount  # lands with the broker's sandbox wiring

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    ensure_default_image(log=lambda line: print(f"image: {line}"))
    base = Path(tempfile.mkdtemp(prefix="vmr-bench-broker-", dir=args.tmp_dir))
    args.tmp_dir = base
    peer_server: Peer | None = None
    try:
        built = time.perf_counter()
        ours = Side("broker", base / "broker")
        console = Side("console", base / "console")
        peer = Side("virtiofsd", base / "virtiofsd")
        tree = make_tree(ours.share)
        make_tree(peer.share)
        if args.console:
            make_tree(console.share)
        os.sync()  # the tree's write-back is not part of any step
        print(f"share: copies of the tree written in {fmt(time.perf_counter() - built)}")
        print_environment(choose_accelerator(), args, tree)
        peer_server = Peer(
            peer.share, base / "virtiofsd.sock", base / "virtiofsd-peer.log",
            args.peer_options.split(),
        )  # fmt: skip
        peer_server.start(args.peer_timeout)
        external = Mount.external(peer_server.socket, GUEST_MOUNT, readonly=False)
        mine = (ours, console) if args.console else (ours,)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(started(peer, external, args, tree))
            await stack.enter_async_context(
                started(ours, Mount(ours.share, GUEST_MOUNT, readonly=False), args, tree)
            )
            if args.console:
                over_console = Mount(console.share, GUEST_MOUNT, transport="console")
                await stack.enter_async_context(started(console, over_console, args, tree))
            peer.server_pid = peer_server.virtiofsd_pid()
            for side in mine:
                side.server_pid = broker_pid(side.running())
            print(f"QEMU command lines: {compare_cmdlines(ours.running(), peer.running())}")
            print(
                "timing: guest clock ($EPOCHREALTIME in bash, one exec per step); the guest's "
                "caches dropped before each step but delete; both VMs stay up, the idle one waits"
            )
            await run_rounds(args, (*mine, peer), tree)
            missed = print_results(args, tree, mine, peer)
            if args.profile:
                await profile_round(args, ours, tree)
        verdict = "all goals met" if not missed else "goals missed: " + ", ".join(missed)
        accel = choose_accelerator().name
        print(f"summary: {accel}, {args.runs} run(s), {args.cpus} vCPU; {verdict}")
    finally:
        if peer_server is not None:
            peer_server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="counted rounds (median)")
    parser.add_argument("--cpus", type=int, default=1, help="vCPUs per VM (Sandbox's default)")
    parser.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB, help="guest RAM")
    parser.add_argument("--big-mb", type=int, default=100, help="the sequential file, MiB")
    parser.add_argument(
        "--tmp-dir", type=Path, default=Path(tempfile.gettempdir()),
        help="where the shares go (a disk, not tmpfs: fsync should cost what it costs)",
    )  # fmt: skip
    parser.add_argument(
        "--peer-timeout", type=float, default=600.0,
        help="wait this long for virtiofsd's socket (the first run builds its chroot)",
    )  # fmt: skip
    parser.add_argument(
        "--peer-options", default="--xattr",
        help="extra virtiofsd options. The default --xattr gives it the broker's feature set: "
        "a server with extended attributes is asked for security.capability before every "
        "guest write(2), one more round trip that virtiofsd without them is spared",
    )  # fmt: skip
    parser.add_argument(
        "--no-console", dest="console", action="store_false",
        help="leave out the third sandbox, the broker on the console transport",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="py-spy one more broker round")
    parser.add_argument("--profile-top", type=int, default=15, help="frames to list")
    parser.add_argument(
        "--keep-profile", type=Path, metavar="FILE", help="copy the raw py-spy stacks here"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.cpus < 1 or args.big_mb < 1:
        parser.error("--runs, --cpus and --big-mb must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return samples.run(lambda: bench_main(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have ended every VM and server
        print("interrupted", file=sys.stderr)
        sys.exit(130)
