"""Offline load: OCI layout directories, OCI archives, docker-save tars; all verified."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import uuid
from pathlib import Path

import pytest
from helpers import cache_contents
from imagefactory import (
    directory,
    file,
    make_layer_tar,
    write_docker_save,
    write_oci_archive,
    write_oci_index_multiplatform,
    write_oci_layout,
)

from vmruntime.errors import (
    ArchiveError,
    DigestMismatchError,
    ImageNotFoundError,
    InvalidReferenceError,
)
from vmruntime.rootfs import ErofsLayers, load, resolve


def layers() -> list[bytes]:
    salt = uuid.uuid4().hex
    return [
        make_layer_tar([directory("etc"), file("etc/hostname", "box\n"), file("salt", salt)]),
        make_layer_tar([directory("data"), file("data/blob", os.urandom(50_000))]),
    ]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_load_oci_layout_directory(store, tmp_path, mount_erofs) -> None:
    info = write_oci_layout(tmp_path / "layout", layers())
    record = load(tmp_path / "layout", "example/app:1", store=store)
    assert record.reference == "docker.io/example/app:1"
    assert record.manifest_digest == info.manifest_digest
    assert (mount_erofs(record.layer_paths[0]) / "etc/hostname").read_text() == "box\n"
    assert resolve("example/app:1", store).manifest_digest == info.manifest_digest


def test_layout_needs_a_name_unless_it_carries_one(store, tmp_path) -> None:
    write_oci_layout(tmp_path / "bare", layers(), tag="latest")
    with pytest.raises(ArchiveError, match="--tag"):
        load(tmp_path / "bare", store=store)
    info = write_oci_layout(tmp_path / "named", layers(), tag="registry.local/team/app:2")
    record = load(tmp_path / "named", store=store)
    assert record.reference == "registry.local/team/app:2"
    assert record.manifest_digest == info.manifest_digest


def test_multi_image_layout_picks_by_tag(store, tmp_path) -> None:
    first = write_oci_layout(tmp_path / "multi", layers(), tag="one")
    second = write_oci_layout(tmp_path / "multi", layers(), tag="two")
    with pytest.raises(ArchiveError, match="holds 2 images"):
        load(tmp_path / "multi", "x/y:three", store=store)
    assert (
        load(tmp_path / "multi", "x/y:two", store=store).manifest_digest == second.manifest_digest
    )
    assert load(tmp_path / "multi", "x/y:one", store=store).manifest_digest == first.manifest_digest


def test_layout_with_an_index_selects_the_platform(store, tmp_path) -> None:
    multi = write_oci_index_multiplatform(
        tmp_path / "mp", {"linux/amd64": layers(), "linux/arm64/v8": layers()}
    )
    record = load(tmp_path / "mp", "x/mp:1", store=store)
    assert record.manifest_digest == multi.images["linux/amd64"].manifest_digest


@pytest.mark.parametrize("compressed", [False, True])
def test_load_oci_archive(store, tmp_path, compressed) -> None:
    info = write_oci_layout(tmp_path / "layout", layers(), compression="zstd")
    archive = write_oci_archive(tmp_path / "layout", tmp_path / "image.tar")
    if compressed:
        with open(archive, "rb") as src, gzip.open(tmp_path / "image.tar.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        archive = tmp_path / "image.tar.gz"
    record = load(archive, "x/archive:1", store=store)
    assert record.manifest_digest == info.manifest_digest
    assert all(p.is_file() for p in record.layer_paths)


def test_load_docker_save(store, tmp_path, mount_erofs) -> None:
    saved = write_docker_save(
        tmp_path / "save.tar", layers(), ["example/saved:1", "example/saved:latest"]
    )
    record = load(saved.tar_path, store=store)
    assert record.reference == "docker.io/example/saved:1"
    assert list(record.config.diff_ids) == saved.diff_ids
    assert resolve("example/saved:latest", store).manifest_digest == record.manifest_digest
    assert (mount_erofs(record.layer_paths[1]) / "data/blob").stat().st_size == 50_000


def test_tampered_layout_blob_is_refused(store, tmp_path) -> None:
    info = write_oci_layout(tmp_path / "layout", layers())
    flip_byte(info.blob_path(info.layer_digests[1]), 40)
    before = cache_contents(store)
    with pytest.raises(DigestMismatchError) as caught:
        load(tmp_path / "layout", "x/t:1", store=store)
    assert caught.value.expected == info.layer_digests[1]
    assert not store.has_blob(info.layer_digests[1])
    assert store.get_ref("docker.io/x/t:1") is None
    assert not [k for k in cache_contents(store) if k.startswith("tmp")]
    assert set(cache_contents(store)) - set(before) <= {
        f"blobs/sha256/{d[7:]}" for d in (info.config_digest, info.layer_digests[0])
    } | {f"rootfs/sha256/{info.diff_ids[0][7:]}.erofs"}


def test_tampered_archive_is_refused(store, tmp_path) -> None:
    info = write_oci_layout(tmp_path / "layout", layers(), compression="none")
    archive = write_oci_archive(tmp_path / "layout", tmp_path / "image.tar")
    with tarfile.open(archive) as tar:
        member = tar.getmember(f"blobs/sha256/{info.layer_digests[0][7:]}")
    flip_byte(archive, member.offset_data + 700)
    with pytest.raises(DigestMismatchError) as caught:
        load(archive, "x/t:2", store=store)
    assert caught.value.expected == info.layer_digests[0]
    assert store.list_refs() == []


def test_tampered_docker_save_is_refused(store, tmp_path) -> None:
    saved = write_docker_save(tmp_path / "save.tar", layers(), "example/bad:1")
    with tarfile.open(saved.tar_path) as tar:
        member = tar.getmember(saved.layer_paths[0])
    flip_byte(saved.tar_path, member.offset_data + 600)
    with pytest.raises(DigestMismatchError) as caught:
        load(saved.tar_path, store=store)
    assert caught.value.expected == saved.diff_ids[0]
    assert not ErofsLayers(store).ready(saved.diff_ids[0]) and not store.has_blob(saved.diff_ids[0])
    assert store.list_refs() == []


def test_missing_blob_and_garbage_inputs(store, tmp_path) -> None:
    info = write_oci_layout(tmp_path / "layout", layers())
    info.blob_path(info.layer_digests[0]).unlink()
    with pytest.raises(ArchiveError, match=f"missing blob {info.layer_digests[0]}"):
        load(tmp_path / "layout", "x/m:1", store=store)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ArchiveError, match=r"junk\.tar"):
        load(junk, "x/j:1", store=store)
    with pytest.raises(ArchiveError, match="no such file"):
        load(tmp_path / "absent", "x/a:1", store=store)
    with pytest.raises(InvalidReferenceError):
        load(tmp_path / "layout", "Bad Tag", store=store)
    assert store.list_refs() == []


def test_digest_lookup_and_damaged_entries(store, tmp_path) -> None:
    from vmruntime.images import list_images

    good = load(write_oci_layout(tmp_path / "a", layers()).layout_dir, "x/good:1", store=store)
    info = write_oci_layout(tmp_path / "b", layers())
    bad = load(info.layout_dir, "x/bad:1", store=store)
    assert resolve(good.manifest_digest, store).reference == "docker.io/x/good:1"
    # a layer image deleted behind the cache's back is rebuilt from its blob, identically
    original = bad.layer_paths[1].read_bytes()
    bad.layer_paths[1].unlink()
    assert resolve("x/bad:1", store).layer_paths[1].read_bytes() == original
    # with the blob gone too, the image is reported missing, and listed as incomplete
    bad.layer_paths[1].unlink()
    store.blob_path(info.layer_digests[1]).unlink()
    with pytest.raises(ImageNotFoundError):
        resolve("x/bad:1", store)
    rows = {row.reference: row for row in list_images(store)}
    assert rows["docker.io/x/good:1"].layers == 2
    assert "incomplete" in rows["docker.io/x/bad:1"].source


def test_docker_save_with_compressed_layers(store, tmp_path, mount_erofs) -> None:
    import zstandard

    plain = layers()
    stored = [gzip.compress(plain[0]), zstandard.ZstdCompressor().compress(plain[1])]
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in plain]
    saved = write_docker_save(
        tmp_path / "save.tar",
        stored,
        "example/packed:1",
        config_overrides={"rootfs": {"type": "layers", "diff_ids": diff_ids}},
    )
    record = load(saved.tar_path, store=store)
    assert [layer.media_type.rsplit("+", 1)[-1] for layer in record.manifest.layers] == [
        "gzip",
        "zstd",
    ]
    assert list(record.config.diff_ids) == diff_ids
    assert (mount_erofs(record.layer_paths[1]) / "data/blob").stat().st_size == 50_000
