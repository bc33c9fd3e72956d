"""Snapshots of real microVMs (slow tier): the busybox test image (``vm_session``).

A running sandbox is captured while its guest holds the writable layer frozen, and
restored (a qcow2 overlay over the snapshot's layer) into new, independent sandboxes;
a capture during a large write gives a filesystem that fscks clean; a stopped, kept
sandbox is captured as it is.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from conftest import VmSession
from vm_support import sh

from vmruntime import AsyncSandbox, Sandbox
from vmruntime.cli import main
from vmruntime.errors import FreezeError
from vmruntime.snapshots import SnapshotStore
from vmruntime.snapshots.capture import copy_layer
from vmruntime.vm import state
from vmruntime.vm.sync import run

pytestmark = pytest.mark.slow
MEMORY = 256



def fsck_clean(layer: Path, fmt: str, tmp_path: Path) -> str:
    """``e2fsck -fn`` of a raw, flattened copy of ``layer``; returns its report."""
    flat = tmp_path / f"flat-{time.monotonic_ns()}.img"
    copy_layer(layer, fmt, flat)
    result = subprocess.run(["e2fsck", "-fn", str(flat)], capture_output=True, text=True)
    flat.unlink()
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_snapshot_a_running_sandbox_and_restore_it_twice(vm_session: VmSession,
                                                         tmp_path: Path) -> None:  # fmt: skip
    with Sandbox.create(vm_session.image, memory_mib=MEMORY) as original:
        sh(original, "mkdir -p /data && echo captured > /data/state && echo 1 > /data/n")
        snapshot = original.snapshot("two-ways", labels={"test": "restore"})
        assert snapshot.manifest.parent is None
        sh(original, "echo after > /data/state")  # after the capture: in no restore
        with Sandbox.create(from_snapshot="two-ways", memory_mib=MEMORY) as first, \
                Sandbox.create(from_snapshot="two-ways", memory_mib=MEMORY) as second:  # fmt: skip
            for restored in (first, second):
                assert sh(restored, "cat /data/state /data/n") == "captured\n1\n"
            sh(first, "echo first > /data/state && echo mine > /data/first-only")
            sh(second, "echo second > /data/state")
            assert sh(first, "cat /data/state") == "first\n"
            assert sh(second, "cat /data/state; ls /data") == "second\nn\nstate\n"
            first_layer = state.SandboxPaths(first.id).writable
            assert state.find_record(first.id).layer_origin == snapshot.digest
        assert sh(original, "cat /data/state") == "after\n"  # the original went on
    assert not first_layer.exists()  # ephemeral restores leave nothing
    # The snapshot's own layer was never written: it fscks clean and still says "captured".
    fsck_clean(snapshot.layer_path, "raw", tmp_path)
    assert SnapshotStore().get("two-ways").digest == snapshot.digest


def test_a_snapshot_taken_during_a_large_write_fscks_clean(vm_session: VmSession,
                                                           tmp_path: Path) -> None:  # fmt: skip
    with Sandbox.create(vm_session.image, memory_mib=MEMORY) as box:
        # Not zeros: the writable drive turns written zeros into holes (detect-zeroes).
        writer = box.exec_stream(["sh", "-c", "dd if=/dev/urandom of=/big bs=64k count=1024 "
                                  "2>/dev/null; sync; echo done"], stdin=False)  # fmt: skip
        time.sleep(3)  # well into the write
        snapshot = box.snapshot("mid-write", seal=True)
        output = b"".join(data for _, data in writer)
        assert writer.wait().returncode == 0 and output == b"done\n"  # it went on
        snapshot.verify()
    report = fsck_clean(snapshot.layer_path, "raw", tmp_path)
    assert "clean" in report or "files" in report
    # A restore mounts it (the boot would fail otherwise) and sees a prefix of the file.
    with Sandbox.create(from_snapshot="mid-write", memory_mib=MEMORY, keep=True) as restored:
        size = int(sh(restored, "[ -f /big ] && wc -c < /big || echo 0").strip())
        assert 0 <= size <= 64 << 20
        sh(restored, "echo more > /more")
    # The restored sandbox's overlay, flattened with its backing file, is clean too.
    record = state.find_record(restored.id)
    fsck_clean(state.SandboxPaths(record.id).writable, record.writable_format, tmp_path)
    # ... and a snapshot of that stopped, kept, restored sandbox records its parent.
    assert main(["snapshot", "create", record.id, "mid-write-child"]) == 0
    child = SnapshotStore().get("mid-write-child")
    assert child.manifest.parent == snapshot.digest
    state.SandboxPaths(record.id).remove()
    with Sandbox.create(from_snapshot="mid-write-child", memory_mib=MEMORY) as grandchild:
        assert sh(grandchild, "cat /more") == "more\n"


def test_the_freeze_holds_guest_writers_until_the_thaw(vm_session: VmSession) -> None:
    async def scenario() -> None:
        async with await AsyncSandbox.create(vm_session.image, memory_mib=MEMORY) as box:
            async with box.frozen(timeout=30):
                writer = asyncio.ensure_future(box.exec(["sh", "-c", "echo x > /frozen-write"]))
                await asyncio.sleep(1.5)
                assert not writer.done()  # blocked on the frozen layer
                assert (await box.exec(["ls", "/"])).returncode == 0  # reads go on
            assert (await writer).returncode == 0
            assert (await box.fs.read("/frozen-write")) == b"x\n"
            async with box.frozen(timeout=1):
                await asyncio.sleep(2.5)  # past its timeout: the guest thawed by itself
                assert (await box.exec(["sh", "-c", "echo y > /late"], timeout=20)).returncode == 0
            # (the thaw at the block's end raised; see below)

    with pytest.raises(FreezeError, match="timeout"):
        run(scenario())


def test_a_stopped_kept_sandbox_is_captured_as_it_is(vm_session: VmSession,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    box = Sandbox.create(vm_session.image, memory_mib=MEMORY, keep=True)
    sh(box, "echo kept > /kept")
    box.stop()
    assert main(["snapshot", "create", box.id, "from-stopped", "--label", "k=v"]) == 0
    snapshot = SnapshotStore().get("from-stopped")
    assert dict(snapshot.manifest.labels) == {"k": "v"}
    state.SandboxPaths(box.id).remove()
    with Sandbox.create(from_snapshot="from-stopped", memory_mib=MEMORY) as restored:
        assert sh(restored, "cat /kept") == "kept\n"
    capfd.readouterr()
    assert main(["run", "--snapshot", "from-stopped", "--memory", str(MEMORY), "cat", "/kept"]) == 0
    assert capfd.readouterr().out == "kept\n"
