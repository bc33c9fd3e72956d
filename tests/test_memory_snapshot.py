"""Memory snapshots of real microVMs (slow tier): the busybox test image (``vm_session``).

One sandbox is booted, given state that lives only in its RAM (a file in the tmpfs
``/dev/shm``), and saved whole; sandboxes resumed from it find that state, run on with
the original's uptime, and are independent of each other. Tampered snapshots are
refused before any VM starts, and what cannot be saved is refused with the reason.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VmSession
from vm_support import sh

from vmruntime import AsyncSandbox, Sandbox
from vmruntime.cli import main
from vmruntime.errors import (
    MemorySnapshotError,
    SandboxConfigError,
    SnapshotCorruptError,
    SnapshotManifestError,
)
from vmruntime.snapshots import Snapshot, SnapshotStore, content_digest
from vmruntime.snapshots.manifest import SnapshotManifest
from vmruntime.vm import Mount, state
from vmruntime.vm.sync import run

pytestmark = pytest.mark.slow
MEMORY = 256
SAVED = "saved-machine"



def uptime(sandbox: Sandbox) -> float:
    return float(sh(sandbox, "cut -d' ' -f1 /proc/uptime"))


@pytest.fixture(scope="module")
def saved(vm_session: VmSession) -> Iterator[tuple[Snapshot, float]]:
    """The memory snapshot, and the original's uptime just before it was taken."""
    with Sandbox.create(vm_session.image, memory_mib=MEMORY) as original:
        sh(original, "echo only-in-ram > /dev/shm/marker && echo on-disk > /root/f")
        before = uptime(original)
        snapshot = original.snapshot(SAVED, memory=True, labels={"test": "memory"})
        # The original goes on, and what it does next is in no resumed copy.
        assert sh(original, "cat /dev/shm/marker") == "only-in-ram\n"
        sh(original, "echo later > /dev/shm/marker")
    yield snapshot, before


def test_the_snapshot_holds_the_machine(saved: tuple[Snapshot, float]) -> None:
    snapshot, _ = saved
    memory = snapshot.manifest.memory
    assert memory is not None and snapshot.manifest.schema == 2
    assert (memory.cpus, memory.memory_mib) == (1, MEMORY)
    assert memory.ram.size == MEMORY << 20
    for saved_file in (memory.ram, memory.state):
        mode = os.stat(snapshot.path / saved_file.file).st_mode & 0o777
        assert mode == 0o600, oct(mode)  # the RAM holds whatever the guest held
    # Sparse: far less allocated than the guest's RAM.
    assert os.stat(snapshot.path / memory.ram.file).st_blocks * 512 < (MEMORY << 20) // 2
    snapshot.verify()


def test_resumed_sandboxes_go_on_from_the_saved_machine(saved: tuple[Snapshot, float]) -> None:
    snapshot, before = saved
    with Sandbox.create(from_snapshot=SAVED) as first, \
            Sandbox.create(from_snapshot=SAVED) as second:  # fmt: skip
        for resumed in (first, second):
            # RAM-only state came back, and the guest's uptime runs on from the save
            # (a boot would start from zero and have an empty /dev/shm).
            assert sh(resumed, "cat /dev/shm/marker /root/f") == "only-in-ram\non-disk\n"
            assert uptime(resumed) >= before
            assert state.find_record(resumed.id).layer_origin == snapshot.digest
        sh(first, "echo first > /dev/shm/marker && echo first > /root/f")
        assert sh(second, "cat /dev/shm/marker /root/f") == "only-in-ram\non-disk\n"
        assert first.id != second.id


def test_each_resumed_sandbox_gets_a_fresh_identity(saved: tuple[Snapshot, float]) -> None:
    script = ("hostname; cat /etc/machine-id; date +%s; "
              "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")  # fmt: skip
    with Sandbox.create(from_snapshot=SAVED) as first, \
            Sandbox.create(from_snapshot=SAVED) as second:  # fmt: skip
        seen = []
        for resumed in (first, second):
            host_now = time.time()
            hostname, machine_id, clock, random_bytes = sh(resumed, script).split("\n")[:4]
            assert hostname == f"vmr-{resumed.id}"
            assert abs(int(clock) - host_now) <= 1.5  # under TCG it would lag by the age
            seen.append((machine_id, random_bytes))
        assert seen[0][0] != seen[1][0] and len(seen[0][0]) == 32
        assert seen[0][1] != seen[1][1] and len(seen[0][1]) == 32


def test_many_sandboxes_resume_at_once(saved: tuple[Snapshot, float]) -> None:
    async def resume_six() -> list[str]:
        boxes = await asyncio.gather(*[AsyncSandbox.create(from_snapshot=SAVED) for _ in range(6)])
        try:
            return [(await box.exec(["cat", "/dev/shm/marker"])).stdout.decode() for box in boxes]
        finally:
            for box in boxes:
                await box.kill()

    assert run(resume_six()) == ["only-in-ram\n"] * 6  # each QEMU's socket raced its listen


def test_a_resumed_sandbox_keeps_the_saved_shape(saved: tuple[Snapshot, float]) -> None:
    with pytest.raises(SandboxConfigError, match="memory_mib=256"):
        Sandbox.create(from_snapshot=SAVED, memory_mib=MEMORY * 2)
    with Sandbox.create(from_snapshot=SAVED, memory_mib=MEMORY, cpus=1) as resumed:
        assert int(sh(resumed, "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2")) < (
            MEMORY * 1024)  # fmt: skip
        # Its RAM is a private copy-on-write mapping: it cannot be saved again.
        with pytest.raises(MemorySnapshotError, match="resumed from a memory snapshot"):
            resumed.snapshot("again", memory=True)
        assert not SnapshotStore().exists("again")
        resumed.snapshot("again-disk")  # a disk snapshot of it works
    SnapshotStore().remove("again-disk")


def copy_of(snapshot: Snapshot, name: str, tmp_path: Path) -> Snapshot:
    """A second snapshot with the same files, to tamper with."""
    store = SnapshotStore()
    target = store.root / name
    os.mkdir(target)
    for file in [*snapshot.manifest.files, "manifest.json"]:
        data = (snapshot.path / file).read_bytes()
        if file == "manifest.json":
            data = data.replace(f'"name":"{SAVED}"'.encode(), f'"name":"{name}"'.encode())
        (target / file).write_bytes(data)
    return store.get(name)


def flip_ram_byte(snapshot: Snapshot, offset: int) -> None:
    memory = snapshot.manifest.memory
    assert memory is not None
    with open(snapshot.path / memory.ram.file, "r+b") as ram:
        ram.seek(offset)
        byte = ram.read(1)
        ram.seek(offset)
        ram.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("tamper", ["state-byte", "state-truncated", "ram-size", "ram-missing"])
def test_a_tampered_memory_snapshot_is_refused(saved: tuple[Snapshot, float], tmp_path: Path,
                                               tamper: str) -> None:  # fmt: skip
    snapshot = copy_of(saved[0], f"tampered-{tamper}", tmp_path)
    memory = snapshot.manifest.memory
    assert memory is not None
    state_file, ram_file = snapshot.path / memory.state.file, snapshot.path / memory.ram.file
    if tamper == "state-byte":  # same size, one byte of the device state changed
        data = bytearray(state_file.read_bytes())
        data[len(data) // 2] ^= 0x40
        state_file.write_bytes(bytes(data))
    elif tamper == "state-truncated":
        state_file.write_bytes(state_file.read_bytes()[:1000])
    elif tamper == "ram-size":
        os.truncate(ram_file, memory.ram.size + 4096)
    else:
        ram_file.unlink()
    before = set(os.listdir(state.state_root() / "sandboxes"))
    culprit = r"memory\.ram" if tamper.startswith("ram") else r"machine\.state"
    with pytest.raises(SnapshotCorruptError, match=culprit):
        Sandbox.create(from_snapshot=snapshot.name)
    assert set(os.listdir(state.state_root() / "sandboxes")) == before  # nothing was made
    with pytest.raises(SnapshotCorruptError):
        snapshot.verify()
    SnapshotStore().remove(snapshot.name)


def test_a_sealed_snapshot_checks_its_ram_on_every_resume(saved: tuple[Snapshot, float],
                                                          tmp_path: Path) -> None:  # fmt: skip
    snapshot = copy_of(saved[0], "sealed-ram", tmp_path)
    document = snapshot.manifest.to_dict()
    document["seal"] = {"algorithm": "sha256-chunks-v1",
                        "digest": content_digest(snapshot.layer_path)}  # fmt: skip
    (snapshot.path / "manifest.json").write_bytes(SnapshotManifest.from_dict(document).to_json())
    flip_ram_byte(snapshot, 2 << 20)
    with pytest.raises(SnapshotCorruptError, match=r"memory\.ram was changed"):
        Sandbox.create(from_snapshot="sealed-ram")
    SnapshotStore().remove("sealed-ram")


def test_a_resumed_sandbox_continues_a_computation(vm_session: VmSession) -> None:
    with Sandbox.create(vm_session.image, memory_mib=MEMORY) as original:
        counter = original.exec_stream(
            ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.1; done"],
            stdin=False, detached=True)  # fmt: skip
        time.sleep(1.5)
        snapshot = original.snapshot("counting", memory=True)
        at_capture = int(sh(original, "cat /dev/shm/count"))
    with Sandbox.create(from_snapshot="counting") as resumed:
        time.sleep(1.5)
        first = int(sh(resumed, "cat /dev/shm/count"))
        time.sleep(1)
        second = int(sh(resumed, "cat /dev/shm/count"))
        # The loop went on from where it was: past the capture's count, still counting.
        assert first >= at_capture - 2 and second > first, (at_capture, first, second)
        adopted = resumed.adopt(counter.pid)  # and the new connection can take it over
        adopted.signal(9, group=True)
        assert adopted.wait().returncode == -9
    SnapshotStore().remove(snapshot.name)


def test_a_changed_ram_byte_fails_verify(saved: tuple[Snapshot, float], tmp_path: Path) -> None:
    snapshot = copy_of(saved[0], "tampered-ram-byte", tmp_path)
    flip_ram_byte(snapshot, 1 << 20)
    with pytest.raises(SnapshotCorruptError, match=r"memory\.ram is not the file"):
        snapshot.verify()
    SnapshotStore().remove(snapshot.name)


def test_a_manifest_whose_ram_size_disagrees_with_its_memory_is_refused(
        saved: tuple[Snapshot, float]) -> None:  # fmt: skip
    document = saved[0].manifest.to_dict()
    document["memory"]["memory_mib"] = MEMORY * 2
    with pytest.raises(SnapshotManifestError, match="ram size"):
        SnapshotManifest.from_dict(document)


def test_a_sandbox_with_a_share_is_not_saved(vm_session: VmSession, tmp_path: Path) -> None:
    with Sandbox.create(vm_session.image, memory_mib=MEMORY,
                        mounts=[f"{tmp_path}:/share"]) as shared:  # fmt: skip
        with pytest.raises(MemorySnapshotError, match="vhost-user-fs"):
            shared.snapshot("with-share", memory=True)
        assert sh(shared, "echo still-running") == "still-running\n"
    assert not SnapshotStore().exists("with-share")


def test_the_cli_saves_a_detached_sandbox_and_runs_on_it(
        vm_session: VmSession, capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["run", "-d", "--memory", str(MEMORY), vm_session.image]) == 0
    sandbox_id = capfd.readouterr().out.strip()
    try:
        assert main(["sandbox", "exec", sandbox_id, "--", "sh", "-c",
                     "echo from-cli > /dev/shm/cli"]) == 0  # fmt: skip
        assert main(["snapshot", "create", sandbox_id, "cli-memory", "--memory"]) == 0
    finally:
        assert main(["sandbox", "stop", sandbox_id]) == 0
        main(["sandbox", "rm", "-f", sandbox_id])
    capfd.readouterr()
    assert main(["run", "--snapshot", "cli-memory", "cat", "/dev/shm/cli"]) == 0
    assert capfd.readouterr().out == "from-cli\n"
    # The saved machine has its own memory size: asking for another is refused.
    assert main(["run", "--snapshot", "cli-memory", "--memory", str(MEMORY * 2), "true"]) == 1
    assert "memory_mib=256" in capfd.readouterr().err
    SnapshotStore().remove("cli-memory")


def test_a_console_share_survives_a_memory_snapshot(vm_session: VmSession,
                                                    tmp_path: Path) -> None:  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "seen.txt").write_text("from the first folder\n")
    (second / "seen.txt").write_text("from the second folder\n")
    share = Mount(first, "/data", transport="console")
    with Sandbox.create(vm_session.image, memory_mib=MEMORY, mounts=[share]) as original:
        assert sh(original, "cat /data/seen.txt") == "from the first folder\n"
        snapshot = original.snapshot("with-console-share", memory=True)
        assert snapshot.manifest.memory is not None
        assert snapshot.manifest.memory.mounts == ("/data",)
        sh(original, "echo still > /data/after.txt")  # the original's share goes on
    assert (first / "after.txt").read_text() == "still\n"
    # The resumed guest's FUSE mount goes on through a new broker, on another folder.
    with Sandbox.create(from_snapshot="with-console-share", mounts=[f"{second}:/data"]) as resumed:
        assert sh(resumed, "cat /data/seen.txt") == "from the second folder\n"
        sh(resumed, "echo written > /data/new.txt")
        assert (second / "new.txt").read_text() == "written\n"
        assert not (first / "new.txt").exists()
        assert "fuse" in sh(resumed, "grep ' /data ' /proc/mounts")
    with pytest.raises(SandboxConfigError, match=r"shares at \['/data'\]"):
        Sandbox.create(from_snapshot="with-console-share", mounts=[f"{second}:/elsewhere"])
    with pytest.raises(SandboxConfigError, match="mounts"):
        Sandbox.create(from_snapshot="with-console-share")
    SnapshotStore().remove("with-console-share")
