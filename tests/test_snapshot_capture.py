"""Capture and restore on the fake VMM (fast tier: no QEMU; tests/fake_vmm.py).

The "guest" is the real agent on the host, which has no writable layer to freeze: a
running capture is refused (FREEZE answers ENODEV) and leaves nothing. A stopped, kept
sandbox is captured as it is; its layer file is real, so the tests write marker bytes
into it (and into a restored sandbox's qcow2 overlay with qemu-io) and read them back
from snapshots and flattened copies. The real freeze, a real guest's files and fsck are
the slow tier's (tests/test_snapshot_vm.py).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from fake_world import IMAGE, fake, left_behind

from vmruntime import images
from vmruntime.cli import main
from vmruntime.errors import (
    FreezeError,
    SandboxConfigError,
    SnapshotBaseImageError,
    SnapshotError,
    SnapshotNameError,
)
from vmruntime.rootfs.writable import templates_dir
from vmruntime.snapshots import LayerInfo, Sandbox, SnapshotManifest, SnapshotStore, restore
from vmruntime.snapshots.capture import capture_stopped, copy_layer
from vmruntime.snapshots.restore import make_overlay
from vmruntime.vm import state
from vmruntime.vm.qemu import qemu_argv

MARK = 1 << 30  # where the tests write into a 4 GiB layer
SIZE = 4 << 30


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def stopped_sandbox_with(data: bytes) -> state.SandboxRecord:
    """A kept, stopped sandbox whose layer holds ``data`` at MARK."""
    box = Sandbox.create(IMAGE, driver=fake(), keep=True)
    box.stop()
    write_at(state.SandboxPaths(box.id).writable, MARK, data)
    return state.find_record(box.id)


def capture(record: state.SandboxRecord, name: str, **options: object):  # type: ignore[no-untyped-def]
    import asyncio

    return asyncio.run(capture_stopped(record, name, **options))  # type: ignore[arg-type]


def test_a_stopped_kept_sandbox_is_captured_as_it_is(world: Path) -> None:
    record = stopped_sandbox_with(b"captured state")
    snapshot = capture(record, "base", seal=True, labels={"team": "data"})
    m = snapshot.manifest
    image = images.resolve(IMAGE)
    assert (m.name, m.image, m.image_manifest_digest) == ("base", record.image,
                                                           image.manifest_digest)  # fmt: skip
    assert m.image_layer_digests == tuple(d.digest for d in image.manifest.layers)
    assert m.parent is None and dict(m.labels) == {"team": "data"} and m.seal is not None
    assert (m.layer.format, m.layer.apparent_size) == ("raw", SIZE)
    assert m.layer.allocated_size == snapshot.layer_path.stat().st_blocks * 512 < 64 << 20
    assert read_at(snapshot.layer_path, MARK, 14) == b"captured state"
    assert stat.S_IMODE(snapshot.layer_path.stat().st_mode) == 0o400
    assert stat.S_IMODE(snapshot.path.stat().st_mode) == 0o700
    snapshot.verify()
    assert SnapshotStore().get("base").digest == snapshot.digest


def test_restore_is_an_overlay_over_the_read_only_layer_and_a_snapshot_of_it_is_flat(
    world: Path, tmp_path: Path
) -> None:
    base = capture(stopped_sandbox_with(b"base bytes"), "base")
    driver = fake()
    restored = Sandbox.create(from_snapshot="base", driver=driver, keep=True)
    (spec,) = driver.specs
    (writable,) = [d for d in spec.disks if d.serial == "W"]
    assert writable.format == "qcow2" and not writable.readonly
    argv = " ".join(qemu_argv(spec))
    assert f"file={writable.path},format=qcow2,if=none" in argv
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                      str(writable.path)], capture_output=True, check=True,
                                     text=True).stdout)  # fmt: skip
    assert info["backing-filename"] == str(base.layer_path.resolve())
    assert info["backing-filename-format"] == "raw" and info["virtual-size"] == SIZE
    assert writable.path.stat().st_blocks * 512 < 4 << 20  # independent of the data
    record = state.find_record(restored.id)
    assert (record.writable_format, record.layer_origin) == ("qcow2", base.digest)
    assert record.image == base.manifest.image
    restored.stop()
    # The restored sandbox writes (into its overlay only) and is captured: flattened.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {MARK + 4096} 4096",
                    str(writable.path)], check=True, capture_output=True)  # fmt: skip
    child = capture(state.find_record(restored.id), "child")
    assert child.manifest.parent == base.digest and child.manifest.layer.format == "raw"
    assert read_at(child.layer_path, MARK, 10) == b"base bytes"
    assert read_at(child.layer_path, MARK + 4096, 4096) == b"\x5a" * 4096
    assert read_at(base.layer_path, MARK + 4096, 4096) == bytes(4096)  # never written
    assert child.layer_path.stat().st_blocks * 512 < 64 << 20  # holes stayed holes
    # A restore of the child stands on the child's raw layer alone: one level, always.
    grandchild = Sandbox.create(from_snapshot="child", driver=fake())
    overlay = state.SandboxPaths(grandchild.id).writable
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--backing-chain",
                                      "--output=json", str(overlay)], capture_output=True,
                                     check=True, text=True).stdout)  # fmt: skip
    assert [i["format"] for i in info] == ["qcow2", "raw"]
    grandchild.stop()
    state.SandboxPaths(restored.id).remove()


def test_a_running_capture_needs_the_guest_freeze_and_leaves_nothing_without_it(
    world: Path,
) -> None:
    with Sandbox.create(IMAGE, driver=fake()) as box:
        with pytest.raises(FreezeError) as caught:
            box.snapshot("never")
        assert caught.value.errno == errno.ENODEV  # the host agent has no layer to freeze
        assert SnapshotStore().list() == []
        assert [p.name for p in SnapshotStore().root.iterdir()] == []  # no .tmp- left
        assert box.exec(["true"]).returncode == 0  # and the sandbox goes on
        with pytest.raises(FreezeError) as caught, box.frozen(timeout=5):
            pytest.fail("the block must not run without a freeze")
        assert caught.value.errno == errno.ENODEV and caught.value.sandbox_id == box.id


def test_refusals_before_anything_is_made(world: Path) -> None:
    driver = fake()
    with pytest.raises(SnapshotNameError):
        capture(stopped_sandbox_with(b"x"), "../escape")
    with pytest.raises(SandboxConfigError):
        Sandbox.create(IMAGE, from_snapshot="base", driver=driver)
    with pytest.raises(SnapshotError, match="no such snapshot"):
        Sandbox.create(from_snapshot="absent", driver=driver)
    assert driver.specs == []


def test_a_missing_base_image_says_how_to_pull_it_by_digest(world: Path) -> None:
    store = SnapshotStore()
    digest = "sha256:" + "cd" * 32
    with store.create("orphan") as pending:
        layer = pending.path / "layer.img"
        layer.write_bytes(b"")
        os.truncate(layer, 1 << 20)
        pending.commit(SnapshotManifest(
            name="orphan", image="registry.example:5000/team/app:1",
            image_manifest_digest=digest, image_layer_digests=(digest,),
            layer=LayerInfo(apparent_size=1 << 20, allocated_size=0)))  # fmt: skip
    driver = fake()
    with pytest.raises(SnapshotBaseImageError) as caught:
        Sandbox.create(from_snapshot="orphan", driver=driver)
    assert f"vmr image pull registry.example:5000/team/app@{digest}" in str(caught.value)
    assert caught.value.digest == digest
    assert driver.specs == [] and left_behind(driver) == []


def test_copy_layer_refuses_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="unknown format"):
        copy_layer(tmp_path / "x", "vmdk", tmp_path / "y")


def test_the_snapshot_commands(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = stopped_sandbox_with(b"cli")
    assert main(["snapshot", "create", record.id, "s1", "--seal", "--label", "k=v"]) == 0
    assert main(["snapshot", "ls"]) == 0
    assert main(["snapshot", "verify", "s1"]) == 0
    assert "s1: ok (sizes and seal" in capsys.readouterr().out
    assert main(["snapshot", "inspect", "s1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["labels"] == {"k": "v"} and doc["restored_by"] == []
    assert main(["snapshot", "create", record.id, "s1"]) == 1  # exists
    assert main(["snapshot", "create", record.id, "s2", "--label", "novalue"]) == 1
    restored = Sandbox.create(from_snapshot="s1", driver=fake(), keep=True)
    restored.stop()
    assert main(["snapshot", "rm", "s1"]) == 1  # a kept sandbox's layer stands on it
    assert restored.id in capsys.readouterr().err
    state.SandboxPaths(restored.id).remove()
    assert main(["snapshot", "rm", "s1"]) == 0
    assert SnapshotStore().list() == []


@pytest.mark.parametrize("depth", [1, 60])
def test_an_overlay_from_the_template_is_a_valid_qcow2_over_its_backing(
    tmp_path: Path, depth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restore writes overlays from a template with the backing name patched in (no
    qemu-img per restore): qemu-img must find them clean, over the right file and size."""
    monkeypatch.setattr(restore, "_overlay_templates", {})  # made here, then from memory
    folder = tmp_path.joinpath(*[f"d{i}" for i in range(depth)])
    folder.mkdir(parents=True)
    backing = folder / "layer.img"
    with open(backing, "wb") as file:
        file.truncate(64 << 20)
        file.write(b"base data")
    for index in range(2):  # the second comes from the in-memory template
        overlay = tmp_path / f"overlay-{index}.qcow2"
        make_overlay(backing, overlay, tmp_path / "cache")
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                         capture_output=True, check=True).stdout)  # fmt: skip
        assert info["backing-filename"] == str(backing)
        assert info["virtual-size"] == 64 << 20 and info["format"] == "qcow2"
        subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, check=True)
        read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x62 0 1", str(overlay)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert "read 1/1 bytes" in read.stdout, read.stdout + read.stderr  # b"b" of "base"
    assert (templates_dir(tmp_path / "cache") / f"qcow2-overlay-{64 << 20}.img").is_file()
