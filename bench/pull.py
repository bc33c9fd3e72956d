"""Benchmark: vmruntime's pulls against peers doing the same work, on a realistic image.

Not a test: it prints timings and ratios measured in the same run, on this machine.

What it does, once per run, in one temporary directory (removed at the end unless
``--keep``):

1. builds an OCI image layout of three gzip (level 6, like docker) layers made of
   real files of this host (``/usr/lib/<multiarch>``, ``/usr/share``,
   ``/usr/lib/python3*``: many small files, some big ones, symlinks and hard
   links), about ``--size-mb`` MB of uncompressed tar in total;
2. starts a real local registry (``tests/registry_support.LocalRegistry``, Debian's
   ``docker-registry`` on 127.0.0.1) and pushes the image to it;
3. finds the peers (``bench/setup-peers.sh`` installs them), and tries podman on a
   tiny image to pick its storage driver, or to say why it cannot run here;
4. measures two comparisons, ``--repeat`` times each step, interleaved, every step
   into a fresh directory and checked afterwards (untimed) to have made what it
   should, so a broken step cannot look fast:

   - **download and verify only**: ``vmruntime.images.pull`` without a layer handler
     (blobs downloaded, digest and size checked, fsynced, renamed) against
     ``skopeo copy docker://... oci:DIR`` (the same, into an OCI layout);
   - **the full pull to a bootable cache entry**: ``vmruntime.rootfs.pull`` (the
     above, plus each layer decompressed once, its diff_id checked and its EROFS
     image written, in the same pass) against ``skopeo copy`` followed by ``umoci
     unpack`` (timed together: a root filesystem on disk), and against ``podman
     pull`` into a private storage root (layers unpacked into its storage driver);

   and, to show where our full pull's time goes, gunzip + diff_id alone and
   ``build_erofs_from_tar`` alone, layer after layer, from local files.

Each ratio is peer time / our time within one repetition (our rate / the peer's
rate: above 1 we are faster), given as median, min and max over the repetitions.
``--profile`` then runs one more full pull under ``py-spy`` (if installed) and prints
where its samples fall. See ``bench/README.md`` for what every line means.

Every process it starts (registry, skopeo, umoci, podman and anything podman
leaves behind, py-spy, our unpack workers) is gone before it exits, also on Ctrl-C,
SIGTERM and errors: it is their subreaper and checks for leftover children at the end.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import stat
import statistics
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

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
    file,
    make_config,
    make_layer_tar,
    write_blob,
    write_oci_layout,
)
from registry_support import LocalRegistry, push_layout  # noqa: E402

from vmruntime import images, rootfs  # noqa: E402
from vmruntime._streams import HashingReader, decompressed  # noqa: E402
from vmruntime.images import ImageRecord, ImageStore  # noqa: E402
from vmruntime.rootfs.erofs import build_erofs_from_tar  # noqa: E402

BenchError = samples.BenchError
MB = 1_000_000  # every "MB" printed is 10**6 bytes
REPO = "bench/pull"
PROBE_REPO = "bench/podman-probe"
TAG = "latest"
GZIP_LEVEL = 6  # docker's (and containerd's) default
PEER_TIMEOUT = 1800.0  # seconds; a peer step taking longer is broken, not slow
SETUP_HINT = "bench/setup-peers.sh installs it"
PushMethod = Literal["skopeo", "http"]  # how push_layout puts the image in the registry


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
    # The last regular file added, (path in the layer, size): an unpacker that stopped
    # early would miss it, so the peers' unpacked trees are checked for it.
    last_file: tuple[str, int] = ("", 0)
    build_seconds: list[float] = field(default_factory=list)  # one per repetition

    @property
    def entries(self) -> int:
        return self.files + self.dirs + self.symlinks + self.hardlinks


@dataclass
class BuiltImage:
    layout: Path
    layers: list[LayerStats]
    config_digest: str
    config_size: int
    seconds: float

    def blobs(self) -> list[tuple[str, int]]:
        """(digest, size) of every blob a pull transfers: the config and the layers."""
        return [(self.config_digest, self.config_size)] + [
            (layer.digest, layer.blob_size) for layer in self.layers
        ]

    def blob_path(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]

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
                    stats.last_file = (arcname, info.size)
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
    return BuiltImage(layout, layers, config_digest, len(config), time.monotonic() - started)


# --- the peers --------------------------------------------------------------------------


def _tool_version(path: str | None) -> str:
    if path is None:
        return "missing"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.split()[-1] if out.stdout.strip() else "unknown"


@dataclass(frozen=True)
class Peers:
    """Where each peer tool is on PATH (None: missing)."""

    skopeo: str | None
    umoci: str | None
    podman: str | None

    @classmethod
    def find(cls) -> Peers:
        return cls(shutil.which("skopeo"), shutil.which("umoci"), shutil.which("podman"))


def run_tool(cmd: list[str], timeout: float = PEER_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``cmd`` to its end (killed on timeout, Ctrl-C or SIGTERM: subprocess.run does that)."""
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def run_peer(cmd: list[str]) -> None:
    """A timed peer command; a failure stops the run (a failed step must not count)."""
    result = run_tool(cmd)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr[-1500:]}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


# podman's default as root first (what users get); vfs, which needs no kernel overlayfs,
# only if overlay cannot work here.
PODMAN_DRIVERS = ("overlay", "vfs")


@dataclass(frozen=True)
class Podman:
    """podman with all its state private to one step: storage (``--root``) and libpod's
    tmpdir in the step's directory, its run root in ``run_dir``, so removing those resets
    podman and nothing of the machine's own podman (or of another run) is read or written.

    The run root is apart because the overlay driver refuses one longer than 50
    characters; root's default is on tmpfs (/run) too.
    """

    exe: str
    driver: str
    run_dir: Path

    def runroot(self, state: Path) -> Path:
        return self.run_dir / state.name

    def command(self, state: Path, *args: str) -> list[str]:
        return [
            self.exe,
            *("--root", str(state / "root"), "--runroot", str(self.runroot(state))),
            *("--tmpdir", str(state / "tmp"), "--storage-driver", self.driver),
            *args,
        ]

    def clear(self, state: Path) -> None:
        clear(state)
        clear(self.runroot(state))

    def pull_command(self, state: Path, ref: str) -> list[str]:
        return self.command(state, "pull", "--tls-verify=false", ref)

    def layer_dirs(self, state: Path) -> list[Path]:
        """Where this driver keeps each layer's files (vfs: each layer's whole tree)."""
        if self.driver == "overlay":
            return [d / "diff" for d in (state / "root" / "overlay").glob("*") if d.name != "l"]
        return list((state / "root" / "vfs" / "dir").glob("*"))


@dataclass(frozen=True)
class PodmanProbe:
    """What trying podman here found: the driver that works (if any), and why others did not."""

    podman: Podman | None
    failures: tuple[str, ...]


def short_run_dir() -> Path:
    """A new directory with a short path for podman's run roots (removed by the caller)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") if os.geteuid() else "/run"
    base = runtime if runtime and os.access(runtime, os.W_OK) else "/tmp"
    return Path(tempfile.mkdtemp(prefix="vmr-pm-", dir=base))


def probe_podman(
    exe: str, registry: LocalRegistry, work: Path, run_dir: Path, push_method: PushMethod
) -> PodmanProbe:
    """Pull a one-file image with each driver in turn, up to the first one that works."""
    layout = work / "probe-layout"
    write_oci_layout(layout, [make_layer_tar([file("probe.txt", b"probe\n")])], tag=TAG)
    push_layout(registry, layout, PROBE_REPO, TAG, method=push_method)
    ref = f"{registry.host}/{PROBE_REPO}:{TAG}"
    failures = []
    for driver in PODMAN_DRIVERS:
        podman, state = Podman(exe, driver, run_dir), work / f"podman-probe-{driver}"
        try:
            pulled = run_tool(podman.pull_command(state, ref), timeout=300)
            if pulled.returncode != 0:
                failures.append(f"{driver}: {_last_line(pulled.stderr)}")
            elif not any((d / "probe.txt").is_file() for d in podman.layer_dirs(state)):
                failures.append(f"{driver}: pulled, but the layer's file is not in its storage")
            else:
                return PodmanProbe(podman, tuple(failures))
        except subprocess.TimeoutExpired:
            failures.append(f"{driver}: no answer in 300 s")
        finally:
            podman.clear(state)
    return PodmanProbe(None, tuple(failures))


# --- directories ------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (mountinfo escapes spaces and such as \\ooo)."""
    prefix = str(path.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), point)
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


LEFT_MOUNTED: list[str] = []  # what a step left mounted (podman's drivers mount)


def clear(path: Path) -> Path:
    """Remove ``path``: first unmount anything a tool left mounted below it, deepest
    first (rmtree would otherwise delete the mounted files), noted in LEFT_MOUNTED."""
    if path.exists():
        for point in sorted(_mounts_under(path), reverse=True):
            LEFT_MOUNTED.append(point)
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)
    return path


# --- the steps --------------------------------------------------------------------------


class Samples(samples.Samples):
    def spread(self) -> str:
        return f"{self.median:6.2f} s ({self.low:.2f}..{self.high:.2f})"

    def spread_ratio(self) -> str:
        return f"{self.median:5.2f} ({self.low:.2f}..{self.high:.2f})"


@dataclass
class Step:
    """One measured operation: ``action(dest)`` timed, then ``check(dest, result)``
    untimed, which raises BenchError unless the action really made what it should."""

    key: str  # short name, for the progress lines
    label: str
    action: Callable[[Path], object]
    check: Callable[[Path, object], None]
    # Removes what the step made, before and after it (and anything a tool left mounted).
    reset: Callable[[Path], object] = clear
    plain: Samples = field(default_factory=lambda: Samples(""))
    durable: Samples = field(default_factory=lambda: Samples(""))  # plus the sync() after it


_EROFS_MAGIC = 0xE0F5E1E2  # little-endian u32 at byte 1024, the superblock
_EROFS_SUPERBLOCK = 1024


def _is_erofs(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(_EROFS_SUPERBLOCK)
        head = f.read(4)
    return len(head) == 4 and struct.unpack("<I", head)[0] == _EROFS_MAGIC


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PullBench:
    """The steps, their checks, and what the checks learn (the pull's EROFS hashes)."""

    def __init__(self, image: BuiltImage, ref: str, peers: Peers, podman: Podman | None) -> None:
        self.image, self.ref, self.peers, self.podman = image, ref, peers, podman
        self.pulled_erofs: list[str] | None = None  # sha256 of the first full pull's images
        self.identical: bool | None = None  # the build step's images == the pull's

    def steps(self) -> list[Step]:
        """Every step the tools here allow, in the order each repetition runs them."""
        steps = [Step("ours-blobs", "vmruntime.images.pull, no layer handler",
                      self.images_pull, self.check_images_pull)]  # fmt: skip
        if self.peers.skopeo:
            steps.append(Step("skopeo", "skopeo copy docker:// -> oci:",
                              self.skopeo_copy, self.check_skopeo))  # fmt: skip
        steps.append(Step("ours-full", "vmruntime.rootfs.pull (EROFS per layer)",
                          self.bootable_pull, self.check_bootable_pull))  # fmt: skip
        if self.peers.skopeo and self.peers.umoci:
            steps.append(Step("umoci", "skopeo copy + umoci unpack",
                              self.skopeo_umoci, self.check_umoci))  # fmt: skip
        if self.podman:
            steps.append(Step("podman", f"podman pull ({self.podman.driver}, private root)",
                              self.podman_pull, self.check_podman, self.podman.clear))  # fmt: skip
        steps.append(Step("gunzip", "gunzip + diff_id sha256 only",
                          self.decompress_only, lambda dest, result: None))  # fmt: skip
        steps.append(Step("erofs", "build_erofs_from_tar only (tar files)",
                          self.build_only, self.check_build))  # fmt: skip
        return steps

    # ours

    def images_pull(self, dest: Path) -> ImageRecord:
        return images.pull(self.ref, store=ImageStore(dest))

    def check_images_pull(self, dest: Path, record: object) -> None:
        assert isinstance(record, ImageRecord)
        self._check_store(dest, record, "images.pull")
        if record.layer_paths:
            raise BenchError(f"images.pull without a handler made layers: {record.layer_paths}")

    def bootable_pull(self, dest: Path) -> ImageRecord:
        return rootfs.pull(self.ref, store=ImageStore(dest))

    def check_bootable_pull(self, dest: Path, record: object) -> None:
        assert isinstance(record, ImageRecord)
        self._check_store(dest, record, "rootfs.pull")
        paths = list(record.layer_paths)
        if len(paths) != len(self.image.layers):
            raise BenchError(f"rootfs.pull: {len(paths)} layer images, not one per layer")
        for path in paths:
            if not path.is_relative_to(dest) or not path.is_file() or not _is_erofs(path):
                raise BenchError(f"rootfs.pull: {path} is not an EROFS image in the fresh cache")
        if self.pulled_erofs is None:
            self.pulled_erofs = [_sha256_file(p) for p in paths]

    def _check_store(self, dest: Path, record: ImageRecord, what: str) -> None:
        fetched = record.report.bytes_fetched if record.report else 0
        if fetched != self.image.compressed:
            raise BenchError(f"{what} fetched {fetched} bytes, expected {self.image.compressed}")
        store = ImageStore(dest)
        for digest, size in [*self.image.blobs(), (record.manifest_digest, None)]:
            path = store.blob_path(digest)
            if not path.is_file() or (size is not None and path.stat().st_size != size):
                raise BenchError(f"{what}: blob {digest} missing or of the wrong size")

    # skopeo, umoci, podman

    def skopeo_copy(self, dest: Path) -> None:
        assert self.peers.skopeo
        src, out = f"docker://{self.ref}", f"oci:{dest}:{TAG}"
        run_peer([self.peers.skopeo, "copy", "--src-tls-verify=false", src, out])

    def check_skopeo(self, dest: Path, result: object) -> None:
        index = json.loads((dest / "index.json").read_text())
        tags = [m.get("annotations", {}).get(REF_NAME_ANNOTATION) for m in index["manifests"]]
        if TAG not in tags:
            raise BenchError(f"skopeo copy: {dest}/index.json has no {TAG!r}: {tags}")
        for digest, size in self.image.blobs():
            path = dest / "blobs" / "sha256" / digest.split(":", 1)[1]
            if not path.is_file() or path.stat().st_size != size:
                raise BenchError(f"skopeo copy: blob {digest} missing or of the wrong size")

    def skopeo_umoci(self, dest: Path) -> None:
        assert self.peers.umoci
        dest.mkdir()  # skopeo makes its layout directory, but not the parents
        self.skopeo_copy(dest / "oci")
        # umoci as root keeps owners; not as root it needs --rootless to unpack at all.
        rootless = [] if os.geteuid() == 0 else ["--rootless"]
        image, bundle = f"{dest / 'oci'}:{TAG}", str(dest / "bundle")
        run_peer([self.peers.umoci, "unpack", *rootless, "--image", image, bundle])

    def check_umoci(self, dest: Path, result: object) -> None:
        self.check_skopeo(dest / "oci", result)
        self._check_trees("skopeo + umoci", [dest / "bundle" / "rootfs"])

    def podman_pull(self, dest: Path) -> None:
        assert self.podman
        run_peer(self.podman.pull_command(dest, self.ref))

    def check_podman(self, dest: Path, result: object) -> None:
        assert self.podman
        exists = run_tool(self.podman.command(dest, "image", "exists", self.ref), timeout=120)
        if exists.returncode != 0:
            raise BenchError(f"podman pull: the image is not in its storage: {exists.stderr}")
        self._check_trees("podman pull", self.podman.layer_dirs(dest))

    def _check_trees(self, what: str, roots: list[Path]) -> None:
        """Each layer's last file is somewhere in ``roots``, complete."""
        for layer in self.image.layers:
            name, size = layer.last_file
            found = [r / name for r in roots if (r / name).is_file()]
            if not any(path.stat().st_size == size for path in found):
                raise BenchError(f"{what}: {name} ({size} bytes) of layer {layer.name} missing")

    # the parts of our full pull, alone

    def decompress_only(self, dest: Path) -> None:
        """gunzip + sha256 of the uncompressed stream, as the pull's diff_id check does it."""
        for layer in self.image.layers:
            path = self.image.blob_path(layer.digest)
            with open(path, "rb") as raw:
                reader = HashingReader(decompressed(raw, layer.digest))
                reader.drain()
            if reader.digest != layer.diff_id:
                raise BenchError(f"{path}: diff_id {reader.digest} != {layer.diff_id}")

    def build_only(self, dest: Path) -> list[Path]:
        """``build_erofs_from_tar`` on each layer's tar file, as the pull calls it.

        The tar files are the ones the image was made from: byte for byte the layers'
        uncompressed streams (their sha256 are the config's diff_ids). Each layer's
        time is appended to its ``build_seconds``.
        """
        dest.mkdir(parents=True)
        outputs = []
        for layer in self.image.layers:
            out = dest / f"{layer.diff_id.split(':', 1)[1]}.erofs"
            started = time.perf_counter()
            with open(layer.tar_path, "rb") as tar:
                build_erofs_from_tar(tar, out, layer=layer.digest)
            layer.build_seconds.append(time.perf_counter() - started)
            outputs.append(out)
        return outputs

    def check_build(self, dest: Path, built: object) -> None:
        assert isinstance(built, list)
        if self.identical is None and self.pulled_erofs is not None:
            self.identical = self.pulled_erofs == [_sha256_file(p) for p in built]


def measure(steps: list[Step], repeat: int, scratch: Path) -> None:
    """Every step ``repeat`` times, interleaved, each into a fresh directory.

    ``os.sync()`` runs before each timed action (untimed), so no step pays for the
    write-back of an earlier one; the one right after it is timed separately (the
    ``durable`` samples: what the step left unwritten, written).
    """
    for rep in range(repeat):
        print(f"repetition {rep + 1}/{repeat}:", end="", flush=True)
        for step in steps:
            dest = scratch / step.key
            step.reset(dest)
            try:
                os.sync()
                started = time.perf_counter()
                result = step.action(dest)
                done = time.perf_counter()
                os.sync()
                synced = time.perf_counter()
                step.check(dest, result)
            finally:
                step.reset(dest)
            step.plain.seconds.append(done - started)
            step.durable.seconds.append(synced - started)
            print(f" {step.key} {done - started:.2f} s", end="", flush=True)
        print(flush=True)


# --- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Our step against one peer's: the ratio is peer time / our time, per repetition."""

    title: str
    ours: str  # Step.key
    peer: str
    peer_label: str


COMPARISONS = (
    Comparison("download + verify", "ours-blobs", "skopeo", "skopeo copy"),
    Comparison("full pull", "ours-full", "umoci", "skopeo copy + umoci unpack"),
    Comparison("full pull", "ours-full", "podman", "podman pull"),
)
GOAL = 1.0


def ratios(peer: Samples, ours: Samples) -> Samples:
    """Within each repetition (the steps ran close together): peer time / our time."""
    return Samples("", [p / o for p, o in zip(peer.seconds, ours.seconds, strict=True)])


def print_results(bench: PullBench, steps: dict[str, Step], repeat: int) -> None:
    image = bench.image
    blob_mb, tar_mb = image.compressed / MB, image.uncompressed / MB
    print(
        f"results, {repeat} repetition(s): wall time median (min..max); the median with "
        "the sync() right after the step; throughput of the median"
    )
    groups = (
        ("download and verify only", ("ours-blobs", "skopeo"), blob_mb, "MB/s of blobs"),
        ("full pull to a bootable cache entry", ("ours-full", "umoci", "podman"), blob_mb,
         "MB/s of blobs"),
        ("our full pull's parts alone, layer after layer, from local files",
         ("gunzip", "erofs"), tar_mb, "MB/s of tar"),
    )  # fmt: skip
    for title, keys, mb, unit in groups:
        print(f"  {title}:")
        for step in (steps[k] for k in keys if k in steps):
            print(
                f"    {step.label:<42} {step.plain.spread()}  +sync {step.durable.median:6.2f} s"
                f"  {mb / step.plain.median:6.1f} {unit}"
            )
    identical = {True: "yes", False: "NO", None: "not compared"}[bench.identical]
    print(f"  EROFS images of the build step byte-identical to the full pull's: {identical}")


def print_ratios(steps: dict[str, Step], skipped: dict[str, str]) -> list[str]:
    """The ratio lines; returns the short form of each for the summary."""
    print(f"ratios, peer time / our time per repetition (our rate / the peer's; > {GOAL:g}: "
          "we are faster): median (min..max)")  # fmt: skip
    short = []
    for c in COMPARISONS:
        what = f"  {c.title:<17} vs {c.peer_label:<28}"
        if c.peer not in steps:
            print(f"{what} skipped: {skipped.get(c.peer, 'not run')}")
            short.append(f"{c.title} vs {c.peer_label} skipped")
            continue
        r = ratios(steps[c.peer].plain, steps[c.ours].plain)
        verdict = "met" if r.median >= GOAL else "MISSED"
        print(f"{what} {r.spread_ratio()}  goal >= {GOAL:.1f}: {verdict}")
        short.append(f"{c.title} vs {c.peer_label} {r.median:.2f}")
    print("  made durable (each step's time plus the sync() right after it):")
    for c in COMPARISONS:
        if c.peer in steps:
            r = ratios(steps[c.peer].durable, steps[c.ours].durable)
            print(f"    {c.title:<17} vs {c.peer_label:<26} {r.spread_ratio()}")
    return short


def print_breakdown(steps: dict[str, Step], image: BuiltImage) -> None:
    """Where our full pull's time goes: the EROFS build per layer, and its share."""
    build, gunzip = steps["erofs"].plain.median, steps["gunzip"].plain.median
    full, tar_mb = steps["ours-full"].plain.median, image.uncompressed / MB
    print(
        f"erofs build: {1000 * build / tar_mb:.1f} ms per MB of uncompressed layer "
        f"({tar_mb / build:.1f} MB/s); alone, the build takes {100 * build / full:.0f}% of "
        f"the full pull's wall time, gunzip + diff_id {100 * gunzip / full:.0f}%"
    )
    for layer in image.layers:
        seconds = statistics.median(layer.build_seconds)
        print(
            f"  layer {layer.name:<7} {layer.tar_size / MB:6.1f} MB, {layer.entries:5d} entries: "
            f"{seconds:.2f} s = {1000 * seconds / (layer.tar_size / MB):5.1f} ms/MB, "
            f"{1e6 * seconds / layer.entries:4.0f} us/entry"
        )


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
    ("tar parsing (tarfile)", ("tarfile.py", "tarstream.py")),
    ("EROFS building and writing", ("erofs.py",)),
)


def _classify(stack: list[str]) -> str:
    # py-spy's process and thread frames name command lines and threads, not code (a
    # worker's command line holds a "sha256:" digest): only code frames count.
    code = [f for f in stack if not f.startswith(("process ", "thread "))]
    if any("<frozen importlib" in frame for frame in code):
        return "imports (a worker's start-up)"  # whatever the imported module runs
    for frame in reversed(code):
        for category, needles in _CATEGORIES:
            if any(needle in frame for needle in needles):
                return category
    return "other"


def _group(frames: list[str]) -> str:
    """Which part of the pull a sample is from: our process's threads, or a worker."""
    if any(f.startswith("process ") and "unpack_worker" in f for f in frames):
        return "unpack worker processes"
    if any(f.startswith("thread ") and "layer" in f for f in frames):
        return "layer threads"
    return "main thread"


_PROFILE_HZ = 100


def profile_pull(bench: PullBench, dest: Path, out: Path) -> None:
    """One more full pull under ``py-spy record`` (raw collapsed stacks, our process and
    its unpack workers); prints a breakdown."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        print("profile: py-spy not found (pip install py-spy into the venv); skipped")
        return
    cmd = [spy, "record", "--pid", str(os.getpid()), "--rate", str(_PROFILE_HZ)]
    cmd += ["--format", "raw", "--threads", "--native", "--subprocesses", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # let py-spy attach
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            print(f"profile: py-spy exited: {err.decode(errors='replace')[-500:]}")
            return
        started = time.perf_counter()
        record = bench.bootable_pull(dest)
        seconds = time.perf_counter() - started
    finally:
        err = _stop_spy(proc)
    try:
        bench.check_bootable_pull(dest, record)  # the profile of a broken pull would mislead
    finally:
        clear(dest)
    if not out.exists():
        print(f"profile: py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        return
    print_profile(out, seconds)


def _stop_spy(proc: subprocess.Popen[bytes]) -> bytes:
    """py-spy's stderr, once it has written its output (it does on SIGINT) and exited."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


def print_profile(out: Path, seconds: float) -> None:
    groups: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in out.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack_text.split(";")
        groups[_group(frames)][_classify(frames)] += int(count)
    print(
        f"profile: one full pull under py-spy took {seconds:.2f} s (py-spy stops the processes "
        f"to take each sample, so it runs slower: read the shares); raw stacks: {out}"
    )
    for group, counter in sorted(groups.items()):
        total = sum(counter.values())
        print(f"  {group}: {total} samples ({total / _PROFILE_HZ:.2f} s py-spy saw as active)")
        for category, count in counter.most_common():
            print(f"    {category:<36} {count / _PROFILE_HZ:6.2f} s  {100 * count / total:5.1f}%")


# --- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=240.0, help="uncompressed image size")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where to make it")
    parser.add_argument("--profile", action="store_true", help="profile one extra full pull")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0:
        parser.error("--repeat must be >= 1 and --size-mb > 0")
    return args


def bench_main(args: argparse.Namespace) -> int:
    # Whatever a peer daemonises (podman's pause process or conmon, say) becomes our
    # child when its parent exits, so the leftover check at the end sees it.
    samples.become_subreaper()
    if shutil.which("docker-registry") is None:
        print("docker-registry is missing: apt-get install docker-registry", file=sys.stderr)
        return 2
    peers = Peers.find()
    work = Path(tempfile.mkdtemp(prefix="vmr-bench-pull-", dir=args.tmp_dir))
    run_dir = short_run_dir() if peers.podman else None
    try:
        return run_bench(args, work, peers, run_dir)
    finally:  # the registry is already stopped: run_bench holds it in a with block
        if run_dir is not None:
            clear(run_dir)
        if args.keep:
            print(f"kept {work}")
        else:
            clear(work)
        if LEFT_MOUNTED:
            print(f"warning: steps left these mounted (unmounted): {LEFT_MOUNTED}")


def print_environment(peers: Peers) -> str:
    """The environment line; returns its short form for the summary."""
    user = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    env = (
        f"cpus={len(os.sched_getaffinity(0))} python={platform.python_version()} "
        f"skopeo={_tool_version(peers.skopeo)} umoci={_tool_version(peers.umoci)} "
        f"podman={_tool_version(peers.podman)}"
    )
    print(
        f"environment: {env} registry={_tool_version(shutil.which('docker-registry'))} "
        f"kernel={platform.release()} machine={platform.machine()} user={user} "
        f"load average={load_average()}"
    )
    return env


def print_image(image: BuiltImage) -> None:
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


def print_peers(peers: Peers, probe: PodmanProbe | None) -> dict[str, str]:
    """One line per peer: how it runs, or why it does not; returns the reasons."""
    skipped = {}
    if peers.skopeo is None:
        skipped["skopeo"] = skipped["umoci"] = f"skopeo is missing ({SETUP_HINT})"
    elif peers.umoci is None:
        skipped["umoci"] = f"umoci is missing ({SETUP_HINT})"
    if probe is None:
        skipped["podman"] = f"podman is missing ({SETUP_HINT})"
    elif probe.podman is None:
        skipped["podman"] = "podman cannot pull here: " + "; ".join(probe.failures)
    mode = "umoci unpack" if os.geteuid() == 0 else "umoci unpack --rootless (not root)"
    print("peers:")
    print(f"  skopeo copy:                {skipped.get('skopeo', 'skopeo copy docker:// -> oci:')}")
    print(f"  skopeo copy + umoci unpack: {skipped.get('umoci', mode)}")
    if probe is not None and probe.podman is not None:
        tried = f"; tried first: {'; '.join(probe.failures)}" if probe.failures else ""
        print(
            f"  podman pull:                storage driver {probe.podman.driver}, private "
            f"--root, --runroot and --tmpdir, removed after each pull (a probe pull worked{tried})"
        )
    else:
        print(f"  podman pull:                skipped: {skipped['podman']}")
    return skipped


def run_bench(args: argparse.Namespace, work: Path, peers: Peers, run_dir: Path | None) -> int:
    env = print_environment(peers)
    print(f"building a ~{args.size_mb:g} MB image from this host's /usr in {work} ...")
    image = build_image(work, args.size_mb)
    print_image(image)
    # skopeo pushes OCI layouts as they are; without it, plain registry API calls do.
    push_method: PushMethod = "skopeo" if peers.skopeo else "http"
    with LocalRegistry(base_dir=work / "registry") as registry:
        started = time.monotonic()
        push_layout(registry, image.layout, REPO, TAG, method=push_method)
        ref = f"{registry.host}/{REPO}:{TAG}"
        print(f"pushed to {ref} in {time.monotonic() - started:.1f} s")
        probe = None
        if peers.podman and run_dir:
            probe = probe_podman(peers.podman, registry, work, run_dir, push_method)
        skipped = print_peers(peers, probe)
        bench = PullBench(image, ref, peers, probe.podman if probe else None)
        steps = bench.steps()
        scratch = work / "scratch"
        scratch.mkdir()
        measure(steps, args.repeat, scratch)
        by_key = {step.key: step for step in steps}
        print_results(bench, by_key, args.repeat)
        short = print_ratios(by_key, skipped)
        print_breakdown(by_key, image)
        print(
            f"summary: {env} image={image.uncompressed / MB:.0f}MB tar/"
            f"{image.compressed / MB:.0f}MB gzip x{len(image.layers)} layers "
            f"repeat={args.repeat} load average at end={load_average()}: " + "; ".join(short)
        )
        if args.profile:
            profile_pull(bench, scratch / "profile", work / "pull.pyspy.txt")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return samples.run_blocking(lambda: bench_main(args))


if __name__ == "__main__":
    sys.exit(main())
