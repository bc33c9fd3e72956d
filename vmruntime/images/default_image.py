"""The built-in default image ``vmruntime/default:latest``: build it, cache it.

The default image is a Debian bookworm root filesystem with the guest's Python
(3.11, the same minor version as the host's, so cloudpickle'd code objects move
between them) and what a Jupyter kernel needs: ipykernel, cloudpickle, numpy,
pandas and matplotlib. It is built locally with ``mmdebstrap`` from the Debian
mirrors the host's apt already uses, and written as an OCI image layout that
the image cache loads like any other image.

Who calls what:

* the CLI (``vmr image build-default [--force]``) and the kernel provider call
  :func:`ensure_default_image`; it is cheap (well under a second) when the cached
  image was built from the same inputs, and builds (about two minutes) otherwise;
* :func:`plan_default_image` tells anyone what the current inputs and their hash
  are, without building; the hash is the value of the config label
  :data:`INPUTS_LABEL` of an image built from them;
* :func:`build_default_image_layout` builds into a given directory without
  touching the cache (tests, exporting the image).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from vmruntime import _paths
from vmruntime.errors import ImageBuildError, ImageNotFoundError
from vmruntime.images.catalog import resolve
from vmruntime.images.oci_layout import (
    DEFAULT_PATH,
    ImageConfigSpec,
    LayoutResult,
    format_timestamp,
    write_image_layout,
)
from vmruntime.images.reference import DEFAULT_IMAGE
from vmruntime.images.store import ImageStore

BUILD_RECIPE_VERSION = 1
"""Bump whenever the recipe changes in a way its inputs do not capture (hooks' meaning,
config fields): a bump changes the input hash and so forces every cache to rebuild."""

SUITE = "bookworm"
GUEST_PYTHON: tuple[int, int] = (3, 11)  # bookworm's python3; must match the host's minor

PACKAGES: tuple[str, ...] = (
    "python3",
    "python3-ipykernel",
    "python3-cloudpickle",
    "python3-numpy",
    "python3-pandas",
    "python3-matplotlib",
    # python3-fonttools (a matplotlib dependency) depends on
    # "python3-scipy | python3-munkres"; apt takes the first alternative, and scipy
    # drags in pythran, g++, gcc, the boost headers and openblas-dev: measured
    # 1.29 GB of tar instead of 0.68 GB. Naming munkres (about 100 kB) satisfies
    # the alternative instead.
    "python3-munkres",
)

DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/doc/*",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
)
APT_OPTIONS: tuple[str, ...] = ('APT::Install-Recommends "false"',)

SMOKE_IMPORTS: tuple[str, ...] = (
    "ipykernel.kernelapp",
    "cloudpickle",
    "numpy",
    "pandas",
    "matplotlib.pyplot",
)

INPUTS_LABEL = "org.vmruntime.default-image.inputs"
"""Config label (and manifest annotation) holding the input hash, ``sha256:<hex>``."""

RECIPE_EPOCH = 1795737600
"""2026-11-27T00:00:00Z: the default ``SOURCE_DATE_EPOCH``. mmdebstrap clamps file
mtimes to it and it is the config's ``created``, so the same inputs and the same
mirror content give a byte-identical layer. Debian's ``.pyc`` files are hash-based,
so clamped ``.py`` mtimes do not make them stale."""

REQUIRED_FREE_BYTES = 2 << 30
"""Checked before building: mmdebstrap's chroot (~0.7 GB plus downloaded .debs)
and the tar (~0.7 GB) exist at the same time. The layout hard-links the tar."""

BUILD_DIR_PREFIX = "default-image-"
LOCK_NAME = ".default-image.lock"
ERROR_TAIL_LINES = 25
DEBIAN_SUITE_NAMES = frozenset(
    {"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid"}
    | {"oldoldstable", "oldstable", "stable", "testing", "unstable"}
)
DPKG_TO_OCI_ARCH = {
    "amd64": "amd64",
    "arm64": "arm64",
    "armhf": "arm",
    "i386": "386",
    "ppc64el": "ppc64le",
    "riscv64": "riscv64",
    "s390x": "s390x",
}

Log = Callable[[str], None]


# --- the recipe and the build plan ------------------------------------------------


@dataclass(frozen=True)
class DefaultImageRecipe:
    """What goes into the image, independent of the host building it.

    The defaults are the default image's. Other recipes (the small Python image the
    tests build, say) change ``reference``, ``packages`` and ``smoke_imports``; the
    fields after ``recipe_version`` change the input hash only when they differ from
    their defaults, so the default image's hash (and every cache holding it) stays put.
    """

    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    variant: str = "apt"
    dpkg_options: tuple[str, ...] = DPKG_OPTIONS
    apt_options: tuple[str, ...] = APT_OPTIONS
    python_version: tuple[int, int] = GUEST_PYTHON
    recipe_version: int = BUILD_RECIPE_VERSION
    reference: str = DEFAULT_IMAGE
    name: str = "default image"  # in the title, the smoke test's line and log lines
    contents: str = "Python, ipykernel, cloudpickle, numpy, pandas and matplotlib"
    smoke_imports: tuple[str, ...] = SMOKE_IMPORTS
    mmdebstrap_options: tuple[str, ...] = ()  # e.g. a --hook-dir

    @property
    def title(self) -> str:
        return f"vmruntime {self.name}"

    def customize_hooks(self) -> tuple[str, ...]:
        """Shell snippets mmdebstrap runs in the finished chroot (``$1``), in order."""
        major, minor = self.python_version
        smoke_test = (
            "import sys; "
            f"assert sys.version_info[:2] == ({major}, {minor}), sys.version; "
            f"import {', '.join(self.smoke_imports)}; "
            f"print('{self.name} smoke test passed: python', sys.version.split()[0])"
        )
        smoke_env = (
            f"PATH={DEFAULT_PATH} LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 "
            # Keep matplotlib's font cache in /tmp (mmdebstrap empties it) and
            # silence debugpy's frozen-modules warning.
            "MPLBACKEND=Agg MPLCONFIGDIR=/tmp/mpl-smoke-test PYDEVD_DISABLE_FILE_VALIDATION=1"
        )
        return (
            # mmdebstrap copies these two from the build host: they would leak its
            # DNS setup into every guest and make the layer differ between hosts.
            'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
            # Fail the build, not the first kernel start, if the set is not importable.
            f'chroot "$1" env -i {smoke_env} python3 -c "{smoke_test}"',
        )


DEFAULT_RECIPE = DefaultImageRecipe()


@dataclass(frozen=True)
class BuildPlan:
    """A recipe bound to this host: mirrors, apt options, architecture, epoch.

    Everything that influences the image's content is in :meth:`inputs`, so
    :attr:`input_hash` changes exactly when a rebuild could give a different image
    (except for new package versions on the mirror: see docs/default-image.md).
    """

    recipe: DefaultImageRecipe
    mirrors: tuple[str, ...]
    host_apt_options: tuple[str, ...] = ()
    architecture: str = "amd64"
    source_date_epoch: int = RECIPE_EPOCH

    def inputs(self) -> dict[str, object]:
        r = self.recipe
        inputs: dict[str, object] = {
            "recipe_version": r.recipe_version,
            "suite": r.suite,
            "variant": r.variant,
            "packages": list(r.packages),
            "dpkg_options": list(r.dpkg_options),
            "apt_options": [*r.apt_options, *self.host_apt_options],
            "customize_hooks": list(r.customize_hooks()),
            "mirrors": list(self.mirrors),
            "architecture": self.architecture,
            "source_date_epoch": self.source_date_epoch,
        }
        # Only when not the default's: the default image's hash must not move.
        if r.reference != DEFAULT_IMAGE:
            inputs["reference"] = r.reference
        if r.mmdebstrap_options:
            inputs["mmdebstrap_options"] = list(r.mmdebstrap_options)
        return inputs

    @property
    def input_hash(self) -> str:
        canonical = json.dumps(self.inputs(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def mmdebstrap_argv(self, output: Path) -> list[str]:
        """The full mmdebstrap command line writing the root filesystem tar to ``output``."""
        r = self.recipe
        return [
            "mmdebstrap",
            # unshare: mounts (/proc, /sys) live in a private mount namespace, so a
            # killed build cannot leave them behind under our temp dir.
            "--mode=unshare",
            "--format=tar",
            f"--variant={r.variant}",
            *r.mmdebstrap_options,
            "--include=" + ",".join(r.packages),
            *(f"--dpkgopt={opt}" for opt in r.dpkg_options),
            *(f"--aptopt={opt}" for opt in (*r.apt_options, *self.host_apt_options)),
            *(f"--customize-hook={hook}" for hook in r.customize_hooks()),
            "--",
            r.suite,
            str(output),
            *self.mirrors,
        ]


def plan_default_image(
    recipe: DefaultImageRecipe | None = None, *, apt_etc: Path = Path("/etc/apt")
) -> BuildPlan:
    """Bind ``recipe`` (default: :data:`DEFAULT_RECIPE`) to this host's apt sources and
    options; cheap (milliseconds), no network."""
    recipe = recipe or DEFAULT_RECIPE
    return BuildPlan(
        recipe=recipe,
        mirrors=host_debian_mirrors(recipe.suite, apt_etc=apt_etc),
        host_apt_options=host_apt_options(),
        architecture=_dpkg_architecture(recipe.reference),
        source_date_epoch=_source_date_epoch(),
    )


def _source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(value) if value.isdigit() else RECIPE_EPOCH


def _dpkg_architecture(reference: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageBuildError(
            reference, f"step 'plan': cannot determine the dpkg architecture: {exc}"
        ) from exc
    return out


# --- mirrors and apt options from the host's apt configuration ------------------------


def host_debian_mirrors(suite: str, *, apt_etc: Path = Path("/etc/apt")) -> tuple[str, ...]:
    """One-line ``deb URI SUITE main`` sources for ``suite``, from the host's apt sources.

    Reads ``sources.list``, ``sources.list.d/*.list`` and ``sources.list.d/*.sources``
    (deb822) like apt does, keeps enabled ``deb`` entries whose suite is a Debian
    release (so third-party repositories are ignored), and retargets them: the host's
    ``X`` becomes ``suite``, ``X-updates``/``X-security`` become ``suite-updates``/
    ``suite-security``; other pockets (backports) are dropped. An empty result means
    "let mmdebstrap use its default mirrors".
    """
    lines: list[str] = []
    for uri, host_suite in _host_source_entries(apt_etc):
        target = _retarget_suite(host_suite, suite)
        if target is not None:
            lines.append(f"deb {uri} {target} main")
    return tuple(dict.fromkeys(lines))  # dedupe, keep apt's order


def _host_source_entries(apt_etc: Path) -> Iterator[tuple[str, str]]:
    one_line_files = [apt_etc / "sources.list"]
    parts = apt_etc / "sources.list.d"
    part_files = sorted(parts.iterdir()) if parts.is_dir() else []
    one_line_files += [p for p in part_files if p.suffix == ".list"]
    for path in one_line_files:
        if path.is_file():
            yield from _parse_one_line_sources(path.read_text(errors="replace"))
    for path in part_files:
        if path.suffix == ".sources" and path.is_file():
            yield from _parse_deb822_sources(path.read_text(errors="replace"))


def _parse_one_line_sources(text: str) -> Iterator[tuple[str, str]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if "[" in line:  # "deb [arch=amd64 signed-by=...] URI suite comps"
            head, _, rest = line.partition("[")
            line = head + rest.partition("]")[2]
        tokens = line.split()
        if len(tokens) >= 3 and tokens[0] == "deb":
            yield tokens[1], tokens[2]


def _parse_deb822_sources(text: str) -> Iterator[tuple[str, str]]:
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        for uri in stanza.get("uris", "").split():
            for host_suite in stanza.get("suites", "").split():
                yield uri, host_suite


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = None
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0].isspace() and key is not None:
            stanza[key] += " " + line.strip()  # continuation line
        elif ":" in line:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            stanza[key] = value.strip()


def _retarget_suite(host_suite: str, suite: str) -> str | None:
    base, dash, pocket = host_suite.partition("-")
    if base not in DEBIAN_SUITE_NAMES:
        return None
    if not dash:
        return suite
    if pocket in ("updates", "security"):
        return f"{suite}-{pocket}"
    return None


def host_apt_options() -> tuple[str, ...]:
    """Apt options of the host that the build must share to reach the same mirrors.

    mmdebstrap runs apt with its own configuration, not the host's. A host that
    disables the Release-file date checks (typical for snapshot mirrors) must pass
    that on, or the build fails where the host's own ``apt-get update`` works.
    """
    names = ("Acquire::Check-Valid-Until", "Acquire::Check-Date")
    try:
        out = subprocess.run(
            ["apt-config", "shell", *(x for i, n in enumerate(names) for x in (f"V{i}", n))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ()
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return tuple(
        f'{name} "false"'
        for i, name in enumerate(names)
        if values.get(f"V{i}", "").strip("'\"").lower() in ("false", "no", "0")
    )


# --- ensure: the cached entry point ---------------------------------------------------


def ensure_default_image(
    *,
    recipe: DefaultImageRecipe | None = None,
    force: bool = False,
    load: Callable[[Path, str], object] | None = None,
    is_current: Callable[[str], bool] | None = None,
    workdir: Path | None = None,
    log: Log = print,
) -> str:
    """Make sure the image cache holds an up-to-date ``vmruntime/default:latest`` (or the
    image of another ``recipe``, under its reference).

    Computes the input hash (:func:`plan_default_image`); unless ``force``, returns
    at once when ``is_current(input_hash)`` is true. Otherwise builds the image
    under ``workdir`` (default: ``<cache dir>/build``), hands the OCI layout to
    ``load(layout_dir, reference)`` and removes everything it wrote under
    ``workdir``, on success and on failure alike. Concurrent calls are serialised
    by a lock file in ``workdir``; the one that waited re-checks ``is_current``.

    ``load`` and ``is_current`` default to :func:`vmruntime.images.load` (which
    stores the blobs only: pass one that also builds layer images, as the CLI does)
    and :func:`default_image_is_current`. Progress goes to ``log`` one line at a time.

    Returns the image reference, :data:`DEFAULT_IMAGE` (or the recipe's).
    Raises :class:`ImageBuildError` naming the failed step (and, for mmdebstrap,
    the tail of its output; for a full disk, the path); errors from ``load``
    propagate unchanged.
    """
    plan = plan_default_image(recipe)
    reference = plan.recipe.reference
    load, is_current = _cache_callables(load, is_current, reference)
    _warn_on_python_mismatch(plan.recipe, log)
    if not force and is_current(plan.input_hash):
        log(f"{reference} is up to date (inputs {plan.input_hash})")
        return reference
    workdir = Path(workdir) if workdir is not None else default_workdir()
    _make_dir(workdir, reference)
    with _build_lock(workdir, reference, log):
        if not force and is_current(plan.input_hash):
            log(f"{reference} was built by another process meanwhile")
            return reference
        _remove_stale_builds(workdir, log)
        _check_free_space(workdir, REQUIRED_FREE_BYTES, reference)
        build_dir = Path(tempfile.mkdtemp(prefix=BUILD_DIR_PREFIX, dir=workdir))
        try:
            layout = build_default_image_layout(build_dir / "layout", plan=plan, log=log)
            log(f"loading {reference} into the image cache")
            started = time.monotonic()
            load(layout.path, reference)
            log(f"loaded {reference} in {time.monotonic() - started:.1f} s")
        finally:
            _remove_tree(build_dir, log)
    return reference


def default_workdir() -> Path:
    """``<cache dir>/build``; the cache dir is ``$VMRUNTIME_CACHE``, else
    ``$XDG_CACHE_HOME/vmruntime``, else ``~/.cache/vmruntime``: the image cache's own
    rule (:func:`vmruntime._paths.cache_root`), so building needs no disk
    other than the cache's."""
    return _paths.cache_root() / "build"


def _cache_callables(
    load: Callable[[Path, str], object] | None,
    is_current: Callable[[str], bool] | None,
    reference: str,
) -> tuple[Callable[[Path, str], object], Callable[[str], bool]]:
    from vmruntime.images.load import load as load_into_cache

    if is_current is None:
        is_current = partial(default_image_is_current, reference=reference)
    return load or load_into_cache, is_current


def default_image_is_current(input_hash: str, store: ImageStore | None = None,
                             reference: str = DEFAULT_IMAGE) -> bool:  # fmt: skip
    """True when the cached default image (or the image at ``reference``) was built from
    these inputs."""
    try:
        image = resolve(reference, store)
    except ImageNotFoundError:
        return False
    return image.config.labels.get(INPUTS_LABEL) == input_hash


def _warn_on_python_mismatch(recipe: DefaultImageRecipe, log: Log) -> None:
    if sys.version_info[:2] != recipe.python_version:
        guest = ".".join(map(str, recipe.python_version))
        log(
            f"warning: the {recipe.name} has Python {guest} but the host runs "
            f"{sys.version_info.major}.{sys.version_info.minor}; cloudpickle'd functions "
            "will not load across minor versions"
        )


# --- build -------------------------------------------------------------------------


def build_default_image_layout(
    dest_dir: Path, *, plan: BuildPlan | None = None, log: Log = print
) -> LayoutResult:
    """Build the default image (or ``plan``'s) into a new OCI image layout at ``dest_dir``.

    Does not consult or change the image cache. Scratch space (mmdebstrap's
    chroot, the tar) is a temporary directory next to ``dest_dir``, removed
    before returning; ``dest_dir`` itself is left as is on failure (the caller
    created its parent and owns it). The tar is hard-linked into the layout when
    ``dest_dir`` is on the same filesystem as its parent, which it is by default.
    """
    plan = plan or plan_default_image()
    dest_dir = Path(dest_dir)
    log(
        f"building {plan.recipe.reference}: {plan.recipe.suite}, "
        f"{len(plan.recipe.packages)} packages, "
        f"{len(plan.mirrors) or 'default'} mirror(s), inputs {plan.input_hash}"
    )
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=dest_dir.parent))
    try:
        tar_path = scratch / "rootfs.tar"
        _run_mmdebstrap(plan, tar_path, scratch, log)
        return _write_default_layout(dest_dir, tar_path, plan, log)
    finally:
        _remove_tree(scratch, log)


def _run_mmdebstrap(plan: BuildPlan, tar_path: Path, scratch: Path, log: Log) -> None:
    tmpdir = scratch / "tmp"
    tmpdir.mkdir()
    argv = plan.mmdebstrap_argv(tar_path)
    env = {
        **os.environ,
        # mmdebstrap builds the chroot under $TMPDIR: keep it inside our scratch dir
        # so it is on the disk we checked and is removed with it.
        "TMPDIR": str(tmpdir),
        "SOURCE_DATE_EPOCH": str(plan.source_date_epoch),
    }
    log("running mmdebstrap (up to two minutes): " + shlex.join(argv[:6]) + " ...")
    started = time.monotonic()
    returncode, tail = _stream_process(argv, env, log, plan.recipe.reference)
    elapsed = time.monotonic() - started
    if returncode != 0:
        raise _mmdebstrap_error(returncode, tail, scratch, plan.recipe.reference)
    size = tar_path.stat().st_size
    log(f"mmdebstrap finished in {elapsed:.0f} s; root filesystem tar is {size / 1e6:.0f} MB")


def _stream_process(argv: Sequence[str], env: dict[str, str], log: Log,
                    reference: str) -> tuple[int, list[str]]:  # fmt: skip
    """Run ``argv``, pass each output line to ``log``; return status and the last lines."""
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(
            reference,
            f"step 'mmdebstrap': {argv[0]} is not installed (apt-get install mmdebstrap)",
        ) from exc
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(f"mmdebstrap: {line}")
        return proc.wait(), list(tail)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Make sure the child is gone (we may be here because of KeyboardInterrupt)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)  # mmdebstrap removes its chroot on SIGTERM
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _mmdebstrap_error(returncode: int, tail: list[str], scratch: Path,
                      reference: str) -> ImageBuildError:  # fmt: skip
    output = "\n".join(tail)
    if "No space left on device" in output or _free_bytes(scratch) < (64 << 20):
        reason = (
            f"step 'mmdebstrap': no space left on device under {scratch} "
            f"(free: {_free_bytes(scratch) / 1e6:.0f} MB; the build needs about "
            f"{REQUIRED_FREE_BYTES / 1e9:.1f} GB); last lines of its output:\n{output}"
        )
    else:
        reason = (
            f"step 'mmdebstrap' failed with exit status {returncode}; "
            f"last lines of its output:\n{output}"
        )
    return ImageBuildError(reference, reason)


def _write_default_layout(
    dest_dir: Path, tar_path: Path, plan: BuildPlan, log: Log
) -> LayoutResult:
    log(f"writing OCI image layout to {dest_dir}")
    started = time.monotonic()
    try:
        result = write_image_layout(
            dest_dir,
            [tar_path],
            tag=plan.recipe.reference,
            config=_image_config(plan),
            annotations=_manifest_annotations(plan),
        )
    except ImageBuildError as exc:
        raise ImageBuildError(
            plan.recipe.reference, f"step 'write OCI layout': {exc.reason}"
        ) from exc
    log(
        f"OCI layout written in {time.monotonic() - started:.1f} s: "
        f"manifest {result.manifest_digest}, layer {result.layer_digests[0]}"
    )
    return result


def _image_config(plan: BuildPlan) -> ImageConfigSpec:
    r = plan.recipe
    python = ".".join(map(str, r.python_version))
    return ImageConfigSpec(
        env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
        cmd=("python3",),
        working_dir="/",
        labels={
            INPUTS_LABEL: plan.input_hash,
            "org.vmruntime.default-image.recipe-version": str(r.recipe_version),
            "org.vmruntime.default-image.suite": r.suite,
            "org.vmruntime.default-image.python": python,
            "org.vmruntime.default-image.packages": " ".join(r.packages),
            "org.opencontainers.image.title": r.title,
        },
        architecture=DPKG_TO_OCI_ARCH.get(plan.architecture, plan.architecture),
        created=datetime.fromtimestamp(plan.source_date_epoch, tz=UTC),
        # Mirrors are left out: URIs may carry credentials and the history is public.
        created_by=f"mmdebstrap --variant={r.variant} --include={','.join(r.packages)} {r.suite}",
        comment=f"{r.title} recipe {r.recipe_version}",
    )


def _manifest_annotations(plan: BuildPlan) -> dict[str, str]:
    return {
        INPUTS_LABEL: plan.input_hash,
        "org.opencontainers.image.created": format_timestamp(
            datetime.fromtimestamp(plan.source_date_epoch, tz=UTC)
        ),
        "org.opencontainers.image.title": plan.recipe.title,
        "org.opencontainers.image.description": (
            f"Debian {plan.recipe.suite} with {plan.recipe.contents}"
        ),
    }


# --- work directory housekeeping ------------------------------------------------------


def _make_dir(path: Path, reference: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(
            reference, f"step 'create work directory': cannot create {path}: {exc.strerror}"
        ) from exc


@contextlib.contextmanager
def _build_lock(workdir: Path, reference: str, log: Log) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` for one build (released if we die)."""
    with open(workdir / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building an image there; {reference} waits for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_stale_builds(workdir: Path, log: Log) -> None:
    """Remove build dirs of killed runs: under the lock, no other build is alive."""
    for stale in workdir.glob(BUILD_DIR_PREFIX + "*"):
        if stale.is_dir():
            log(f"removing leftovers of an interrupted build: {stale}")
            _remove_tree(stale, log)


def _check_free_space(path: Path, needed: int, reference: str) -> None:
    free = _free_bytes(path)
    if free < needed:
        raise ImageBuildError(
            reference,
            f"step 'check free space': not enough space left on device for {path}: "
            f"{free / 1e6:.0f} MB free, the build needs about {needed / 1e9:.1f} GB "
            "(point VMRUNTIME_CACHE or workdir at a larger disk)",
        )


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _remove_tree(path: Path, log: Log) -> None:
    """rmtree, except below a mount point: never delete through a mount into the host."""
    if not path.exists():
        return
    mounts = _mounts_under(path)
    if mounts:
        log(f"warning: not removing {path}: still mounted below it: {', '.join(mounts)}")
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log(f"warning: could not remove all of {path}")


def _mounts_under(path: Path) -> list[str]:
    root = str(path.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    # Field 5 is the mount point, with spaces etc. octal-escaped.
    points = [line.split()[4].encode().decode("unicode_escape") for line in lines]
    return [p for p in points if p == root or p.startswith(root + "/")]
