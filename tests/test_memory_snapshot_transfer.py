"""A memory snapshot moves like a disk snapshot (fast tier: no VM): export and import
(archive format version 2), push and pull (the shared store's index version 2), and
what an attacker who rewrites an archive or a store gets for it.

Memory snapshots are built here by hand as capture leaves them: a sparse "RAM" file, a
small "device state" file, their content digests in a schema-2 manifest, committed
through the store. Tamper cases play the forger who knows the formats: digests inside
the archive or the store are recomputed, so only the checks against the manifest and
the per-file digests stand in the way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
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
from vmruntime.errors import SnapshotCorruptError, SnapshotImportError, SnapshotStoreError
from vmruntime.snapshots import CHUNK_SIZE, LayerInfo, SnapshotManifest, SnapshotStore
from vmruntime.snapshots.archive import (
    _CHUNK,
    _END,
    _HEADER,
    _TRAILER,
    MAGIC,
    export_snapshot,
    import_snapshot,
)
from vmruntime.snapshots.manifest import MemoryInfo, SavedFile, canonical_json
from vmruntime.snapshots.remote import pull, push
from vmruntime.snapshots.seal import content_digest
from vmruntime.snapshots.store import Snapshot

MiB = 1 << 20
DIGEST = "sha256:" + "ab" * 32
LAYER_SIZE = 2 * CHUNK_SIZE + 4096
MEMORY_MIB = 64  # 16 RAM chunks
RAM_SIZE = MEMORY_MIB * MiB
STATE_SIZE = 200_000  # one short chunk, as QEMU's device state is


def random_bytes(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


LAYER_WRITES = {0: random_bytes(1, 8192), 2 * CHUNK_SIZE: random_bytes(2, 4096)}
# RAM chunks 0-9 hold data; 10 holds written zeros (a zero chunk); 11-15 are holes.
RAM_WRITES = {i * CHUNK_SIZE + 4096: random_bytes(100 + i, 256 << 10) for i in range(10)}
RAM_WRITES[10 * CHUNK_SIZE] = bytes(MiB)
RAM_DATA_CHUNKS = 10


def make_memory_snapshot(
    store: SnapshotStore,
    name: str,
    *,
    ram_writes: dict[int, bytes] = RAM_WRITES,
    state: bytes = random_bytes(7, STATE_SIZE),
) -> Snapshot:
    """A schema-2 snapshot in ``store``, as ``capture_memory`` would commit it."""
    with store.create(name) as pending:
        layer = sparse_file(pending.path / "layer.img", LAYER_SIZE, LAYER_WRITES)
        ram = sparse_file(pending.path / "memory.ram", RAM_SIZE, ram_writes)
        state_path = pending.path / "machine.state"
        state_path.write_bytes(state)
        memory = MemoryInfo(
            ram=SavedFile("memory.ram", RAM_SIZE, content_digest(ram)),
            state=SavedFile("machine.state", len(state), content_digest(state_path)),
            cpus=1, memory_mib=MEMORY_MIB, accelerator="tcg",
        )  # fmt: skip
        manifest = SnapshotManifest(
            name=name, image="localhost/vmruntime/default:latest",
            image_manifest_digest=DIGEST, image_layer_digests=(DIGEST,),
            layer=LayerInfo(apparent_size=LAYER_SIZE, allocated_size=allocated(layer)),
            created_at="2026-12-05T03:00:00Z", labels={"kind": "memory"},
            memory=memory, schema=2,
        )  # fmt: skip
        return pending.commit(manifest)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def assert_same_files(copy: Snapshot, original: Snapshot) -> None:
    """Every data file byte-identical, 0600, and as sparse as the original's."""
    assert copy.manifest.files == original.manifest.files == (
        "layer.img", "memory.ram", "machine.state")  # fmt: skip
    for file in original.manifest.files:
        ours, theirs = copy.path / file, original.path / file
        assert ours.read_bytes() == theirs.read_bytes(), file
        assert os.stat(ours).st_mode & 0o777 == 0o600, file
        assert allocated(ours) <= allocated(theirs) + 64 * 1024, file
    # 64 MiB apparent, ~2.5 MiB of data: rebuilt sparse.
    assert allocated(copy.path / "memory.ram") < 4 * MiB


def assert_nothing_left(store: SnapshotStore, name: str) -> None:
    assert not store.exists(name)
    leftovers = list(store.root.iterdir()) if store.root.is_dir() else []
    assert leftovers == [], f"the failed transfer left {leftovers}"


@pytest.fixture
def here(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "here")


@pytest.fixture
def there(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "there")


@pytest.fixture
def saved(here: SnapshotStore) -> Snapshot:
    return make_memory_snapshot(here, "machine")


# --- the archive: round trip ------------------------------------------------------------


def test_export_import_round_trip(saved: Snapshot, there: SnapshotStore, tmp_path: Path) -> None:
    result = export_snapshot(saved, tmp_path / "machine.vmrsnap")
    data = result.path.read_bytes()
    assert _HEADER.unpack_from(data)[:2] == (MAGIC, 2)  # a memory snapshot: version 2
    assert result.manifest_digest == saved.digest
    # Layer 2 chunks + RAM 10 + state 1; zero chunks and holes are not stored.
    assert result.chunks == 2 + RAM_DATA_CHUNKS + 1
    assert result.size < 4 * MiB

    copy = import_snapshot(result.path, there)
    assert copy.digest == saved.digest and copy.manifest == saved.manifest
    assert_same_files(copy, saved)
    copy.verify()

    renamed = import_snapshot(result.path, there, "renamed")
    assert renamed.manifest == dataclasses.replace(saved.manifest, name="renamed")
    assert_same_files(renamed, saved)


def test_a_disk_snapshot_still_exports_as_version_1(here: SnapshotStore, tmp_path: Path) -> None:
    disk = make_memory_snapshot(here, "m")
    with here.create("disk") as pending:
        sparse_file(pending.path / "layer.img", LAYER_SIZE, LAYER_WRITES)
        manifest = dataclasses.replace(disk.manifest, name="disk", memory=None, schema=1)
        disk = pending.commit(manifest)
    data = export_snapshot(disk, tmp_path / "d.vmrsnap").path.read_bytes()
    assert _HEADER.unpack_from(data)[1] == 1 and b"E" + _END.pack(2, LAYER_SIZE) not in data
    assert import_snapshot(tmp_path / "d.vmrsnap", SnapshotStore(tmp_path / "x")).digest == (
        disk.digest
    )


def test_a_memory_snapshot_whose_ram_changed_is_not_exported(
    saved: Snapshot, tmp_path: Path
) -> None:
    with open(saved.path / "memory.ram", "r+b") as ram:
        ram.seek(5 * CHUNK_SIZE + 4096)
        ram.write(b"changed after the capture")
    with pytest.raises(SnapshotCorruptError, match=r"memory\.ram is sha256:"):
        export_snapshot(saved, tmp_path / "x.vmrsnap")
    assert list(tmp_path.glob("*x.vmrsnap*")) == []


# --- the archive, as a forger rewrites it ---------------------------------------------------


@dataclass
class Archive:
    """An archive taken apart: header version, manifest bytes, each file's chunk records
    [index, sha256, frame] and the size its end record gives."""

    version: int
    manifest_json: bytes
    files: list[list[list[Any]]]
    sizes: list[int]

    @classmethod
    def parse(cls, data: bytes) -> Archive:
        _, version, _, _, manifest_len = _HEADER.unpack_from(data)
        offset = _HEADER.size + manifest_len
        manifest_json = data[_HEADER.size : offset]
        files, sizes = [], []
        while data[offset : offset + 1] in (b"C", b"E"):
            records = []
            while data[offset : offset + 1] == b"C":
                index, stored_len, sha = _CHUNK.unpack_from(data, offset + 1)
                start = offset + 1 + _CHUNK.size
                records.append([index, sha, data[start : start + stored_len]])
                offset = start + stored_len
            assert data[offset : offset + 1] == b"E"
            sizes.append(_END.unpack_from(data, offset + 1)[1])
            offset += 1 + _END.size
            files.append(records)
        return cls(version, manifest_json, files, sizes)

    def build(self) -> bytes:
        """Consistent in itself: end records, trailer and file digest recomputed."""
        out = bytearray(_HEADER.pack(MAGIC, self.version, 0, CHUNK_SIZE, len(self.manifest_json)))
        out += self.manifest_json
        for records, size in zip(self.files, self.sizes, strict=True):
            for index, sha, frame in records:
                out += b"C" + _CHUNK.pack(index, len(frame), sha) + frame
            out += b"E" + _END.pack(len(records), size)
        count = sum(len(records) for records in self.files)
        manifest_sha = hashlib.sha256(self.manifest_json).digest()
        out += b"T" + _TRAILER.pack(count, sum(self.sizes), manifest_sha)
        return bytes(out + hashlib.sha256(out).digest())

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_json)

    def set_manifest(self, document: dict[str, Any]) -> None:
        self.manifest_json = canonical_json(document)


def record(data: bytes) -> list[Any]:
    """A chunk record as a forger makes it: the frame and its digest match the data."""
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    return [0, hashlib.sha256(data).digest(), frame]


RAM, STATE = 1, 2  # positions of the files in the archive


@pytest.fixture
def archive(saved: Snapshot, tmp_path: Path) -> Archive:
    parsed = Archive.parse(export_snapshot(saved, tmp_path / "a.vmrsnap").path.read_bytes())
    assert parsed.build() == (tmp_path / "a.vmrsnap").read_bytes()  # the forger's kit is exact
    return parsed


def assert_import_refused(data: bytes, there: SnapshotStore, tmp_path: Path, words: str) -> None:
    path = tmp_path / "forged.vmrsnap"
    path.write_bytes(data)
    with pytest.raises(SnapshotImportError, match=words):
        import_snapshot(path, there)
    assert_nothing_left(there, "machine")


def test_a_flipped_byte_in_a_ram_chunk(
    archive: Archive, there: SnapshotStore, tmp_path: Path
) -> None:
    frame = bytearray(archive.files[RAM][3][2])
    frame[len(frame) // 2] ^= 0x01
    archive.files[RAM][3][2] = bytes(frame)
    words = r"chunk 3 of memory\.ram: (digest mismatch|corrupt compressed)"
    assert_import_refused(archive.build(), there, tmp_path, words)


def test_a_ram_chunk_replaced_with_its_digest_recomputed(
    archive: Archive, there: SnapshotStore, tmp_path: Path
) -> None:
    archive.files[RAM][3][1:] = record(random_bytes(99, CHUNK_SIZE))[1:]
    assert_import_refused(archive.build(), there, tmp_path,
                          "digest mismatch: memory.ram's content is sha256:")  # fmt: skip


def test_a_truncated_state(
    archive: Archive, saved: Snapshot, there: SnapshotStore, tmp_path: Path
) -> None:
    state = (saved.path / "machine.state").read_bytes()
    short = [0, *record(state[: STATE_SIZE // 2])[1:]]
    archive.files[STATE] = [short]
    assert_import_refused(archive.build(), there, tmp_path,
                          f"chunk 0 of machine.state: the compressed frame declares "
                          f"{STATE_SIZE // 2} bytes, the chunk holds {STATE_SIZE}")  # fmt: skip
    # The state cut short in the manifest too (end record and size): its digest is not.
    document = archive.manifest()
    document["memory"]["state"]["size"] = STATE_SIZE // 2
    archive.set_manifest(document)
    archive.sizes[STATE] = STATE_SIZE // 2
    assert_import_refused(archive.build(), there, tmp_path,
                          "digest mismatch: machine.state's content")  # fmt: skip
    # And an archive file cut inside the state's records.
    whole = export_snapshot(saved, tmp_path / "whole.vmrsnap").path.read_bytes()
    assert_import_refused(whole[: -(200 + 1 + _TRAILER.size + 32)], there, tmp_path,
                          "truncated: the file ends inside")  # fmt: skip


def test_a_manifest_claiming_a_smaller_ram(
    archive: Archive, there: SnapshotStore, tmp_path: Path
) -> None:
    document = archive.manifest()
    document["memory"].update(memory_mib=MEMORY_MIB // 2)
    document["memory"]["ram"]["size"] = RAM_SIZE // 2
    archive.set_manifest(document)
    archive.sizes[RAM] = RAM_SIZE // 2
    assert_import_refused(archive.build(), there, tmp_path,
                          "chunk 8 of memory.ram is outside memory.ram \\(8 chunks")  # fmt: skip
    # Without the chunks past the claimed end, the RAM's digest gives it away.
    archive.files[RAM] = [r for r in archive.files[RAM] if r[0] < 8]
    assert_import_refused(archive.build(), there, tmp_path,
                          "digest mismatch: memory.ram's content")  # fmt: skip


def test_an_end_record_that_disagrees_with_the_manifest(
    archive: Archive, there: SnapshotStore, tmp_path: Path
) -> None:
    archive.sizes[RAM] -= CHUNK_SIZE
    words = f"memory.ram: the archive says {RAM_SIZE - CHUNK_SIZE} bytes"
    assert_import_refused(archive.build(), there, tmp_path, words)


def test_a_memory_manifest_in_a_version_1_archive(
    archive: Archive, there: SnapshotStore, tmp_path: Path
) -> None:
    archive.version = 1
    words = "format version 1 with a memory snapshot's manifest.*want version 2"
    assert_import_refused(archive.build(), there, tmp_path, words)


def test_an_unknown_archive_version(archive: Archive, there: SnapshotStore, tmp_path: Path) -> None:
    archive.version = 3
    assert_import_refused(archive.build(), there, tmp_path,
                          "unsupported archive format version 3 \\(this vmruntime reads "
                          "versions 1, 2\\)")  # fmt: skip


def test_a_state_file_pointing_outside_the_staging_directory(
    archive: Archive, there: SnapshotStore, tmp_path: Path
) -> None:
    document = archive.manifest()
    document["memory"]["state"]["file"] = "../../escaped"
    archive.set_manifest(document)
    assert_import_refused(archive.build(), there, tmp_path, "plain file name")
    assert not (there.root.parent / "escaped").exists()


# --- the shared store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


@dataclass
class Remote:
    url: str
    options: dict[str, Any]
    fs: Any
    root: str

    def object(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def index(self, name: str = "machine") -> dict[str, Any]:
        self.fs.invalidate_cache()
        digest = self.fs.cat_file(self.object(f"names/{name}")).decode()[7:]
        return json.loads(self.fs.cat_file(self.object(f"manifests/sha256/{digest}")))

    def forge_index(self, index: dict[str, Any], name: str = "machine") -> None:
        """A store consistent in itself (the index under its digest) that says what it likes."""
        data = canonical_json(index)
        digest = hashlib.sha256(data).hexdigest()
        self.fs.pipe_file(self.object(f"manifests/sha256/{digest}"), data)
        self.fs.pipe_file(self.object(f"names/{name}"), f"sha256:{digest}".encode())


@pytest.fixture
def s3(s3_server: S3Server) -> Remote:
    bucket = s3_server.new_bucket()
    return Remote(f"s3://{bucket}/store", s3_server.storage_options, s3_server.filesystem(),
                  f"{bucket}/store")  # fmt: skip


@pytest.fixture
def memory_store() -> Remote:
    root = f"/vmr-{uuid.uuid4().hex}"
    return Remote(f"memory://{root}", {}, fsspec.filesystem("memory"), root)


def test_push_pull_round_trip(saved: Snapshot, s3: Remote, there: SnapshotStore) -> None:
    result = push(saved, s3.url, storage_options=s3.options)
    assert result.chunks == result.chunks_sent == 2 + RAM_DATA_CHUNKS + 1
    index = s3.index()
    assert index["version"] == 2 and sorted(index["memory"]) == ["ram", "state"]
    assert [i for i, _ in index["memory"]["ram"]["chunks"]] == list(range(RAM_DATA_CHUNKS))
    assert index["memory"]["ram"]["size"] == RAM_SIZE
    assert index["memory"]["state"]["size"] == STATE_SIZE

    copy = pull(result.url, store=there, storage_options=s3.options)
    assert copy.digest == saved.digest and copy.manifest == saved.manifest
    assert_same_files(copy, saved)
    copy.verify()
    again = push(saved, s3.url, storage_options=s3.options)
    assert again.chunks_sent == 0 and again.index_digest == result.index_digest


def test_a_second_memory_snapshot_sends_only_its_new_chunks(
    saved: Snapshot, here: SnapshotStore, s3: Remote
) -> None:
    push(saved, s3.url, storage_options=s3.options)
    changed = dict(RAM_WRITES)
    changed[3 * CHUNK_SIZE + 4096] = random_bytes(333, 256 << 10)
    second = make_memory_snapshot(here, "later", ram_writes=changed,
                                  state=random_bytes(8, STATE_SIZE))  # fmt: skip
    result = push(second, s3.url, storage_options=s3.options)
    # One RAM chunk and the device state are new; the layer and nine RAM chunks are shared.
    assert (result.chunks, result.chunks_sent) == (2 + RAM_DATA_CHUNKS + 1, 2)
    assert result.bytes_sent < 2 * MiB


def test_a_disk_snapshot_index_is_unchanged(here: SnapshotStore, memory_store: Remote) -> None:
    saved = make_memory_snapshot(here, "m")
    with here.create("disk") as pending:
        sparse_file(pending.path / "layer.img", LAYER_SIZE, LAYER_WRITES)
        disk = pending.commit(dataclasses.replace(saved.manifest, name="disk", memory=None,
                                                  schema=1))  # fmt: skip
    push(disk, memory_store.url)
    assert sorted(memory_store.index("disk")) == ["apparent_size", "chunks", "manifest"]


def test_a_ram_chunk_replaced_under_its_digest(
    saved: Snapshot, s3: Remote, there: SnapshotStore
) -> None:
    push(saved, s3.url, storage_options=s3.options)
    hex_digest = dict(s3.index()["memory"]["ram"]["chunks"])[4]
    other = zstandard.ZstdCompressor().compress(random_bytes(44, CHUNK_SIZE))
    s3.fs.pipe_file(s3.object(f"chunks/sha256/{hex_digest}"), other)
    with pytest.raises(SnapshotStoreError, match=f"chunk 4 of memory.ram .*{hex_digest}.* does "
                       "not match its digest"):  # fmt: skip
        pull(f"{s3.url}/machine", store=there, storage_options=s3.options)
    assert_nothing_left(there, "machine")


def test_a_state_chunk_cut_short_in_the_store(
    saved: Snapshot, memory_store: Remote, there: SnapshotStore
) -> None:
    push(saved, memory_store.url)
    hex_digest = memory_store.index()["memory"]["state"]["chunks"][0][1]
    state = (saved.path / "machine.state").read_bytes()
    short = zstandard.ZstdCompressor().compress(state[:1000])
    memory_store.fs.pipe_file(memory_store.object(f"chunks/sha256/{hex_digest}"), short)
    with pytest.raises(SnapshotStoreError, match=f"chunk 0 of machine.state .* holds 1000 bytes, "
                       f"not {STATE_SIZE}"):  # fmt: skip
        pull(f"{memory_store.url}/machine", store=there)
    assert_nothing_left(there, "machine")


def _drop_ram_chunk_5(index: dict[str, Any]) -> None:
    index["memory"]["ram"]["chunks"] = [c for c in index["memory"]["ram"]["chunks"] if c[0] != 5]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # More chunks listed than the size holds.
        (lambda i: i["memory"]["ram"]["chunks"].append([RAM_SIZE // CHUNK_SIZE, "ab" * 32]),
         "chunk index 16 is out of order or past memory.ram's end \\(16 chunks\\)"),
        # Fewer: the missing one would read as zeros; the RAM's digest says otherwise.
        (_drop_ram_chunk_5, "digest mismatch: the manifest records sha256:.* for memory.ram"),
        (lambda i: i["memory"]["state"].update(size=STATE_SIZE - 1),
         "memory state size 199999 differs from the manifest's 200000"),
        (lambda i: i["manifest"]["memory"]["ram"].update(digest="sha256:" + "00" * 32),
         "digest mismatch: the manifest records sha256:0000"),
        (lambda i: i.update(version=3), "index version 3 is unknown"),
        (lambda i: i.pop("version"), "want an object with keys \\['apparent_size', 'chunks', "
         "'manifest'\\]"),
        (lambda i: i["memory"].pop("state"), "memory: want an object with keys"),
    ],
)  # fmt: skip
def test_a_forged_index_is_refused(
    change: Any, words: str, saved: Snapshot, memory_store: Remote, there: SnapshotStore
) -> None:
    push(saved, memory_store.url)
    index = memory_store.index()
    change(index)
    memory_store.forge_index(index)
    with pytest.raises(SnapshotStoreError, match=words):
        pull(f"{memory_store.url}/machine", store=there)
    assert_nothing_left(there, "machine")


def test_a_memory_snapshot_whose_state_changed_is_not_pushed(
    saved: Snapshot, memory_store: Remote
) -> None:
    with open(saved.path / "machine.state", "r+b") as state:
        state.write(b"tampered")
    with pytest.raises(SnapshotCorruptError, match=r"machine\.state is sha256:.*not pushed"):
        push(saved, memory_store.url)
    memory_store.fs.invalidate_cache()
    assert not memory_store.fs.exists(memory_store.object("names/machine"))
    assert not memory_store.fs.exists(memory_store.object("manifests"))


# --- vmr snapshot ls / inspect ---------------------------------------------------------------


def test_ls_and_inspect_show_a_memory_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))
    make_memory_snapshot(SnapshotStore(), "machine")
    assert main(["snapshot", "ls"]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:6] == ["NAME", "KIND", "CREATED", "SIZE", "MEMORY", "SEALED"]
    assert line.split()[:2] == ["machine", "memory"] and "64.0 MiB" in line
    assert main(["snapshot", "inspect", "machine"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "memory" and doc["memory"]["memory_mib"] == MEMORY_MIB
    assert doc["files"]["memory.ram"]["size"] == RAM_SIZE
    assert 0 < doc["files"]["memory.ram"]["allocated"] < 4 * MiB
    assert doc["files"]["machine.state"]["size"] == STATE_SIZE
    assert main(["snapshot", "verify", "machine"]) == 0
    assert "RAM and device state digests" in capsys.readouterr().out
