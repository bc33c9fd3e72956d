"""Shares on the console transport (``Mount(..., transport="console")``) in a real microVM.

One sandbox with a read-write, a read-only and a spare console share (one boot). The
spare one is unmounted by the guest, whose root then writes a forged frame on its
port: the broker must refuse it on the host.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VmSession
from vm_support import brokers_of, sh

from vmruntime import Mount, Sandbox
from vmruntime.broker.process import BrokerProcess, ShareConfig
from vmruntime.vm import state

pytestmark = pytest.mark.slow

SECRET = "host secret beside the share\n"


@dataclass(frozen=True)
class Console:
    box: Sandbox
    rw: Path
    ro: Path
    spare: Path




def gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if state.process_start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def console(vm_session: VmSession, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    base = tmp_path_factory.mktemp("console")
    rw, ro, spare = base / "share", base / "ro", base / "spare"
    for path in (rw, ro, spare):
        path.mkdir()
    (base / "secret.txt").write_text(SECRET)
    (rw / "from-host.txt").write_text("written on the host\n")
    (rw / "dir").mkdir()
    (rw / "dir" / "inner.txt").write_text("inner\n")
    os.symlink("../secret.txt", rw / "up")
    os.symlink(str(base / "secret.txt"), rw / "absolute")
    (ro / "precious.txt").write_text("never changed by the guest\n")
    mounts = [
        Mount(rw, "/mnt/rw", transport="console"),
        Mount(ro, "/mnt/ro", readonly=True, transport="console"),
        Mount(spare, "/mnt/spare", transport="console"),
    ]
    with Sandbox.create(vm_session.image, mounts=mounts) as box:
        yield Console(box, rw, ro, spare)


def test_console_shares_are_fuse_mounts_and_no_vhost_user_device(console: Console) -> None:
    lines = sh(console.box, "cat /proc/mounts").splitlines()
    table = {line.split()[1]: line.split() for line in lines}
    assert table["/mnt/rw"][2] == "fuse" and table["/mnt/rw"][3].startswith("rw")
    assert table["/mnt/ro"][2] == "fuse" and table["/mnt/ro"][3].startswith("ro")
    assert "allow_other" in table["/mnt/rw"][3] and "default_permissions" in table["/mnt/rw"][3]
    qemu = state.read_record(state.SandboxPaths(console.box.id)).vmm_pid
    argv = Path(f"/proc/{qemu}/cmdline").read_bytes().split(b"\0")
    assert not any(b"vhost-user-fs" in arg for arg in argv)
    assert any(b"name=org.vmruntime.fs.0" in arg for arg in argv)


def test_reads_and_writes_go_both_ways(console: Console) -> None:
    box, rw = console.box, console.rw
    assert sh(box, "cat /mnt/rw/from-host.txt") == "written on the host\n"
    (rw / "later.txt").write_text("appeared while the guest ran\n")
    assert sh(box, "cat /mnt/rw/later.txt") == "appeared while the guest ran\n"
    sh(box, "mkdir -p /mnt/rw/sub/d && echo from the guest > /mnt/rw/sub/d/out.txt")
    assert (rw / "sub" / "d" / "out.txt").read_text() == "from the guest\n"
    data = os.urandom(3 << 20)  # several max_write-sized requests and replies
    box.fs.write("/mnt/rw/blob", data)
    assert (rw / "blob").read_bytes() == data
    assert box.fs.read("/mnt/rw/blob") == data
    sh(box, "rm /mnt/rw/blob && mv /mnt/rw/later.txt /mnt/rw/moved.txt")
    assert not (rw / "blob").exists() and (rw / "moved.txt").exists()


def test_read_only_is_enforced_by_the_broker_even_after_a_guest_remount(
    console: Console,
) -> None:
    box, ro = console.box, console.ro
    before = (ro / "precious.txt").read_bytes(), sorted(os.listdir(ro))
    sh(box, "mount -o remount,rw /mnt/ro")
    assert " rw," in sh(box, "grep ' /mnt/ro ' /proc/mounts")
    for script in ("echo changed > /mnt/ro/precious.txt", "touch /mnt/ro/new",
                   "rm /mnt/ro/precious.txt", "mkdir /mnt/ro/d"):  # fmt: skip
        result = box.exec(["sh", "-c", script])
        assert result.returncode != 0 and b"Read-only file system" in result.stderr, script
    assert ((ro / "precious.txt").read_bytes(), sorted(os.listdir(ro))) == before


def test_nothing_beside_the_share_is_reachable(console: Console) -> None:
    box = console.box
    # Symlinks resolve in the guest's namespace, never on the host; `..` of the mount is
    # the guest's /mnt.
    for script in ("cat /mnt/rw/up", "cat /mnt/rw/absolute", "cat /mnt/rw/../secret.txt",
                   "cat /mnt/rw/dir/../../secret.txt"):  # fmt: skip
        result = box.exec(["sh", "-c", script])
        assert SECRET.encode() not in result.stdout, script
    assert sh(box, "readlink /mnt/rw/up") == "../secret.txt\n"


async def _migrate_to_file(control: Path, state_file: Path) -> dict[str, object]:
    """What a memory snapshot does (DESIGN.md): stop, x-ignore-shared, migrate, cont."""
    from qemu.qmp import QMPClient

    client = QMPClient("console-share-test")
    await client.connect(str(control))
    try:
        await client.execute("stop")
        caps = [{"capability": "x-ignore-shared", "state": True}]
        await client.execute("migrate-set-capabilities", {"capabilities": caps})
        await client.execute("migrate", {"uri": f"exec:cat > {state_file}"})
        for _ in range(500):
            status = await client.execute("query-migrate")
            assert isinstance(status, dict)
            if status.get("status") in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.02)
        await client.execute("cont")
        return status
    finally:
        await client.disconnect()


def test_a_sandbox_with_console_shares_migrates_to_a_file(console: Console, tmp_path: Path) -> None:
    box = console.box
    paths = state.SandboxPaths(box.id)
    state_file = tmp_path / "device-state"
    status = asyncio.run(_migrate_to_file(paths.control_socket, state_file))
    assert status.get("status") == "completed", status  # no "non-migratable device"
    assert 0 < state_file.stat().st_size < 4 << 20  # devices only: the RAM is shared
    assert sh(box, "cat /mnt/rw/from-host.txt") == "written on the host\n"
    sh(box, "echo after the capture > /mnt/rw/captured.txt")
    assert (console.rw / "captured.txt").read_text() == "after the capture\n"


def test_a_forged_frame_is_refused_by_the_broker(console: Console) -> None:
    box = console.box
    paths = state.SandboxPaths(box.id)
    spare_broker = brokers_of(box)[2]
    # The guest's root frees the port (unmounting ends its relay) and writes a frame
    # whose length no request can have.
    sh(box, "umount /mnt/spare; sleep 0.5")
    port = sh(box, "grep -l org.vmruntime.fs.2 /sys/class/virtio-ports/*/name").strip()
    dev = "/dev/" + port.split("/")[-2]
    sh(box, f"printf '\\377\\377\\377\\177AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' > {dev}")
    assert gone(spare_broker)
    text = paths.broker_log(2).read_text()
    assert "request length 2147483647" in text and "closing the connection" in text
    # The other shares are untouched.
    assert sh(box, "cat /mnt/ro/precious.txt") == "never changed by the guest\n"


def test_a_restarted_broker_resumes_the_guests_session(console: Console) -> None:
    """What a memory-snapshot restore does to a share: a new broker, mid-session."""
    box, rw = console.box, console.rw
    assert sh(box, "cat /mnt/rw/dir/inner.txt; ls /mnt/rw/dir") == "inner\ninner.txt\n"
    paths = state.SandboxPaths(box.id)
    old = brokers_of(box)[0]
    os.kill(old, 9)
    assert gone(old)
    log = paths.state / "broker0.resumed.log"
    new = BrokerProcess.start(ShareConfig(rw), paths.share_socket(0), log=log,
                              transport="console", resume=True)  # fmt: skip
    try:
        # At once (the guest's entries and attributes are still cached, with the old
        # broker's node ids): ESTALE sends the kernel back to the root, which works.
        assert sh(box, "cat /mnt/rw/dir/inner.txt") == "inner\n"
        assert sh(box, "ls /mnt/rw/dir; stat -c %s /mnt/rw/from-host.txt") == "inner.txt\n20\n"
        sh(box, "echo after > /mnt/rw/dir/after.txt")
        assert (rw / "dir" / "after.txt").read_text() == "after\n"
    finally:
        new.stop()
