"""The shared snapshot store: push and pull through s3:// (a real S3 server, moto, on
127.0.0.1), memory:// and file:// (fast tier: no VM, the layers are made here)."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import zstandard
from helpers import sparse_file
from s3_support import S3Server, running_s3_server

from vmruntime.cli import main
from vmruntime.errors import SnapshotCorruptError, SnapshotExistsError, SnapshotStoreError
from vmruntime.snapshots import CHUNK_SIZE, LayerInfo, Seal, SnapshotManifest, SnapshotStore
from vmruntime.snapshots.manifest import canonical_json
from vmruntime.snapshots.remote import (
    RemoteStore,
    pull,
    pull_from,
    push,
    seal_from_digests,
    split_snapshot_url,
)
from vmruntime.snapshots.seal import content_digest
from vmruntime.snapshots.store import Snapshot

DIGEST = "sha256:" + "ab" * 32
SIZE = 9 * CHUNK_SIZE + 12345  # ten chunks, the last one short


def random_bytes(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


# Non-zero chunks: 0, 2, 3 and 4 (one write straddles them), 9 (the short last one).
# Chunk 5 is written, but with zeros: a zero chunk, never sent.
WRITES = {
    0: random_bytes(1, 64 << 10),
    2 * CHUNK_SIZE + 1000: random_bytes(2, 8 << 10),
    4 * CHUNK_SIZE - 2048: random_bytes(3, 8 << 10),
    5 * CHUNK_SIZE: bytes(1 << 20),
    9 * CHUNK_SIZE + 100: random_bytes(4, 5000),
}
NON_ZERO_CHUNKS = 5


def make_snapshot(
    store: SnapshotStore,
    name: str,
    writes: dict[int, bytes] = WRITES,
    size: int = SIZE,
    seal: bool = False,
) -> Snapshot:
    """A snapshot in ``store`` whose sparse layer holds ``writes``, as capture would leave."""
    with store.create(name) as pending:
        layer = sparse_file(pending.path / "layer.img", size, writes)
        allocated = os.stat(layer).st_blocks * 512
        manifest = SnapshotManifest(
            name=name,
            image="localhost/vmruntime/default:latest",
            image_manifest_digest=DIGEST,
            image_layer_digests=(DIGEST,),
            layer=LayerInfo(apparent_size=size, allocated_size=allocated),
            created_at="2026-12-04T23:00:00Z",
            labels={"team": "data"},
            seal=Seal(content_digest(layer, size)) if seal else None,
        )
        return pending.commit(manifest)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@dataclass
class Remote:
    """A shared store under test: its URL, what fsspec needs to reach it, and a view of
    its objects through an independent filesystem object."""

    url: str
    options: dict[str, Any]
    fs: Any
    root: str

    def objects(self, directory: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(self.fs.find(f"{self.root}/{directory}"))

    def object(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def open(self) -> RemoteStore:
        return RemoteStore.open(self.url, self.options)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


def memory_remote() -> Remote:
    root = f"/vmr-{uuid.uuid4().hex}"
    return Remote(f"memory://{root}", {}, fsspec.filesystem("memory"), root)


def file_remote(tmp_path: Path) -> Remote:
    root = str(tmp_path / "shared")
    return Remote(f"file://{root}", {}, fsspec.filesystem("file"), root)


def s3_remote(server: S3Server) -> Remote:
    bucket = server.new_bucket()
    return Remote(
        f"s3://{bucket}/store", server.storage_options, server.filesystem(), f"{bucket}/store"
    )


@pytest.fixture
def s3(s3_server: S3Server) -> Remote:
    return s3_remote(s3_server)


@pytest.fixture(params=["s3", "memory", "file"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    if request.param == "s3":
        return s3_remote(request.getfixturevalue("s3_server"))
    if request.param == "memory":
        return memory_remote()
    return file_remote(tmp_path)


@pytest.fixture
def here(tmp_path: Path) -> SnapshotStore:
    """The pushing machine's local store."""
    return SnapshotStore(tmp_path / "here")


@pytest.fixture
def there(tmp_path: Path) -> SnapshotStore:
    """The pulling machine's local store."""
    return SnapshotStore(tmp_path / "there")


def assert_nothing_imported(store: SnapshotStore, name: str) -> None:
    assert not store.exists(name)
    leftovers = list(store.root.iterdir()) if store.root.is_dir() else []
    assert leftovers == [], f"the failed pull left {leftovers}"


# --- round trips ----------------------------------------------------------------------------


def test_round_trip(remote: Remote, here: SnapshotStore, there: SnapshotStore) -> None:
    original = make_snapshot(here, "base")
    result = original.push(remote.url, storage_options=remote.options)
    assert result.url == f"{remote.url}/base"
    assert (result.chunks, result.chunks_sent) == (NON_ZERO_CHUNKS, NON_ZERO_CHUNKS)
    # Zero chunks (holes and the written zeros of chunk 5) were never sent.
    assert len(remote.objects("chunks/sha256")) == NON_ZERO_CHUNKS
    assert len(remote.objects("manifests/sha256")) == 1
    assert remote.fs.cat_file(remote.object("names/base")).decode() == result.index_digest

    pulled = Snapshot.pull(result.url, store=there, storage_options=remote.options)
    assert pulled.path == there.root / "base"
    assert pulled.manifest == original.manifest  # digest included: same canonical bytes
    assert pulled.layer_path.read_bytes() == original.layer_path.read_bytes()
    # Sparse: only the written data is allocated (the original has chunk 5's zeros too).
    assert allocated(pulled.layer_path) <= 200 << 10
    assert allocated(pulled.layer_path) < allocated(original.layer_path)
    there.get("base").verify()


def test_pull_under_another_name_and_by_cli(
    s3: Remote, here: SnapshotStore, there: SnapshotStore
) -> None:
    original = make_snapshot(here, "base")
    push(original, s3.url, storage_options=s3.options, progress=False)
    copy = pull(f"{s3.url}/base", "copy", there, storage_options=s3.options)
    assert copy.name == "copy" and there.get("copy").manifest.name == "copy"
    assert copy.manifest.layer == original.manifest.layer
    assert copy.layer_path.read_bytes() == original.layer_path.read_bytes()


def test_pull_refuses_a_local_name_that_exists(s3: Remote, here: SnapshotStore) -> None:
    push(make_snapshot(here, "base"), s3.url, storage_options=s3.options)
    with pytest.raises(SnapshotExistsError) as caught:
        pull(f"{s3.url}/base", store=here, storage_options=s3.options)
    assert caught.value.name == "base"


# --- deduplication ----------------------------------------------------------------------


def test_second_push_sends_no_chunk(s3: Remote, here: SnapshotStore) -> None:
    snapshot = make_snapshot(here, "base")
    first = push(snapshot, s3.url, storage_options=s3.options)
    listing = s3.objects("chunks/sha256")
    again = push(snapshot, s3.url, storage_options=s3.options)
    assert (again.chunks_sent, again.bytes_sent) == (0, 0)
    assert again.index_digest == first.index_digest
    assert s3.objects("chunks/sha256") == listing
    assert len(s3.objects("manifests/sha256")) == 1


def test_a_snapshot_sharing_chunks_sends_only_the_new_ones(s3: Remote, here: SnapshotStore) -> None:
    push(make_snapshot(here, "base"), s3.url, storage_options=s3.options)
    before = set(s3.objects("chunks/sha256"))
    # A child: chunk 7 is new, chunk 9 changed, the other three are as in "base".
    child = make_snapshot(
        here,
        "child",
        {
            **WRITES,
            7 * CHUNK_SIZE: random_bytes(5, 4096),
            9 * CHUNK_SIZE + 100: random_bytes(6, 5000),
        },
    )
    result = push(child, s3.url, storage_options=s3.options)
    assert (result.chunks, result.chunks_sent) == (NON_ZERO_CHUNKS + 1, 2)
    new = set(s3.objects("chunks/sha256")) - before
    expected = {hashlib.sha256(_chunk(child.layer_path, index)).hexdigest() for index in (7, 9)}
    assert {Path(path).name for path in new} == expected
    assert len(s3.objects("names")) == 2


def _chunk(layer: Path, index: int) -> bytes:
    with open(layer, "rb") as file:
        file.seek(index * CHUNK_SIZE)
        return file.read(CHUNK_SIZE)


# --- interrupted and concurrent pushes -----------------------------------------------------


class Killed(BaseException):
    """The pushing process died (simulated: the store stops taking writes). Like a signal,
    not an Exception: nothing may turn it into a store error."""


class DiesAfterWrites:
    """An fsspec filesystem that takes ``writes`` writes, then fails every one: a push
    killed midway, as far as the store can tell."""

    def __init__(self, fs: Any, writes: int) -> None:
        self._fs = fs
        self._left = writes
        self._lock = threading.Lock()

    def pipe_file(self, path: str, data: bytes, **kwargs: Any) -> Any:
        with self._lock:
            if self._left == 0:
                raise Killed(path)
            self._left -= 1
        return self._fs.pipe_file(path, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def test_interrupted_push_then_complete_one(
    s3: Remote, here: SnapshotStore, there: SnapshotStore
) -> None:
    snapshot = make_snapshot(here, "base")
    dying = s3.open()
    dying.fs = DiesAfterWrites(dying.fs, writes=2)
    with pytest.raises(Killed):
        push(snapshot, dying)
    assert len(s3.objects("chunks/sha256")) == 2
    assert s3.objects("manifests/sha256") == [] and s3.objects("names") == []
    with pytest.raises(SnapshotStoreError, match="no snapshot named 'base'"):
        pull(f"{s3.url}/base", store=there, storage_options=s3.options)
    assert_nothing_imported(there, "base")

    result = push(snapshot, s3.url, storage_options=s3.options)
    assert result.chunks_sent == NON_ZERO_CHUNKS - 2  # what the killed push sent is kept
    assert len(s3.objects("names")) == 1
    pulled = pull(result.url, store=there, storage_options=s3.options)
    assert pulled.layer_path.read_bytes() == snapshot.layer_path.read_bytes()


def test_killed_before_the_name_leaves_the_old_name_intact(
    here: SnapshotStore, there: SnapshotStore
) -> None:
    remote = memory_remote()
    old = make_snapshot(here, "base")
    push(old, remote.url)
    newer_store = SnapshotStore(here.root.parent / "newer")
    newer = make_snapshot(newer_store, "base", {0: random_bytes(9, 4096)})
    dying = remote.open()
    dying.fs = DiesAfterWrites(dying.fs, writes=2)  # its chunk and its index, not the name
    with pytest.raises(Killed):
        push(newer, dying)
    pulled = pull(f"{remote.url}/base", store=there)
    assert pulled.manifest == old.manifest


def test_two_machines_pushing_one_name_at_once(tmp_path: Path, there: SnapshotStore) -> None:
    remote = memory_remote()
    snapshots = [
        make_snapshot(
            SnapshotStore(tmp_path / f"m{n}"),
            "shared",
            {n * CHUNK_SIZE: random_bytes(10 + n, 1 << 20)},
        )
        for n in range(2)
    ]
    errors: list[BaseException] = []

    def push_one(snapshot: Snapshot) -> None:
        try:
            push(snapshot, remote.url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push_one, args=(s,)) for s in snapshots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    pulled = pull(f"{remote.url}/shared", store=there)  # whichever won, whole
    assert pulled.layer_path.read_bytes() in [s.layer_path.read_bytes() for s in snapshots]


# --- what a pull refuses -------------------------------------------------------------------


def _pushed(remote: Remote, store: SnapshotStore, seal: bool = False) -> tuple[Snapshot, str]:
    snapshot = make_snapshot(store, "base", seal=seal)
    index_hex = push(snapshot, remote.url, storage_options=remote.options).index_digest[7:]
    return snapshot, index_hex


def _chunk_hex(store: SnapshotStore, index: int) -> str:
    return hashlib.sha256(_chunk(store.get("base").layer_path, index)).hexdigest()


def test_a_tampered_chunk_is_refused_by_name(
    s3: Remote, here: SnapshotStore, there: SnapshotStore
) -> None:
    _pushed(s3, here)
    digest = _chunk_hex(here, 2)
    forged = zstandard.ZstdCompressor().compress(random_bytes(99, CHUNK_SIZE))
    s3.fs.pipe_file(s3.object(f"chunks/sha256/{digest}"), forged)
    with pytest.raises(SnapshotStoreError) as caught:
        pull(f"{s3.url}/base", store=there, storage_options=s3.options)
    assert "chunk 2" in caught.value.reason and digest in caught.value.reason
    assert "does not match its digest" in caught.value.reason
    assert caught.value.url == s3.url
    assert_nothing_imported(there, "base")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not zstd at all", "not a zstd frame"),
        (zstandard.ZstdCompressor().compress(bytes(2 * CHUNK_SIZE)), "more than"),  # a bomb
        (zstandard.ZstdCompressor().compress(b"short"), "holds 5 bytes"),
        (None, "is missing"),
    ],
)
def test_a_broken_chunk_is_refused(
    content: bytes | None, words: str, here: SnapshotStore, there: SnapshotStore
) -> None:
    remote = memory_remote()
    _pushed(remote, here)
    digest = _chunk_hex(here, 3)
    path = remote.object(f"chunks/sha256/{digest}")
    if content is None:
        remote.fs.rm_file(path)
    else:
        remote.fs.pipe_file(path, content)
    with pytest.raises(SnapshotStoreError, match=words) as caught:
        pull(f"{remote.url}/base", store=there)
    assert "chunk 3" in caught.value.reason and digest in caught.value.reason
    assert_nothing_imported(there, "base")


def test_a_name_pointing_at_a_missing_index(here: SnapshotStore, there: SnapshotStore) -> None:
    remote = memory_remote()
    _, index_hex = _pushed(remote, here)
    remote.fs.rm_file(remote.object(f"manifests/sha256/{index_hex}"))
    with pytest.raises(SnapshotStoreError) as caught:
        pull(f"{remote.url}/base", store=there)
    assert f"index sha256:{index_hex}, which the store does not have" in caught.value.reason
    assert_nothing_imported(there, "base")


def test_a_tampered_index_is_refused(here: SnapshotStore, there: SnapshotStore) -> None:
    remote = memory_remote()
    _, index_hex = _pushed(remote, here)
    path = remote.object(f"manifests/sha256/{index_hex}")
    remote.fs.pipe_file(path, remote.fs.cat_file(path).replace(b'"team"', b'"tean"'))
    with pytest.raises(
        SnapshotStoreError, match=f"does not match its digest: expected sha256:{index_hex}"
    ):
        pull(f"{remote.url}/base", store=there)
    assert_nothing_imported(there, "base")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b"sha256:1234", "not a digest"),
        (b"\xff\xfe", "not a digest"),
    ],
)
def test_a_bad_name_object_is_refused(
    text: bytes, words: str, here: SnapshotStore, there: SnapshotStore
) -> None:
    remote = memory_remote()
    _pushed(remote, here)
    remote.fs.pipe_file(remote.object("names/base"), text)
    with pytest.raises(SnapshotStoreError, match=words):
        pull(f"{remote.url}/base", store=there)


def _forge_index(remote: Remote, index: dict[str, Any], name: str = "base") -> None:
    """A store that is consistent in itself (digests match) but says what it likes."""
    data = canonical_json(index)
    digest = hashlib.sha256(data).hexdigest()
    remote.fs.pipe_file(remote.object(f"manifests/sha256/{digest}"), data)
    remote.fs.pipe_file(remote.object(f"names/{name}"), f"sha256:{digest}".encode())


def _index(remote: Remote, index_hex: str) -> dict[str, Any]:
    import json

    return json.loads(remote.fs.cat_file(remote.object(f"manifests/sha256/{index_hex}")))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda i: i.update(apparent_size=i["apparent_size"] + 1), "differs from the manifest"),
        (lambda i: i.update(chunks=i["chunks"][::-1]), "out of order"),
        (lambda i: i["chunks"].append([10, "00" * 32]), "past the layer's end"),
        (lambda i: i.update(extra=1), "want an object with keys"),
        (lambda i: i["manifest"].update(schema=3), "schema 3 is not one of"),
        (lambda i: i["manifest"]["layer"].update(file="../../x"), "plain file name"),
    ],
)
def test_an_invalid_index_is_refused(
    change: Any, words: str, here: SnapshotStore, there: SnapshotStore
) -> None:
    remote = memory_remote()
    _, index_hex = _pushed(remote, here)
    index = _index(remote, index_hex)
    change(index)
    _forge_index(remote, index)
    with pytest.raises(SnapshotStoreError, match=words):
        pull(f"{remote.url}/base", store=there)
    assert_nothing_imported(there, "base")


# --- the seal -----------------------------------------------------------------------------


def test_a_sealed_snapshot_round_trips_with_its_seal(
    s3: Remote, here: SnapshotStore, there: SnapshotStore
) -> None:
    original, _ = _pushed(s3, here, seal=True)
    pulled = pull(f"{s3.url}/base", store=there, storage_options=s3.options)
    assert pulled.manifest.seal == original.manifest.seal is not None
    pulled.verify()


def test_a_pull_checks_the_seal(here: SnapshotStore, there: SnapshotStore) -> None:
    remote = memory_remote()
    _, index_hex = _pushed(remote, here, seal=True)
    index = _index(remote, index_hex)
    index["manifest"]["seal"]["digest"] = "sha256:" + "00" * 32
    _forge_index(remote, index)
    with pytest.raises(SnapshotStoreError, match="seal mismatch: sealed sha256:0000"):
        pull(f"{remote.url}/base", store=there)
    assert_nothing_imported(there, "base")


def test_a_sealed_snapshot_whose_layer_changed_is_not_pushed(here: SnapshotStore) -> None:
    remote = memory_remote()
    snapshot = make_snapshot(here, "base", seal=True)
    snapshot.layer_path.chmod(0o600)
    with open(snapshot.layer_path, "r+b") as file:
        file.seek(CHUNK_SIZE + 7)
        file.write(b"x")
    with pytest.raises(SnapshotCorruptError, match="seal mismatch"):
        push(snapshot, remote.url)
    assert remote.objects("names") == []


def test_the_seal_from_chunk_digests_is_the_seal(here: SnapshotStore) -> None:
    snapshot = make_snapshot(here, "base")
    digests = {
        index: hashlib.sha256(_chunk(snapshot.layer_path, index)).hexdigest()
        for index in (0, 2, 3, 4, 9)
    }
    assert seal_from_digests(digests, SIZE) == content_digest(snapshot.layer_path, SIZE)


# --- URLs, progress and the command line ------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/prefix/snap", ("s3://bucket/prefix", "snap")),
        ("s3://bucket/snap/", ("s3://bucket", "snap")),
        ("memory://snap", ("memory://", "snap")),
        ("file:///srv/store/snap", ("file:///srv/store", "snap")),
        ("/srv/store/snap", ("/srv/store", "snap")),
    ],
)
def test_split_snapshot_url(url: str, expected: tuple[str, str]) -> None:
    assert split_snapshot_url(url) == expected


@pytest.mark.parametrize("url", ["snap", "s3://", "s3://bucket/..", "s3://bucket/.hidden"])
def test_split_snapshot_url_refuses(url: str) -> None:
    with pytest.raises((SnapshotStoreError, ValueError)):
        split_snapshot_url(url)


def test_pull_from_the_root_of_a_memory_store(here: SnapshotStore, there: SnapshotStore) -> None:
    name = f"root-{uuid.uuid4().hex[:8]}"
    result = push(make_snapshot(here, name), "memory://")
    assert result.url == f"memory://{name}"
    assert pull(result.url, store=there).name == name
    remote = RemoteStore(fsspec.filesystem("memory"), "", "memory://")
    assert pull_from(remote, name, "again", store=there).name == "again"


def test_progress_bars_go_to_stderr_when_asked(
    here: SnapshotStore, there: SnapshotStore, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = memory_remote()
    push(make_snapshot(here, "base"), remote.url, progress=True)
    pull(f"{remote.url}/base", store=there, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "push base" in captured.err and "pull base" in captured.err
    push(here.get("base"), remote.url)  # stderr is no terminal here: no bar
    assert capsys.readouterr().err == ""


def _as_machine(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    monkeypatch.setenv("VMRUNTIME_STATE", str(state))


def test_cli_push_and_pull_with_endpoint_url(
    s3: Remote,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _as_machine(monkeypatch, tmp_path / "a")
    original = make_snapshot(SnapshotStore(), "base")
    assert main(["snapshot", "push", "base", s3.url, "--endpoint-url", s3_server.endpoint]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{s3.url}/base"
    assert f"sent {NON_ZERO_CHUNKS} of {NON_ZERO_CHUNKS} chunks" in err

    _as_machine(monkeypatch, tmp_path / "b")
    assert (
        main(["snapshot", "pull", f"{s3.url}/base", "mine", "--endpoint-url", s3_server.endpoint])
        == 0
    )
    assert capsys.readouterr().out.strip() == "mine"
    assert SnapshotStore().get("mine").layer_path.read_bytes() == (original.layer_path.read_bytes())


def test_cli_reads_the_endpoint_from_the_environment(
    s3: Remote,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    _as_machine(monkeypatch, tmp_path / "a")
    make_snapshot(SnapshotStore(), "base")
    assert main(["snapshot", "push", "base", s3.url, "--no-progress"]) == 0
    _as_machine(monkeypatch, tmp_path / "b")
    assert main(["snapshot", "pull", f"{s3.url}/base", "--no-progress"]) == 0
    assert SnapshotStore().exists("base")


def test_cli_errors_name_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _as_machine(monkeypatch, tmp_path / "a")
    remote = memory_remote()
    assert main(["snapshot", "pull", f"{remote.url}/nothing"]) == 1
    assert f"snapshot store {remote.url}: no snapshot named 'nothing'" in capsys.readouterr().err
    assert main(["snapshot", "push", "absent", remote.url]) == 1
    assert "snapshot 'absent': no such snapshot" in capsys.readouterr().err
    make_snapshot(SnapshotStore(), "base")
    assert main(["snapshot", "push", "base", remote.url, "--endpoint-url", "http://x"]) == 1
    assert "--endpoint-url is for s3:// URLs" in capsys.readouterr().err


def test_an_unreachable_store_is_a_store_error(s3_server: S3Server, here: SnapshotStore) -> None:
    # s3_server only for its dummy credentials: this endpoint is a port nobody serves.
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
        options = {
            "endpoint_url": dead,
            "config_kwargs": {"retries": {"max_attempts": 1}},
        }
        with pytest.raises(SnapshotStoreError, match="EndpointConnectionError") as caught:
            push(make_snapshot(here, "base"), "s3://bucket/p", storage_options=options)
    assert caught.value.url == "s3://bucket/p"
    assert "cannot check chunks/sha256/" in caught.value.reason


def test_a_missing_bucket_is_a_store_error(s3_server: S3Server, here: SnapshotStore) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/store"
    with pytest.raises(SnapshotStoreError, match="cannot write chunks/sha256/") as caught:
        push(make_snapshot(here, "base"), url, storage_options=s3_server.storage_options)
    assert caught.value.url == url


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ``vmr ARGV`` with stderr on a new pseudo-terminal (stdout a pipe); its exit
    status and what reached the terminal."""
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "vmruntime", *argv], stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    received = bytearray()
    while True:  # read as it comes: a full pty buffer would block the child
        try:
            data = os.read(controller, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        received += data
    os.close(controller)
    process.communicate(timeout=60)
    return process.wait(timeout=60), received.decode(errors="replace")


def test_progress_bars_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _as_machine(monkeypatch, tmp_path / "a")
    make_snapshot(SnapshotStore(), "base")
    url = f"file://{tmp_path}/shared"
    status, shown = _run_on_a_terminal(["snapshot", "push", "base", url])
    assert status == 0, shown
    assert "push base: 100%" in shown and "sent 5, had 0" in shown
    status, shown = _run_on_a_terminal(["snapshot", "pull", f"{url}/base", "copy"])
    assert status == 0, shown
    assert "pull copy: 100%" in shown
    status, shown = _run_on_a_terminal(["snapshot", "push", "base", url, "--no-progress"])
    assert status == 0 and "%|" not in shown
