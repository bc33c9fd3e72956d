"""The export archive: round trips, sparseness, and every way a file is refused (fast tier).

Snapshots are made directly with the store API from sparse files written here: no VM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import tarfile
from pathlib import Path

import pytest
import zstandard
from helpers import sparse_file

from vmruntime.cli import main
from vmruntime.errors import (
    SnapshotCorruptError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotImportError,
)
from vmruntime.snapshots import (
    CHUNK_SIZE,
    LayerInfo,
    Seal,
    Snapshot,
    SnapshotManifest,
    SnapshotStore,
    content_digest,
)
from vmruntime.snapshots.archive import (
    _CHUNK,
    _HEADER,
    _TRAILER,
    MAGIC,
    export_snapshot,
    import_snapshot,
)

MiB = 1 << 20
LAYER_SIZE = 64 * MiB
DIGEST = "sha256:" + "ab" * 32
# A few MiB of data at offsets: inside one chunk, across a chunk boundary, in the last one.
WRITES = {
    1 * MiB: os.urandom(MiB),
    3 * CHUNK_SIZE - 512 * 1024: b"boundary" * (128 * 1024),
    LAYER_SIZE - 8192: b"\x07" * 8192,
    20 * MiB: bytes(64 * 1024) + b"after zeros" + bytes(64 * 1024),
}


def make_layer(path: Path, size: int = LAYER_SIZE, writes: dict[int, bytes] = WRITES) -> Path:
    return sparse_file(path, size, writes)


def make_snapshot(
    store: SnapshotStore,
    name: str,
    *,
    sealed: bool,
    size: int = LAYER_SIZE,
    writes: dict[int, bytes] = WRITES,
) -> Snapshot:
    with store.create(name) as pending:
        layer = make_layer(pending.path / "layer.img", size, writes)
        seal = Seal(digest=content_digest(layer, size)) if sealed else None
        manifest = SnapshotManifest(
            name=name, image="localhost/vmruntime/default:latest",
            image_manifest_digest=DIGEST, image_layer_digests=(DIGEST,),
            layer=LayerInfo(apparent_size=size, allocated_size=allocated(layer)),
            created_at="2026-12-04T23:00:00Z", labels={"team": "data"}, seal=seal,
        )  # fmt: skip
        return pending.commit(manifest)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "store")


@pytest.fixture
def unsealed_archive(store: SnapshotStore, tmp_path: Path) -> Path:
    snapshot = make_snapshot(store, "base", sealed=False)
    return export_snapshot(snapshot, tmp_path / "base.vmrsnap").path


@pytest.fixture
def sealed_archive(store: SnapshotStore, tmp_path: Path) -> Path:
    snapshot = make_snapshot(store, "sealed", sealed=True)
    return export_snapshot(snapshot, tmp_path / "sealed.vmrsnap").path


def assert_refused(store: SnapshotStore, archive: Path, words: str, name: str = "copy") -> None:
    """The import fails naming ``words``, and nothing of it is left in the store."""
    store.root.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in store.root.iterdir())
    with pytest.raises(SnapshotImportError, match=words) as info:
        import_snapshot(archive, store, name)
    assert info.value.path == archive
    assert not store.exists(name)
    assert sorted(p.name for p in store.root.iterdir()) == before  # no staging dir left


def records(archive: Path) -> list[tuple[int, int, int]]:
    """(index, offset of its record, stored length) of each chunk record in ``archive``."""
    data = archive.read_bytes()
    manifest_len = _HEADER.unpack_from(data)[4]
    offset = _HEADER.size + manifest_len
    found = []
    while data[offset : offset + 1] == b"C":
        index, stored_len, _ = _CHUNK.unpack_from(data, offset + 1)
        found.append((index, offset, stored_len))
        offset += 1 + _CHUNK.size + stored_len
    return found


def rewrite(archive: Path, out: Path, change) -> Path:  # type: ignore[no-untyped-def]
    data = bytearray(archive.read_bytes())
    change(data)
    out.write_bytes(bytes(data))
    return out


def refinalize(data: bytearray) -> bytearray:
    """Recompute the trailing file digest, as a forger who knows the format would."""
    data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    return data


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True])
def test_export_import_round_trip_keeps_bytes_and_holes(
    store: SnapshotStore, tmp_path: Path, sealed: bool
) -> None:
    original = make_snapshot(store, "orig", sealed=sealed)
    result = export_snapshot(original, tmp_path / "orig.vmrsnap")
    assert result.manifest_digest == original.digest
    assert result.chunks == 5  # chunks 0, 2, 3, 5 and 15 hold data
    assert result.size == (tmp_path / "orig.vmrsnap").stat().st_size < 4 * MiB
    assert (tmp_path / "orig.vmrsnap").stat().st_mode & 0o777 == 0o600

    copy = import_snapshot(result.path, store, "copy")
    assert copy.name == "copy" and store.get("copy") == copy
    assert copy.layer_path.read_bytes() == original.layer_path.read_bytes()
    assert allocated(copy.layer_path) <= allocated(original.layer_path) + 64 * 1024
    assert allocated(copy.layer_path) < 4 * MiB  # sparse: 64 MiB apparent
    assert copy.manifest == dataclasses.replace(original.manifest, name="copy")
    assert copy.manifest.seal == original.manifest.seal
    copy.verify()


def test_import_under_the_archived_name_keeps_the_manifest_digest(
    tmp_path: Path, unsealed_archive: Path, store: SnapshotStore
) -> None:
    elsewhere = SnapshotStore(tmp_path / "other-machine")
    imported = import_snapshot(unsealed_archive, elsewhere)
    assert imported.name == "base"
    assert imported.digest == store.get("base").digest


def test_zero_chunks_and_empty_layers(store: SnapshotStore, tmp_path: Path) -> None:
    written_zeros = {0: bytes(CHUNK_SIZE), CHUNK_SIZE: b"x"}
    snapshot = make_snapshot(store, "zeros", sealed=True, size=CHUNK_SIZE + 100,
                             writes=written_zeros)  # fmt: skip
    result = export_snapshot(snapshot, tmp_path / "zeros.vmrsnap")
    assert result.chunks == 1  # the written zeros are not stored
    copy = import_snapshot(result.path, store, "zeros-copy")
    assert copy.layer_path.read_bytes() == snapshot.layer_path.read_bytes()

    empty = make_snapshot(store, "empty", sealed=True, size=0, writes={})
    result = export_snapshot(empty, tmp_path / "empty.vmrsnap")
    assert result.chunks == 0
    assert import_snapshot(result.path, store, "empty-copy").layer_path.stat().st_size == 0


# --- refusals ----------------------------------------------------------------------------


def test_name_clash_is_refused_unless_a_new_name_is_given(
    store: SnapshotStore, unsealed_archive: Path
) -> None:
    layer_before = store.get("base").layer_path.read_bytes()
    with pytest.raises(SnapshotExistsError) as info:
        import_snapshot(unsealed_archive, store)
    assert info.value.name == "base"
    assert store.get("base").layer_path.read_bytes() == layer_before
    assert import_snapshot(unsealed_archive, store, "base-2").name == "base-2"


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_flipped_byte_in_a_chunk_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path, which: str
) -> None:
    index, offset, stored_len = records(unsealed_archive)[0 if which == "first" else -1]
    data_start = offset + 1 + _CHUNK.size

    def flip(data: bytearray) -> None:
        data[data_start + stored_len // 2] ^= 0x01

    assert_refused(store, rewrite(unsealed_archive, tmp_path / "bad", flip), f"chunk {index}")


def test_a_flipped_byte_in_a_chunk_digest_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    index, offset, _ = records(unsealed_archive)[1]

    def flip(data: bytearray) -> None:
        data[offset + 1 + 12 + 5] ^= 0x80  # inside the sha256 field

    bad = rewrite(unsealed_archive, tmp_path / "bad", flip)
    assert_refused(store, bad, f"chunk {index}: digest mismatch")


def test_a_moved_chunk_is_refused_by_the_file_digest(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    index, offset, _ = records(unsealed_archive)[3]
    assert index == 5

    def move(data: bytearray) -> None:  # chunk 5's data as chunk 6: in range, in order
        struct.pack_into(">Q", data, offset + 1, 6)

    bad = rewrite(unsealed_archive, tmp_path / "bad", move)
    assert_refused(store, bad, "file digest mismatch")


@pytest.mark.parametrize("flip_at", ["json syntax", "label value"])
def test_a_flipped_byte_in_the_manifest_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path, flip_at: str
) -> None:
    def flip(data: bytearray) -> None:
        start = _HEADER.size
        at = data.index(b"{", start) if flip_at == "json syntax" else data.index(b'"data"') + 1
        data[at] ^= 0x01  # '{' -> 'z'; 'd' -> 'e': still valid JSON, another manifest

    bad = rewrite(unsealed_archive, tmp_path / "bad", flip)
    assert_refused(store, bad, "manifest")


def test_a_swapped_manifest_is_refused(store: SnapshotStore, tmp_path: Path) -> None:
    """Another snapshot's manifest (valid JSON, same layer size) in place of this one's."""
    ours = export_snapshot(make_snapshot(store, "ours", sealed=False), tmp_path / "ours").path
    theirs = make_snapshot(store, "theirs", sealed=False, writes={0: b"other"})
    their_json = theirs.manifest.to_json()

    def swap(data: bytearray) -> None:
        manifest_len = _HEADER.unpack_from(data)[4]
        data[_HEADER.size : _HEADER.size + manifest_len] = their_json
        struct.pack_into(">I", data, 20, len(their_json))
        refinalize(data)  # even with the file digest made right again

    assert_refused(store, rewrite(ours, tmp_path / "swapped", swap), "manifest is not the one")


def test_a_rebuilt_archive_with_a_swapped_sealed_manifest_fails_the_seal(
    store: SnapshotStore, tmp_path: Path, sealed_archive: Path
) -> None:
    """A forger who rewrites every digest of the file is stopped by the seal."""
    theirs = make_snapshot(store, "theirs", sealed=True, writes={0: b"other"})
    swapped = dataclasses.replace(theirs.manifest, name="copy")
    bad = rewrite(sealed_archive, tmp_path / "forged", lambda data: _forge(data, swapped))
    assert_refused(store, bad, "seal mismatch")


def _forge(data: bytearray, manifest: SnapshotManifest) -> None:
    magic, version, flags, chunk_size, manifest_len = _HEADER.unpack_from(data)
    new_json = manifest.to_json()
    body = bytes(data[_HEADER.size + manifest_len : -(1 + _TRAILER.size + 32)])
    count, size, _ = _TRAILER.unpack_from(data, len(data) - 32 - _TRAILER.size)
    trailer = b"T" + _TRAILER.pack(count, size, hashlib.sha256(new_json).digest())
    out = _HEADER.pack(magic, version, flags, chunk_size, len(new_json)) + new_json + body + trailer
    data[:] = out + hashlib.sha256(out).digest()


def test_an_expected_digest_pins_the_manifest(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    with pytest.raises(SnapshotImportError, match="expected sha256:"):
        import_snapshot(unsealed_archive, store, "copy", expected_digest=DIGEST)
    assert not store.exists("copy")
    good = store.get("base").digest
    assert import_snapshot(unsealed_archive, store, "copy", expected_digest=good).name == "copy"


@pytest.mark.parametrize("cut", [1, 32, 100, "inside a chunk", "after the header"])
def test_a_truncated_file_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path, cut: int | str
) -> None:
    data = unsealed_archive.read_bytes()
    if cut == "inside a chunk":
        _, offset, stored_len = records(unsealed_archive)[2]
        end = offset + stored_len // 2
    elif cut == "after the header":
        end = _HEADER.size + 10
    else:
        end = len(data) - int(cut)
    bad = tmp_path / "truncated"
    bad.write_bytes(data[:end])
    assert_refused(store, bad, "truncated")


def test_trailing_garbage_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    bad = rewrite(unsealed_archive, tmp_path / "bad", lambda data: data.extend(b"\0"))
    assert_refused(store, bad, "trailing bytes")


def test_bytes_hidden_after_a_chunk_frame_are_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    index, offset, stored_len = records(unsealed_archive)[0]

    def hide(data: bytearray) -> None:
        end = offset + 1 + _CHUNK.size + stored_len
        data[end:end] = b"hidden"
        struct.pack_into(">I", data, offset + 1 + 8, stored_len + 6)
        refinalize(data)

    bad = rewrite(unsealed_archive, tmp_path / "bad", hide)
    assert_refused(store, bad, f"chunk {index}: (extra bytes|corrupt compressed data)")
    frame = bytes(records_frame(unsealed_archive, offset, stored_len))

    def append_frame(data: bytearray) -> None:  # a second, valid frame behind the first
        end = offset + 1 + _CHUNK.size + stored_len
        data[end:end] = frame
        struct.pack_into(">I", data, offset + 1 + 8, stored_len * 2)
        refinalize(data)

    bad = rewrite(unsealed_archive, tmp_path / "bad2", append_frame)
    assert_refused(store, bad, f"chunk {index}: (extra bytes|inflates to more than)")

    def append_skippable_frame(data: bytearray) -> None:  # zstd readers skip these silently
        end = offset + 1 + _CHUNK.size + stored_len
        skippable = struct.pack("<II", 0x184D2A50, 6) + b"hidden"
        data[end:end] = skippable
        struct.pack_into(">I", data, offset + 1 + 8, stored_len + len(skippable))
        refinalize(data)

    bad = rewrite(unsealed_archive, tmp_path / "bad3", append_skippable_frame)
    assert_refused(store, bad, f"chunk {index}: extra bytes")


def records_frame(archive: Path, offset: int, stored_len: int) -> bytes:
    start = offset + 1 + _CHUNK.size
    return archive.read_bytes()[start : start + stored_len]


@pytest.mark.parametrize("declare_size", [True, False])
def test_a_decompression_bomb_is_refused_without_inflating_it(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path, declare_size: bool
) -> None:
    """A chunk whose frame inflates to 1 GiB of zeros (a few KiB stored)."""
    bomb_data = bytes(64 * MiB)
    compressor = zstandard.ZstdCompressor(level=19, write_content_size=declare_size)
    bomb = compressor.compress(bomb_data) * 16  # 16 frames of 64 MiB: 1 GiB
    index, offset, stored_len = records(unsealed_archive)[0]

    def plant(data: bytearray) -> None:
        start = offset + 1 + _CHUNK.size
        data[start : start + stored_len] = bomb
        struct.pack_into(">I", data, offset + 1 + 8, len(bomb))
        refinalize(data)

    bad = rewrite(unsealed_archive, tmp_path / "bomb", plant)
    assert_refused(store, bad, f"chunk {index}: the compressed frame declares")


def test_a_frame_that_lies_about_its_size_is_read_no_further_than_the_chunk(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    """The frame header says CHUNK_SIZE, the blocks hold 64 MiB: reading stops early."""
    index, offset, stored_len = records(unsealed_archive)[0]
    bomb = _frame_with_declared_size(bytes(64 * MiB), CHUNK_SIZE)

    def plant(data: bytearray) -> None:
        start = offset + 1 + _CHUNK.size
        data[start : start + stored_len] = bomb
        struct.pack_into(">I", data, offset + 1 + 8, len(bomb))
        refinalize(data)

    bad = rewrite(unsealed_archive, tmp_path / "liar", plant)
    assert_refused(store, bad, f"chunk {index}: (inflates to more than|corrupt compressed)")


def _frame_with_declared_size(data: bytes, declared: int) -> bytes:
    """A zstd frame of ``data`` whose header claims ``declared`` bytes (4-byte size field)."""
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(data))
    descriptor = frame[4]
    assert descriptor >> 6 == 2, "expected a 4-byte content size field"
    single_segment = bool(descriptor & 0x20)
    dict_id_size = (0, 1, 2, 4)[descriptor & 0x03]
    at = 5 + (0 if single_segment else 1) + dict_id_size
    struct.pack_into("<I", frame, at, declared)
    return bytes(frame)


def test_a_chunk_index_out_of_order_or_range_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    (_, first, _), (_, second, _) = records(unsealed_archive)[:2]

    def repeat(data: bytearray) -> None:
        struct.pack_into(">Q", data, second + 1, 0)  # the second record claims chunk 0 again
        refinalize(data)

    def beyond(data: bytearray) -> None:
        struct.pack_into(">Q", data, first + 1, 1 << 40)
        refinalize(data)

    bad = rewrite(unsealed_archive, tmp_path / "repeat", repeat)
    assert_refused(store, bad, "chunk 0 after chunk 0: not increasing")
    bad = rewrite(unsealed_archive, tmp_path / "beyond", beyond)
    assert_refused(store, bad, "outside the layer")


def test_a_layer_size_that_disagrees_with_the_trailer_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    def resize(data: bytearray) -> None:
        at = len(data) - 32 - _TRAILER.size + 8
        struct.pack_into(">Q", data, at, LAYER_SIZE + 1)
        refinalize(data)

    assert_refused(store, rewrite(unsealed_archive, tmp_path / "bad", resize), "layer size")


@pytest.mark.parametrize("field", ["magic", "version", "flags", "chunk size", "manifest len"])
def test_a_bad_header_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path, field: str
) -> None:
    at, value, words = {
        "magic": (0, b"\x89VMRSNAQ", "bad magic"),
        "version": (12, struct.pack(">H", 2), "format version 2"),
        "flags": (14, struct.pack(">H", 1), "flags"),
        "chunk size": (16, struct.pack(">I", 1 * MiB), "chunk size"),
        "manifest len": (20, struct.pack(">I", 1 << 30), "manifest length"),
    }[field]
    bad = rewrite(unsealed_archive, tmp_path / "bad",
                  lambda data: data.__setitem__(slice(at, at + len(value)), value))  # fmt: skip
    assert_refused(store, bad, words)


def test_a_non_canonical_manifest_is_refused(
    store: SnapshotStore, tmp_path: Path, unsealed_archive: Path
) -> None:
    def pad(data: bytearray) -> None:
        manifest_len = _HEADER.unpack_from(data)[4]
        data[_HEADER.size : _HEADER.size + 1] = b"{ "
        struct.pack_into(">I", data, 20, manifest_len + 1)
        refinalize(data)

    assert_refused(store, rewrite(unsealed_archive, tmp_path / "bad", pad), "canonical")


@pytest.mark.parametrize("member", ["outside", "symlink", "hardlink", "device"])
def test_a_tar_shaped_hostile_file_is_refused(
    store: SnapshotStore, tmp_path: Path, member: str
) -> None:
    """The archive is not a tar: a tar with a hostile member never gets to be unpacked."""
    path = tmp_path / f"{member}.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo({"outside": "../../escape", "symlink": "layer.img",
                                "hardlink": "layer.img", "device": "dev"}[member])  # fmt: skip
        payload = b""
        if member == "outside":
            payload = b"x" * 100
        elif member == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif member == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        else:
            info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    assert_refused(store, path, "not a vmr snapshot archive")
    assert not (tmp_path / "escape").exists()


def test_a_missing_file_is_an_import_error(store: SnapshotStore, tmp_path: Path) -> None:
    with pytest.raises(SnapshotImportError, match="cannot open"):
        import_snapshot(tmp_path / "nope", store)


def test_an_archive_starts_with_the_magic(unsealed_archive: Path) -> None:
    assert unsealed_archive.read_bytes().startswith(MAGIC)


# --- the command line and the method ------------------------------------------------------


def test_vmr_snapshot_export_and_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))
    store = SnapshotStore()
    original = make_snapshot(store, "cli", sealed=True)
    archive = tmp_path / "cli.vmrsnap"

    assert main(["snapshot", "export", "cli", str(archive)]) == 0
    out = capsys.readouterr().out
    assert f"manifest {original.digest}" in out and "5 chunks" in out

    assert main(["snapshot", "import", str(archive)]) == 1  # the name is taken
    assert "already exists" in capsys.readouterr().err
    assert main(["snapshot", "import", str(archive), "cli-2", "--digest", DIGEST]) == 1
    assert f"expected {DIGEST}" in capsys.readouterr().err
    assert not store.exists("cli-2")
    assert main(["snapshot", "import", str(archive), "cli-2", "--digest", original.digest]) == 0
    assert capsys.readouterr().out == "cli-2\n"
    assert store.get("cli-2").layer_path.read_bytes() == original.layer_path.read_bytes()

    archive.write_bytes(archive.read_bytes()[:-1])
    assert main(["snapshot", "import", str(archive), "cli-3"]) == 1
    assert "truncated" in capsys.readouterr().err and not store.exists("cli-3")
    assert main(["snapshot", "export", "nope", str(tmp_path / "x")]) == 1
    assert "no such snapshot" in capsys.readouterr().err


def test_snapshot_export_method_and_a_damaged_layer(store: SnapshotStore, tmp_path: Path) -> None:
    snapshot = make_snapshot(store, "method", sealed=False)
    result = snapshot.export(tmp_path / "m.vmrsnap")
    assert import_snapshot(result.path, store, "method-2").digest != snapshot.digest  # renamed

    os.truncate(snapshot.layer_path, LAYER_SIZE - 1)
    with pytest.raises(SnapshotCorruptError, match="method"):
        snapshot.export(tmp_path / "damaged.vmrsnap")
    assert sorted(p.name for p in tmp_path.iterdir() if "damaged" in p.name) == []
    with pytest.raises(SnapshotError, match="is a directory"):
        snapshot.export(tmp_path)
    with pytest.raises(SnapshotError, match="No such file"):
        snapshot.export(tmp_path / "no-such-dir" / "x.vmrsnap")
