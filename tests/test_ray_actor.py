"""SandboxActor on a real local Ray, with real microVMs of the default image (slow tier).

One actor is shared by most tests (a boot under TCG costs seconds); the restart and
snapshot tests make their own. The guest is treated as hostile: some functions here
write forged messages straight into the worker's pipe to the host.
"""

from __future__ import annotations

import os
import pickle
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray
import ray_user_module
from vm_support import qemu_processes

from ray_backend import (
    SandboxActor,
    SandboxPool,
    SandboxTaskError,
    SandboxTimeoutError,
    UntrustedResultError,
    WorkerDiedError,
    WorkerProtocolError,
    _wire,
)
from vmruntime.vm import state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def actor(ray_session: Any) -> Iterator[Any]:
    handle = SandboxActor.remote()
    ray.get(handle.python_version.remote())
    yield handle
    ray.kill(handle)


def call(handle: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return ray.get(handle.run.remote(fn, *args, **kwargs), timeout=300)


def raised(handle: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BaseException:
    with pytest.raises(Exception) as caught:
        call(handle, fn, *args, **kwargs)
    return caught.value


# --- values --------------------------------------------------------------------------


def guest_facts() -> dict[str, Any]:
    import platform
    import sys

    return {"release": platform.release(), "python": list(sys.version_info[:2]),
            "pid": __import__("os").getpid()}  # fmt: skip


def test_run_computes_in_the_guest(actor: Any) -> None:
    facts = call(actor, guest_facts)
    assert facts["release"] != platform.release()
    assert facts["release"].endswith("-cloud-amd64")
    assert call(actor, pow, 3, 4) == 81
    assert call(actor, lambda *a, **k: (a, k), 1, "two", three=3.0) == ((1, "two"), {"three": 3.0})


def test_plain_data_round_trips(actor: Any) -> None:
    value = {"none": None, "flags": [True, False], "big": 2**100, "neg": -7, "pi": 3.25,
             "z": 1 - 2j, "text": "héllo\u2603", "raw": b"\x00\xff" * 40000,
             "tuple": (1, (2, 3)), "set": {1, 2}, "frozen": frozenset({"a"}),
             "buf": bytearray(b"abc"), 5: "int key"}  # fmt: skip
    assert call(actor, lambda v: v, value) == value


def test_a_100_mb_array_goes_in_and_back_intact(actor: Any) -> None:
    array = np.random.default_rng(7).integers(0, 2**31, size=100 * 2**20 // 8, dtype=np.int64)
    result = call(actor, lambda a: a[::-1] * 2, array)
    assert result.dtype == np.int64
    assert np.array_equal(result, array[::-1] * 2)


def test_numpy_scalars_and_pandas_round_trip(actor: Any) -> None:
    frame = pd.DataFrame({"x": np.arange(5, dtype=np.float32), "label": list("abcde")},
                         index=pd.Index([10, 20, 30, 40, 50], name="id"))  # fmt: skip
    out = call(actor, lambda f: (f.assign(y=f.x * 2), f.x.sum(), f.label), frame)
    result, total, labels = out
    assert list(result.columns) == ["x", "label", "y"]
    assert result.index.name == "id" and list(result.index) == [10, 20, 30, 40, 50]
    assert result["y"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert total == np.float32(10.0) and isinstance(total, np.floating)
    assert labels.name == "label" and labels.tolist() == list("abcde")


def test_functions_of_the_callers_own_modules_travel_by_value(actor: Any) -> None:
    assert call(actor, ray_user_module.add_offset, 5) == 1005


# --- errors ----------------------------------------------------------------------------


class GuestOnlyError(Exception):
    pass


def fails_with_zero_division() -> float:
    return 1 / 0


def fails_with_own_type() -> None:
    raise GuestOnlyError("made in the guest")


def test_a_builtin_exception_comes_back_as_itself_with_the_guest_traceback(actor: Any) -> None:
    error = raised(actor, fails_with_zero_division)
    assert isinstance(error, ZeroDivisionError)
    assert "traceback in the sandbox" in str(error)
    assert "fails_with_zero_division" in str(error)


def test_other_exceptions_come_back_as_sandbox_task_errors(actor: Any) -> None:
    error = raised(actor, fails_with_own_type)
    assert isinstance(error, SandboxTaskError)
    assert "GuestOnlyError" in str(error) and "made in the guest" in str(error)


def test_a_timeout_kills_the_worker_and_the_next_call_gets_a_fresh_one(actor: Any) -> None:
    before = call(actor, guest_facts)["pid"]
    started = time.monotonic()
    error = raised(actor, time.sleep, 600, timeout=2)
    assert isinstance(error, SandboxTimeoutError) and isinstance(error, TimeoutError)
    assert time.monotonic() - started < 60
    after = call(actor, guest_facts)["pid"]
    assert after != before
    assert call(actor, guest_facts)["pid"] == after  # and it stays warm


def exits_hard() -> None:
    print("last words")
    os._exit(3)


def segfaults() -> None:
    import ctypes

    ctypes.string_at(0)


def eats_memory() -> None:
    hoard = []
    while True:
        hoard.append(bytearray(b"x" * (32 << 20)))


def test_a_worker_that_exits_is_reported_and_replaced(actor: Any) -> None:
    error = raised(actor, exits_hard)
    assert isinstance(error, WorkerDiedError)
    assert "exited with status 3" in str(error) and "last words" in str(error)
    error = raised(actor, segfaults)
    assert isinstance(error, WorkerDiedError) and "signal 11" in str(error)
    error = raised(actor, eats_memory)
    assert isinstance(error, WorkerDiedError) and error.oom_killed
    assert "out-of-memory killer" in str(error)
    assert call(actor, pow, 2, 10) == 1024


# --- hostile results -------------------------------------------------------------------


class _RunsOnUnpickle:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def returns_an_object_with_reduce(command: str) -> Any:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (command,))

    return Payload()


def forges_a_reply(message: bytes) -> None:
    """Writes ``message`` into the worker's own pipe to the host, then hangs."""
    import fcntl
    import os
    import stat
    import time

    stderr_pipe = os.fstat(2).st_ino
    for fd in range(3, 256):
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        if stat.S_ISFIFO(info.st_mode) and writable and info.st_ino != stderr_pipe:
            os.write(fd, message)
    time.sleep(600)


def forged(kind: _wire.Kind, body: bytes, lengths: tuple[int, ...] = ()) -> bytes:
    header = _wire.HEADER.pack(_wire.MAGIC, _wire.VERSION, kind, 0, len(lengths), len(body))
    return header + b"".join(_wire.LENGTH.pack(n) for n in lengths) + body


def test_a_result_whose_reduce_would_run_a_command_is_refused(actor: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    error = raised(actor, returns_an_object_with_reduce, f"touch {marker}")
    assert isinstance(error, UntrustedResultError) and "Payload" in str(error)
    assert not marker.exists()


def test_a_forged_pickle_reply_is_never_unpickled(actor: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_RunsOnUnpickle(f"touch {marker}"))
    error = raised(actor, forges_a_reply, forged(_wire.Kind.PICKLED_RESULT, evil))
    assert isinstance(error, WorkerProtocolError)
    time.sleep(0.5)
    assert not marker.exists()
    assert call(actor, pow, 2, 3) == 8  # a fresh worker


@pytest.mark.parametrize(("message", "detail"), [
    (b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 8, "bad magic"),
    (forged(_wire.Kind.RESULT, b"", (1 << 40,)), "exceed the limit"),
    (forged(_wire.Kind.RESULT, b"l" + (2**62).to_bytes(8, "big")), "exceeds the bytes left"),
    (forged(_wire.Kind.RESULT, b"A\x02|O\x01" + (1).to_bytes(8, "big") + b"b" + bytes(16)),
     "not allowed"),
])  # fmt: skip
def test_forged_replies_are_refused(actor: Any, message: bytes, detail: str) -> None:
    started = time.monotonic()
    error = raised(actor, forges_a_reply, message)
    assert isinstance(error, WorkerProtocolError) and detail in str(error)
    assert time.monotonic() - started < 120


# --- isolation --------------------------------------------------------------------------


def reads(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def connects(host: str, port: int) -> None:
    import socket

    socket.create_connection((host, port), timeout=5).close()


def environment() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_a_function_cannot_read_the_hosts_home(actor: Any) -> None:
    secret = Path.home() / "host-secret.txt"
    secret.write_text("only on the host")
    assert isinstance(raised(actor, reads, str(secret)), FileNotFoundError)


def test_a_function_cannot_open_a_connection(actor: Any) -> None:
    gcs_host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    assert isinstance(raised(actor, connects, gcs_host, int(gcs_port)), OSError)
    assert isinstance(raised(actor, connects, "192.0.2.1", 80), OSError)


def test_nothing_of_the_hosts_or_rays_environment_reaches_the_guest(actor: Any) -> None:
    guest_env = call(actor, environment)
    assert not [name for name in guest_env if name.startswith(("RAY_", "VMRUNTIME_"))]
    assert guest_env.get("HOME") != os.environ.get("HOME")


# --- pools, snapshots and restarts -----------------------------------------------------


def square(value: int) -> int:
    return value * value


def test_a_pool_spreads_calls_over_its_actors(actor: Any) -> None:
    other = SandboxActor.remote()
    try:
        pool = SandboxPool([actor, other])
        assert list(pool.map(square, range(6))) == [0, 1, 4, 9, 16, 25]
        assert sorted(pool.map_unordered(square, range(4))) == [0, 1, 4, 9]
        pool.submit(square, 7)
        assert pool.has_next()
        assert pool.get_next(timeout=300) == 49
        assert not pool.has_next()
        sandboxes = {ray.get(a.get_instance_id.remote()) for a in (actor, other)}
        assert len(sandboxes) == 2
    finally:
        ray.kill(other)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def eventually(fn: Callable[[], Any], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except ray.exceptions.RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_restarted_actor_restores_its_last_snapshot(ray_session: Any) -> None:
    handle = SandboxActor.options(max_restarts=1).remote(trust_results=True)
    call(handle, write_text, "/root/state.txt", "snapshotted")
    assert ray.get(handle.snapshot.remote("restart-test")) == "restart-test"
    call(handle, write_text, "/root/state.txt", "after the snapshot")
    first_sandbox = ray.get(handle.get_instance_id.remote())
    assert qemu_processes(first_sandbox)
    ray.kill(handle, no_restart=False)
    restored = eventually(lambda: call(handle, read_text, "/root/state.txt"))
    assert not qemu_processes(first_sandbox), "the killed actor's VM outlived it"
    # the restarted actor removed what the killed one left (in the session's state, which
    # the actors use whatever other session fixtures did to this process's environment)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VMRUNTIME_STATE", str(ray_session.state))
        patch.setenv("XDG_RUNTIME_DIR", str(ray_session.runtime))
        records = {record.id for record in state.list_records()}
    assert ray.get(handle.get_instance_id.remote()) in records  # the right directory
    assert first_sandbox not in records
    assert restored == "snapshotted"
    assert ray.get(handle.get_instance_id.remote()) != first_sandbox
    # trust_results=True: the actor unpickles what it was asked to trust
    from fractions import Fraction

    assert call(handle, Fraction, 1, 3) == Fraction(1, 3)
    ray.kill(handle, no_restart=True)


def test_two_actors_restored_from_one_snapshot_are_independent(actor: Any) -> None:
    call(actor, write_text, "/root/shared.txt", "from the snapshot")
    ray.get(actor.snapshot.remote("two-clones"))
    first, second = (SandboxActor.remote(snapshot="two-clones") for _ in range(2))
    try:
        call(first, write_text, "/root/shared.txt", "changed in the first")
        assert call(second, read_text, "/root/shared.txt") == "from the snapshot"
        assert call(first, read_text, "/root/shared.txt") == "changed in the first"
    finally:
        ray.kill(first)
        ray.kill(second)


def test_a_plain_result_needs_no_trust_but_an_object_does(actor: Any) -> None:
    from fractions import Fraction

    error = raised(actor, Fraction, 1, 3)
    assert isinstance(error, UntrustedResultError) and "Fraction" in str(error)


# --- options ------------------------------------------------------------------------------


def probe_options(share: str) -> dict[str, Any]:
    import os

    with open(f"{share}/data.txt") as shared:
        facts: dict[str, Any] = {"cwd": os.getcwd(), "env": os.environ.get("PROJECT"),
                                 "shared": shared.read(), "cpus": os.cpu_count()}  # fmt: skip
    with open("/proc/meminfo") as meminfo:
        facts["memory_kib"] = int(meminfo.readline().split()[1])
    for path in (f"{share}/new.txt", "/etc/new.txt", "/tmp/new.txt", "/work/out/new.txt"):
        try:
            with open(path, "w") as handle:
                handle.write("x")
            facts[path] = "written"
        except OSError as exc:
            facts[path] = exc.strerror
    return facts


def test_mounts_env_workdir_readonly_and_ttl_are_honoured(ray_session: Any,
                                                          tmp_path: Path) -> None:  # fmt: skip
    share = tmp_path / "share"
    share.mkdir()
    (share / "data.txt").write_text("from the host")
    handle = SandboxActor.options(num_cpus=2, memory=700 << 20).remote(
        mounts=[f"{share}:/data:ro"], env={"PROJECT": "demo"}, workdir="/work/out",
        readonly=True, ttl_seconds=60)  # fmt: skip
    try:
        facts = call(handle, probe_options, "/data")
        assert facts["cwd"] == "/work/out" and facts["env"] == "demo"
        assert facts["shared"] == "from the host"
        assert facts["cpus"] == 2  # what Ray assigned to the actor
        assert 600 << 10 < facts["memory_kib"] <= 700 << 10
        assert facts["/data/new.txt"] == "Read-only file system"
        assert facts["/etc/new.txt"] == "Read-only file system"
        assert facts["/tmp/new.txt"] == facts["/work/out/new.txt"] == "written"
        assert not (share / "new.txt").exists()
        status = ray.get(handle.get_status.remote())
        assert status.name == "RUNNING"
        deadline = time.monotonic() + 120
        while ray.get(handle.get_status.remote()).name != "TERMINATED":
            assert time.monotonic() < deadline, "the TTL did not end the sandbox"
            time.sleep(2)
        with pytest.raises(ray.exceptions.RayTaskError) as caught:
            call(handle, pow, 2, 2)
        assert "SandboxGoneError" in str(caught.value)
    finally:
        ray.kill(handle)
