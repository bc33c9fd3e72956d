"""A snapshot restorable on any machine: pushed with its base image, or with its image in a
registry, then made ready by ``ensure_local`` on a machine whose cache started empty.

Fast tier: a real S3 server (moto on 127.0.0.1), a real registry (docker-registry on
127.0.0.1), real image caches (EROFS layers built); no VM. The restore up to the VM
(``restore_source``: the snapshot's layer and its image by digest) is checked here; the
boot is in tests/test_ray_cluster.py and tests/test_snapshot_vm.py.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from conftest import USER_CACHE, end_session_runtime, setup_kernel
from helpers import sparse_file
from imagefactory import ImageInfo, directory, file, make_layer_tar, write_oci_layout
from registry_support import LocalRegistry, push_layout, tamper_blob
from s3_support import S3Server, running_s3_server

from vmruntime import Sandbox
from vmruntime.cli import main
from vmruntime.errors import (
    SnapshotBaseImageError,
    SnapshotExistsError,
    SnapshotImageUnavailableError,
)
from vmruntime.images import ImageStore
from vmruntime.rootfs import ErofsLayers, load
from vmruntime.snapshots import CHUNK_SIZE, LayerInfo, SnapshotManifest, SnapshotStore
from vmruntime.snapshots.ensure import ensure_local, fetched_name
from vmruntime.snapshots.remote import push
from vmruntime.snapshots.remote_images import record_path
from vmruntime.snapshots.restore import SnapshotLayer, restore_source
from vmruntime.snapshots.store import Snapshot

LOCAL_IMAGE = "localhost/vmruntime/anywhere-test:latest"  # a name no registry serves
LAYER_SIZE = 4 * CHUNK_SIZE + 1000  # two layers; the big one spans five chunks


@dataclass
class Machine:
    """One machine's local stores: snapshots and images."""

    snapshots: SnapshotStore
    images: ImageStore

    def ensure(self, spec: str, server: S3Server | None = None) -> str:
        options = server.storage_options if server is not None else None
        return ensure_local(
            spec, store=self.snapshots, image_store=self.images, storage_options=options
        )


def machine(root: Path) -> Machine:
    return Machine(SnapshotStore(root / "state" / "snapshots"), ImageStore(root / "cache"))


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


@pytest.fixture
def store_url(s3_server: S3Server) -> str:
    return f"s3://{s3_server.new_bucket()}/store"


@pytest.fixture
def here(tmp_path: Path) -> Machine:
    return machine(tmp_path / "here")


@pytest.fixture
def there(tmp_path: Path) -> Machine:
    """The other machine: both of its stores start empty."""
    return machine(tmp_path / "there")


def image_layers() -> list[bytes]:
    """A small layer and a big one (uncompressed: its blob spans several chunks); salted,
    so no other test shares their blobs (the registry tests tamper with them)."""
    salt = uuid.uuid4().hex
    big = os.urandom(LAYER_SIZE)
    return [
        make_layer_tar([directory("etc"), file("etc/salt", salt)]),
        make_layer_tar([directory("data"), file("data/big.bin", big)]),
    ]


def make_image(root: Path, store: ImageStore, tag: str = LOCAL_IMAGE) -> ImageInfo:
    """An image in ``store`` under ``tag`` (layers as images: EROFS built)."""
    layout = root / f"layout-{uuid.uuid4().hex[:8]}"
    info = write_oci_layout(layout, image_layers(), compression="none")
    load(layout, tag, store=store)
    return info


def make_snapshot(
    machine: Machine, name: str, image: str, info: ImageInfo, created: str = "2026-12-05T00:00:00Z"
) -> Snapshot:
    """A snapshot of ``image`` with some data in its layer, as capture would leave it."""
    size = 3 * CHUNK_SIZE
    with machine.snapshots.create(name) as pending:
        writes = {0: b"hello from the first machine", 2 * CHUNK_SIZE + 5: os.urandom(9000)}
        layer = sparse_file(pending.path / "layer.img", size, writes)
        manifest = SnapshotManifest(
            name=name,
            image=image,
            image_manifest_digest=info.manifest_digest,
            image_layer_digests=tuple(info.layer_digests),
            layer=LayerInfo(apparent_size=size, allocated_size=os.stat(layer).st_blocks * 512),
            created_at=created,
        )
        return pending.commit(manifest)


def store_objects(s3_server: S3Server, url: str, directory: str) -> list[str]:
    fs = s3_server.filesystem()
    root = url.removeprefix("s3://")
    return sorted(fs.find(f"{root}/{directory}"))


def assert_restorable(there: Machine, name: str, original: Snapshot, info: ImageInfo) -> None:
    """What ``Sandbox.create(from_snapshot=name)`` checks before booting, and the layer."""
    restored = restore_source(name, store=there.snapshots, image_store=there.images)
    assert restored.image in (original.manifest.image, info.manifest_digest)
    layer = restored.layer
    assert isinstance(layer, SnapshotLayer)
    assert layer.snapshot.layer_path.read_bytes() == original.layer_path.read_bytes()
    erofs = ErofsLayers(there.images)
    assert all(erofs.ready(diff_id) for diff_id in info.diff_ids)


def nothing_committed(there: Machine, info: ImageInfo, refused: int | None = None) -> None:
    """After a refused fetch: no snapshot, no image reference, no temp file, and in the
    cache only blobs that are what their digest says (those that verified before the
    failure stay, as after any interrupted pull); of layer ``refused``, nothing."""
    assert there.snapshots.list() == []
    if there.snapshots.root.is_dir():
        leftovers = [p.name for p in there.snapshots.root.iterdir() if p.name.startswith(".tmp")]
        assert leftovers == []
    assert there.images.list_refs() == []
    assert list(there.images.tmp_dir.iterdir()) == []
    for blob in there.images.blobs_dir.iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    if refused is not None:
        assert not there.images.has_blob(info.layer_digests[refused])
        assert not ErofsLayers(there.images).ready(info.diff_ids[refused])


# --- pushed with its image: a machine with nothing gets both from the store ---------------


def test_a_snapshot_pushed_with_its_image_restores_on_an_empty_machine(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    original = make_snapshot(here, "warm", LOCAL_IMAGE, info)
    result = push(original, store_url, storage_options=s3_server.storage_options,
                  with_image=True, image_store=here.images)  # fmt: skip
    assert result.image is not None
    assert result.image.manifest_digest == info.manifest_digest
    assert result.image.blobs == 4  # manifest, config, two layers
    assert result.image.chunks_sent == result.image.chunks >= 7  # the big layer: 5 chunks
    assert store_objects(s3_server, store_url, "images/sha256") == [
        f"{store_url.removeprefix('s3://')}/{record_path(info.manifest_digest)}"
    ]

    name = there.ensure(result.url, s3_server)
    assert name == fetched_name("warm", result.index_digest[7:])
    assert name.startswith("warm-") and len(name) == len("warm-") + 12
    assert_restorable(there, name, original, info)
    ref = there.images.list_refs()
    assert [r.reference for r in ref] == [
        f"localhost/vmruntime/anywhere-test@{info.manifest_digest}"
    ]
    assert ref[0].source == f"store {store_url}"
    assert list(there.images.tmp_dir.iterdir()) == []


def test_the_image_is_sent_once_and_shared_between_snapshots(
    here: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    options = s3_server.storage_options
    first = push(make_snapshot(here, "one", LOCAL_IMAGE, info), store_url,
                 storage_options=options, with_image=True, image_store=here.images)  # fmt: skip
    chunks = store_objects(s3_server, store_url, "chunks/sha256")
    again = push(make_snapshot(here, "two", LOCAL_IMAGE, info), store_url,
                 storage_options=options, with_image=True, image_store=here.images)  # fmt: skip
    assert first.image is not None and again.image is not None
    assert (again.image.chunks_sent, again.image.bytes_sent) == (0, 0)
    assert again.image.chunks == first.image.chunks
    new = set(store_objects(s3_server, store_url, "chunks/sha256")) - set(chunks)
    assert len(new) <= again.chunks_sent  # only the second snapshot's own layer chunks


def test_ensure_is_idempotent_and_fetches_nothing_twice(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    url = push(make_snapshot(here, "warm", LOCAL_IMAGE, info), store_url,
               storage_options=s3_server.storage_options, with_image=True,
               image_store=here.images).url  # fmt: skip
    name = there.ensure(url, s3_server)
    layer = there.snapshots.get(name).layer_path
    inode = layer.stat().st_ino
    blobs = sorted(p.name for p in there.images.blobs_dir.iterdir())
    assert there.ensure(url, s3_server) == name
    assert layer.stat().st_ino == inode  # the same file: not pulled again
    assert sorted(p.name for p in there.images.blobs_dir.iterdir()) == blobs
    assert there.ensure(name) == name  # and by its local name


def test_a_new_push_under_the_same_name_is_a_new_local_snapshot(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    options = s3_server.storage_options
    first = push(make_snapshot(here, "warm", LOCAL_IMAGE, info), store_url,
                 storage_options=options, with_image=True, image_store=here.images)  # fmt: skip
    old = there.ensure(first.url, s3_server)
    other = machine(tmp_path / "third")
    second = push(make_snapshot(other, "warm", LOCAL_IMAGE, info), store_url,
                  storage_options=options, with_image=True, image_store=here.images)  # fmt: skip
    new = there.ensure(second.url, s3_server)
    assert new != old and {s.name for s in there.snapshots.list()} == {old, new}
    assert there.snapshots.get(new).manifest.created_at == "2026-12-05T00:00:00Z"


def test_a_different_local_snapshot_under_the_fetched_name_is_refused(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    result = push(make_snapshot(here, "warm", LOCAL_IMAGE, info), store_url,
                  storage_options=s3_server.storage_options, with_image=True,
                  image_store=here.images)  # fmt: skip
    squatter = fetched_name("warm", result.index_digest[7:])
    # Another snapshot (its manifest differs: the name is all they share).
    make_snapshot(there, squatter, LOCAL_IMAGE, info, created="2026-12-06T00:00:00Z")
    with pytest.raises(SnapshotExistsError) as caught:
        there.ensure(result.url, s3_server)
    assert caught.value.name == squatter


def _ensure_in_a_process(spec: str, root: str, endpoint: str, queue: multiprocessing.Queue) -> None:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        queue.put(machine(Path(root)).ensure(spec))
    except BaseException as exc:  # reported to the test
        queue.put(repr(exc))


def test_two_processes_of_one_machine_at_once(
    here: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    url = push(make_snapshot(here, "warm", LOCAL_IMAGE, info), store_url,
               storage_options=s3_server.storage_options, with_image=True,
               image_store=here.images).url  # fmt: skip
    root = tmp_path / "there"
    context = multiprocessing.get_context("spawn")  # no threads of this process carried over
    queue = context.Queue()
    workers = [
        context.Process(
            target=_ensure_in_a_process, args=(url, str(root), s3_server.endpoint, queue)
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    there = machine(root)
    assert results[0] == results[1] == there.snapshots.list()[0].name, results
    assert len(there.snapshots.list()) == 1
    nothing_left = [p.name for p in there.snapshots.root.iterdir() if p.name.startswith(".tmp")]
    assert nothing_left == []
    assert_restorable(there, results[0], here.snapshots.get("warm"), info)


# --- what a fetch of the image refuses -----------------------------------------------------


def _pushed_with_image(
    here: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> tuple[str, ImageInfo]:
    info = make_image(tmp_path, here.images)
    result = push(make_snapshot(here, "warm", LOCAL_IMAGE, info), store_url,
                  storage_options=s3_server.storage_options, with_image=True,
                  image_store=here.images)  # fmt: skip
    return result.url, info


def _record(s3_server: S3Server, store_url: str, info: ImageInfo) -> tuple[str, dict]:
    path = f"{store_url.removeprefix('s3://')}/{record_path(info.manifest_digest)}"
    return path, json.loads(s3_server.filesystem().cat_file(path))


def _blob_chunks(record: dict, digest: str) -> list[list]:
    return next(blob["chunks"] for blob in record["blobs"] if blob["digest"] == digest)


def test_a_tampered_image_chunk_is_refused_and_nothing_is_committed(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    url, info = _pushed_with_image(here, store_url, s3_server, tmp_path)
    _, record = _record(s3_server, store_url, info)
    big = info.layer_digests[1]
    index, chunk_hex = _blob_chunks(record, big)[2]
    forged = zstandard.ZstdCompressor().compress(os.urandom(CHUNK_SIZE))
    chunk_path = f"{store_url.removeprefix('s3://')}/chunks/sha256/{chunk_hex}"
    s3_server.filesystem().pipe_file(chunk_path, forged)

    with pytest.raises(SnapshotImageUnavailableError) as caught:
        there.ensure(url, s3_server)
    message = str(caught.value)
    assert info.manifest_digest in message
    assert f"store {store_url}" in message
    assert f"chunk {index} of blob {big}" in message and "does not match its digest" in message
    assert "registry: none, localhost/vmruntime/anywhere-test@" in message
    nothing_committed(there, info, refused=1)


def test_a_record_that_swaps_blobs_is_refused(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    # A store that is consistent in itself: every chunk matches its digest, but the
    # record hands out the small layer's chunks (padded) as the big layer's.
    url, info = _pushed_with_image(here, store_url, s3_server, tmp_path)
    path, record = _record(s3_server, store_url, info)
    big = info.layer_digests[1]
    chunks = _blob_chunks(record, big)
    chunks[:] = [[i, h] for i, h in chunks if i != 0]  # chunk 0 "is all zeros" now
    s3_server.filesystem().pipe_file(path, json.dumps(record).encode())
    with pytest.raises(SnapshotImageUnavailableError, match=f"digest mismatch: expected {big}"):
        there.ensure(url, s3_server)
    nothing_committed(there, info, refused=1)
    # and a record of another image is refused by its own "manifest" field
    record["manifest"] = "sha256:" + "0" * 64
    s3_server.filesystem().pipe_file(path, json.dumps(record).encode())
    with pytest.raises(SnapshotImageUnavailableError, match="is the record of 'sha256:0000"):
        there.ensure(url, s3_server)
    nothing_committed(there, info, refused=1)


def test_a_tampered_manifest_blob_is_refused(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    url, info = _pushed_with_image(here, store_url, s3_server, tmp_path)
    path, record = _record(s3_server, store_url, info)
    # Replace the manifest by another, self-consistent one: its chunk is valid, its
    # digest is not the one the snapshot pins.
    other = json.loads(info.manifest)
    other["annotations"] = {"forged": "yes"}
    data = json.dumps(other).encode()
    chunk_hex = hashlib.sha256(data).hexdigest()
    fs = s3_server.filesystem()
    fs.pipe_file(f"{store_url.removeprefix('s3://')}/chunks/sha256/{chunk_hex}",
                 zstandard.ZstdCompressor().compress(data))  # fmt: skip
    for blob in record["blobs"]:
        if blob["digest"] == info.manifest_digest:
            blob["size"], blob["chunks"] = len(data), [[0, chunk_hex]]
    fs.pipe_file(path, json.dumps(record).encode())
    with pytest.raises(SnapshotImageUnavailableError) as caught:
        there.ensure(url, s3_server)
    assert f"manifest blob {info.manifest_digest} does not match its digest" in str(caught.value)
    nothing_committed(there, info)
    assert list(there.images.blobs_dir.iterdir()) == []  # nothing follows a bad manifest


def test_pushing_a_damaged_cached_blob_is_refused_before_the_name(
    here: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    snapshot = make_snapshot(here, "warm", LOCAL_IMAGE, info)
    blob = here.images.blob_path(info.layer_digests[1])
    data = bytearray(blob.read_bytes())
    data[CHUNK_SIZE + 10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(Exception, match="digest mismatch") as caught:
        push(snapshot, store_url, storage_options=s3_server.storage_options, with_image=True,
             image_store=here.images)  # fmt: skip
    assert "not pushed" in str(caught.value)
    assert store_objects(s3_server, store_url, "names") == []
    assert store_objects(s3_server, store_url, "images/sha256") == []


def test_pushing_with_an_image_that_is_not_cached(
    here: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    snapshot = make_snapshot(here, "warm", LOCAL_IMAGE, info)
    empty = ImageStore(tmp_path / "empty-cache")
    with pytest.raises(SnapshotBaseImageError, match=info.manifest_digest):
        push(snapshot, store_url, storage_options=s3_server.storage_options, with_image=True,
             image_store=empty)  # fmt: skip
    assert store_objects(s3_server, store_url, "names") == []


# --- the image from its registry -------------------------------------------------------


def _registry_image(
    registry: LocalRegistry, here: Machine, tmp_path: Path
) -> tuple[str, ImageInfo]:
    """An image served by the registry and cached here under its registry reference."""
    repo = f"anywhere/{uuid.uuid4().hex[:12]}"
    info = make_image(tmp_path, here.images, tag="latest")
    push_layout(registry, info.layout_dir, repo, "v1", src_tag="latest")
    return f"{registry.host}/{repo}:v1", info


def test_without_its_image_the_registry_serves_it_by_digest(
    local_registry: LocalRegistry,
    here: Machine,
    there: Machine,
    store_url: str,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    reference, info = _registry_image(local_registry, here, tmp_path)
    original = make_snapshot(here, "warm", reference, info)
    result = push(original, store_url, storage_options=s3_server.storage_options)
    assert result.image is None
    assert store_objects(s3_server, store_url, "images/sha256") == []

    name = there.ensure(result.url, s3_server)
    assert_restorable(there, name, original, info)
    repository = reference.rsplit(":", 1)[0]
    assert [r.reference for r in there.images.list_refs()] == [
        f"{repository}@{info.manifest_digest}"
    ]
    for digest in info.layer_digests:
        assert local_registry.blob_get_count(digest) == 1


def test_a_local_name_gets_its_image_from_the_registry(
    local_registry: LocalRegistry, here: Machine, tmp_path: Path
) -> None:
    reference, info = _registry_image(local_registry, here, tmp_path)
    snapshot = make_snapshot(here, "warm", reference, info)
    fresh = Machine(here.snapshots, ImageStore(tmp_path / "fresh-cache"))
    assert fresh.ensure("warm") == "warm"
    assert_restorable(fresh, "warm", snapshot, info)


def test_a_tampered_registry_blob_is_refused(
    local_registry: LocalRegistry,
    here: Machine,
    there: Machine,
    store_url: str,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    reference, info = _registry_image(local_registry, here, tmp_path)
    url = push(make_snapshot(here, "warm", reference, info), store_url,
               storage_options=s3_server.storage_options).url  # fmt: skip
    tamper_blob(local_registry, info.layer_digests[1])
    with pytest.raises(SnapshotImageUnavailableError) as caught:
        there.ensure(url, s3_server)
    message = str(caught.value)
    assert f"registry ({reference.rsplit(':', 1)[0]}@{info.manifest_digest})" in message
    assert f"digest mismatch: expected {info.layer_digests[1]}" in message
    assert f"store {store_url}: no {record_path(info.manifest_digest)}" in message
    nothing_committed(there, info, refused=1)


def test_no_place_has_the_image(
    here: Machine, there: Machine, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    info = make_image(tmp_path, here.images)
    url = push(make_snapshot(here, "warm", LOCAL_IMAGE, info), store_url,
               storage_options=s3_server.storage_options).url  # fmt: skip
    with pytest.raises(SnapshotImageUnavailableError) as caught:
        there.ensure(url, s3_server)
    error = caught.value
    assert error.digest == info.manifest_digest and error.image == LOCAL_IMAGE
    assert error.tried[0] == "the cache: not there"
    assert error.tried[1] == f"store {store_url}: no {record_path(info.manifest_digest)}"
    assert error.tried[2].startswith("registry: none, localhost/vmruntime/anywhere-test@")
    assert "vmr snapshot push --with-image" in error.tried[2]
    nothing_committed(there, info)
    assert list(there.images.blobs_dir.iterdir()) == []


# --- the command line ----------------------------------------------------------------------


def test_cli_push_and_pull_with_image(
    store_url: str,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # --endpoint-url, not $AWS_ENDPOINT_URL: fsspec caches a filesystem per set of options,
    # so one made from the environment would outlive this module's server.
    endpoint = ["--endpoint-url", s3_server.endpoint]
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "a" / "state"))
    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "a" / "cache"))
    a = machine(tmp_path / "a")
    info = make_image(tmp_path, a.images)
    original = make_snapshot(a, "warm", LOCAL_IMAGE, info)
    assert (
        main(["snapshot", "push", "warm", store_url, "--with-image", "--no-progress", *endpoint])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.strip() == f"{store_url}/warm"
    assert f"image {info.manifest_digest}: 4 blobs; sent" in err

    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "b" / "state"))
    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "b" / "cache"))
    assert (
        main(["snapshot", "pull", f"{store_url}/warm", "--with-image", "--no-progress", *endpoint])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.strip() == "warm"
    assert f"image {info.manifest_digest}: from the store" in err
    assert_restorable(machine(tmp_path / "b"), "warm", original, info)


# --- the whole way, with VMs (slow): a machine whose cache started empty -----------------


def _as_machine(patch: pytest.MonkeyPatch, cache: Path, state: Path, runtime: Path) -> None:
    patch.setenv("VMRUNTIME_CACHE", str(cache))
    patch.setenv("VMRUNTIME_STATE", str(state))
    patch.setenv("XDG_RUNTIME_DIR", str(runtime))


def _python(sandbox: Sandbox, code: str) -> str:
    result = sandbox.exec(["python3", "-c", code], timeout=120)
    assert result.returncode == 0, result
    return result.stdout.decode()


@pytest.mark.slow
def test_a_machine_whose_cache_started_empty_restores_and_runs_python(
    python_image: str, store_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    kernel = setup_kernel()
    runtimes = [Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp")) for _ in range(2)]
    try:
        with pytest.MonkeyPatch.context() as patch:
            # The first machine: the small Python image in the user's cache.
            _as_machine(patch, USER_CACHE, tmp_path / "a" / "state", runtimes[0])
            with Sandbox.create(python_image, memory_mib=256) as first:
                _python(first, "open('/root/state', 'w').write('written on the first machine')")
                snapshot = first.snapshot("py-warm")
            result = push(snapshot, store_url, storage_options=s3_server.storage_options,
                          with_image=True)  # fmt: skip

            # The second: a cache holding only the guest kernel (tests never download one).
            cache = tmp_path / "b" / "cache"
            (cache / "guest" / "kernel").mkdir(parents=True)
            (cache / "guest" / "kernel" / kernel.release).symlink_to(kernel.vmlinuz.parent)
            _as_machine(patch, cache, tmp_path / "b" / "state", runtimes[1])
            name = ensure_local(result.url, storage_options=s3_server.storage_options)
            with Sandbox.create(from_snapshot=name, memory_mib=256) as second:
                seen = _python(second, "import pickle, zipimport, struct, io, os, sys, "
                               "traceback; print(open('/root/state').read())")  # fmt: skip
            assert seen == "written on the first machine\n"
            assert [r.source for r in ImageStore(cache).list_refs()] == [f"store {store_url}"]
    finally:
        for runtime in runtimes:
            end_session_runtime(runtime)
