"""Snapshot names, the manifest (schema 1), the seal and the local store (fast tier)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from helpers import sparse_file

from vmruntime.errors import (
    SnapshotCorruptError,
    SnapshotExistsError,
    SnapshotManifestError,
    SnapshotNameError,
    SnapshotNotFoundError,
)
from vmruntime.snapshots import (
    CHUNK_SIZE,
    LayerInfo,
    Seal,
    SnapshotManifest,
    SnapshotStore,
    check_name,
    content_digest,
    iter_chunks,
)

DIGEST = "sha256:" + "ab" * 32


def manifest(name: str = "snap", size: int = 1 << 20, **changes: object) -> SnapshotManifest:
    fields: dict[str, object] = dict(
        name=name, image="localhost/vmruntime/default:latest", image_manifest_digest=DIGEST,
        image_layer_digests=(DIGEST,), layer=LayerInfo(apparent_size=size, allocated_size=4096),
        created_at="2026-12-04T23:00:00Z", labels={"team": "data"},
    )  # fmt: skip
    fields.update(changes)
    return SnapshotManifest(**fields)  # type: ignore[arg-type]


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "base-1", "v1.2_x", "A" * 100])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(("name", "words"), [
    ("", "empty"), ("a/b", "'/'"), ("..", "'..'"), ("a..b", "'..'"), (".hidden", "starting"),
    ("-x", "starting"), ("a b", "letters"), ("x" * 101, "longer than 100"), (7, "string"),
])  # fmt: skip
def test_bad_names_say_why(name: object, words: str) -> None:
    with pytest.raises(SnapshotNameError, match=words):
        check_name(name)


# --- the manifest -----------------------------------------------------------------------


def test_the_manifest_round_trips_canonically_and_its_digest_is_stable() -> None:
    original = manifest(seal=Seal(digest=DIGEST), parent=DIGEST)
    data = original.to_json()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    again = SnapshotManifest.from_json(data)
    assert again == original and again.digest() == original.digest()
    assert original.digest() != manifest().digest()


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d.update(schema=3), "schema 3"),
    (lambda d: d.update(schema=2), r"missing \['memory'\]"),
    (lambda d: d.update(schema=True), "schema True"),
    (lambda d: d.pop("image"), "missing"),
    (lambda d: d.update(extra=1), "unknown"),
    (lambda d: d.update(name="../x"), "'/'"),
    (lambda d: d.update(image_manifest_digest="sha256:xyz"), "image_manifest_digest"),
    (lambda d: d["layer"].update(file="../escape"), "plain file name"),
    (lambda d: d["layer"].update(file="manifest.json"), "plain file name"),
    (lambda d: d["layer"].update(format="qcow2"), "format"),
    (lambda d: d["layer"].update(apparent_size=-1), "apparent_size"),
    (lambda d: d.update(created_at="yesterday"), "created_at"),
    (lambda d: d.update(labels={"k": 3}), "label k"),
    (lambda d: d.update(labels=[]), "labels"),
    (lambda d: d.update(seal={"algorithm": "md5", "digest": DIGEST}), "seal algorithm"),
    (lambda d: d.update(parent="nope"), "parent"),
])  # fmt: skip
def test_a_bad_manifest_is_refused_naming_the_field(edit: object, words: str) -> None:
    document = json.loads(manifest().to_json())
    edit(document)  # type: ignore[operator]
    with pytest.raises(SnapshotManifestError, match=words):
        SnapshotManifest.from_json(json.dumps(document).encode())


def test_not_json_is_refused() -> None:
    with pytest.raises(SnapshotManifestError, match="not JSON"):
        SnapshotManifest.from_json(b"\xff{")


# --- chunks and the seal ----------------------------------------------------------------


def test_chunks_skip_holes_and_zeros_and_the_seal_ignores_how_zeros_are_stored(
    tmp_path: Path,
) -> None:
    size = 3 * CHUNK_SIZE + 123
    writes = {CHUNK_SIZE + 5: b"data", 3 * CHUNK_SIZE: b"tail"}
    sparse = sparse_file(tmp_path / "sparse", size, writes)
    dense = tmp_path / "dense"
    dense.write_bytes(sparse.read_bytes())  # the same bytes, zeros written out
    chunks = list(iter_chunks(sparse, size))
    assert [c.is_zero for c in chunks] == [True, False, True, False]
    assert [c.length for c in chunks] == [CHUNK_SIZE] * 3 + [123]
    assert [c.is_zero for c in iter_chunks(dense)] == [True, False, True, False]
    assert content_digest(sparse) == content_digest(dense)
    sparse_file(dense, size, {CHUNK_SIZE * 2 + 7: b"\x01"})
    assert content_digest(sparse) != content_digest(dense)


def test_a_size_that_disagrees_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds 10 bytes"):
        list(iter_chunks(sparse_file(tmp_path / "f", 10, {}), 11))


# --- the store --------------------------------------------------------------------------


def test_a_snapshot_appears_whole_with_private_modes(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    with store.create("snap") as pending:
        layer = sparse_file(pending.path / "layer.img", 1 << 20, {4096: b"x"})
        assert store.list() == [] and not store.exists("snap")  # not yet visible
        seal = Seal(digest=content_digest(layer))
        pending.commit(manifest(seal=seal))
    snapshot = store.get("snap")
    assert [s.name for s in store.list()] == ["snap"]
    assert stat.S_IMODE(snapshot.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(snapshot.layer_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((snapshot.path / "manifest.json").stat().st_mode) == 0o600
    snapshot.verify()
    assert sorted(p.name for p in store.root.iterdir()) == ["snap"]


def test_a_failed_write_leaves_nothing_under_the_name(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(RuntimeError), store.create("snap") as pending:
        sparse_file(pending.path / "layer.img", 1 << 20, {})
        raise RuntimeError("the copy failed")
    assert list(tmp_path.iterdir()) == []
    with store.create("snap"):
        pass  # no commit: nothing either
    assert list(tmp_path.iterdir()) == []


def test_names_are_unique_and_missing_ones_are_named(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with store.create("snap") as first, store.create("snap") as second:  # two writers race
        for pending in (first, second):
            sparse_file(pending.path / "layer.img", 1 << 20, {})
        first.commit(manifest())
        with pytest.raises(SnapshotExistsError):
            second.commit(manifest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]
    with pytest.raises(SnapshotExistsError), store.create("snap"):
        pass
    with pytest.raises(SnapshotNotFoundError, match="other"):
        store.get("other")
    with pytest.raises(SnapshotNameError):
        store.get("../etc")
    store.remove("snap")
    assert store.list() == [] and list(tmp_path.iterdir()) == []


def test_verify_finds_a_changed_layer(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with store.create("snap") as pending:
        layer = sparse_file(pending.path / "layer.img", 1 << 20, {0: b"original"})
        snapshot = pending.commit(manifest(seal=Seal(digest=content_digest(layer))))
    with open(snapshot.layer_path, "r+b") as file:
        file.write(b"tampered")
    with pytest.raises(SnapshotCorruptError, match="seal mismatch"):
        snapshot.verify()
    os.truncate(snapshot.layer_path, 10)
    with pytest.raises(SnapshotCorruptError, match="holds 10 bytes"):
        snapshot.verify()


def test_a_swapped_manifest_is_found(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for name in ("one", "two"):
        with store.create(name) as pending:
            sparse_file(pending.path / "layer.img", 1 << 20, {})
            pending.commit(manifest(name))
    (tmp_path / "one" / "manifest.json").write_bytes((tmp_path / "two" / "manifest.json")
                                                     .read_bytes())  # fmt: skip
    with pytest.raises(SnapshotCorruptError, match="names 'two'"):
        store.get("one")
    assert [s.name for s in store.list()] == ["two"]


def test_leftovers_of_an_interrupted_write_are_ignored_then_pruned(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    (tmp_path / ".tmp-snap-abc").mkdir()
    assert store.list() == []
    assert [p.name for p in store.prune_temp()] == [".tmp-snap-abc"]
    assert list(tmp_path.iterdir()) == []
