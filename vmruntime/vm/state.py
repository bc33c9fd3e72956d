"""Where sandboxes live on the host, and how to tell which are still alive.

Who calls it: :mod:`vmruntime.vm.sandbox` (records a sandbox) and the
``vmr sandbox`` commands (list, find, prune). What it promises:

- a sandbox's durable state (``sandbox.json``, the writable layer, the console
  and VMM logs) is under ``<state>/sandboxes/<id>/`` (``<state>`` and ``<runtime>``
  as :mod:`vmruntime._paths` says);
- the host ends of its sockets are under ``<runtime>/<id>/``, a directory that
  must be ours and mode 0700 (checked, never trusted), so no other local user can
  reach an agent or QMP socket;
- a process is identified by pid *and* start time, so a recycled pid is never
  mistaken for our QEMU or our host process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmruntime._durable import fsync_dir
from vmruntime._paths import ensure_runtime_root, private_dir, runtime_root, state_root
from vmruntime.errors import SandboxError, SandboxNotFoundError

# 2: adds `mounts` and `brokers`; a version 1 record reads as one with neither.
# 3: adds `config` (the request, as SandboxConfig.to_json), `exec_defaults` (the image's
#    env, cwd, user, entrypoint and cmd, with the request's env) and `vmm` (the driver);
#    an older record reads with empty ones (attach() then runs with neutral defaults).
# 4: adds `writable_format` ("raw", or "qcow2" for an overlay) and `layer_origin` (the
#    manifest digest of the snapshot a restored layer stands on); older: raw, none.
RECORD_VERSION = 4
_RECORD = "sandbox.json"


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: start time in clock ticks since boot."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def process_alive(pid: int | None, start_time: int | None) -> bool:
    return bool(pid) and start_time is not None and process_start_time(pid) == start_time


def kill_process(pid: int | None, start_time: int | None, wait: float = 2.0) -> None:
    """SIGKILL a process named by pid and start time, and wait (briefly) until it is gone.

    For processes another (maybe gone) process started, e.g. a detached sandbox's
    brokers; a child of ours is reaped too.
    """
    if not pid or not process_alive(pid, start_time):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while process_alive(pid, start_time) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def end_brokers(record: SandboxRecord) -> None:
    """Kill whatever is left of a sandbox's brokers (they normally exit with QEMU)."""
    for pid, start in record.brokers:
        kill_process(pid, start)


@dataclass
class SandboxRecord:
    """What ``sandbox.json`` holds."""

    id: str
    image: str
    manifest_digest: str
    created: float
    cpus: int
    memory_mib: int
    accelerator: str
    detached: bool
    owner_pid: int
    owner_start: int | None
    vmm_pid: int = 0
    vmm_start: int | None = None
    name: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    keep: bool = False
    stopped: bool = False
    mounts: list[str] = field(default_factory=list)
    # [pid, start time] of each virtio-fs broker: ended with QEMU by stop/kill/prune.
    brokers: list[list[int | None]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    exec_defaults: dict[str, Any] = field(default_factory=dict)
    vmm: str = "qemu"
    writable_format: str = "raw"
    layer_origin: str = ""
    version: int = RECORD_VERSION

    @property
    def vm_running(self) -> bool:
        return not self.stopped and process_alive(self.vmm_pid, self.vmm_start)

    @property
    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start)

    @property
    def status(self) -> str:
        if not self.vmm_pid and not self.stopped:
            return "creating" if self.owner_alive else "orphaned"
        if not self.vm_running:
            return "stopped"
        if not self.detached and not self.owner_alive:
            return "orphaned"
        return "running"


class SandboxPaths:
    def __init__(self, sandbox_id: str) -> None:
        self.id = sandbox_id
        self.state = state_root() / "sandboxes" / sandbox_id
        self.runtime = runtime_root() / sandbox_id

    @property
    def record(self) -> Path:
        return self.state / _RECORD

    @property
    def writable(self) -> Path:
        return self.state / "writable.ext4"

    @property
    def console_log(self) -> Path:
        return self.state / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.state / "vmm.log"

    @property
    def agent_socket(self) -> Path:
        return self.runtime / "agent.sock"

    @property
    def control_socket(self) -> Path:
        return self.runtime / "qmp.sock"

    @property
    def agent_lock(self) -> Path:
        return self.runtime / "agent.lock"

    def share_socket(self, index: int) -> Path:
        """The vhost-user socket of the broker serving share ``index``."""
        return self.runtime / f"fs{index}.sock"

    def broker_log(self, index: int) -> Path:
        return self.state / f"broker{index}.log"

    def create(self) -> None:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(mode=0o700)
        ensure_runtime_root()
        private_dir(self.runtime)

    def remove(self) -> None:
        shutil.rmtree(self.runtime, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)


def new_sandbox_id() -> str:
    return secrets.token_hex(6)


def write_record(paths: SandboxPaths, record: SandboxRecord) -> None:
    tmp = paths.state / f".{_RECORD}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2, sort_keys=True))
    os.replace(tmp, paths.record)
    fsync_dir(paths.state)


def read_record(paths: SandboxPaths) -> SandboxRecord:
    try:
        doc: dict[str, Any] = json.loads(paths.record.read_text())
    except FileNotFoundError:
        raise SandboxNotFoundError(paths.id) from None
    except (OSError, ValueError) as exc:
        raise SandboxError(paths.id, f"unreadable {paths.record}: {exc}") from exc
    known = set(SandboxRecord.__dataclass_fields__)
    return SandboxRecord(**{k: v for k, v in doc.items() if k in known})


def list_records() -> list[SandboxRecord]:
    root = state_root() / "sandboxes"
    records = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        with contextlib.suppress(SandboxError):
            records.append(read_record(SandboxPaths(entry.name)))
    return sorted(records, key=lambda r: r.created)


def find_record(id_or_name: str) -> SandboxRecord:
    """A sandbox by full id, unique id prefix, or name."""
    records = list_records()
    exact = [r for r in records if id_or_name in (r.id, r.name)]
    matches = exact or [r for r in records if r.id.startswith(id_or_name) and id_or_name]
    if len(matches) != 1:
        if matches:
            raise SandboxError(id_or_name, "ambiguous: matches " + ", ".join(r.id for r in matches))
        raise SandboxNotFoundError(id_or_name)
    return matches[0]


def mark_stopped(paths: SandboxPaths) -> None:
    with contextlib.suppress(SandboxError):
        record = read_record(paths)
        record.stopped = True
        write_record(paths, record)
    shutil.rmtree(paths.runtime, ignore_errors=True)
