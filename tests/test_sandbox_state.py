"""Sandbox records, the private runtime directory and liveness (fast tier, no VM)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from vmruntime.errors import SandboxError, SandboxNotFoundError
from vmruntime.vm import state
from vmruntime.vm.commands import prune_sandboxes


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
    with pytest.raises(SandboxError, match="mode 755, not 700"):
        state.SandboxPaths("bbbbbbbbbbbb").create()


def test_a_symlinked_runtime_dir_is_refused(dirs: Path) -> None:
    elsewhere = dirs / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.runtime_root().symlink_to(elsewhere)
    with pytest.raises(SandboxError, match="not a directory owned by"):
        state.private_dir(state.runtime_root())


def test_a_runtime_dir_owned_by_someone_else_is_refused(dirs: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another uid")
    state.runtime_root().mkdir(mode=0o700)
    os.chown(state.runtime_root(), 12345, 12345)
    with pytest.raises(SandboxError, match="not a directory owned by uid 0"):
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
