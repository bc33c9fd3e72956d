"""Benchmark: ``vmruntime.images.pull`` against ``skopeo copy``, on a realistic image.

Not a test: it prints timings and ratios measured in the same run, on this machine.

What it does, once per run, in one temporary directory (removed at the end unless
``--keep``):

1. builds an OCI image layout of three gzip (level 6, like docker) layers made of
   real files of this host (``/usr/lib/<multiarch>``, ``/usr/share``,
   ``/usr/lib/python3*``: many small files, some big ones, symlinks and hard
   links), about ``--size-mb`` MB of uncompressed tar in total;
2. starts a real local registry (``tests/registry_support.LocalRegistry``) and
   pushes the image to it with ``push_layout``;
3. measures, ``--repeat`` times each, interleaved, and reports the median of:

   - ``skopeo copy docker://... oci:DIR`` into a fresh directory (the baseline:
     download and digest verification, no filesystem image);
   - ``vmruntime.images.pull`` into a fresh, empty ``ImageStore`` (download,
     digest and diff_id verification, EROFS build, fsyncs: the user-facing
     operation);
   - the download alone, through the pull's own public pieces
     (``RegistryClient.copy_blob`` into ``ImageStore.stage_blob``, verified,
     fsynced and committed, layers in parallel as the pull does);
   - gzip decompression plus the diff_id hash alone, layer after layer;
   - ``build_erofs_from_tar`` alone, on each layer's uncompressed tar read from a
     file, layer after layer.

``--profile`` then runs one more pull under ``py-spy`` (if installed) and prints
where its samples fall. See ``bench/README.md`` for what every line means.

Every process it starts (registry, skopeo, py-spy) is stopped before it exits,
also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import os
import platform
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn, ParamSpec, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

import samples  # noqa: E402  (bench/samples.py, beside this script)
from imagefactory import (  # noqa: E402
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    canonical_json,
    make_config,
    write_blob,
)
from registry_support import LocalRegistry, push_layout  # noqa: E402

from vmruntime.images import ImageStore, parse_reference  # noqa: E402
from vmruntime.images.ingest import no_progress  # noqa: E402
from vmruntime.images.manifest import (  # noqa: E402
    Descriptor,
    ImageManifest,
    parse_manifest_document,
)
from vmruntime.images.registry import RegistryClient  # noqa: E402
from vmruntime.images.streams import HashingReader, decompressed  # noqa: E402
from vmruntime.rootfs import pull  # noqa: E402
from vmruntime.rootfs.erofs import build_erofs_from_tar  # noqa: E402

MB = 1_000_000  # every "MB" printed is 10**6 bytes
REPO = "bench/pull"
TAG = "latest"
GZIP_LEVEL = 6  # docker's (and containerd's) default
PARALLEL_DOWNLOADS = 3  # what vmruntime.images.ingest uses for layers

P = ParamSpec("P")
T = TypeVar("T")


# --- building the image ---------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One layer: host directories to copy (in sorted order) and its share of the size."""

    name: str
    roots: tuple[Path, ...]
    share: float


def layer_specs() -> tuple[LayerSpec, ...]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    pythons = tuple(sorted(p for p in Path("/usr/lib").glob("python3*") if p.is_dir()))
    return (
        LayerSpec("libs", (Path("/usr/lib") / multiarch,), 0.5),
        LayerSpec("share", (Path("/usr/share"),), 0.3),
        LayerSpec("python", pythons, 0.2),
    )


@dataclass
class LayerStats:
    """What went into one layer."""

    name: str
    tar_path: Path
    diff_id: str = ""
    tar_size: int = 0
    digest: str = ""
    blob_size: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    largest_file: int = 0
    build_seconds: list[float] = field(default_factory=list)  # (c), one per repetition

    @property
    def entries(self) -> int:
        return self.files + self.dirs + self.symlinks + self.hardlinks


@dataclass
class BuiltImage:
    layout: Path
    layers: list[LayerStats]
    config_size: int
    seconds: float

    @property
    def uncompressed(self) -> int:
        return sum(layer.tar_size for layer in self.layers)

    @property
    def compressed(self) -> int:
        """Bytes of every blob a pull transfers: layers plus config."""
        return sum(layer.blob_size for layer in self.layers) + self.config_size


class _HashingSink:
    """A write-only file that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _TarTee:
    """Where tarfile writes: the uncompressed tar file and the gzip blob, in one pass."""

    def __init__(self, tar_sink: _HashingSink, gz: gzip.GzipFile) -> None:
        self.tar_sink = tar_sink
        self.gz = gz

    def write(self, data: bytes) -> int:
        self.tar_sink.write(data)
        self.gz.write(data)
        return len(data)


def _walk(root: Path) -> Iterator[Path]:
    """``root`` and everything below it, depth first, names sorted, symlinks not followed."""
    yield root
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))
        else:
            yield Path(entry.path)


def build_layer(spec: LayerSpec, budget: int, workdir: Path, blob_tmp: Path) -> LayerStats:
    """Tar ``spec.roots`` until the tar reaches ``budget`` bytes; write tar and gzip blob.

    Regular files larger than a quarter of the budget are skipped (so one huge
    library does not make up a layer). The size check happens before tarfile
    sees a file, so hard links always point at a member already in the tar.
    """
    stats = LayerStats(spec.name, workdir / f"{spec.name}.tar")
    max_file = max(budget // 4, MB)
    added: set[str] = set()
    with (
        open(stats.tar_path, "wb") as tar_raw,
        open(blob_tmp, "wb") as blob_raw,
    ):
        tar_sink, blob_sink = _HashingSink(tar_raw), _HashingSink(blob_raw)
        gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=blob_sink, compresslevel=GZIP_LEVEL, mtime=0
        )
        tee = _TarTee(tar_sink, gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:

            def add(path: Path) -> None:
                arcname = path.relative_to("/").as_posix()
                if arcname in added:
                    return
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_size > max_file:
                    return
                try:
                    info = tar.gettarinfo(str(path), arcname)
                except OSError:
                    return
                if info is None:  # sockets
                    return
                info.uname = info.gname = ""
                added.add(arcname)
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                    stats.files += 1
                    stats.largest_file = max(stats.largest_file, info.size)
                else:
                    tar.addfile(info)
                    stats.dirs += info.isdir()
                    stats.symlinks += info.issym()
                    stats.hardlinks += info.islnk()

            for root in spec.roots:
                for ancestor in reversed(root.parents[:-1]):  # usr, usr/lib (not "/")
                    add(ancestor)
                for path in _walk(root):
                    if tar_sink.size >= budget:
                        break
                    add(path)
        gz.close()
        blob_sink.flush()
    stats.diff_id, stats.tar_size = tar_sink.digest, tar_sink.size
    stats.digest, stats.blob_size = blob_sink.digest, blob_sink.size
    return stats


def build_image(workdir: Path, size_mb: float) -> BuiltImage:
    """An OCI layout at ``workdir/layout`` tagged ``TAG``; tars kept in ``workdir/tars``."""
    started = time.monotonic()
    layout = workdir / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tars = workdir / "tars"
    tars.mkdir()
    layers = []
    for spec in layer_specs():
        budget = int(size_mb * MB * spec.share)
        stats = build_layer(spec, budget, tars, blobs / f"tmp-{spec.name}")
        (blobs / f"tmp-{spec.name}").rename(blobs / stats.digest.split(":", 1)[1])
        layers.append(stats)
    config = make_config([layer.diff_id for layer in layers])
    config_digest = write_blob(layout, config)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.blob_size}
                for layer in layers
            ],
        }
    )
    manifest_digest = write_blob(layout, manifest)
    (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    descriptor = {
        "mediaType": OCI_MANIFEST,
        "digest": manifest_digest,
        "size": len(manifest),
        "annotations": {REF_NAME_ANNOTATION: TAG},
    }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}
    (layout / "index.json").write_bytes(canonical_json(index))
    return BuiltImage(layout, layers, len(config), time.monotonic() - started)


# --- the measurements -------------------------------------------------------------------


class Samples(samples.Samples):
    def line(self) -> str:
        runs = ", ".join(f"{s:.2f}" for s in self.seconds)
        return f"  {self.label:<48} median {self.median:7.2f} s   (runs: {runs})"


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _timed(action: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[float, T]:
    """(wall seconds, result) of ``action(*args)``, started with no dirty pages around."""
    os.sync()  # what the previous measurement left to write back is not ours (untimed)
    started = time.perf_counter()
    result = action(*args, **kwargs)
    return time.perf_counter() - started, result


def run_skopeo(ref: str, dest: Path) -> None:
    cmd = ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}:{TAG}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy failed ({result.returncode}): {result.stderr}")


def run_pull(ref: str, cache: Path, expect_bytes: int) -> list[Path]:
    record = pull(ref, store=ImageStore(cache))
    assert record.report is not None
    if record.report.bytes_fetched != expect_bytes:
        raise RuntimeError(
            f"pull fetched {record.report.bytes_fetched} bytes, expected {expect_bytes}"
        )
    return list(record.layer_paths)


def run_download_only(ref: str, cache: Path) -> None:
    """The pull's download half: same client, same sink, same checks, no unpacking."""
    reference = parse_reference(ref)
    store = ImageStore(cache)
    client = RegistryClient(reference)
    body, content_type, _ = client.get_manifest(reference.manifest_ref)
    manifest = parse_manifest_document(body, f"manifest of {ref}", content_type)
    assert isinstance(manifest, ImageManifest)

    def fetch(desc: Descriptor) -> None:
        with store.stage_blob(desc.digest, desc.size, f"blob {desc.digest}") as staged:
            client.copy_blob(desc, staged, no_progress(desc, "bench"))
            staged.commit()  # size + sha256 check, fsync, rename, directory fsync

    fetch(manifest.config)
    with ThreadPoolExecutor(max_workers=PARALLEL_DOWNLOADS) as pool:
        list(pool.map(fetch, manifest.layers))


def run_decompress_only(blob_paths: list[Path], diff_ids: list[str]) -> None:
    """gunzip + sha256 of the uncompressed stream, as the pull's diff_id check does it."""
    for path, diff_id in zip(blob_paths, diff_ids, strict=True):
        with open(path, "rb") as raw:
            reader = HashingReader(decompressed(raw, diff_id))
            reader.drain()
        if reader.digest != diff_id:
            raise RuntimeError(f"{path}: diff_id {reader.digest} != {diff_id}")


def run_builds(layers: list[LayerStats], out_dir: Path) -> list[Path]:
    """``build_erofs_from_tar`` on each layer's tar file, as the pull calls it.

    The tar files are the ones the image was made from: byte for byte the layers'
    uncompressed streams (their sha256 are the config's diff_ids). Each layer's
    time is appended to its ``build_seconds``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = []
    for layer in layers:
        dest = out_dir / f"{layer.diff_id.split(':', 1)[1]}.erofs"
        started = time.perf_counter()
        with open(layer.tar_path, "rb") as tar:
            build_erofs_from_tar(tar, dest, layer=layer.digest)
        layer.build_seconds.append(time.perf_counter() - started)
        outputs.append(dest)
    return outputs


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- profiling --------------------------------------------------------------------------

# A sample goes to the category of its innermost frame that matches a needle; the
# native frames (py-spy --native) tell GIL waits, garbage collection and idle workers
# apart from work.
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (worker waiting for a task)", ("SimpleQueue_get",)),
    ("waiting for / handing over the GIL", ("pthread_cond_timedwait", "pthread_cond_signal")),
    ("garbage collection", ("gc_collect",)),
    ("fsync", ("fsync",)),
    ("sha256 hashing", ("EVP_", "sha256", "SHA256", "hash.update")),
    ("gzip decompression (zlib)", ("gzip.py", "_compression.py", "zlib", "inflate")),
    ("download loop (HTTP receive)", ("socket.py", "urllib3", "requests/", "registry.py")),
    ("download loop (blob file writes)", ("store.py",)),
    ("tar parsing (tarfile)", ("tarfile.py",)),
    ("EROFS building and writing", ("erofs.py",)),
)


def _classify(stack: list[str]) -> str:
    for frame in reversed(stack):
        for category, needles in _CATEGORIES:
            if any(needle in frame for needle in needles):
                return category
    return "other"


_PROFILE_HZ = 100


def profile_pull(ref: str, cache: Path, out: Path, expect_bytes: int) -> None:
    """One more pull under ``py-spy record`` (raw collapsed stacks); prints a breakdown."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        print("profile: py-spy not found (pip install py-spy into the venv); skipped")
        return
    cmd = [spy, "record", "--pid", str(os.getpid()), "--rate", str(_PROFILE_HZ)]
    cmd += ["--format", "raw", "--threads", "--native", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # let py-spy attach
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            print(f"profile: py-spy exited: {err.decode(errors='replace')[-500:]}")
            return
        seconds, _ = _timed(run_pull, ref, cache, expect_bytes)
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if not out.exists():
        print(f"profile: py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        return
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in out.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack_text.split(";")
        thread = "layer threads" if "layer" in frames[0] else "main thread"
        per_thread[thread][_classify(frames)] += int(count)
    print(
        f"profile: one pull under py-spy took {seconds:.2f} s (py-spy stops the process to "
        f"take each sample, so it runs slower: read the shares); raw stacks: {out}"
    )
    for thread, counter in sorted(per_thread.items()):
        total = sum(counter.values())
        print(f"  {thread}: {total} samples ({total / _PROFILE_HZ:.2f} s py-spy saw as active)")
        for category, count in counter.most_common():
            print(f"    {category:<36} {count / _PROFILE_HZ:6.2f} s  {100 * count / total:5.1f}%")


# --- main -------------------------------------------------------------------------------


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "missing"
    return out.strip().split()[-1] if out.strip() else "unknown"


def _raise_exit(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=240.0, help="uncompressed image size")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where to make it")
    parser.add_argument("--profile", action="store_true", help="profile one extra pull with py-spy")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0:
        parser.error("--repeat must be >= 1 and --size-mb > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    if shutil.which("skopeo") is None:
        print("skopeo is missing: apt-get install skopeo", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vmr-bench-pull-", dir=args.tmp_dir))
    try:
        return _run(args, work)
    finally:  # the registry is already stopped: _run holds it in a with block
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    env = (
        f"cpus={len(os.sched_getaffinity(0))} python={platform.python_version()} "
        f"skopeo={_tool_version(['skopeo', '--version'])}"
    )
    print(
        f"environment: {env} "
        f"registry={_tool_version(['/usr/bin/docker-registry', '--version'])} "
        f"kernel={platform.release()} machine={platform.machine()}"
    )
    print(f"building a ~{args.size_mb:g} MB image from this host's /usr in {work} ...")
    image = build_image(work, args.size_mb)
    for layer in image.layers:
        print(
            f"  layer {layer.name:<7} {layer.tar_size / MB:7.1f} MB tar -> "
            f"{layer.blob_size / MB:6.1f} MB gzip; {layer.files} files "
            f"(largest {layer.largest_file / MB:.1f} MB), {layer.dirs} dirs, "
            f"{layer.symlinks} symlinks, {layer.hardlinks} hard links"
        )
    print(
        f"  image: {image.uncompressed / MB:.1f} MB uncompressed, "
        f"{image.compressed / MB:.1f} MB of blobs, built in {image.seconds:.1f} s"
    )

    with LocalRegistry(base_dir=work / "registry") as registry:
        started = time.monotonic()
        push_layout(registry, image.layout, REPO, TAG)
        ref = f"{registry.host}/{REPO}:{TAG}"
        print(f"pushed to {ref} in {time.monotonic() - started:.1f} s")
        return _measure(args, work, image, ref, env)


def _measure(args: argparse.Namespace, work: Path, image: BuiltImage, ref: str, env: str) -> int:
    skopeo = Samples("(a) skopeo copy docker:// -> oci:")
    skopeo_sync = Samples("    skopeo copy, then sync (made durable)")
    vmr = Samples("(b) vmruntime pull into an empty cache")
    download = Samples("    download only (pull's client + sink)")
    decompress = Samples("    gunzip + diff_id sha256 only")
    build = Samples("(c) build_erofs_from_tar only (from tar files)")
    blob_paths = [image.layout / "blobs" / "sha256" / x.digest.split(":")[1] for x in image.layers]
    diff_ids = [layer.diff_id for layer in image.layers]
    identical: bool | None = None
    scratch = work / "scratch"
    scratch.mkdir()
    for rep in range(args.repeat):
        print(f"repetition {rep + 1}/{args.repeat} ...", flush=True)
        dest = _fresh(scratch / "skopeo")
        seconds, _ = _timed(run_skopeo, ref, dest)
        sync_started = time.perf_counter()
        os.sync()  # what skopeo left in the page cache, written out
        skopeo.seconds.append(seconds)
        skopeo_sync.seconds.append(seconds + time.perf_counter() - sync_started)
        _fresh(dest)

        cache = _fresh(scratch / "cache")
        seconds, pulled = _timed(run_pull, ref, cache, image.compressed)
        vmr.seconds.append(seconds)
        pulled_hashes = [_sha256_file(p) for p in pulled] if identical is None else []
        _fresh(cache)

        cache = _fresh(scratch / "download")
        download.seconds.append(_timed(run_download_only, ref, cache)[0])
        _fresh(cache)

        decompress.seconds.append(_timed(run_decompress_only, blob_paths, diff_ids)[0])

        out = _fresh(scratch / "erofs")
        seconds, built = _timed(run_builds, image.layers, out)
        build.seconds.append(seconds)
        if identical is None:
            identical = pulled_hashes == [_sha256_file(p) for p in built]
        _fresh(out)

    print(f"results, {args.repeat} repetition(s), wall time:")
    for measured in (skopeo, skopeo_sync, vmr, download, decompress, build):
        print(measured.line())
    print(f"  EROFS images from (c) byte-identical to the pull's: {'yes' if identical else 'NO'}")

    blob_mb, tar_mb = image.compressed / MB, image.uncompressed / MB
    vmr_rate, skopeo_rate = blob_mb / vmr.median, blob_mb / skopeo.median
    print(
        f"pull throughput: vmruntime {vmr_rate:.1f} MB/s, skopeo {skopeo_rate:.1f} MB/s, "
        f"ratio {vmr_rate / skopeo_rate:.2f} (goal >= 1.0)"
    )
    print(
        f"erofs build: {1000 * build.median / tar_mb:.1f} ms per MB of uncompressed layer "
        f"({tar_mb / build.median:.1f} MB/s)"
    )
    for layer in image.layers:
        seconds = statistics.median(layer.build_seconds)
        print(
            f"  layer {layer.name:<7} {layer.tar_size / MB:6.1f} MB, {layer.entries:5d} entries: "
            f"{seconds:.2f} s = {1000 * seconds / (layer.tar_size / MB):5.1f} ms/MB, "
            f"{1e6 * seconds / layer.entries:4.0f} us/entry"
        )
    print(
        f"download only (measured): {download.median:.2f} s, {blob_mb / download.median:.1f} MB/s"
        f" = {skopeo.median / download.median:.2f} x skopeo's rate; gunzip + diff_id: "
        f"{decompress.median:.2f} s ({tar_mb / decompress.median:.1f} MB/s uncompressed)"
    )
    print(
        f"pull minus build (estimate, (b) - (c)): {vmr.median - build.median:.2f} s; "
        f"build is {100 * build.median / vmr.median:.0f}% of the pull's wall time"
    )
    print(
        f"summary: {env} image={tar_mb:.0f}MB tar/"
        f"{blob_mb:.0f}MB gzip x{len(image.layers)} layers repeat={args.repeat}: "
        f"vmruntime {vmr.median:.2f} s vs skopeo {skopeo.median:.2f} s, "
        f"ratio {vmr_rate / skopeo_rate:.2f}, erofs {tar_mb / build.median:.0f} MB/s"
    )
    if args.profile:
        profile_pull(ref, _fresh(scratch / "profile"), work / "pull.pyspy.txt", image.compressed)
        _fresh(scratch / "profile")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main's finally blocks have stopped and removed everything
        print("interrupted", file=sys.stderr)
        sys.exit(130)
