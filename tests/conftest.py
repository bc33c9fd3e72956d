"""Shared fixtures: real local registries, an isolated image cache per test, and a
session environment for the tests that boot real microVMs.

No test sees the user's cache, state or runtime directory: before any test module is
imported, ``pytest_configure`` points ``VMRUNTIME_CACHE``, ``VMRUNTIME_STATE``,
``XDG_RUNTIME_DIR``, ``HOME`` and the ``XDG_*_HOME`` directories at a fresh directory
under /tmp (removed at the end). The few fixtures that need what ``scripts/setup.sh``
prepared (the guest kernel, the built default image, the virtiofsd peer's chroot) say
so and use ``USER_CACHE`` / ``PEER_CACHE``, captured before the switch.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from registry_support import LocalRegistry
from vm_support import broker_processes, load_busybox_image, qemu_processes

from vmruntime.guest.kernel import GuestKernel, cached_kernel
from vmruntime.images.store import ImageStore, default_cache_dir

# Fixtures of the fast tier's fake VMM world (world, agent_cache): tests/fake_world.py;
# Ray's own gVisor sandboxes as the peer of the Ray front door (gvisor_peer): tests/ray_peer.py.
pytest_plugins = ["fake_world", "ray_support", "ray_peer"]

# The user's real directories, read before pytest_configure replaces them.
USER_CACHE = default_cache_dir()
PEER_CACHE = Path(os.environ.get("PEER_CACHE") or Path.home() / ".cache" / "vmruntime-peers")
_DROPPED_VARIABLES = ("VMRUNTIME_AUTH_FILE", "REGISTRY_AUTH_FILE")  # the user's credentials
_isolated_root: Path | None = None

# CI explores the same examples every run, so a red build is reproducible; developers'
# runs keep drawing new ones (and remember failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def isolated_environment(root: Path) -> dict[str, str]:
    """Every directory the runtime (or a tool it runs) would default to, under ``root``."""
    home = root / "home"
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "VMRUNTIME_CACHE": str(root / "cache"),
        "VMRUNTIME_STATE": str(root / "state"),
        # Unix socket paths live under it and must stay under 108 bytes: hence /tmp.
        "XDG_RUNTIME_DIR": str(root / "run"),
    }


def pytest_configure(config: pytest.Config) -> None:
    global _isolated_root
    _isolated_root = Path(tempfile.mkdtemp(prefix="vmr-tests-", dir="/tmp"))
    for name, value in isolated_environment(_isolated_root).items():
        Path(value).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ[name] = value
    for name in _DROPPED_VARIABLES:
        os.environ.pop(name, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _isolated_root is not None:
        shutil.rmtree(_isolated_root, ignore_errors=True)


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Debian's docker-registry on 127.0.0.1, shared by the session (repos per test)."""
    registry = LocalRegistry(base_dir=tmp_path_factory.mktemp("registry"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def basic_auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    registry = LocalRegistry(base_dir=tmp_path_factory.mktemp("registry-basic"), auth="basic")
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def token_auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    registry = LocalRegistry(
        base_dir=tmp_path_factory.mktemp("registry-token"),
        auth="token",
        allow_anonymous_pull=True,
    )
    yield registry
    registry.stop()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageStore:
    """A fresh cache, also the default for code that opens its own (via VMRUNTIME_CACHE)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("VMRUNTIME_CACHE", str(root))
    monkeypatch.setenv("VMRUNTIME_AUTH_FILE", str(tmp_path / "no-auth.json"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return ImageStore(root)


@pytest.fixture
def mount_erofs(tmp_path: Path) -> Iterator:
    """Mount EROFS images read-only on the host (root is available here); unmount after."""
    mounted: list[Path] = []

    def mount(image: Path) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        result = subprocess.run(
            ["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(target)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.fail(f"mounting {image} failed: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


@dataclass(frozen=True)
class VmSession:
    cache: Path
    state: Path
    runtime: Path
    image: str
    real_cache: Path


@pytest.fixture(scope="session")
def vm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmSession]:
    """Private cache, state and runtime dirs holding the busybox test image.

    The guest kernel is the one scripts/setup.sh downloaded into the user's cache
    (linked, read-only); without it the session fails, it never downloads one. The
    agent, initramfs and writable-layer templates are built in the session's own
    cache. At the end, any QEMU or virtio-fs broker still running from this
    session fails the run.
    """
    kernel = setup_kernel()
    root = tmp_path_factory.mktemp("vm")
    cache = root / "cache"
    (cache / "guest" / "kernel").mkdir(parents=True)
    (cache / "guest" / "kernel" / kernel.release).symlink_to(kernel.vmlinuz.parent)
    # Unix socket paths are short-lived and must stay under 108 bytes.
    runtime = Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VMRUNTIME_CACHE", str(cache))
        patch.setenv("VMRUNTIME_STATE", str(root / "state"))
        patch.setenv("XDG_RUNTIME_DIR", str(runtime))
        patch.setenv("VMRUNTIME_AUTH_FILE", str(root / "no-auth.json"))
        image = load_busybox_image(root)
        yield VmSession(cache, root / "state", runtime, image, USER_CACHE)
    end_session_runtime(runtime)


@dataclass(frozen=True)
class DefaultImageSession:
    """Where sandboxes of the default image run in this session (see the fixture)."""

    cache: Path
    state: Path
    runtime: Path
    image: str = "vmruntime/default:latest"


@pytest.fixture(scope="session")
def default_image_session(tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[DefaultImageSession]:  # fmt: skip
    """The built default image, for tests that run its Python (Jupyter kernels, Ray).

    It lives in the user's cache (``scripts/run.sh`` builds it there; here it is built
    if it is missing or stale, minutes once, seconds after), which these tests share
    read-mostly: the cache is content-addressed and locked. Sandbox state and runtime
    directories stay private to the session, and a QEMU or broker left at the end
    fails the run.
    """
    setup_kernel()
    build = subprocess.run(
        [sys.executable, "-m", "vmruntime", "image", "build-default"],
        env={**os.environ, "VMRUNTIME_CACHE": str(USER_CACHE)},
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if build.returncode != 0:
        pytest.fail(f"building the default image failed:\n{build.stdout}{build.stderr}")
    root = tmp_path_factory.mktemp("default-image")
    runtime = Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VMRUNTIME_CACHE", str(USER_CACHE))
        patch.setenv("VMRUNTIME_STATE", str(root / "state"))
        patch.setenv("XDG_RUNTIME_DIR", str(runtime))
        yield DefaultImageSession(USER_CACHE, root / "state", runtime)
        close_warm_kernels()  # a pool's ready kernels would otherwise outlive the session
    end_session_runtime(runtime)


def close_warm_kernels() -> None:
    from kernelprovider.provisioner import MicroVMProvisioner

    MicroVMProvisioner.close_pools()


@pytest.fixture(scope="session")
def python_image() -> str:
    """The small Python test image (tests/python_image.py) in the user's cache, like the
    default image: built if it is missing or stale (about 32 s once), found afterwards.
    Returns its reference; sessions that boot it use ``USER_CACHE`` as their cache."""
    from python_image import PYTHON_IMAGE, PYTHON_RECIPE

    from vmruntime.errors import ImageBuildError
    from vmruntime.images.default_image import default_image_is_current, ensure_default_image
    from vmruntime.rootfs import load

    setup_kernel()
    store = ImageStore(USER_CACHE)
    try:
        return ensure_default_image(
            recipe=PYTHON_RECIPE,
            load=functools.partial(load, store=store),
            is_current=functools.partial(
                default_image_is_current, store=store, reference=PYTHON_IMAGE
            ),
            workdir=USER_CACHE / "build",
            log=lambda line: None,
        )
    except ImageBuildError as exc:
        pytest.fail(f"building the small Python test image failed: {exc}", pytrace=False)


def end_session_runtime(runtime: Path) -> None:
    """Kill what a VM session left running under ``runtime``, remove it, and fail the run
    if anything was left: every QEMU and broker must have ended with its sandbox."""
    leftovers = qemu_processes(str(runtime))
    brokers = broker_processes(str(runtime))
    for pid in leftovers + brokers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(runtime, ignore_errors=True)
    assert not leftovers, f"QEMU processes outlived the test session: {leftovers}"
    assert not brokers, f"broker processes outlived the test session: {brokers}"


def setup_kernel() -> GuestKernel:
    """The guest kernel scripts/setup.sh put in the user's cache; fails if there is none.

    Failing, not skipping: a slow run whose every VM test skipped would look green
    while testing nothing, and the cure is one setup step, not a different machine.
    """
    kernel = cached_kernel(USER_CACHE)
    if kernel is None:
        pytest.fail(
            f"no guest kernel in {USER_CACHE}/guest/kernel: run scripts/setup.sh first "
            "(the tests never download one)",
            pytrace=False,
        )
    return kernel
