"""Benchmark: warm starts (memory snapshots and warm pools) against cold ones and peers.

Not a test: it prints timings, host memory and ratios measured in the same run, on this
machine. Three parts (``--parts``, default ``jupyter,memory,ray``):

``jupyter``: from ``start_kernel`` to the first ``execute_reply`` of ``1+1`` (channels
started and the execute sent at once, without ``wait_for_ready``), through jupyter_client's
real ``AsyncKernelManager``, for four kernelspecs written to a temporary ``JUPYTER_PATH``:
- ``pool``: ``microvm-provisioner`` with ``pool_size`` 1, a kernel claimed from a warm
  pool that had a ready member (waited for, then ``--settle`` seconds of quiet);
- ``snapshot``: ``pool_size`` 0, a kernel resumed on demand from the memory-snapshot
  template;
- ``cold``: ``warm`` False, a boot and ipykernel's imports;
- ``local``: the same ipykernel on the host through ``LocalProvisioner``.
With ``--mount HOST:GUEST[:ro]`` (repeatable) the sandboxed kernelspecs share those host
folders, as the quick start's does ``docs/`` (warm kernels carry them over the console
transport).
The template is made (timed) before the first round; one warm-up round, then ``--runs``
rounds, the order rotating; medians, ratios against ``local`` and the issue's two goals.

``memory``: host memory (PSS of QEMU and its helpers, guest RAM included) of
``--clones`` sandboxes resumed from one memory snapshot against as many cold-booted
sandboxes of the same image and size, and of one cold sandbox alone; the goal "10 clones
<= 3 x the memory of one".

``ray``: Ray's own gVisor sandbox (``tests/ray_peer.py``, the helpers of
``bench/ray_actor.py``) on the same image: its create to first exec, and its host memory
per idle sandbox with ``--clones`` of them idle; against it, ``SandboxActor`` s from a
``WarmActorPool`` (claim to first exec, claim to first ``run``), resumed from the node's
memory-snapshot template (``ray_backend.create`` to first exec, ``.remote()`` to first
``run``) and booted (``warm=False``), a plain Ray actor's start for context, and the host
memory of ``--clones`` idle pool members; the issue's four Ray goals.

Everything runs in a temporary state directory (``VMRUNTIME_STATE``: sandboxes, the
snapshots), removed at the end. Every kernel, sandbox, pool member and Ray actor is ended
before it exits, also on Ctrl-C, SIGTERM and errors; a child process still alive at the
end is reported and killed. See ``bench/README.md`` for every line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

import hostmem  # noqa: E402  (bench/hostmem.py, beside this script)
import kernel_start  # noqa: E402  (bench/kernel_start.py: kernelspecs, checks, memory)
import samples  # noqa: E402  (bench/samples.py, beside this script)
from jupyter_client import AsyncKernelManager  # noqa: E402
from jupyter_client import __version__ as jupyter_client_version  # noqa: E402
from ray_peer import environment  # noqa: E402  (tests/ray_peer.py: imports no Ray)

from kernelprovider import provisioner  # noqa: E402
from kernelprovider.pool import WarmKernelSpec, ensure_template, warm_spec  # noqa: E402
from kernelprovider.provisioner import MicroVMProvisioner  # noqa: E402
from vmruntime import ImageStore  # noqa: E402
from vmruntime.errors import MountError  # noqa: E402
from vmruntime.guest.assets import ensure_guest_assets  # noqa: E402
from vmruntime.images.default_image import DEFAULT_IMAGE, ensure_default_image  # noqa: E402
from vmruntime.pools import WarmPool  # noqa: E402
from vmruntime.snapshots import AsyncSandbox, SnapshotStore  # noqa: E402
from vmruntime.vm import Mount, state, sync  # noqa: E402
from vmruntime.vm.accel import choose_accelerator  # noqa: E402

PARTS = ("jupyter", "memory", "ray")
LOCAL, POOL, SNAPSHOT, COLD = "local", "pool", "snapshot", "cold"
KERNELS = (POOL, SNAPSHOT, COLD, LOCAL)
# The provisioner's configuration of each sandboxed kernelspec (the rest is
# bench/kernel_start.py's microVM kernelspec).
PROVISIONER_CONFIG = {POOL: {"pool_size": 1}, SNAPSHOT: {"pool_size": 0}, COLD: {"warm": False}}
SPEC_PREFIX = "vmr-warm-"
FIRST_CODE = "1+1"
POOL_GOAL, RESTORE_GOAL = 0.5, 1.0  # x LocalProvisioner's start
CLONES_GOAL = 3.0  # 10 clones <= 3 x the memory of one
# The Ray side's goals (issue 17): from a memory snapshot <= 0.1 x cold; against gVisor's
# create, a pool member's first exec <= 0.5 x, a restore's <= 1.0 x; idle memory <= 2 x.
RAY_SNAPSHOT_GOAL, RAY_POOL_GOAL, RAY_RESTORE_GOAL, RAY_MEMORY_GOAL = 0.1, 0.5, 1.0, 2.0
MEMORY_SNAPSHOT = "vmr-bench-warm-memory"

BenchError = samples.BenchError
Samples = samples.Samples
fmt = samples.seconds_text
mib = samples.mib


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


# --- part "jupyter" ---------------------------------------------------------------------


@dataclass
class KernelSide:
    """One kind of kernel: its starts, and what its sandbox recorded."""

    name: str
    start: Samples
    launched: Samples  # start_kernel alone (the provisioner's launch), of the start
    accelerator: str = ""
    machine: str = ""


def new_kernel_side(name: str) -> KernelSide:
    return KernelSide(
        name,
        Samples(f"start_kernel to first execute_reply [{name}]"),
        Samples(f"  of which start_kernel [{name}]"),
    )


def kernelspecs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    specs = {LOCAL: kernel_start.local_spec(args)}
    for name, config in PROVISIONER_CONFIG.items():
        spec = kernel_start.microvm_spec(args)
        spec["metadata"]["kernel_provisioner"]["config"].update(config, mounts=args.mount)
        specs[name] = spec
    return specs


@contextlib.contextmanager
def jupyter_paths(args: argparse.Namespace, root: Path) -> Iterator[None]:
    """The kernelspecs under ``root/kernels``, first on ``JUPYTER_PATH``; connection files
    in ``root/runtime``; both variables put back afterwards."""
    for name, spec in kernelspecs(args).items():
        spec_dir = root / "kernels" / (SPEC_PREFIX + name)
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    with environment({
        "JUPYTER_PATH": os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")])),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
    }):
        yield


def warm_kernel_spec(args: argparse.Namespace) -> WarmKernelSpec:
    """The warm spec the provisioner derives from the sandboxed kernelspecs (its defaults
    where the options leave them), so the pool opened here is the one it claims from."""
    traits = MicroVMProvisioner.class_traits()
    spec = warm_spec(
        kernel_start.microvm_spec(args)["argv"],
        args.image,
        args.cpus or traits["cpus"].default(),
        args.memory_mib or traits["memory"].default(),
        traits["warm_imports"].default(),
        [Mount.parse(spec) for spec in args.mount],
    )
    if spec is None:
        raise BenchError("the sandboxed kernelspec cannot have a warm kernel")
    return spec


async def on_runtime_loop(coro: Any) -> Any:
    """Pools and their members live on vmruntime's runtime loop (as the provisioner's)."""
    return await asyncio.wrap_future(sync.submit(coro))


async def open_pool(spec: WarmKernelSpec, size: int) -> WarmPool:
    """The provisioner's pool of ``spec`` (private: a benchmark prepares it ahead)."""

    async def opened() -> WarmPool:
        return provisioner._warm_pools().pool(spec, size)

    pool: WarmPool = await on_runtime_loop(opened())
    return pool


async def close_pools() -> None:
    """End the process's pool members not handed out, so that no member of size 1 serves
    the ``pool_size`` 0 kernel, and no refill competes with the next start."""
    await asyncio.to_thread(MicroVMProvisioner.close_pools)


async def wait_until_ready(pool: WarmPool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pool.ready < 1:
        if time.monotonic() > deadline:
            raise BenchError(f"pool {pool.name}: no ready member in {timeout:g} s: {pool.failures}")
        await asyncio.sleep(0.1)


async def prepare(args: argparse.Namespace, spec: WarmKernelSpec, name: str) -> WarmPool | None:
    """The pool the kernel ``name`` will claim from (ready for ``pool``, empty for
    ``snapshot``), the other pools closed; then a quiet moment."""
    await close_pools()
    pool = None
    if name in (POOL, SNAPSHOT):
        pool = await open_pool(spec, 1 if name == POOL else 0)
        if name == POOL:
            await wait_until_ready(pool, args.startup_timeout)
    await asyncio.sleep(args.settle)
    return pool


@dataclass
class StartRun:
    seconds: float  # start_kernel to the first execute_reply
    launched: float  # start_kernel alone
    record: state.SandboxRecord | None


async def run_kernel(args: argparse.Namespace, spec: WarmKernelSpec, name: str, guest: str,
                     log_dir: Path) -> StartRun:  # fmt: skip
    """One start of kernel ``name``, checked, then shut down (no process of it left)."""
    pool = await prepare(args, spec, name)
    km = AsyncKernelManager(kernel_name=SPEC_PREFIX + name)
    with kernel_start.kernel_output(name, log_dir) as output:
        try:
            run = await timed_start(args, km, name, guest, output)
            check_origin(name, run.record, pool)
            pids = kernel_start.kernel_pids(km, run.record, set())
            await close_pools()  # before the claimed member's replacement is made
            await km.shutdown_kernel()
        finally:
            if km.has_kernel:  # an error or Ctrl-C: end it without measuring
                await km.shutdown_kernel(now=True)
    if left := [pid for pid in pids if kernel_start.still_running(pid)]:
        raise BenchError(f"{name}: processes left after shutdown_kernel: {left}")
    return run


async def timed_start(args: argparse.Namespace, km: AsyncKernelManager, name: str, guest: str,
                      output: dict[str, Any]) -> StartRun:  # fmt: skip
    began = time.perf_counter()
    await km.start_kernel(**output)
    launched = time.perf_counter()
    client = km.client()
    client.start_channels()
    try:
        reply = await client.execute(FIRST_CODE, reply=True, timeout=args.startup_timeout)
        replied = time.perf_counter()
        content = reply["content"]
        if content["status"] != "ok" or content.get("execution_count") != 1:
            raise BenchError(f"{name}: the first execute answered {content}")
        where = await kernel_start.execute(client, args.reply_timeout, "pass",
                                           kernel_start.WHERE_EXPRESSIONS)  # fmt: skip
    finally:
        client.stop_channels()
    kernel_start.check_where(LOCAL if name == LOCAL else kernel_start.MICROVM, km, where, guest)
    record = None if name == LOCAL else await kernel_start.sandbox_record(km)
    return StartRun(replied - began, launched - began, record)


def check_origin(name: str, record: state.SandboxRecord | None, pool: WarmPool | None) -> None:
    """The kernel came from where its name says: a ready pool member (no miss), a resume
    on demand (a miss), or a boot (a layer of no snapshot)."""
    if record is None:
        return
    resumed = bool(record.layer_origin)
    expected = {POOL: (1, 0), SNAPSHOT: (1, 1)}.get(name)
    counts = (pool.claims, pool.misses) if pool is not None else None
    if resumed != (name != COLD) or counts != expected:
        raise BenchError(
            f"{name}: sandbox {record.id} resumed={resumed}, pool (claims, misses)={counts}; "
            f"expected resumed={name != COLD}, {expected}"
        )


async def jupyter_part(args: argparse.Namespace, work: Path) -> dict[str, KernelSide]:
    print("part jupyter: start_kernel to the first execute_reply", flush=True)
    guest = ensure_guest_assets(ImageStore().root).release
    spec = warm_kernel_spec(args)
    sides = {name: new_kernel_side(name) for name in KERNELS}
    try:
        began = time.perf_counter()
        template = await on_runtime_loop(ensure_template(spec))
        print(f"  template {template.name}: ready in {fmt(time.perf_counter() - began)} "
              f"(made once per state directory; {spec.cpus} vCPU, {spec.memory_mib} MiB, "
              f"warm imports {', '.join(spec.warm_imports) or 'none'})", flush=True)  # fmt: skip
        with jupyter_paths(args, work / "jupyter"):
            await jupyter_rounds(args, spec, sides, guest, work)
    finally:
        await close_pools()
    return sides


async def jupyter_rounds(
    args: argparse.Namespace,
    spec: WarmKernelSpec,
    sides: dict[str, KernelSide],
    guest: str,
    log_dir: Path,
) -> None:
    for round_ in range(args.runs + 1):
        label = "warm-up round (not counted)" if round_ == 0 else f"round {round_}/{args.runs}"
        shift = round_ % len(KERNELS)
        cells = []
        for name in KERNELS[shift:] + KERNELS[:shift]:
            run = await run_kernel(args, spec, name, guest, log_dir)
            cells.append(f"{name} {fmt(run.seconds)}")
            if round_ > 0:
                side = sides[name]
                side.start.seconds.append(run.seconds)
                side.launched.seconds.append(run.launched)
                if run.record is not None:
                    side.accelerator = run.record.accelerator
                    side.machine = f"{run.record.cpus} vCPU, {run.record.memory_mib} MiB"
        print(f"  {label}: {', '.join(cells)} (load {load()})", flush=True)


def jupyter_report(args: argparse.Namespace, sides: dict[str, KernelSide]) -> list[str]:
    """Print the part's results; its ratio cells for the summary."""
    print(f"results [jupyter], {args.runs} run(s) of each, interleaved, after a warm-up round:")
    for side in sides.values():
        print("  " + side.start.line())
        print("  " + side.launched.line())
    machine = sides[POOL].machine or "?"
    print(f"  sandboxed kernels: {machine}; local: {args.local_python} -m ipykernel_launcher")
    local = sides[LOCAL].start.median
    cells = []
    for name in (POOL, SNAPSHOT, COLD):
        value = sides[name].start.median / local
        print(f"ratio start to first execute_reply, {name}/local: {value:.2f}")
        cells.append(f"{name}/local x{value:.2f}")
    for name, goal, what in ((POOL, POOL_GOAL, "a pool kernel"),
                             (SNAPSHOT, RESTORE_GOAL, "a memory-snapshot kernel")):  # fmt: skip
        value = sides[name].start.median / local
        print(f"Goal: {what} to its first execute_reply <= {goal:.1f} x LocalProvisioner: "
              f"{verdict(value, goal)} (x{value:.2f})")  # fmt: skip
    return cells


def ratio_text(value: float) -> str:
    """Two decimals, three below 0.1 (a pool's start is a few hundredths of another's)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "MISSED"


# --- part "memory" ----------------------------------------------------------------------


@dataclass
class Fleet:
    """Sandboxes of one kind, idle together, and what they cost."""

    label: str
    sandboxes: list[AsyncSandbox] = field(default_factory=list)
    ready: Samples = field(default_factory=lambda: Samples("create to first exec"))
    memory: kernel_start.KernelMemory | None = None


async def add_sandbox(fleet: Fleet, make: Callable[[], Any]) -> None:
    """One more sandbox of ``fleet`` (a creation that fails or is cancelled ends what it
    made), kept in it before its first ``exec`` is answered."""
    began = time.perf_counter()
    sandbox = await make()
    fleet.sandboxes.append(sandbox)
    await sandbox.exec(["true"], check=True, timeout=60)
    fleet.ready.seconds.append(time.perf_counter() - began)


async def grow(fleet: Fleet, count: int, batch: int, make: Callable[[], Any]) -> None:
    """``count`` sandboxes, ``batch`` at a time (2 cores: booting many at once only
    stretches each boot)."""
    while len(fleet.sandboxes) < count:
        todo = min(batch, count - len(fleet.sandboxes))
        await asyncio.gather(*(add_sandbox(fleet, make) for _ in range(todo)))


def read_fleet_memory(fleet: Fleet) -> kernel_start.KernelMemory:
    pids = set()
    for sandbox in fleet.sandboxes:
        record = sandbox.record
        pids |= {record.vmm_pid} | {pid for pid, _ in record.brokers if pid}
    return kernel_start.read_kernel_memory(hostmem.with_descendants(pids))


async def end_fleet(fleet: Fleet) -> None:
    sandboxes, fleet.sandboxes = fleet.sandboxes, []
    for sandbox in sandboxes:
        with contextlib.suppress(Exception):
            await sandbox.kill()


async def idle_fleet(args: argparse.Namespace, fleet: Fleet) -> None:
    """Idle ``--idle-seconds``, then read the memory of the whole fleet; end it."""
    try:
        await asyncio.sleep(args.idle_seconds)
        fleet.memory = read_fleet_memory(fleet)
    finally:
        await end_fleet(fleet)
    print(f"  {len(fleet.ready.seconds)} {fleet.label}: {mib(fleet.memory.total)} "
          f"(load {load()})", flush=True)  # fmt: skip


async def memory_part(args: argparse.Namespace) -> tuple[Fleet, Fleet, Fleet]:
    """One cold sandbox alone (then its memory snapshot), ``--clones`` cold ones, and
    ``--clones`` resumed from the snapshot, one fleet after the other."""
    print(
        f"part memory: {args.clones} clones of one memory snapshot against {args.clones} "
        f"cold sandboxes of {args.image}, {args.sandbox_memory_mib} MiB each",
        flush=True,
    )

    def cold() -> Any:
        return AsyncSandbox.create(args.image, memory_mib=args.sandbox_memory_mib)

    def clone() -> Any:
        return AsyncSandbox.create(from_snapshot=MEMORY_SNAPSHOT)

    one, colds, clones = Fleet("cold sandbox alone"), Fleet("cold sandboxes"), Fleet("clones")
    try:
        await add_sandbox(one, cold)
        await asyncio.sleep(args.idle_seconds)
        one.memory = read_fleet_memory(one)
        print(f"  one cold sandbox alone: {mib(one.memory.total)}", flush=True)
        await one.sandboxes[0].snapshot(MEMORY_SNAPSHOT, memory=True)
        await end_fleet(one)
        await grow(colds, args.clones, args.boot_batch, cold)
        await idle_fleet(args, colds)
        # One at a time: a resume takes a fraction of a second, and two at once can meet
        # QEMU's control socket before it listens (connection refused, in _load_state).
        await grow(clones, args.clones, 1, clone)
        await idle_fleet(args, clones)
    finally:
        for fleet in (one, colds, clones):
            await end_fleet(fleet)
    return one, colds, clones


def kinds(memory: kernel_start.KernelMemory) -> str:
    parts = ("guest_ram", "anon", "file", "shmem")
    return " + ".join(f"{name} {mib(memory.part(name))}" for name in parts)


def memory_report(args: argparse.Namespace, fleets: tuple[Fleet, Fleet, Fleet]) -> list[str]:
    one, colds, clones = fleets
    assert one.memory and colds.memory and clones.memory
    count = args.clones
    print(f"results [memory], host memory (PSS) read {args.idle_seconds:g} s idle, "
          f"{args.image}, {args.sandbox_memory_mib} MiB each:")  # fmt: skip
    for fleet in fleets:
        assert fleet.memory is not None
        size = len(fleet.ready.seconds)
        each = f", {mib(fleet.memory.total / size)} each" if size > 1 else ""
        print(f"  {size} {fleet.label}: {mib(fleet.memory.total)}{each} ({kinds(fleet.memory)})")
    print("  " + Samples("create to first exec [cold]", colds.ready.seconds).line())
    print("  " + Samples("create to first exec [clone]", clones.ready.seconds).line())
    together = clones.memory.total / colds.memory.total
    of_one = clones.memory.total / one.memory.total
    print(f"ratio memory of {count}, clones/cold: {together:.2f}")
    print(f"ratio memory, {count} clones/one cold sandbox: {of_one:.2f}")
    print(f"Goal: {count} clones <= {CLONES_GOAL:g} x the memory of one: "
          f"{verdict(of_one, CLONES_GOAL)} (x{of_one:.2f}: {mib(clones.memory.total)} against "
          f"{mib(one.memory.total)})")  # fmt: skip
    return [f"{count} clones {mib(clones.memory.total)}", f"{count} cold {mib(colds.memory.total)}",
            f"one {mib(one.memory.total)}", f"clones/one x{of_one:.2f}"]  # fmt: skip


# --- part "ray" -------------------------------------------------------------------------


# Each start of the Ray side: its name in the round lines, its line in the results (in
# the results' order).
RAY_STARTS = {
    "gvisor exec": "create to first exec answered [gvisor]",
    "pool exec": "create to first exec answered, from the pool (claim) [microvm]",
    "snapshot exec": "create to first exec answered, from a memory snapshot [microvm]",
    "cold exec": "create to first exec answered, cold (warm=False) [microvm]",
    "pool run": "SandboxActor start to first run answered, from the pool (claim) [microvm]",
    "snapshot run": "SandboxActor start to first run answered, from a memory snapshot [microvm]",
    "cold run": "SandboxActor start to first run answered, cold (warm=False) [microvm]",
    "plain run": "plain Ray actor start to first run answered (Ray's own part) [host]",
}


@dataclass
class RayResults:
    starts: dict[str, Samples] = field(
        default_factory=lambda: {name: Samples(line) for name, line in RAY_STARTS.items()}
    )
    template: str = ""
    template_seconds: float = 0.0  # the first warm actor's start, the template made in it
    gvisor_memory_kib: float = 0.0  # PSS per idle sandbox, runsc processes
    gvisor_actor_kib: float = 0.0  # besides: its actor processes
    pool_memory_kib: float = 0.0  # PSS per idle pool member: QEMU, brokers and its actor
    pool_actor_kib: float = 0.0  # of which: its actor process
    idle: int = 0


def ray_part(args: argparse.Namespace, work: Path) -> RayResults:
    """In one Ray session with the gVisor peer: gVisor's create to first exec and idle
    memory; our cold, memory-snapshot and pool starts and idle pool members.
    bench/ray_actor.py's helpers, imported here only: they import Ray, numpy and the
    peer's setup, which the other parts do without."""
    import ray
    import ray_actor
    from ray_peer import GVisorPeerError, local_ray, start_gvisor_peer

    print("part ray: Ray's gVisor sandbox, SandboxActors cold, from a memory snapshot and "
          "from a WarmActorPool", flush=True)  # fmt: skip
    # ray_actor's functions (trivial) travel by value, as they do from its own __main__:
    # neither Ray's worker nor the guest can import bench/ray_actor.py.
    ray.cloudpickle.register_pickle_by_value(ray_actor)
    results = RayResults(idle=args.clones)
    try:
        peer = start_gvisor_peer(ImageStore(), ray_actor.PEER_CACHE, work / "peer")
        try:
            with local_ray({**peer.env, "VMRUNTIME_STATE": os.environ["VMRUNTIME_STATE"]}):
                ctx = ray_actor.Context(argparse.Namespace(at_once=args.clones, runs=1), peer)
                make_ray_template(results)
                ray_starts(args, results)
                ray_actor.measure_at_once(ctx, ctx.gvisor, ray_actor.gvisor_create,
                                          ray_actor.gvisor_memory)  # fmt: skip
                results.gvisor_memory_kib = ctx.gvisor.memory_kib[0]
                results.gvisor_actor_kib = ctx.gvisor.actor_memory_kib[0]
                pool_memory(args, results)
        finally:
            peer.registry.stop()
    except GVisorPeerError as exc:  # the peer's setup, or runsc left after the session
        raise BenchError(str(exc)) from exc
    return results


# What each start makes (ray_backend imported when called, in the Ray session), of the
# image the gVisor peer serves (parse_args holds --image to it for this part).


def warm_actor() -> Any:
    import ray_backend

    return ray_backend.SandboxActor.remote(image=DEFAULT_IMAGE)


def cold_actor() -> Any:
    import ray_backend

    return ray_backend.SandboxActor.remote(image=DEFAULT_IMAGE, warm=False)


def warm_create() -> Any:
    import ray_backend

    return ray_backend.create(DEFAULT_IMAGE)


def cold_create() -> Any:
    """What ``ray_backend.create(image)`` makes (read-only root, no Python check), booted:
    ``create`` itself is always warm."""
    import ray_backend

    return ray_backend.SandboxActor.remote(DEFAULT_IMAGE, readonly=True, check_python=False,
                                           warm=False)  # fmt: skip


def expect_resumed(resumed: bool, what: str) -> Callable[[Any], None]:
    """A check (untimed, after the first answer) that the actor's sandbox was resumed from
    a memory snapshot (its writable layer has an origin), or booted."""

    def check(actor: Any) -> None:
        import ray

        sandbox_id = ray.get(actor.get_instance_id.remote(), timeout=60)
        record = state.read_record(state.SandboxPaths(sandbox_id))
        if bool(record.layer_origin) != resumed:
            raise BenchError(f"{what}: sandbox {sandbox_id} resumed={not resumed}, "
                             f"expected resumed={resumed}")  # fmt: skip

    return check


def make_ray_template(results: RayResults) -> None:
    """The node's warm template, made by the first warm actor (timed, not counted)."""
    import ray_actor

    results.template_seconds = ray_actor.first_run_time(
        warm_actor, check=expect_resumed(True, "the first warm actor")
    )
    names = [snap.name for snap in SnapshotStore().list() if snap.name.startswith("ray-warm-")]
    if len(names) != 1:
        raise BenchError(f"expected one warm Ray template in the state directory: {names}")
    results.template = names[0]
    print(f"  template {results.template}: made by the first warm actor, start to first run "
          f"{fmt(results.template_seconds)} (load {load()})", flush=True)  # fmt: skip


@contextlib.contextmanager
def warm_actor_pool(size: int) -> Iterator[Any]:
    """A ``WarmActorPool`` of ``size`` members of the peer's image, closed after."""
    import ray_backend

    pool = ray_backend.WarmActorPool(size, image=DEFAULT_IMAGE)
    try:
        yield pool
    finally:
        pool.close()


def wait_for_members(pool: Any, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pool.ready < count:
        if pool.failures:
            raise BenchError(f"warm actor pool: a member failed to start: {pool.failures}")
        if time.monotonic() > deadline:
            raise BenchError(f"warm actor pool: {pool.ready} of {count} ready in {timeout:g} s")
        time.sleep(0.2)


def ray_starts(args: argparse.Namespace, results: RayResults) -> None:
    """Each kind of start to its first answer, ``--settle`` seconds of quiet before each;
    one uncounted round first (gVisor's image pull if needed, Ray's workers)."""
    import ray_actor

    def run_of(make: Callable[[], Any], resumed: bool, what: str) -> Callable[[], float]:
        return lambda: ray_actor.first_run_time(make, check=expect_resumed(resumed, what))

    def exec_of(make: Callable[[], Any], resumed: bool, what: str) -> Callable[[], float]:
        return lambda: ray_actor.first_exec_time(make, what, expect_resumed(resumed, what))

    makers = {
        "gvisor exec": lambda: ray_actor.first_exec_time(ray_actor.gvisor_create, "gvisor"),
        "cold exec": exec_of(cold_create, False, "cold create"),
        "snapshot exec": exec_of(warm_create, True, "warm create"),
        "cold run": run_of(cold_actor, False, "cold actor"),
        "snapshot run": run_of(warm_actor, True, "warm actor"),
        "plain run": lambda: ray_actor.first_run_time(ray_actor.PlainActor.remote, sandbox=False),
    }
    for round_ in range(args.runs + 1):
        measured = {}
        for name, measure in makers.items():
            time.sleep(args.settle)
            measured[name] = measure()
        measured.update(pool_starts(args))
        if round_ > 0:
            for name, seconds in measured.items():
                results.starts[name].seconds.append(seconds)
        cells = ", ".join(f"{name} {fmt(seconds)}" for name, seconds in measured.items())
        label = "warm-up round (not counted)" if round_ == 0 else f"round {round_}/{args.runs}"
        print(f"  {label}: {cells} (load {load()})", flush=True)


def pool_starts(args: argparse.Namespace) -> dict[str, float]:
    """A claim to its first run, then another to its first exec, from a pool of one that
    has a ready member (the refill waited for) and a quiet machine; the pool is closed
    after its last refill is ready, so no refill competes with the next start."""
    import ray_actor

    found = {}
    with warm_actor_pool(1) as pool:
        for name in ("pool run", "pool exec"):
            wait_for_members(pool, 1, args.startup_timeout)
            time.sleep(args.settle)
            claims = pool.claims
            check = expect_resumed(True, name)
            if name == "pool run":
                found[name] = ray_actor.first_run_time(pool.claim, check=check)
            else:
                found[name] = ray_actor.first_exec_time(pool.claim, name, check)
            if pool.claims != claims + 1:
                raise BenchError(f"{name}: the pool counted {pool.claims - claims} claims")
        # The refill finishes before the pool closes: an actor killed while it resumes
        # leaves its dying processes to compete with the next start.
        wait_for_members(pool, 1, args.startup_timeout)
    return found


def pool_memory(args: argparse.Namespace, results: RayResults) -> None:
    """``--clones`` pool members, all ready, idle as gVisor's were; their host memory."""
    import ray_actor
    from ray_peer import descendants

    with warm_actor_pool(args.clones) as pool:
        wait_for_members(pool, args.clones, args.startup_timeout * args.clones)
        time.sleep(ray_actor.IDLE_SETTLE)
        # The QEMUs of the actors killed before (pool members closed) are this process's
        # zombies until reaped: they would be counted, with no memory to read.
        samples.reap_zombie_children(hostmem.QEMU_COMM)
        qemus = set(hostmem.qemu_pids()) & descendants(os.getpid())
        if len(qemus) != args.clones:
            raise BenchError(f"{args.clones} idle pool members, but {len(qemus)} QEMUs")
        total, actors = ray_actor.ours_memory()
    results.pool_memory_kib = total / args.clones
    results.pool_actor_kib = actors / args.clones
    print(f"  {args.clones} idle pool members: {mib(total)} (load {load()})", flush=True)


def ray_report(args: argparse.Namespace, results: RayResults) -> list[str]:
    print(f"results [ray], {args.runs} run(s) of each, after a warm-up round:")
    print(f"  template {results.template}: the first warm actor's start to first run, template "
          f"made in it: {fmt(results.template_seconds)}")  # fmt: skip
    for measured in results.starts.values():
        print("  " + measured.line())
    per = f"host memory (PSS) per idle sandbox, {results.idle} idle"
    print(f"  {per} [gvisor]: {mib(results.gvisor_memory_kib)} (runsc; besides its actor "
          f"process: {mib(results.gvisor_actor_kib)})")  # fmt: skip
    qemu_kib = results.pool_memory_kib - results.pool_actor_kib
    print(
        f"  {per} pool members [microvm]: {mib(results.pool_memory_kib)} (QEMU and its actor "
        f"process; QEMU only: {mib(qemu_kib)}, the actor: {mib(results.pool_actor_kib)})"
    )
    median = {name: measured.median for name, measured in results.starts.items()}
    gvisor = median["gvisor exec"]
    ratios = {
        "create to first exec, microvm pool/gvisor": median["pool exec"] / gvisor,
        "create to first exec, microvm memory snapshot/gvisor":
            median["snapshot exec"] / gvisor,
        "create to first exec, microvm cold/gvisor": median["cold exec"] / gvisor,
        "SandboxActor first run, memory snapshot/cold":
            median["snapshot run"] / median["cold run"],
        "SandboxActor first run, pool/cold": median["pool run"] / median["cold run"],
        "memory per idle sandbox, microvm pool member with actor/gvisor runsc":
            results.pool_memory_kib / results.gvisor_memory_kib,
        "memory per idle sandbox, QEMU only/runsc only": qemu_kib / results.gvisor_memory_kib,
        "memory per idle sandbox, both with their actor process":
            results.pool_memory_kib / (results.gvisor_memory_kib + results.gvisor_actor_kib),
    }  # fmt: skip
    for label, value in ratios.items():
        print(f"ratio {label}: {ratio_text(value)}")
    snapshot = ratios["SandboxActor first run, memory snapshot/cold"]
    pool = ratios["create to first exec, microvm pool/gvisor"]
    restore = ratios["create to first exec, microvm memory snapshot/gvisor"]
    memory = ratios["memory per idle sandbox, microvm pool member with actor/gvisor runsc"]
    for goal, value, bound, against in (
        ("a SandboxActor from a memory snapshot ready for its first call", snapshot,
         RAY_SNAPSHOT_GOAL, "cold"),
        ("a pool member's first exec", pool, RAY_POOL_GOAL, "gVisor's create"),
        ("a memory-snapshot restore's first exec", restore, RAY_RESTORE_GOAL,
         "gVisor's create"),
        ("an idle pool member (QEMU and its actor; gVisor's runsc alone)", memory,
         RAY_MEMORY_GOAL, "a gVisor sandbox's memory"),
    ):  # fmt: skip
        print(f"Goal: {goal} <= {bound:g} x {against}: {verdict(value, bound)} "
              f"(x{ratio_text(value)})")  # fmt: skip
    return [f"gvisor first exec {fmt(gvisor)}",
            f"gvisor {mib(results.gvisor_memory_kib)}/idle sandbox",
            f"pool member {mib(results.pool_memory_kib)}/idle (QEMU {mib(qemu_kib)})",
            f"first exec pool x{ratio_text(pool)}, snapshot x{restore:.2f}, cold "
            f"x{ratios['create to first exec, microvm cold/gvisor']:.2f} gvisor",
            f"actor first run snapshot/cold x{snapshot:.2f}"]  # fmt: skip


# --- main -------------------------------------------------------------------------------


def print_environment(args: argparse.Namespace) -> None:
    import ipykernel

    print(
        f"environment: cpus={len(os.sched_getaffinity(0))} python={platform.python_version()} "
        f"jupyter_client={jupyter_client_version} ipykernel={ipykernel.__version__} "
        f"host kernel={platform.release()} parts={','.join(args.parts)} runs={args.runs} "
        f"load={load()} (other QEMUs on the host: {len(hostmem.qemu_pids())})"
    )


def print_accelerator(sides: dict[str, KernelSide] | None) -> str:
    accel = choose_accelerator()
    used = {side.accelerator for side in (sides or {}).values() if side.accelerator}
    recorded = ", ".join(sorted(used)) or accel.name
    note = "" if used <= {accel.name} else f"; choose_accelerator() now says {accel.name}"
    print(f"accelerator: {recorded} ({accel.reason}{note})")
    return recorded


def bench_main(args: argparse.Namespace) -> int:
    samples.become_subreaper()
    if args.image == DEFAULT_IMAGE:
        ensure_default_image(log=lambda line: print(f"image: {line}"))
    print_environment(args)
    work = Path(tempfile.mkdtemp(prefix="vmr-bench-warm-"))
    cells: list[str] = []
    sides = None
    try:
        with environment({"VMRUNTIME_STATE": str(work / "state")}):
            if "jupyter" in args.parts:
                sides = asyncio.run(jupyter_part(args, work))
                cells += jupyter_report(args, sides)
            if "memory" in args.parts:
                cells += memory_report(args, sync.run(memory_part(args)))
            if "ray" in args.parts:
                cells += ray_report(args, ray_part(args, work))
    finally:
        MicroVMProvisioner.close_pools()
        shutil.rmtree(work, ignore_errors=True)
    accel = print_accelerator(sides)
    print(f"summary: accel={accel} runs={args.runs} load {load()}; " + "; ".join(cells))
    return 0


def parse_parts(text: str) -> tuple[str, ...]:
    return samples.parse_subset(text, PARTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--parts", type=parse_parts, default=PARTS, help="jupyter,memory,ray (default all)")
    add("--runs", type=int, default=5, help="counted starts of each kind (median)")
    add("--settle", type=float, default=3.0, help="seconds of quiet before each start")
    add("--image", default=DEFAULT_IMAGE, help="the image of every sandbox")
    add("--cpus", type=int, help="the sandboxed kernels' vCPUs (the provisioner's default)")
    add("--memory-mib", type=int, help="the sandboxed kernels' RAM (the provisioner's default)")
    add("--local-python", default=sys.executable, help="the local kernel's Python")
    add("--mount", action="append", default=[], metavar="HOST:GUEST[:ro]",
        help="jupyter part: a host folder the sandboxed kernelspecs share (repeatable)")
    add("--startup-timeout", type=float, default=120.0, help="seconds for a kernel to answer")
    add("--reply-timeout", type=float, default=60.0, help="seconds for one later execute")
    add("--clones", type=int, default=10, help="sandboxes of each kind idle together")
    add("--sandbox-memory-mib", type=int, default=512, help="RAM of the memory part's sandboxes")
    add("--boot-batch", type=int, default=2, help="memory part: sandboxes made at once")
    add("--idle-seconds", type=float, default=5.0, help="idle time before memory is read")
    args = parser.parse_args(argv)
    if min(args.runs, args.clones, args.sandbox_memory_mib, args.boot_batch) < 1:
        parser.error("--runs, --clones, --sandbox-memory-mib and --boot-batch must be >= 1")
    if args.settle < 0 or args.idle_seconds < 0:
        parser.error("--settle and --idle-seconds must be >= 0")
    try:  # absolute host folders: the kernelspecs are read in another directory's terms
        args.mount = [f"{Path(m.host).resolve()}:{m.place}" for m in map(Mount.parse, args.mount)]
    except MountError as exc:
        parser.error(str(exc))
    if args.image != DEFAULT_IMAGE and "ray" in args.parts:
        parser.error("the ray part runs the default image (the one the gVisor peer serves)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return samples.run_blocking(lambda: bench_main(args))


if __name__ == "__main__":
    sys.exit(main())
