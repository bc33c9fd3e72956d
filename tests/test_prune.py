"""`vmr image prune` beyond blobs: layer images, guest assets, writable-layer templates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from imagefactory import file, make_layer_tar, write_oci_layout

from vmruntime import _paths, images
from vmruntime.cli import main as vmr_main
from vmruntime.guest.assets import prune_guest_assets
from vmruntime.guest.build import AGENT_BINARY_NAME, agent_hash, agents_dir
from vmruntime.guest.initramfs import ensure_initramfs, initramfs_dir
from vmruntime.guest.kernel import cached_kernel, kernel_cache_dir
from vmruntime.images.store import ImageStore
from vmruntime.rootfs.writable import ensure_template, prune_templates, templates_dir
from vmruntime.snapshots import LayerInfo, SnapshotManifest, SnapshotStore

SMALL = 16 << 20


def static_binary() -> Path:
    """Any static ELF serves as a stand-in agent; the initramfs needs busybox-static anyway."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("needs busybox-static (apt-get install busybox-static)")
    return busybox


def fake_kernel(cache: Path, release: str) -> None:
    """A kernel entry as ensure_kernel leaves it, without modules (none are needed here)."""
    directory = kernel_cache_dir(cache) / release
    (directory / "modules").mkdir(parents=True)
    (directory / "modules" / "modules.dep").write_text("")
    (directory / "vmlinuz").write_bytes(b"kernel " + release.encode())


def fake_agent(cache: Path, name: str) -> Path:
    agent = agents_dir(cache) / name / AGENT_BINARY_NAME
    agent.parent.mkdir(parents=True)
    shutil.copy(static_binary(), agent)
    return agent


def test_guest_assets_keep_only_what_the_next_sandbox_boots(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fake_kernel(cache, "6.1.0-9-cloud-amd64")
    fake_kernel(cache, "6.1.0-56-cloud-amd64")  # the newest: 56 > 9
    current = fake_agent(cache, agent_hash()[:16])
    fake_agent(cache, "0" * 16)
    kernel = cached_kernel(cache)
    assert kernel is not None and kernel.release == "6.1.0-56-cloud-amd64"
    archive = ensure_initramfs(kernel, current, cache)
    stale = initramfs_dir(cache) / ("f" * 16 + ".cpio")
    stale.write_bytes(b"an initramfs of an older agent")
    (agents_dir(cache) / ".lock").touch()  # the builders' own lock stays

    result = prune_guest_assets(cache)

    assert sorted(p.name for p in kernel_cache_dir(cache).iterdir()) == ["6.1.0-56-cloud-amd64"]
    assert sorted(p.name for p in agents_dir(cache).iterdir()) == [".lock", agent_hash()[:16]]
    assert list(initramfs_dir(cache).iterdir()) == [archive]
    assert {p.name for p in result.removed} == {"6.1.0-9-cloud-amd64", "0" * 16, stale.name}
    assert result.freed_bytes > 0
    assert prune_guest_assets(cache).removed == []  # nothing left to delete


def test_guest_assets_of_an_empty_cache_are_nothing_to_prune(tmp_path: Path) -> None:
    assert prune_guest_assets(tmp_path / "empty").removed == []


def test_a_template_being_cloned_survives_a_prune(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    busy = ensure_template(SMALL, cache)
    idle = ensure_template(SMALL * 2, cache)
    with _paths.cache_lock(f"writable-{SMALL}", cache, shared=True):  # a clone in progress
        result = prune_templates(cache)
    assert busy.exists() and not idle.exists()
    assert result.removed == [idle]
    assert prune_templates(cache).removed == [busy]
    assert list(templates_dir(cache).iterdir()) == []


def test_vmr_image_prune_collects_assets_and_templates(
    store: ImageStore, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_kernel(store.root, "6.1.0-1-cloud-amd64")
    fake_kernel(store.root, "6.1.0-2-cloud-amd64")
    template = ensure_template(SMALL, store.root)
    assert vmr_main(["image", "prune"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert not template.exists()
    assert [p.name for p in kernel_cache_dir(store.root).iterdir()] == ["6.1.0-2-cloud-amd64"]


def test_snapshots_pin_their_base_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`vmr image rm` of a pinned image refuses without --force; prune keeps its blobs
    while a snapshot needs them, and frees them once none does."""
    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))
    layer = make_layer_tar([file("etc/pinned", "x" * 5000)])
    images.load(write_oci_layout(tmp_path / "layout", [layer]).layout_dir, "test/pinned:1")
    store = ImageStore()
    image = images.resolve("test/pinned:1", store)
    blobs = [image.manifest_digest, *(entry.digest for entry in image.manifest.layers)]
    snapshots = SnapshotStore()
    with snapshots.create("base") as pending:
        (pending.path / "layer.img").write_bytes(b"")
        pending.commit(SnapshotManifest(
            name="base", image=image.reference, image_manifest_digest=image.manifest_digest,
            image_layer_digests=tuple(entry.digest for entry in image.manifest.layers),
            layer=LayerInfo(apparent_size=0, allocated_size=0)))  # fmt: skip

    assert vmr_main(["image", "rm", "test/pinned:1"]) == 1
    assert "base of snapshots base" in capsys.readouterr().err
    assert store.get_ref(image.reference) is not None
    assert vmr_main(["image", "rm", "--force", "test/pinned:1"]) == 0
    assert vmr_main(["image", "prune"]) == 0
    assert all(store.has_blob(digest) for digest in blobs)  # the snapshot still needs them

    snapshots.remove("base")
    assert vmr_main(["image", "prune"]) == 0
    assert not any(store.has_blob(digest) for digest in blobs)
