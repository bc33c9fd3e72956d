"""Benchmark: snapshots of a sandbox's writable layer against plain copies of the layer file.

Not a test: it prints timings and ratios measured in the same run, on this machine.

For each amount written (``--written-mb``, default 10 and 200 MB), one source sandbox
of ``vmruntime/default:latest`` with a 4 GiB (apparent) writable layer writes that much
incompressible data (``/dev/urandom``) into its root filesystem and syncs. Then, after
one warm-up round (not counted), ``--runs`` rounds measure, on that layer:

- **create**: ``Sandbox.snapshot(name)`` of the running sandbox (freeze, copy, manifest,
  fsync, rename) against ``cp --sparse=always`` of its layer file (and that copy's fsync);
- **restore**: making a new sandbox's writable layer from the snapshot (the creation
  step that restore replaces) against the same ``cp --sparse=always``;
- **sealed create**: ``Sandbox.snapshot(name, seal=True)``, per GB allocated;
- **push and pull**: ``Snapshot.push(url)`` / ``pull(url)`` to a real S3 server on
  127.0.0.1 (moto's ``ThreadedMotoServer``, through s3fs) against s3fs ``put`` / ``get``
  of the raw layer file.

And once per round, **warm start against cold**: a sandbox restored from a snapshot taken
after a setup step, plus a first exec, against a cold sandbox that runs the setup step
(5,000 small ``.py`` files written and compiled with ``python3 -m compileall``) and then
the same first exec.

A part whose API is not in this checkout yet is not measured, and the output says so.
It prints medians, ratios (ours / the peer's: below 1 we are faster), the accelerator and
a summary line. See ``bench/README.md`` for every line.

Everything runs in a temporary state directory (``VMRUNTIME_STATE``: sandboxes'
records and the snapshot stores), removed at the end with every sandbox it started
and the S3 server, also on Ctrl-C, SIGTERM and errors. The image cache is the normal one.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

import samples  # noqa: E402  (bench/samples.py, beside this script)
from s3_support import S3Server, running_s3_server  # noqa: E402  (tests/s3_support.py)

from vmruntime import Sandbox, _paths  # noqa: E402
from vmruntime._durable import fsync_path  # noqa: E402
from vmruntime.images.default_image import DEFAULT_IMAGE, ensure_default_image  # noqa: E402
from vmruntime.snapshots import SnapshotStore, content_digest  # noqa: E402
from vmruntime.vm import SandboxConfig, state  # noqa: E402
from vmruntime.vm.accel import choose_accelerator  # noqa: E402

MB = 10**6  # "MB" is 10^6 bytes everywhere
GB = 10**9
LAYER_SIZE = 4 << 30  # the writable layer's apparent size (the Sandbox default)
FILL_PATH = "/var/tmp/vmr-bench-fill"  # on the writable layer (the overlay's upper dir)
SETUP_DIR = "/var/tmp/vmr-bench-setup"
SETUP_FILES = 5000
# The cold sandbox's setup step: 5,000 small modules, written and byte-compiled.
SETUP_SCRIPT = f"""
import compileall, os
os.makedirs({SETUP_DIR!r}, exist_ok=True)
for i in range({SETUP_FILES}):
    with open(os.path.join({SETUP_DIR!r}, f"m{{i:04d}}.py"), "w") as f:
        f.write(f"X = {{i}}\\n\\ndef double():\\n    return X * 2\\n")
ok = compileall.compile_dir({SETUP_DIR!r}, quiet=1)
os.sync()
raise SystemExit(0 if ok else 1)
"""
# The first exec, on both sides: counts the compiled modules the setup left.
FIRST_EXEC = ["sh", "-c", f"ls {SETUP_DIR}/__pycache__ | wc -l"]
CREATE_GOAL = 1.0  # the must: create and restore <= the copy, unsealed
RESTORE_GOAL_AT_LARGEST = 0.1  # the goal: restore <= 0.1 of the copy at 200 MB
BUCKET = "vmr-bench"

BenchError = samples.BenchError


# --- samples ----------------------------------------------------------------------------


fmt = samples.seconds_text


def mb(size: float) -> str:
    return f"{size / MB:.1f} MB"


class Samples(samples.Samples):
    def line(self) -> str:
        return f"{self.label}: not measured" if not self.seconds else super().line()


@dataclass
class SizeResults:
    """Everything measured on the layer of one amount written; one sample per round."""

    written: int  # bytes the source sandbox wrote
    allocated: int = 0  # the source layer's allocated bytes, after the write
    cp: Samples = field(default_factory=lambda: Samples("cp"))
    cp_fsync: Samples = field(default_factory=lambda: Samples("cp + fsync"))
    create: Samples = field(default_factory=lambda: Samples("create"))
    restore: Samples = field(default_factory=lambda: Samples("restore"))
    sealed: Samples = field(default_factory=lambda: Samples("sealed create"))
    sealed_allocated: list[int] = field(default_factory=list)
    seal_only: Samples = field(default_factory=lambda: Samples("seal digest alone"))
    push: Samples = field(default_factory=lambda: Samples("push"))
    pull: Samples = field(default_factory=lambda: Samples("pull"))
    s3_put: Samples = field(default_factory=lambda: Samples("s3fs put"))
    s3_get: Samples = field(default_factory=lambda: Samples("s3fs get"))
    s3_bytes: int = 0  # what the peer's put sent
    push_bytes: int = 0  # what our push sent (if it says)

    def __post_init__(self) -> None:
        tag = f" [{self.written // MB} MB written]"
        for value in vars(self).values():
            if isinstance(value, Samples):
                value.label += tag


@dataclass
class StartResults:
    cold: Samples = field(default_factory=lambda: Samples("cold: create + setup + first exec"))
    cold_setup: Samples = field(default_factory=lambda: Samples("  of which the setup step"))
    cold_create: Samples = field(default_factory=lambda: Samples("  of which Sandbox.create"))
    warm: Samples = field(
        default_factory=lambda: Samples("warm: create from snapshot + first exec")
    )


# --- what this checkout has -------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """Which snapshot parts are on this checkout (the issue lands in pieces)."""

    capture: bool
    restore: bool
    remote: bool

    @classmethod
    def find(cls) -> Api:
        capture = hasattr(Sandbox, "snapshot")
        restore = "from_snapshot" in inspect.signature(Sandbox.create).parameters
        try:
            import vmruntime.snapshots.remote  # noqa: F401
        except ImportError:
            remote = False
        else:
            remote = True
        return cls(capture=capture, restore=restore and capture, remote=remote)

    def notes(self) -> list[str]:
        """What is not measured, or measured otherwise, and why: one line each."""
        lines = []
        if not self.capture:
            lines.append("not measured: create, sealed create (Sandbox.snapshot) not on main "
                         "yet; the seal digest alone is measured instead")  # fmt: skip
        if not self.restore:
            lines.append("not measured: restore, warm start (Sandbox.create(from_snapshot=...)) "
                         "not on main yet")  # fmt: skip
        if not self.remote:
            lines.append("not measured: push, pull (vmruntime.snapshots.remote) not on main "
                         "yet; the s3fs peer alone is measured")  # fmt: skip
        elif not self.capture:
            lines.append("note: push, pull are measured on a snapshot made from the layer file "
                         "directly (copied into the store), not captured")  # fmt: skip
        return lines


# --- files ------------------------------------------------------------------------------


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    """``step``'s wall time and result, after an untimed ``sync()`` so it pays for no
    earlier step's write-back."""
    os.sync()
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def sparse_copy(src: Path, dest: Path) -> None:
    subprocess.run(["cp", "--sparse=always", "--", str(src), str(dest)], check=True)


def check_copy(src: Path, dest: Path, what: str) -> None:
    """Untimed: the copy has the layer's size and at least its data."""
    if dest.stat().st_size != src.stat().st_size:
        raise BenchError(f"{what}: {dest} holds {dest.stat().st_size} bytes, "
                         f"the layer {src.stat().st_size}")  # fmt: skip
    if allocated(dest) < allocated(src) // 2:
        raise BenchError(f"{what}: {dest} has {mb(allocated(dest))} allocated, the layer "
                         f"{mb(allocated(src))}")  # fmt: skip


# --- the S3 server ----------------------------------------------------------------------


def storage_options(ctx: Context) -> dict[str, Any]:
    """s3fs's options for the bench's server, the same for ours and the peer."""
    return {**ctx.s3.storage_options, "skip_instance_cache": True}


def s3(ctx: Context) -> Any:
    """A fresh s3fs filesystem on the bench's server (no listing cache across steps)."""
    import s3fs

    return s3fs.S3FileSystem(**storage_options(ctx))


# --- one amount written -----------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    api: Api
    work: Path  # the temporary directory: copies, pulled stores
    s3: S3Server  # moto on 127.0.0.1 (tests/s3_support.py)
    round_: int = 0
    counted: bool = False
    accelerator: str = ""


def source_sandbox(ctx: Context, written: int) -> Sandbox:
    """A sandbox of the default image that has written ``written`` bytes of random data
    to its root filesystem and synced (untimed)."""
    sandbox = Sandbox.create(DEFAULT_IMAGE, writable_size=LAYER_SIZE)
    try:
        ctx.accelerator = sandbox.accelerator
        layer = state.SandboxPaths(sandbox.id).writable
        before = allocated(layer)
        sandbox.exec(["sh", "-c", f"head -c {written} /dev/urandom > {FILL_PATH} && sync"],
                     check=True, timeout=600)  # fmt: skip
        grown = allocated(layer) - before
        if grown < written * 0.9:
            raise BenchError(f"the guest wrote {mb(written)} but its layer grew by {mb(grown)}")
    except BaseException:
        sandbox.kill()
        raise
    return sandbox


def measure_size(ctx: Context, sandbox: Sandbox, results: SizeResults) -> None:
    """One round on one source sandbox's layer; every step checked afterwards."""
    layer = state.SandboxPaths(sandbox.id).writable
    results.allocated = allocated(layer)
    tag = f"{results.written // MB}mb-r{ctx.round_}"
    cells: list[str] = []

    copy = ctx.work / f"copy-{tag}.img"
    cp_seconds, _ = timed(lambda: sparse_copy(layer, copy))
    fsync_started = time.perf_counter()  # right after the copy: no sync() in between
    fsync_path(copy)
    fsync_seconds = time.perf_counter() - fsync_started
    check_copy(layer, copy, "cp --sparse=always")
    copy.unlink()
    record(ctx, results.cp, cp_seconds, cells, "cp")
    record(ctx, results.cp_fsync, cp_seconds + fsync_seconds, cells, "cp+fsync")

    seal_seconds, _ = timed(lambda: content_digest(layer))
    record(ctx, results.seal_only, seal_seconds, cells, "seal digest")

    snapshot = None
    if ctx.api.capture:
        snapshot = measure_capture(ctx, sandbox, results, tag, cells)
        if ctx.api.restore:
            measure_restore(ctx, snapshot, results, cells)
    if ctx.api.remote:
        snapshot = snapshot or direct_snapshot(layer, f"bench-{tag}")
        measure_push_pull(ctx, snapshot, results, tag, cells)
    if snapshot is not None:
        SnapshotStore().remove(snapshot.name)
    measure_s3_peer(ctx, layer, results, tag, cells)
    print(f"  {results.written // MB:>4} MB: " + ", ".join(cells), flush=True)


def record(ctx: Context, into: Samples, seconds: float, cells: list[str], label: str) -> None:
    cells.append(f"{label} {fmt(seconds)}")
    if ctx.counted:
        into.seconds.append(seconds)


def measure_capture(
    ctx: Context, sandbox: Sandbox, results: SizeResults, tag: str, cells: list[str]
) -> Any:
    """Unsealed and sealed capture of the running sandbox; the unsealed snapshot."""
    seconds, snapshot = timed(lambda: sandbox.snapshot(f"bench-{tag}"))
    check_snapshot(snapshot, results)
    record(ctx, results.create, seconds, cells, "create")
    seconds, sealed = timed(lambda: sandbox.snapshot(f"bench-{tag}-sealed", seal=True))
    check_snapshot(sealed, results)
    if sealed.manifest.seal is None:
        raise BenchError(f"snapshot {sealed.name}: seal=True but the manifest has no seal")
    sealed.verify()
    record(ctx, results.sealed, seconds, cells, "sealed create")
    if ctx.counted:
        results.sealed_allocated.append(sealed.manifest.layer.allocated_size)
    SnapshotStore().remove(sealed.name)
    return snapshot


def direct_snapshot(layer: Path, name: str) -> Any:
    """Untimed, without ``Sandbox.snapshot``: the layer file copied into the store with a
    manifest pinning the default image, as a capture makes it (for push and pull)."""
    from vmruntime import images
    from vmruntime.snapshots import LayerInfo, SnapshotManifest

    image = images.resolve(DEFAULT_IMAGE)
    with SnapshotStore().create(name) as pending:
        dest = pending.path / "layer.img"
        sparse_copy(layer, dest)
        fsync_path(dest)
        info = LayerInfo(apparent_size=dest.stat().st_size, allocated_size=allocated(dest))
        manifest = SnapshotManifest(
            name=name, image=DEFAULT_IMAGE, image_manifest_digest=image.manifest_digest,
            image_layer_digests=tuple(blob.digest for blob in image.manifest.layers),
            layer=info,
        )  # fmt: skip
        return pending.commit(manifest)


def check_snapshot(snapshot: Any, results: SizeResults) -> None:
    layer = snapshot.manifest.layer
    if layer.apparent_size != LAYER_SIZE or layer.allocated_size < results.written:
        raise BenchError(
            f"snapshot {snapshot.name}: layer of {layer.apparent_size} bytes, "
            f"{layer.allocated_size} allocated, for {results.written} written"
        )


def measure_restore(ctx: Context, snapshot: Any, results: SizeResults, cells: list[str]) -> None:
    """What restore does before a boot, as ``Sandbox.create(from_snapshot=)`` does it: find
    the snapshot and its base image (``restore_source``), then make the new sandbox's
    writable layer from it (``SnapshotLayer.make``, the creation step that replaces a
    fresh layer). The boot after it is a fresh sandbox's (see warm start)."""
    from vmruntime.snapshots.restore import restore_source

    dest = ctx.work / "restored-layer"

    def restore() -> None:
        source = restore_source(snapshot.name).layer
        source.make(dest, SandboxConfig(DEFAULT_IMAGE), _paths.cache_root())

    seconds, _ = timed(restore)
    check_restored(dest)
    record(ctx, results.restore, seconds, cells, "restore")
    dest.unlink()


def check_restored(layer: Path) -> None:
    """Untimed: a layer QEMU can open with the snapshot's size (``qemu-img info``)."""
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(layer)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if info.returncode != 0 or json.loads(info.stdout)["virtual-size"] != LAYER_SIZE:
        raise BenchError(f"restored layer {layer}: {info.stdout or info.stderr}")


def measure_push_pull(
    ctx: Context, snapshot: Any, results: SizeResults, tag: str, cells: list[str]
) -> None:
    """Our push to a fresh store prefix (nothing to deduplicate against), then our pull of
    it into a fresh local store; the pulled snapshot must be the pushed one."""
    from vmruntime.snapshots import Snapshot

    url = f"s3://{BUCKET}/store-{tag}"
    options = storage_options(ctx)
    seconds, pushed = timed(lambda: snapshot.push(url, storage_options=options, progress=False))
    record(ctx, results.push, seconds, cells, "push")
    if ctx.counted:
        results.push_bytes = pushed.bytes_sent
    local = SnapshotStore(ctx.work / f"pulled-{tag}")
    seconds, pulled = timed(
        lambda: Snapshot.pull(pushed.url, store=local, storage_options=options, progress=False)
    )
    if pulled.digest != snapshot.digest or pulled.layer_path.stat().st_size != LAYER_SIZE:
        raise BenchError(f"pulled {pulled.name}: manifest {pulled.digest}, pushed "
                         f"{snapshot.digest}")  # fmt: skip
    record(ctx, results.pull, seconds, cells, "pull")
    shutil.rmtree(local.root)
    s3(ctx).rm(url, recursive=True)


def measure_s3_peer(
    ctx: Context, layer: Path, results: SizeResults, tag: str, cells: list[str]
) -> None:
    """The layer file through s3fs: by default sparse-archived (GNU ``tar --sparse``, only
    the data) and put, then got and unpacked; with ``--raw-peer`` the raw 4 GiB file, put
    and got as it is. Each into a fresh key and file."""
    key = f"{BUCKET}/peer-{tag}/layer"
    dest = ctx.work / f"get-{tag}"
    dest.mkdir()
    seconds, sent = timed(lambda: peer_put(ctx, layer, key))
    record(ctx, results.s3_put, seconds, cells, "s3fs put")
    seconds, got = timed(lambda: peer_get(ctx, key, dest, layer.name))
    check_copy(layer, got, "s3fs get")
    record(ctx, results.s3_get, seconds, cells, "s3fs get")
    if ctx.counted:
        results.s3_bytes = sent
    shutil.rmtree(dest)
    s3(ctx).rm(key)


def peer_put(ctx: Context, layer: Path, key: str) -> int:
    """The peer's upload; the bytes it sent."""
    fs = s3(ctx)
    if ctx.args.raw_peer:
        fs.put_file(str(layer), key)
        return layer.stat().st_size
    archive = ctx.work / "peer-put.tar"
    try:
        subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(layer.parent),
                        layer.name], check=True)  # fmt: skip
        fs.put_file(str(archive), key)
        return archive.stat().st_size
    finally:
        archive.unlink(missing_ok=True)


def peer_get(ctx: Context, key: str, dest: Path, name: str) -> Path:
    """The peer's download, into ``dest``; the layer file it made."""
    fs = s3(ctx)
    if ctx.args.raw_peer:
        fs.get_file(key, str(dest / name))
        return dest / name
    archive = dest / "peer-get.tar"
    fs.get_file(key, str(archive))
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    archive.unlink()
    return dest / name


# --- warm start against cold ------------------------------------------------------------


def cold_start(ctx: Context) -> tuple[float, float, float, Sandbox]:
    """Create + setup + first exec: total, create and setup seconds, and the sandbox
    (running)."""
    started = time.perf_counter()
    sandbox = Sandbox.create(DEFAULT_IMAGE, writable_size=LAYER_SIZE)
    try:
        setup_started = time.perf_counter()
        create = setup_started - started
        sandbox.exec(["python3", "-c", SETUP_SCRIPT], check=True, timeout=1800)
        setup = time.perf_counter() - setup_started
        first_exec(sandbox)
        total = time.perf_counter() - started
    except BaseException:
        sandbox.kill()
        raise
    return total, create, setup, sandbox


def first_exec(sandbox: Sandbox) -> None:
    """The first exec on both sides; it must see every compiled module."""
    out = sandbox.exec(FIRST_EXEC, check=True, timeout=600).stdout.decode().strip()
    if out != str(SETUP_FILES):
        raise BenchError(f"{sandbox.id}: {out!r} compiled modules, not {SETUP_FILES}")


def warm_start(ctx: Context, snapshot_name: str) -> float:
    """``Sandbox.create(from_snapshot=)`` + the first exec (which must find the setup's
    5,000 compiled modules); the sandbox is stopped untimed."""
    started = time.perf_counter()
    sandbox = Sandbox.create(from_snapshot=snapshot_name)
    try:
        first_exec(sandbox)
        seconds = time.perf_counter() - started
    finally:
        sandbox.stop()
    return seconds


def measure_start(ctx: Context, results: StartResults, warm_name: str | None) -> str | None:
    """A cold start (its sandbox snapshotted, untimed, the first time) and a warm one."""
    total, create, setup, sandbox = cold_start(ctx)
    cells = [f"cold {fmt(total)} (create {fmt(create)}, setup {fmt(setup)})"]
    try:
        if warm_name is None and ctx.api.capture:
            warm_name = "bench-after-setup"
            sandbox.snapshot(warm_name)
    finally:
        sandbox.stop()
    if ctx.counted:
        results.cold.seconds.append(total)
        results.cold_setup.seconds.append(setup)
        results.cold_create.seconds.append(create)
    if warm_name is not None and ctx.api.restore:
        seconds = warm_start(ctx, warm_name)
        cells.append(f"warm {fmt(seconds)}")
        if ctx.counted:
            results.warm.seconds.append(seconds)
    print("  start: " + ", ".join(cells), flush=True)
    return warm_name


# --- rounds -----------------------------------------------------------------------------


def run_rounds(ctx: Context, sizes: list[SizeResults], start: StartResults) -> None:
    """Per amount written: a source sandbox, one warm-up round and ``--runs`` counted
    rounds on its layer; then the warm/cold starts, warm-up and counted alike."""
    for results in sizes:
        print(f"source sandbox writing {mb(results.written)} ...", flush=True)
        sandbox = source_sandbox(ctx, results.written)
        try:
            for round_ in range(ctx.args.runs + 1):
                ctx.round_, ctx.counted = round_, round_ > 0
                print(f" {round_label(ctx)}", flush=True)
                measure_size(ctx, sandbox, results)
        finally:
            sandbox.stop()
    if ctx.args.no_start:
        return
    warm_name = None
    for round_ in range(ctx.args.runs + 1):
        ctx.round_, ctx.counted = round_, round_ > 0
        print(f"warm/cold start, {round_label(ctx)} ...", flush=True)
        warm_name = measure_start(ctx, start, warm_name)


def round_label(ctx: Context) -> str:
    if not ctx.counted:
        return "warm-up round (not counted)"
    return f"round {ctx.round_}/{ctx.args.runs}"


# --- results ----------------------------------------------------------------------------


@dataclass
class Ratio:
    label: str
    value: float
    goal: str = ""  # e.g. "must <= 1.0: met"

    def line(self) -> str:
        goal = f" ({self.goal})" if self.goal else ""
        return f"ratio {self.label}: {self.value:.2f}{goal}"


def verdict(value: float, limit: float, kind: str) -> str:
    return f"{kind} <= {limit}: {'met' if value <= limit else 'MISSED'}"


def print_results(ctx: Context, sizes: list[SizeResults], start: StartResults) -> list[Ratio]:
    print(f"results, {ctx.args.runs} run(s), after one warm-up round:")
    for results in sizes:
        print(f"layer [{results.written // MB} MB written]: {LAYER_SIZE >> 30} GiB apparent, "
              f"{mb(results.allocated)} allocated")  # fmt: skip
        for samples_ in (results.cp, results.cp_fsync, results.create, results.restore,
                         results.sealed, results.seal_only, results.push, results.pull,
                         results.s3_put, results.s3_get):  # fmt: skip
            if samples_.seconds:
                print("  " + samples_.line())
        if results.s3_bytes:
            ours = f", our push {mb(results.push_bytes)}" if results.push.seconds else ""
            print(f"  sent [{results.written // MB} MB written]: s3fs peer "
                  f"{mb(results.s3_bytes)}{ours}")  # fmt: skip
    for samples_ in (start.cold, start.cold_create, start.cold_setup, start.warm):
        if samples_.seconds:
            print(samples_.line())
    found = ratios(sizes, start)
    for ratio in found:
        print(ratio.line())
    print_seal_rate(sizes)
    print_restore_flatness(sizes)
    return found


def ratios(sizes: list[SizeResults], start: StartResults) -> list[Ratio]:
    found: list[Ratio] = []
    largest = max(sizes, key=lambda r: r.written)
    for results in sizes:
        tag = f"[{results.written // MB} MB]"
        cp = results.cp.median
        if results.create.seconds:
            value = results.create.median / cp
            found.append(Ratio(f"create/cp {tag}", value, verdict(value, CREATE_GOAL, "must")))
            # The capture fsyncs its copy: against a copy made as durable, for information.
            durable = results.create.median / results.cp_fsync.median
            found.append(Ratio(f"create/(cp + fsync) {tag}", durable))
        if results.restore.seconds:
            value = results.restore.median / cp
            goal = verdict(value, CREATE_GOAL, "must")
            if results is largest:
                goal += "; " + verdict(value, RESTORE_GOAL_AT_LARGEST, "goal")
            found.append(Ratio(f"restore/cp {tag}", value, goal))
        if results.push.seconds:
            found.append(Ratio(f"push/s3fs put {tag}", results.push.median / results.s3_put.median))
        if results.pull.seconds:
            found.append(Ratio(f"pull/s3fs get {tag}", results.pull.median / results.s3_get.median))
    if start.warm.seconds:
        found.append(Ratio("warm/cold start", start.warm.median / start.cold.median))
    return found


def print_seal_rate(sizes: list[SizeResults]) -> None:
    for results in sizes:
        tag = f"[{results.written // MB} MB]"
        if results.sealed.seconds:
            gb = statistics.median(results.sealed_allocated) / GB
            extra = results.sealed.median - results.create.median
            print(f"sealed create per GB allocated {tag}: {fmt(results.sealed.median / gb)} "
                  f"({mb(gb * GB)} allocated; the seal adds {fmt(extra)} to create)")  # fmt: skip
        gb = results.allocated / GB
        print(f"seal digest alone per GB allocated {tag}: {fmt(results.seal_only.median / gb)}")


def print_restore_flatness(sizes: list[SizeResults]) -> None:
    """The goal: restore costs the same whatever the snapshot holds."""
    measured = [results for results in sizes if results.restore.seconds]
    if len(measured) < 2:
        return
    low, high = measured[0], measured[-1]
    value = high.restore.median / low.restore.median
    print(f"restore time [{high.written // MB} MB] / [{low.written // MB} MB]: {value:.2f} "
          f"(goal: the same, ~1.0)")  # fmt: skip


def print_accelerator(ctx: Context) -> str:
    accel = choose_accelerator()
    used = ctx.accelerator or accel.name
    print(f"accelerator: {used} ({accel.reason})")
    return used


def print_summary(ctx: Context, sizes: list[SizeResults], start: StartResults,
                  found: list[Ratio], accel: str) -> None:  # fmt: skip
    cells = []
    for results in sizes:
        parts = [f"cp {fmt(results.cp.median)}"]
        for name, samples_ in (("create", results.create), ("restore", results.restore),
                               ("sealed", results.sealed), ("push", results.push),
                               ("pull", results.pull), ("put", results.s3_put),
                               ("get", results.s3_get)):  # fmt: skip
            if samples_.seconds:
                parts.append(f"{name} {fmt(samples_.median)}")
        cells.append(f"{results.written // MB} MB: " + ", ".join(parts))
    if start.cold.seconds:
        warm = f", warm {fmt(start.warm.median)}" if start.warm.seconds else ""
        cells.append(f"cold {fmt(start.cold.median)}{warm}")
    ratio_text = ", ".join(f"{ratio.label} x{ratio.value:.2f}" for ratio in found)
    count = sum(note.startswith("not measured") for note in ctx.api.notes())
    missing = f"; not measured: {count} part(s), see above" if count else ""
    load = f"load {os.getloadavg()[0]:.2f}"
    print(f"summary: accel={accel} runs={ctx.args.runs} {load}; " + "; ".join(cells)
          + (f"; {ratio_text}" if ratio_text else "") + missing)  # fmt: skip


# --- main -------------------------------------------------------------------------------


def print_environment(ctx: Context) -> None:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    version = qemu.stdout.split("\n", 1)[0].removeprefix("QEMU emulator version ")
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(ctx.work)], capture_output=True,
                        text=True).stdout.strip()  # fmt: skip
    print(f"environment: cpus={len(os.sched_getaffinity(0))} python={platform.python_version()} "
          f"qemu={version} host kernel={platform.release()} work dir={ctx.work} ({fs}) "
          f"load={os.getloadavg()[0]:.2f}")  # fmt: skip
    written = ", ".join(mb(n * MB) for n in ctx.args.written_mb)
    print(f"layer: {LAYER_SIZE >> 30} GiB apparent, {written} of /dev/urandom written by the "
          f"guest; image {DEFAULT_IMAGE}")  # fmt: skip
    peer = ("s3fs put/get of the raw layer file" if ctx.args.raw_peer else
            "tar --sparse of the layer file + s3fs put; s3fs get + tar -x")  # fmt: skip
    print(f"S3: moto's ThreadedMotoServer on 127.0.0.1, through s3fs; peer: {peer}")
    for note in ctx.api.notes():
        print(note)


def bench_main(args: argparse.Namespace) -> int:
    samples.become_subreaper()
    ensure_default_image(log=lambda line: print(f"image: {line}"))
    work = Path(tempfile.mkdtemp(prefix="vmr-bench-snapshot-", dir=args.tmp_dir))
    saved_state = os.environ.get("VMRUNTIME_STATE")
    os.environ["VMRUNTIME_STATE"] = str(work / "state")
    try:
        sizes = [SizeResults(n * MB) for n in args.written_mb]
        start = StartResults()
        with running_s3_server() as server:
            ctx = Context(args, Api.find(), work, server)
            print_environment(ctx)
            s3(ctx).mkdir(BUCKET)
            run_rounds(ctx, sizes, start)
        found = print_results(ctx, sizes, start)
        accel = print_accelerator(ctx)
        print_summary(ctx, sizes, start, found, accel)
    finally:
        if saved_state is None:
            os.environ.pop("VMRUNTIME_STATE", None)
        else:
            os.environ["VMRUNTIME_STATE"] = saved_state
        shutil.rmtree(work, ignore_errors=True)
    return 0


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: MB written, comma-separated") from None
    if not sizes or sizes[0] < 1 or sizes[-1] * MB > LAYER_SIZE // 2:
        raise argparse.ArgumentTypeError(f"{text!r}: each between 1 and {LAYER_SIZE // 2 // MB}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="counted runs of each (median)")
    parser.add_argument(
        "--written-mb", type=parse_sizes, default=[10, 200],
        help="MB the guest writes to its layer, one layer each (default 10,200)",
    )  # fmt: skip
    parser.add_argument(
        "--raw-peer", action="store_true",
        help="the S3 peer puts and gets the raw 4 GiB layer file (moto holds ~5x that in RAM)",
    )  # fmt: skip
    parser.add_argument("--no-start", action="store_true", help="skip warm against cold start")
    parser.add_argument(
        "--tmp-dir", help="where the temporary directory goes (a disk, not a tmpfs)"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return samples.run_blocking(lambda: bench_main(args))


if __name__ == "__main__":
    sys.exit(main())
