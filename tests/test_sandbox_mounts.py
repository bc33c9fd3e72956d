"""Shares, volumes and disks in real microVMs (slow tier).

One sandbox with a read-write share, a read-only share, a directory volume and a
disk volume serves the tests that only look and write; tests about a second
writer, a user's disk image, failure clean-up, the CLI, detached sandboxes, a
crashed host process and an external server boot their own (eight boots in
all, a few seconds each under TCG; about 40 s here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker_wire import has_sys_admin
from conftest import PEER_CACHE, VmSession
from vm_support import broker_processes, brokers_of, qemu_processes, sh

from vmruntime import Mount, Sandbox
from vmruntime.errors import DiskInUseError, MountError, VolumeNotFoundError
from vmruntime.vm import state
from vmruntime.volumes import DiskAttachment, VolumeStore

pytestmark = pytest.mark.slow

DIR_VOLUME = "mounts-shared"
DISK_VOLUME = "mounts-disk"


@dataclass(frozen=True)
class Mounted:
    box: Sandbox
    rw: Path
    ro: Path




def alive(pid: int) -> bool:
    return state.process_start_time(pid) is not None


def ext4_image(path: Path, files: dict[str, str]) -> Path:
    source = path.with_suffix(".src")
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), str(path), "16M"], check=True,
                   capture_output=True)  # fmt: skip
    return path


def debugfs_cat(image: Path, name: str) -> str:
    result = subprocess.run(["debugfs", "-R", f"cat {name}", str(image)], capture_output=True,
                            text=True, check=True)  # fmt: skip
    return result.stdout


def fsck_clean(image: Path) -> None:
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def vmr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmruntime", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def volumes(vm_session: VmSession) -> Iterator[VolumeStore]:
    store = VolumeStore()
    store.create(DIR_VOLUME)
    store.create(DISK_VOLUME, disk_size=32 << 20)
    yield store
    for name in (DIR_VOLUME, DISK_VOLUME):
        store.remove(name)


@pytest.fixture(scope="module")
def mounted(
    vm_session: VmSession, volumes: VolumeStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp("mounts")
    rw, ro = base / "rw", base / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host.txt").write_text("written on the host\n")
    (ro / "precious.txt").write_text("never changed by the guest\n")
    mounts = [
        Mount(rw, "/mnt/rw"), Mount(ro, "/mnt/ro", readonly=True),
        Mount.volume(DIR_VOLUME, "/srv/shared"), Mount.volume(DISK_VOLUME, "/srv/disk"),
    ]  # fmt: skip
    with Sandbox.create(vm_session.image, mounts=mounts) as box:
        yield Mounted(box, rw, ro)


# --- host folders -----------------------------------------------------------------


def test_shares_and_disks_are_mounted_where_asked(mounted: Mounted) -> None:
    lines = sh(mounted.box, "cat /proc/mounts").splitlines()
    table = {line.split()[1]: line.split() for line in lines}
    assert table["/mnt/rw"][2] == "virtiofs" and table["/mnt/rw"][3].startswith("rw")
    assert table["/mnt/ro"][2] == "virtiofs" and table["/mnt/ro"][3].startswith("ro")
    assert table["/srv/shared"][2] == "virtiofs"
    assert table["/srv/disk"][2] == "ext4" and table["/srv/disk"][3].startswith("rw")
    modules = sh(mounted.box, "cut -d' ' -f1 /proc/modules").split()
    assert {"fuse", "virtiofs"} <= set(modules)


def test_bind_mount_carries_writes_both_ways(mounted: Mounted) -> None:
    box, rw = mounted.box, mounted.rw
    assert sh(box, "cat /mnt/rw/from-host.txt") == "written on the host\n"
    (rw / "later.txt").write_text("appeared while the guest ran\n")
    assert sh(box, "cat /mnt/rw/later.txt") == "appeared while the guest ran\n"
    sh(box, "mkdir -p /mnt/rw/sub/dir && echo from the guest > /mnt/rw/sub/dir/out.txt")
    assert (rw / "sub" / "dir" / "out.txt").read_text() == "from the guest\n"
    data = os.urandom(3 << 20)
    box.fs.write("/mnt/rw/blob", data)
    assert (rw / "blob").read_bytes() == data
    assert box.fs.read("/mnt/rw/blob") == data
    sh(box, "rm /mnt/rw/blob && mv /mnt/rw/later.txt /mnt/rw/moved.txt")
    assert sorted(os.listdir(rw)) == ["from-host.txt", "moved.txt", "sub"]


def test_read_only_share_stays_read_only_even_after_a_guest_remount(mounted: Mounted) -> None:
    box, ro = mounted.box, mounted.ro
    before = (ro / "precious.txt").read_bytes(), sorted(os.listdir(ro))
    attempt = box.exec(["sh", "-c", "echo changed > /mnt/ro/precious.txt"])
    assert attempt.returncode != 0 and b"Read-only file system" in attempt.stderr
    # The guest is root: it can drop its own read-only flag, but the broker still refuses.
    sh(box, "mount -o remount,rw /mnt/ro")
    assert " rw," in sh(box, "grep ' /mnt/ro ' /proc/mounts")
    for script in ("echo changed > /mnt/ro/precious.txt", "touch /mnt/ro/new",
                   "rm /mnt/ro/precious.txt", "mkdir /mnt/ro/d", "chmod 777 /mnt/ro/precious.txt",
                   "mv /mnt/ro/precious.txt /mnt/ro/x"):  # fmt: skip
        result = box.exec(["sh", "-c", script])
        # EROFS now comes from the broker: the guest's own mount says rw.
        assert result.returncode != 0 and b"Read-only file system" in result.stderr, script
    assert ((ro / "precious.txt").read_bytes(), sorted(os.listdir(ro))) == before


def test_guest_chown_and_chmod_stay_in_the_guest(mounted: Mounted) -> None:
    box, rw = mounted.box, mounted.rw
    host = rw / "owned.txt"
    host.write_text("x")
    os.chmod(host, 0o644)
    info = host.stat()
    # The sandbox's user (root here) owns every file the guest sees.
    assert sh(box, "stat -c '%u:%g %a' /mnt/rw/owned.txt") == "0:0 644\n"
    sh(box, "chown 1234:4321 /mnt/rw/owned.txt && chmod 4711 /mnt/rw/owned.txt")
    assert sh(box, "stat -c '%u:%g %a' /mnt/rw/owned.txt") == "1234:4321 4711\n"
    after = host.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (info.st_uid, info.st_gid, info.st_mode)
    check_chown_h_of_symlinks(box, rw)


def check_chown_h_of_symlinks(box: Sandbox, rw: Path) -> None:
    """chown -h changes the link the guest sees (docs/broker.md: a trusted.vmruntime.stat
    record on the host link), not the host link's owner nor the target's."""
    (rw / "link-target.txt").write_text("t")
    os.symlink("link-target.txt", rw / "host-link")
    sh(box, "ln -s link-target.txt /mnt/rw/guest-link")
    links = ("host-link", "guest-link")
    before = {name: os.lstat(rw / name) for name in (*links, "link-target.txt")}
    chown_h = "chown -h 2222:3333 /mnt/rw/host-link /mnt/rw/guest-link"
    if not has_sys_admin():  # the broker is ours: without the capability it cannot record
        result = box.exec(["sh", "-c", chown_h])
        assert result.returncode != 0 and b"Operation not supported" in result.stderr
        return
    sh(box, chown_h)
    for name in links:
        assert sh(box, f"stat -c '%u:%g' /mnt/rw/{name}") == "2222:3333\n", name
        assert sh(box, f"[ -L /mnt/rw/{name} ] && readlink /mnt/rw/{name}") == "link-target.txt\n"
    assert sh(box, "stat -c '%u:%g' /mnt/rw/link-target.txt") == "0:0\n"  # -h: not the target
    for name, st in before.items():
        now = os.lstat(rw / name)
        assert (now.st_mode, now.st_uid, now.st_gid) == (st.st_mode, st.st_uid, st.st_gid), name


# --- volumes ----------------------------------------------------------------------


def test_two_sandboxes_share_a_directory_volume_and_a_disk_has_one_writer(
    vm_session: VmSession, mounted: Mounted, volumes: VolumeStore
) -> None:
    first = mounted.box
    sh(first, "echo from the first > /srv/shared/note && echo on disk > /srv/disk/f && sync")
    records, running = state.list_records(), qemu_processes(str(vm_session.runtime))
    with pytest.raises(DiskInUseError, match=f"sandbox {first.id}"):
        Sandbox.create(vm_session.image, mounts=[Mount.volume(DISK_VOLUME, "/srv/disk")])
    # Refused before QEMU: nothing was booted, nothing is left.
    assert state.list_records() == records
    assert qemu_processes(str(vm_session.runtime)) == running
    mounts = [Mount.volume(DIR_VOLUME, "/data"), Mount.volume(DISK_VOLUME, "/disk", readonly=True)]
    with Sandbox.create(vm_session.image, mounts=mounts) as second:
        assert sh(second, "cat /data/note") == "from the first\n"
        sh(second, "echo from the second > /data/reply")
        assert sh(first, "cat /srv/shared/reply") == "from the second\n"
        assert " ro," in sh(second, "grep ' /disk ' /proc/mounts")
        assert "lost+found" in sh(second, "ls /disk")
        assert second.exec(["touch", "/disk/x"]).returncode != 0
        assert volumes.get(DIR_VOLUME).in_use() and volumes.get(DISK_VOLUME).in_use()
        second_brokers = brokers_of(second)
    assert second_brokers and not any(alive(pid) for pid in second_brokers)


# --- disks, failures, lifecycle -----------------------------------------------------------


def test_user_disk_is_written_and_clean_after_stop_and_no_broker_is_left(
    vm_session: VmSession, tmp_path: Path
) -> None:
    image = ext4_image(tmp_path / "user.ext4", {"in-image.txt": "made on the host\n"})
    (tmp_path / "share").mkdir()
    mounts = [Mount.disk(image, "/mnt/disk"), Mount(tmp_path / "share", "/mnt/share")]
    box = Sandbox.create(vm_session.image, mounts=mounts)
    try:
        assert sh(box, "cat /mnt/disk/in-image.txt") == "made on the host\n"
        sh(box, "echo from the guest > /mnt/disk/out.txt")
        with pytest.raises(DiskInUseError):
            DiskAttachment.acquire(image, readonly=False, holder="test")
        brokers = brokers_of(box)
        assert len(brokers) == 1 and alive(brokers[0])
    finally:
        box.stop()
    assert not alive(brokers[0])
    assert not broker_processes(box.id)
    # The agent remounted the disk read-only before the guest went down: a clean image.
    fsck_clean(image)
    assert debugfs_cat(image, "/out.txt") == "from the guest\n"
    DiskAttachment.acquire(image, readonly=False, holder="test").release()  # lock released


def test_a_mount_the_guest_refuses_fails_create_and_leaves_nothing(
    vm_session: VmSession, tmp_path: Path
) -> None:
    image = ext4_image(tmp_path / "user.ext4", {})
    records, running = state.list_records(), qemu_processes(str(vm_session.runtime))
    brokers = broker_processes(str(vm_session.runtime))
    # /etc/passwd is a file in the image: the guest cannot mount a share over it.
    mounts = [Mount(tmp_path, "/etc/passwd"), Mount.disk(image, "/d")]
    with pytest.raises(MountError) as caught:
        Sandbox.create(vm_session.image, mounts=mounts)
    assert "/etc/passwd" in str(caught.value) and "ENOTDIR" in str(caught.value)
    assert state.list_records() == records
    assert qemu_processes(str(vm_session.runtime)) == running
    assert broker_processes(str(vm_session.runtime)) == brokers
    DiskAttachment.acquire(image, readonly=False, holder="test").release()  # lock released


def test_bad_mounts_are_refused_before_any_vm_boots(vm_session: VmSession, tmp_path: Path) -> None:
    records, running = state.list_records(), qemu_processes(str(vm_session.runtime))
    with pytest.raises(MountError, match="No such file"):
        Sandbox.create(vm_session.image, mounts=[Mount(tmp_path / "missing", "/data")])
    with pytest.raises(MountError, match="not absolute"):
        Sandbox.create(vm_session.image, mounts=[Mount(tmp_path, "data")])
    with pytest.raises(VolumeNotFoundError):
        Sandbox.create(vm_session.image, mounts=[Mount.volume("no-such-volume", "/data")])
    bad = vmr("run", "--mount", f"{tmp_path}:/proc/x", vm_session.image, "--", "true")
    assert bad.returncode == 1 and "/proc" in bad.stderr
    assert state.list_records() == records
    assert qemu_processes(str(vm_session.runtime)) == running


def test_vmr_run_with_a_mount_and_a_volume(vm_session: VmSession, tmp_path: Path,
                                          volumes: VolumeStore) -> None:  # fmt: skip
    (tmp_path / "in.txt").write_text("given on the command line\n")
    volumes.get(DIR_VOLUME).path.joinpath("vol.txt").write_text("in the volume\n")
    brokers_before = broker_processes(str(vm_session.runtime))
    result = vmr("run", "--mount", f"{tmp_path}:/in:ro", "--volume", f"{DIR_VOLUME}:/v",
                 vm_session.image, "--", "sh", "-c", "cat /in/in.txt /v/vol.txt")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "given on the command line\nin the volume\n"
    assert broker_processes(str(vm_session.runtime)) == brokers_before


def test_brokers_of_a_detached_sandbox_outlive_vmr_run_and_end_with_stop(
    vm_session: VmSession, tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("still served\n")
    started = vmr("run", "-d", "--mount", f"{tmp_path}:/data", vm_session.image)
    assert started.returncode == 0, started.stderr
    sandbox_id = started.stdout.strip()
    try:
        brokers = [pid for pid, _ in state.find_record(sandbox_id).brokers]
        assert len(brokers) == 1 and alive(int(brokers[0] or 0))  # vmr run itself has exited
        read = vmr("sandbox", "exec", sandbox_id, "--", "cat", "/data/f")
        assert (read.returncode, read.stdout) == (0, "still served\n"), read.stderr
        assert vmr("sandbox", "stop", sandbox_id).returncode == 0
        deadline = time.monotonic() + 10
        while alive(int(brokers[0] or 0)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(int(brokers[0] or 0))
    finally:
        vmr("sandbox", "rm", "-f", sandbox_id)
    assert not broker_processes(sandbox_id) and not qemu_processes(sandbox_id)


def test_a_crashed_host_process_leaves_no_broker(vm_session: VmSession, tmp_path: Path) -> None:
    script = (
        "import os\n"
        "from vmruntime import Mount, Sandbox\n"
        f"box = Sandbox.create({vm_session.image!r}, mounts=[Mount({str(tmp_path)!r}, '/d')])\n"
        "print(box.id, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    sandbox_id = child.stdout.strip()
    brokers = [int(pid or 0) for pid, _ in state.find_record(sandbox_id).brokers]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in brokers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert brokers and not any(alive(pid) for pid in brokers)
    assert not qemu_processes(sandbox_id)
    assert sandbox_id in vmr("sandbox", "prune").stdout


# --- someone else's server ------------------------------------------------------------

# The peers live beside the repository (../shared/peers) in every checkout and in CI.
PEER = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "virtiofsd-peer.sh"
# The first use builds the peer's Debian 13 chroot (debootstrap, about 2 minutes).
PEER_START_TIMEOUT = 600


def start_peer(share: Path, socket: Path, log: Path) -> subprocess.Popen[bytes]:
    """virtiofsd-peer.sh serving ``share`` at ``socket``; waits for the socket.

    Its chroot is kept in the user's PEER_CACHE (not the tests' HOME), so it is
    built once per machine, not once per run.
    """
    if not PEER.is_file():
        pytest.skip(f"no virtiofsd peer at {PEER} (the shared peers beside the checkout)")
    if os.geteuid() != 0:
        pytest.skip("the virtiofsd peer needs root (debootstrap, chroot, bind mounts)")
    with log.open("wb") as out:
        peer = subprocess.Popen([PEER, share, socket], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PEER_CACHE": str(PEER_CACHE)},
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + PEER_START_TIMEOUT
    while not socket.exists() and peer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not socket.exists():
        stop_peer(peer)
        pytest.fail(f"{PEER} gave no socket (exit {peer.returncode}):\n{log.read_text()[-3000:]}")
    return peer


def stop_peer(peer: subprocess.Popen[bytes]) -> None:
    if peer.poll() is None:  # SIGTERM, not SIGKILL: the script's trap unmounts its binds
        os.killpg(peer.pid, signal.SIGTERM)
        peer.wait(timeout=30)


def test_external_vhost_user_fs_server(vm_session: VmSession, tmp_path: Path) -> None:
    """Mount.external, as bench/ uses it: Debian's virtiofsd serves the folder."""
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "hello").write_text("from virtiofsd\n")
    socket = tmp_path / "vfs.sock"
    peer = start_peer(tmp_path / "share", socket, tmp_path / "peer.log")
    try:
        with Sandbox.create(vm_session.image, mounts=[Mount.external(socket, "/ext")]) as box:
            assert sh(box, "cat /ext/hello") == "from virtiofsd\n"
            assert brokers_of(box) == []
        assert peer.wait(timeout=30) == 0  # virtiofsd exits when QEMU disconnects
    finally:
        stop_peer(peer)
