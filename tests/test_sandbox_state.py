"""Sandbox records, the private runtime directory, liveness and mount specs (fast tier, no VM)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from vmruntime import Mount
from vmruntime.errors import (
    BrokerError,
    DiskInUseError,
    MountError,
    SandboxError,
    SandboxNotFoundError,
    UnsafeDirectoryError,
)
from vmruntime.vm import mounts as mounts_module
from vmruntime.vm import state
from vmruntime.vm.builder import kernel_cmdline
from vmruntime.vm.commands import prune_sandboxes
from vmruntime.vm.driver import MachineSpec
from vmruntime.vm.mounts import SandboxMounts, guest_owner, resolve_mounts
from vmruntime.vm.qemu import QemuDriver, qemu_argv


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    return tmp_path


def record(sandbox_id: str, **overrides: object) -> state.SandboxRecord:
    values: dict[str, object] = {
        "id": sandbox_id, "image": "docker.io/test/x:1", "manifest_digest": "sha256:" + "0" * 64,
        "created": time.time(), "cpus": 1, "memory_mib": 256, "accelerator": "tcg",
        "detached": False, "owner_pid": os.getpid(),
        "owner_start": state.process_start_time(os.getpid()),
    }  # fmt: skip
    values.update(overrides)
    return state.SandboxRecord(**values)  # type: ignore[arg-type]


def save(rec: state.SandboxRecord) -> state.SandboxPaths:
    paths = state.SandboxPaths(rec.id)
    paths.create()
    state.write_record(paths, rec)
    return paths


def dead_process() -> tuple[int, int | None]:
    child = subprocess.Popen(["sleep", "0"])
    start = state.process_start_time(child.pid)
    child.wait()
    return child.pid, start


def test_runtime_dirs_are_private(dirs: Path) -> None:
    paths = save(record("aaaaaaaaaaaa"))
    for directory in (state.runtime_root(), paths.runtime):
        assert (os.stat(directory).st_mode & 0o777) == 0o700


def test_a_runtime_dir_others_could_enter_is_refused(dirs: Path) -> None:
    state.runtime_root().mkdir(mode=0o755)
    os.chmod(state.runtime_root(), 0o755)
    with pytest.raises(UnsafeDirectoryError, match="mode 755, not 700"):
        state.SandboxPaths("bbbbbbbbbbbb").create()


def test_a_symlinked_runtime_dir_is_refused(dirs: Path) -> None:
    elsewhere = dirs / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.runtime_root().symlink_to(elsewhere)
    with pytest.raises(UnsafeDirectoryError, match="not a directory owned by"):
        state.private_dir(state.runtime_root())


def test_a_runtime_dir_owned_by_someone_else_is_refused(dirs: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another uid")
    state.runtime_root().mkdir(mode=0o700)
    os.chown(state.runtime_root(), 12345, 12345)
    with pytest.raises(UnsafeDirectoryError, match="not a directory owned by uid 0"):
        state.private_dir(state.runtime_root())


def test_status_follows_the_processes_not_the_pids(dirs: Path) -> None:
    me, my_start = os.getpid(), state.process_start_time(os.getpid())
    gone, gone_start = dead_process()
    assert record("a", vmm_pid=me, vmm_start=my_start).status == "running"
    assert record("b", vmm_pid=gone, vmm_start=gone_start).status == "stopped"
    # Our pid with another start time is a recycled pid, not our VM.
    assert record("c", vmm_pid=me, vmm_start=(my_start or 0) + 1).status == "stopped"
    orphan = record("d", vmm_pid=me, vmm_start=my_start, owner_pid=gone, owner_start=gone_start)
    assert orphan.status == "orphaned"
    detached = record("e", vmm_pid=me, vmm_start=my_start, owner_pid=gone,
                      owner_start=gone_start, detached=True)  # fmt: skip
    assert detached.status == "running"
    assert record("f").status == "creating"
    assert record("g", owner_pid=gone, owner_start=gone_start).status == "orphaned"


def test_find_by_id_prefix_or_name(dirs: Path) -> None:
    save(record("abc111111111", name="first"))
    save(record("abc222222222"))
    assert state.find_record("first").id == "abc111111111"
    assert state.find_record("abc2").id == "abc222222222"
    with pytest.raises(SandboxError, match="ambiguous"):
        state.find_record("abc")
    with pytest.raises(SandboxNotFoundError):
        state.find_record("zzz")


def test_prune_removes_stopped_and_orphaned_but_not_creating(dirs: Path) -> None:
    gone, gone_start = dead_process()
    stopped = save(record("111111111111", vmm_pid=gone, vmm_start=gone_start))
    orphan = save(record("222222222222", owner_pid=gone, owner_start=gone_start))
    creating = save(record("333333333333"))
    removed = {r.id for r in prune_sandboxes()}
    assert removed == {"111111111111", "222222222222"}
    assert not stopped.state.exists() and not orphan.state.exists()
    assert not stopped.runtime.exists()
    assert creating.state.exists()


def test_unreadable_record_is_named(dirs: Path) -> None:
    paths = save(record("444444444444"))
    paths.record.write_text("{not json")
    with pytest.raises(SandboxError, match="unreadable"):
        state.read_record(paths)


# --- records of sandboxes with mounts -------------------------------------------------


def test_record_names_mounts_and_brokers_and_a_version_1_record_still_reads(dirs: Path) -> None:
    paths = save(record("555555555555", mounts=["--mount /h:/g:ro"], brokers=[[123, 456]]))
    again = state.read_record(paths)
    assert (again.version, again.mounts, again.brokers) == (4, ["--mount /h:/g:ro"], [[123, 456]])
    assert (again.writable_format, again.layer_origin) == ("raw", "")
    doc = json.loads(paths.record.read_text())
    for key in ("mounts", "brokers", "config", "exec_defaults", "vmm"):
        del doc[key]
    doc["version"] = 1
    paths.record.write_text(json.dumps(doc))
    old = state.read_record(paths)
    assert (old.mounts, old.brokers, old.config, old.exec_defaults) == ([], [], {}, {})
    assert old.vmm == "qemu"


def test_prune_ends_the_brokers_a_record_names(dirs: Path) -> None:
    gone, gone_start = dead_process()
    broker = subprocess.Popen(["sleep", "60"])  # stands in for a broker that outlived QEMU
    start = state.process_start_time(broker.pid)
    save(record("666666666666", vmm_pid=gone, vmm_start=gone_start, brokers=[[broker.pid, start]]))
    try:
        assert {r.id for r in prune_sandboxes()} == {"666666666666"}
        assert state.process_start_time(broker.pid) is None  # killed (and reaped: our child)
    finally:
        broker.kill()
        broker.wait()
    # A recycled pid (same pid, another start time) is never killed.
    state.kill_process(os.getpid(), (state.process_start_time(os.getpid()) or 0) + 1)


# --- mount specs: checked before anything is made (no VM) -----------------------------


def ext4_image(path: Path, size: str = "4M") -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path), size], check=True, capture_output=True)
    return path


def test_cli_mount_specs_parse() -> None:
    assert Mount.parse("/h/dir:/g") == Mount(Path("/h/dir"), "/g")
    assert Mount.parse("/h/a:b:/g:ro") == Mount(Path("/h/a:b"), "/g", readonly=True)
    assert Mount.parse("data:/g:rw", "volume") == Mount.volume("data", "/g")
    assert Mount.parse("x.img:/d:ro", "disk") == Mount.disk("x.img", "/d", readonly=True)
    assert str(Mount.parse("data:/g:ro", "volume")) == "--volume data:/g:ro"
    for bad in ("/only-host", ":/g", "/h:", "/h:ro"):
        with pytest.raises(MountError, match="HOST:GUEST"):
            Mount.parse(bad)


@pytest.mark.parametrize(
    ("guest", "reason"),
    [("relative/path", "not absolute"), ("/a/../b", "not normalised"), ("/a/", "not normalised"),
     ("//a", "not normalised"), ("/", "root"), ("/proc", "/proc"), ("/sys/kernel", "/sys"),
     ("/dev/shm", "/dev")],
)  # fmt: skip
def test_bad_guest_paths_are_refused_naming_the_mount(
    tmp_path: Path, guest: str, reason: str
) -> None:
    with pytest.raises(MountError, match=reason) as caught:
        resolve_mounts([Mount(tmp_path, guest)])
    assert caught.value.mount == f"--mount {tmp_path}:{guest}"


def test_bad_host_sides_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "empty.img").write_bytes(bytes(4096))
    cases = [
        (Mount(tmp_path / "missing", "/g"), "No such file"),
        (Mount(tmp_path / "file", "/g"), "not a directory"),
        (Mount.disk(tmp_path, "/g"), "not a regular file"),
        (Mount.disk(tmp_path / "empty.img", "/g"), "no ext2/3/4 filesystem"),
        (Mount.external(tmp_path / "file", "/g"), "not a socket"),
    ]
    for mount, reason in cases:
        with pytest.raises(MountError, match=reason):
            resolve_mounts([mount])
    with pytest.raises(MountError, match="already mounted"):
        resolve_mounts([f"{tmp_path}:/g", Mount(tmp_path, "/g", readonly=True)])


def test_good_mounts_resolve_to_absolute_host_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "share").mkdir()
    ext4_image(tmp_path / "disk.img")
    resolved = resolve_mounts(["share:/data", Mount.disk("disk.img", "/disk", readonly=True)])
    assert [(r.source, r.share) for r in resolved] == [
        (tmp_path / "share", True), (tmp_path / "disk.img", False),
    ]  # fmt: skip


def test_guest_owner_of_shared_files() -> None:
    assert guest_owner("") == (0, 0)
    assert guest_owner("app") == (0, 0)  # a name cannot be looked up on the host
    assert guest_owner("1000") == (1000, 1000)
    assert guest_owner("1000:50") == (1000, 50)


def test_mounts_become_devices_locks_and_requests(dirs: Path, tmp_path: Path) -> None:
    (tmp_path / "outer").mkdir()
    image = ext4_image(tmp_path / "disk.img")
    paths = state.SandboxPaths("777777777777")
    paths.create()
    resolved = resolve_mounts([Mount.disk(image, "/outer/disk"), f"{tmp_path}/outer:/outer:ro"])
    mounts = SandboxMounts.prepare([resolved[0]], paths, owner=(0, 0), detached=False)
    try:
        with pytest.raises(DiskInUseError, match="sandbox 777777777777"):
            SandboxMounts.prepare([resolved[0]], state.SandboxPaths("x"), owner=(0, 0),
                                  detached=False)  # fmt: skip
        mounts.shares.append(mounts_module._Share(resolved[1], "vmr0", paths.share_socket(0)))
        spec = MachineSpec(Path("k"), Path("i"), "", 1, 64, "tcg", Path("c"), Path("q"), Path("v"))
        mounts.attach(spec)
        argv = " ".join(qemu_argv(spec))
        assert f"file={image},format=raw,if=none,discard=unmap" in argv
        assert "serial=D0" in argv and "vhost-user-fs-device,chardev=fs0,tag=vmr0" in argv
        assert spec.pass_fds and all(fcntl.fcntl(fd, fcntl.F_GETFD) >= 0 for fd in spec.pass_fds)
        assert [(m.guest, r.fstype, r.source) for m, r in mounts.requests()] == [
            ("/outer", "virtiofs", "vmr0"), ("/outer/disk", "ext4", "D0"),
        ]  # parents first  # fmt: skip
    finally:
        mounts.close()
        mounts.close()
    # Released: another writer may attach; a reader never needed the lock.
    SandboxMounts.prepare([resolved[0]], paths, owner=(0, 0), detached=False).close()
    ro = SandboxMounts.prepare(resolve_mounts([Mount.disk(image, "/d", readonly=True)]), paths,
                               owner=(0, 0), detached=False)  # fmt: skip
    spec = MachineSpec(Path("k"), Path("i"), "", 1, 64, "tcg", Path("c"), Path("q"), Path("v"))
    ro.attach(spec)
    assert "readonly=on,file.locking=off" in " ".join(qemu_argv(spec))
    ro.close()


def test_a_broker_that_fails_to_start_leaves_no_lock(
    dirs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise BrokerError(tmp_path, "refused for the test")

    monkeypatch.setattr(mounts_module, "_start_broker", refuse)
    image = ext4_image(tmp_path / "disk.img")
    paths = state.SandboxPaths("888888888888")
    paths.create()
    resolved = resolve_mounts([Mount.disk(image, "/d"), Mount(tmp_path, "/share")])
    with pytest.raises(BrokerError):
        SandboxMounts.prepare(resolved, paths, owner=(0, 0), detached=False)
    SandboxMounts.prepare(resolved[:1], paths, owner=(0, 0), detached=False).close()


def test_kernel_command_line_loads_virtiofs_only_with_shares() -> None:
    assert "vmr.modules=virtiofs" not in kernel_cmdline(2, "abc", "kvm")
    assert "vmr.modules=virtiofs" in kernel_cmdline(2, "abc", "kvm", shares=True)


def test_a_sandboxs_open_files_are_capped_across_its_shares(dirs: Path, tmp_path: Path) -> None:
    """One broker per share: the sandbox's cap is split between them, not multiplied."""
    folders = [tmp_path / f"share{i}" for i in range(3)]
    for folder in folders:
        folder.mkdir()
    paths = state.SandboxPaths("777777777777")
    paths.create()
    resolved = resolve_mounts([Mount(folder, f"/s{i}") for i, folder in enumerate(folders)])
    mounts = SandboxMounts.prepare(resolved, paths, owner=(0, 0), detached=False)
    try:
        caps = []
        for pid, _start in mounts.broker_processes:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            caps.append(int(argv[argv.index(b"--max-handles") + 1]))
    finally:
        mounts.close()
    assert caps == [mounts_module.SANDBOX_OPEN_HANDLES // 3] * 3


def test_tcg_translation_cache_size_is_on_the_accel_option_only_under_tcg() -> None:
    def argv(accel: str, **kwargs: int | None) -> list[str]:
        spec = MachineSpec(Path("k"), Path("i"), "", 1, 64, accel, Path("c"), Path("q"), Path("v"))
        return qemu_argv(spec, **kwargs)

    tcg = argv("tcg", tb_size_mib=16)
    assert tcg[tcg.index("-accel") + 1] == "tcg,tb-size=16"
    assert "accel=" not in tcg[tcg.index("-M") + 1]  # QEMU refuses both forms together
    assert argv("tcg", tb_size_mib=None)[tcg.index("-accel") + 1] == "tcg"  # QEMU's default
    kvm = argv("kvm", tb_size_mib=16)
    assert kvm[kvm.index("-accel") + 1] == "kvm"  # KVM has no tb-size property
    with pytest.raises(ValueError, match="at least 1"):
        QemuDriver(tb_size_mib=0)
