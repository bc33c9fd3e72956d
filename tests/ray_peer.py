"""Ray's own sandboxes (``ray.experimental.sandbox``, gVisor): the peer the Ray front door
is held to, set up with no manual step.

Who calls it: the ``gvisor_peer`` session fixture (a plugin of ``tests/conftest.py``; the
session's one Ray, ``ray_session`` of ``tests/ray_support.py``, starts with its ``env``
when a test of the run asks for it) and ``bench/ray_actor.py`` (through
:func:`start_gvisor_peer` and :func:`local_ray`).

What it promises: a :class:`GVisorPeer` whose ``env``, set before ``ray.init``, makes
``ray.experimental.sandbox.create(image="vmruntime/default:latest")`` work in that Ray
session, on the very image our sandboxes run (the default image of the user's cache).
Three things make that so:

* ``../shared/peers/ray-gvisor-peer.sh`` (beside the repository) provides gVisor's
  ``runsc`` and a ``mkfs.erofs`` new enough for Ray, both from a Debian 13 chroot that
  it builds once (about 2 minutes, as root, from the mirror of the host's apt sources)
  under ``PEER_CACHE`` (``~/.cache/vmruntime-peers``); later runs take seconds.
* Ray pulls images itself, only from registries: the default image is pushed (skopeo,
  from an OCI layout of symlinks into our cache) to a real ``docker-registry`` on
  127.0.0.1 under its Docker Hub-style name, and ``RAY_SANDBOX_REGISTRY_MIRROR`` points
  Ray's Docker Hub pulls at it. The registry's storage is kept in ``PEER_CACHE`` too,
  so a later session pushes nothing new (delete ``PEER_CACHE/registry`` to reclaim it).
* Ray caches what it pulled by image *name* under ``/tmp/ray/sandbox/images`` and never
  asks the registry again; when the default image was rebuilt since, the stale entry
  is invalidated here, so Ray re-pulls (about 20 s) instead of running an old image.

:func:`end_runsc` fails if a runsc process below this process outlives its sandboxes
(and kills it), like the QEMU check of the VM sessions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_support import LocalRegistry, push_layout

from vmruntime.images.reference import canonical_reference
from vmruntime.images.store import ImageStore

REPO_ROOT = Path(__file__).resolve().parent.parent
# The peers live beside the repository, shared by every checkout of it.
PEERS_DIR = REPO_ROOT.parent / "shared" / "peers"
PEER_SCRIPT = "ray-gvisor-peer.sh"
# Ray resolves a name without a registry to Docker Hub, which the mirror replaces.
PEER_IMAGE = "vmruntime/default:latest"
PEER_REPOSITORY, PEER_TAG = PEER_IMAGE.rsplit(":", 1)
PEER_SETUP_TIMEOUT = 900.0  # seconds; the first run builds a Debian 13 chroot
_EXPORT_PATH = re.compile(r'^export PATH="(?P<bin>[^"]+):\$PATH"$', re.MULTILINE)
_RUNSC_COMMS = ("runsc", "runsc-gofer", "runsc-sandbox", "exe")  # exe: runsc re-executed


class GVisorPeerError(RuntimeError):
    """The gVisor peer could not be set up; the message says what to do."""


@dataclass(frozen=True)
class GVisorPeer:
    """Everything a Ray session needs to run Ray's gVisor sandboxes on the default image.

    ``env`` holds the variables to set before ``ray.init`` (Ray's workers inherit them):
    ``PATH`` with ``bin_dir`` first, and ``RAY_SANDBOX_REGISTRY_MIRROR``.
    """

    bin_dir: Path
    registry: LocalRegistry
    image: str
    manifest_digest: str
    env: Mapping[str, str]


def peer_script() -> Path:
    """``../shared/peers/ray-gvisor-peer.sh`` relative to the repository root."""
    script = PEERS_DIR / PEER_SCRIPT
    if not script.is_file():
        raise GVisorPeerError(
            f"{script} is missing: the peers directory ../shared/peers sits beside the "
            f"repository ({REPO_ROOT}) and holds the scripts that set up the systems we "
            "compare against (see /work/shared/DESIGN.md, 'Peers')"
        )
    return script


def peer_tools(peer_cache: Path) -> Path:
    """Run the peer script (idempotent); the directory holding ``runsc`` and ``mkfs.erofs``."""
    script = peer_script()
    env = {**os.environ, "PEER_CACHE": str(peer_cache)}
    try:
        done = subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True,
            timeout=PEER_SETUP_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise GVisorPeerError(f"{script} took over {PEER_SETUP_TIMEOUT:.0f} s") from exc
    found = _EXPORT_PATH.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise GVisorPeerError(
            f"{script} failed (exit {done.returncode}):\n{done.stderr.strip()}\n"
            f"{done.stdout.strip()}"
        )
    return Path(found["bin"])


def write_layout(store: ImageStore, reference: str, dest: Path, tag: str) -> str:
    """An OCI layout at ``dest`` of the cached image ``reference``, tagged ``tag``; its
    blobs are symlinks into the cache (the default image's layer is 680 MB). Returns the
    manifest digest."""
    record = store.get_ref(canonical_reference(reference))
    if record is None:
        raise GVisorPeerError(f"{reference} is not in the image cache {store.root}")
    manifest = json.loads(store.read_blob(record.manifest))
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    digests = [record.manifest, manifest["config"]["digest"]]
    digests += [layer["digest"] for layer in manifest["layers"]]
    for digest in digests:
        (blobs / digest.split(":", 1)[1]).symlink_to(store.blob_path(digest))
    descriptor = {
        "mediaType": record.media_type,
        "digest": record.manifest,
        "size": store.blob_path(record.manifest).stat().st_size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    return record.manifest


def start_registry(work_dir: Path, peer_cache: Path) -> LocalRegistry:
    """A registry on 127.0.0.1 whose storage persists in ``peer_cache/registry``."""
    storage = peer_cache / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    base = work_dir / "registry"
    base.mkdir(parents=True)
    (base / "storage").symlink_to(storage)  # LocalRegistry serves base/storage
    return LocalRegistry(base_dir=base)


def image_config_digest(store: ImageStore, manifest_digest: str) -> str:
    return str(json.loads(store.read_blob(manifest_digest))["config"]["digest"])


def forget_stale_ray_image(image: str, config_digest: str) -> bool:
    """Make Ray re-pull ``image`` if what it cached is another image than ``config_digest``.

    Ray keys its cache by name and marks a finished pull with ``.extracted``; removing
    that marker (under Ray's own lock) is what makes its next create pull again, and
    Ray's re-pull keeps sandboxes still running on the old copy intact. True if it did.
    """
    from ray.experimental.sandbox._internal.image_utils import (
        DEFAULT_IMAGES_DIR,
        sanitize_image_name,
    )

    name = sanitize_image_name(image)
    cached = Path(DEFAULT_IMAGES_DIR) / name
    marker = cached / ".extracted"
    if not marker.exists():
        return False
    with open(Path(DEFAULT_IMAGES_DIR) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            config = (cached / ".image_config.json").read_bytes()
        except FileNotFoundError:
            config = b""
        if "sha256:" + hashlib.sha256(config).hexdigest() == config_digest:
            return False
        marker.unlink(missing_ok=True)
        return True


def start_gvisor_peer(store: ImageStore, peer_cache: Path, work_dir: Path) -> GVisorPeer:
    """Set up the peer's tools, serve the default image, and say how to start Ray.

    The caller owns the returned registry (``peer.registry.stop()``) and ``work_dir``.
    """
    bin_dir = peer_tools(peer_cache)
    layout = work_dir / "layout"
    digest = write_layout(store, PEER_IMAGE, layout, PEER_TAG)
    registry = start_registry(work_dir, peer_cache)
    try:
        push_layout(registry, layout, PEER_REPOSITORY, PEER_TAG)
        forget_stale_ray_image(PEER_IMAGE, image_config_digest(store, digest))
    except BaseException:
        registry.stop()
        raise
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_SANDBOX_REGISTRY_MIRROR": registry.url,
    }
    return GVisorPeer(bin_dir, registry, PEER_IMAGE, digest, env)


# --- Ray sessions ---------------------------------------------------------------------------


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    found: set[int] = set()
    todo = list(_children(pid))
    while todo:
        child = todo.pop()
        if child not in found:
            found.add(child)
            todo += _children(child)
    return found


def runsc_processes(below: int) -> set[int]:
    """The runsc processes (run, gofer, sandbox and what they re-execute) below ``below``.

    A local ``ray.init`` starts the raylet as a child of the driver, and the raylet the
    workers, so every gVisor sandbox a session made is below the driver until it ends.
    """
    return {pid for pid in descendants(below) if _comm(pid) in _RUNSC_COMMS}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def end_runsc(started: set[int], grace: float = 5.0) -> None:
    """Wait a moment for runsc processes to end with their sandboxes; kill those that do
    not and raise :class:`GVisorPeerError` naming them."""
    deadline = time.monotonic() + grace
    while (left := {pid for pid in started if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        raise GVisorPeerError(f"runsc processes outlived their sandboxes: {sorted(left)}")


@contextlib.contextmanager
def local_ray(env: Mapping[str, str], num_cpus: int = 2) -> Iterator[None]:
    """``ray.init(num_cpus=...)`` with ``env`` set in this process (so in the raylet and
    its workers) for the session; at the end ``ray.shutdown()`` and the environment back,
    and :func:`end_runsc` for the runsc processes the session left. For the benchmark:
    tests share ``ray_session`` (tests/ray_support.py)."""
    import ray

    with environment(env):
        ray.init(num_cpus=num_cpus, logging_level="ERROR", include_dashboard=False)
        try:
            yield
        finally:
            started = runsc_processes(os.getpid())
            ray.shutdown()
            end_runsc(started)


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment for the block, the old ones back after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- the fixture ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gvisor_peer(default_image_session: object, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[GVisorPeer]:  # fmt: skip
    """Ray's gVisor sandboxes, ready to run the default image: ``ray_session`` starts with
    ``gvisor_peer.env`` when a test of the run asks for this fixture. Fails, never skips,
    when the peer cannot be set up (the message says why)."""
    from conftest import PEER_CACHE, USER_CACHE

    try:
        peer = start_gvisor_peer(
            ImageStore(USER_CACHE), PEER_CACHE, tmp_path_factory.mktemp("gvisor-peer")
        )
    except GVisorPeerError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield peer
    peer.registry.stop()
