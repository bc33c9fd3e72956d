"""Sandboxes as real QEMU microVMs booting the real guest kernel (slow tier).

One sandbox is shared by the tests that only run commands; tests about
lifecycle, isolation between sandboxes, disk, memory and death boot their own.
Under TCG (these machines) a boot takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VmSession
from helpers import small_tmpfs
from vm_support import IMAGE_MARKER, allocated_bytes, qemu_processes

from vmruntime import AsyncSandbox, Sandbox, resolve
from vmruntime.errors import (
    AgentDiedError,
    ExecTimeoutError,
    GuestFileError,
    GuestOutOfMemoryError,
    ImageNotFoundError,
    SandboxError,
    VmruntimeError,
)
from vmruntime.vm import AsyncProcess, ExecResult, state
from vmruntime.vm.sync import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sandbox(vm_session: VmSession) -> Iterator[Sandbox]:
    with Sandbox.create(vm_session.image, cpus=2) as shared:
        yield shared


def sh(sandbox: Sandbox, script: str, **options: object) -> str:
    result = sandbox.exec(["sh", "-c", script], **options)
    assert result.returncode == 0, result
    return result.stdout.decode()


# --- what the guest is ------------------------------------------------------------


def test_guest_runs_its_own_kernel(sandbox: Sandbox) -> None:
    release = sh(sandbox, "uname -r").strip()
    assert release == sandbox.kernel_release
    assert release != os.uname().release
    assert "cloud-amd64" in release


def test_guest_sees_the_image_and_nothing_of_the_host(sandbox: Sandbox) -> None:
    assert sandbox.fs.read("/etc/image-marker") == IMAGE_MARKER
    top = set(sh(sandbox, "ls -A /").split())
    assert {"bin", "etc", "work", "root", "www", "proc", "sys", "dev", "tmp", "run"} <= top
    assert not top & {"usr", "lib", "var", "opt"} - {"run"}, top  # the host's dirs are absent
    result = sandbox.exec(["ls", str(Path(__file__).parent)])
    assert result.returncode != 0
    # The upper layer's whiteout hides the lower layer's file.
    assert sandbox.exec(["cat", "/etc/doomed"]).returncode == 1


def test_guest_has_no_network_device(sandbox: Sandbox) -> None:
    assert sh(sandbox, "ls /sys/class/net").split() == ["lo"]


def test_only_the_boot_modules_are_loaded(sandbox: Sandbox) -> None:
    modules = set(sh(sandbox, "cut -d' ' -f1 /proc/modules").split())
    assert {"virtio_blk", "virtio_console", "erofs", "overlay"} <= modules
    assert not modules & {"fuse", "virtiofs"}  # on demand only (vmr.modules=virtiofs)


def test_pseudo_filesystems_are_mounted_like_a_container(sandbox: Sandbox) -> None:
    lines = sh(sandbox, "cat /proc/mounts").splitlines()
    mounts = {line.split()[1]: line.split()[2] for line in lines}
    assert mounts["/"] == "overlay"
    for point, fstype in {"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs",
                          "/dev/pts": "devpts", "/dev/shm": "tmpfs", "/tmp": "tmpfs",
                          "/run": "tmpfs"}.items():  # fmt: skip
        assert mounts.get(point) == fstype, (point, mounts)


def test_image_config_env_workdir_and_cmd_are_honoured(sandbox: Sandbox) -> None:
    assert sh(sandbox, 'echo "$GREETING"; pwd') == "hello from the image\n/work\n"
    assert sandbox.default_command() == ["sh", "-c", "echo default command ran"]
    assert sh(sandbox, "echo $X", env={"X": "per exec"}) == "per exec\n"
    assert sh(sandbox, "pwd", cwd="/www") == "/www\n"


def test_user_by_name(sandbox: Sandbox) -> None:
    assert sh(sandbox, "id -u; id -g", user="app") == "1000\n1000\n"


def test_rlimits_apply_to_the_process(sandbox: Sandbox) -> None:
    limits = {resource.RLIMIT_NOFILE: (64, 128)}
    assert sh(sandbox, "ulimit -n; ulimit -Hn", rlimits=limits) == "64\n128\n"


# --- processes ------------------------------------------------------------------


def test_exit_codes_signals_and_missing_commands(sandbox: Sandbox) -> None:
    assert sandbox.exec(["sh", "-c", "exit 7"]).returncode == 7
    killed = sandbox.exec(["sh", "-c", "kill -TERM $$"])
    assert killed.returncode == -signal.SIGTERM and killed.signal == signal.SIGTERM
    missing = sandbox.exec(["no-such-command", "x"])
    assert missing.returncode == 127
    assert b"no-such-command" in missing.stderr


def test_stdout_and_stderr_stay_apart(sandbox: Sandbox) -> None:
    result = sandbox.exec(["sh", "-c", "echo out; echo err >&2"])
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


def test_ten_megabytes_of_stdin_come_back_intact(sandbox: Sandbox) -> None:
    data = os.urandom(10 * 1024 * 1024)
    result = sandbox.exec(["cat"], input=data, timeout=300)
    assert result.returncode == 0
    assert len(result.stdout) == len(data) and result.stdout == data


def test_signal_reaches_the_process(sandbox: Sandbox) -> None:
    script = 'trap "echo got-usr1; exit 3" USR1; echo ready; while true; do sleep 0.1; done'
    process = sandbox.exec_stream(["sh", "-c", script], stdin=False)
    assert process.read() == ("stdout", b"ready\n")
    process.signal(signal.SIGUSR1)
    output = b"".join(data for _, data in process)
    assert output == b"got-usr1\n"
    assert process.wait().returncode == 3


def test_concurrent_execs_run_at_the_same_time(sandbox: Sandbox) -> None:
    # Each waits for the other's file: this finishes only if both run at once.
    def waiter(mine: str, theirs: str) -> list[str]:
        return ["sh", "-c", f"touch /tmp/{mine}; while [ ! -e /tmp/{theirs} ]; do sleep 0.05; done;"
                f" echo {mine}"]  # fmt: skip

    async def both() -> list[object]:
        inner = sandbox.asynchronous
        return await asyncio.gather(
            inner.exec(waiter("a", "b"), timeout=60), inner.exec(waiter("b", "a"), timeout=60),
            inner.exec(["echo", "third"]),
        )  # fmt: skip

    first, second, third = run(both())
    assert (first.stdout, second.stdout, third.stdout) == (b"a\n", b"b\n", b"third\n")


def test_timeout_is_an_error_not_an_exit_code(sandbox: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as caught:
        sandbox.exec(["sleep", "60"], timeout=1)
    assert caught.value.argv == ["sleep", "60"]
    assert time.monotonic() - started < 30
    assert sh(sandbox, "echo still alive") == "still alive\n"


def test_tty_and_resize(sandbox: Sandbox) -> None:
    process = sandbox.exec_stream(["sh", "-c", "tty; stty size; read x; stty size"], tty=True,
                                  rows=30, cols=100)  # fmt: skip
    seen = b""
    while b"30 100" not in seen:
        item = process.read()
        assert item is not None, seen
        seen += item[1]
    assert b"/dev/pts/" in seen
    process.resize(40, 120)
    process.write(b"go\n")
    rest = b"".join(data for _, data in process)
    assert b"40 120" in rest
    assert process.wait().returncode == 0


def test_files_put_and_get(sandbox: Sandbox) -> None:
    payload = os.urandom(300_000)
    sandbox.fs.write("/root/blob", payload, mode=0o600)
    assert sandbox.fs.read("/root/blob") == payload
    assert sh(sandbox, "stat -c %a /root/blob") == "600\n"
    with pytest.raises(GuestFileError) as caught:
        sandbox.fs.read("/no/such/file")
    assert caught.value.errno == 2


def test_port_forwarding_reaches_a_guest_server(vm_session: VmSession) -> None:
    with Sandbox.create(vm_session.image, ports=[8080]) as box:
        sh(box, "httpd -p 127.0.0.1:8080 -h /www")
        host_port = box.ports[8080]
        with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/index.html", timeout=60) as r:
            assert r.read() == b"served from the guest\n"


async def _read_some(box: AsyncSandbox, guest_port: int, nbytes: int) -> asyncio.StreamWriter:
    """Connect through the forward once the guest service listens; read ``nbytes``."""
    for _ in range(100):
        reader, writer = await asyncio.open_connection("127.0.0.1", box.ports[guest_port])
        with contextlib.suppress(asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.readexactly(nbytes), 60)
            return writer
        writer.close()  # refused in the guest: not listening yet
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listened on guest port {guest_port}")


async def _output_and_exit(process: AsyncProcess) -> ExecResult:
    async for _ in process:
        pass
    return await process.wait()


def test_forwarded_connections_end_with_either_side_and_with_the_sandbox(
    vm_session: VmSession,
) -> None:
    """A client that leaves a guest service in mid-stream gets the guest's connection
    reset, so the service's writer ends; stopping with clients connected is quiet."""
    calls: list[dict[str, object]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: calls.append(context))
        async with await AsyncSandbox.create(vm_session.image, ports=[8080, 8081]) as box:
            # nc -e runs yes on the accepted socket: it writes until the socket breaks.
            streamer = await box.exec_stream(["nc", "-l", "-p", "8081", "-e", "yes"])
            leaving = await _read_some(box, 8081, 1 << 20)
            leaving.close()
            ended = await asyncio.wait_for(_output_and_exit(streamer), 30)
            assert ended.returncode != 0  # EPIPE or SIGPIPE
            await box.exec(["sh", "-c", "httpd -p 127.0.0.1:8080 -h /www"], check=True)
            staying = []
            for request in (b"", b"GET /index.html HTTP/1.0\r\n"):  # idle; half a request
                reader, writer = await asyncio.open_connection("127.0.0.1", box.ports[8080])
                writer.write(request)
                staying.append((reader, writer))
            await asyncio.sleep(0.5)
        for reader, writer in staying:  # the sandbox has stopped: their connections ended
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(scenario())
    assert calls == []


# --- isolation between sandboxes, disk and lifecycle ------------------------------------


def layer_files_of(pid: int) -> set[tuple[int, int]]:
    identities = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.endswith(".erofs"):
            info = os.stat(target)
            identities.add((info.st_dev, info.st_ino))
    return identities


def test_writes_are_private_and_layers_are_shared(vm_session: VmSession) -> None:
    first = Sandbox.create(vm_session.image, keep=True)
    try:
        sh(first, "echo mine > /root/written; rm /etc/image-marker")
        digest = resolve(vm_session.image).manifest_digest
        with Sandbox.create(digest) as second:  # by manifest digest, same image
            assert second.exec(["cat", "/root/written"]).returncode == 1
            assert second.fs.read("/etc/image-marker") == IMAGE_MARKER
            shared = layer_files_of(first.vmm_pid)
            assert len(shared) == 2
            assert shared == layer_files_of(second.vmm_pid)
    finally:
        first.stop()
    writable = state.SandboxPaths(first.id).writable
    # Stopped cleanly: the agent synced and remounted the layer read-only first.
    fsck = subprocess.run(["e2fsck", "-fn", str(writable)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(writable)], capture_output=True, text=True)
    assert re.search(r"^Filesystem state:\s+clean$", header.stdout, re.MULTILINE), header.stdout
    listing = subprocess.run(["debugfs", "-R", "ls -l /upper/root", str(writable)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "written" in listing
    etc = subprocess.run(["debugfs", "-R", "stat /upper/etc/image-marker", str(writable)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "Type: character special" in etc  # the deletion is an overlayfs whiteout
    subprocess.run([sys.executable, "-m", "vmruntime", "sandbox", "rm", first.id], check=True)
    assert not state.SandboxPaths(first.id).state.exists()


def test_full_writable_layer_is_enospc_in_the_guest_only(vm_session: VmSession) -> None:
    size = 32 << 20
    with Sandbox.create(vm_session.image, writable_size=size, keep=True) as box:
        result = box.exec(["dd", "if=/dev/zero", "of=/root/big", "bs=1M", "count=100"])
        assert result.returncode != 0
        assert b"No space left on device" in result.stderr
        assert sh(box, "echo usable") == "usable\n"
        writable = state.SandboxPaths(box.id).writable
        assert allocated_bytes(writable) <= size
    subprocess.run([sys.executable, "-m", "vmruntime", "sandbox", "rm", box.id], check=True)


def test_guest_out_of_memory_is_reported(vm_session: VmSession) -> None:
    with Sandbox.create(vm_session.image, memory_mib=128) as box:
        # One endless line: tail keeps all of it, growing until the kernel steps in.
        result = box.exec(["tail", "/dev/zero"], timeout=300)
        assert result.signal == signal.SIGKILL
        assert result.oom_killed
        assert sh(box, "echo agent survived") == "agent survived\n"


def test_guest_kernel_panic_is_an_error_with_the_console_tail(vm_session: VmSession) -> None:
    box = Sandbox.create(vm_session.image)
    vmm_pid = box.vmm_pid
    try:
        with pytest.raises(AgentDiedError) as caught:
            box.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout=120)
        assert not isinstance(caught.value, GuestOutOfMemoryError)
        assert "Kernel panic - not syncing: sysrq triggered crash" in caught.value.console_tail
    finally:
        box.kill()
    assert not Path(f"/proc/{vmm_pid}").exists()


def test_unknown_image_suggests_pull_or_load(vm_session: VmSession) -> None:
    before = state.list_records()
    with pytest.raises(ImageNotFoundError, match="vmr image pull"):
        Sandbox.create("example.invalid/nothing:here")
    assert state.list_records() == before


def test_a_crashed_host_process_leaves_no_vm_and_prune_cleans_up(vm_session: VmSession) -> None:
    script = (
        "import os, sys\n"
        "from vmruntime import Sandbox\n"
        f"box = Sandbox.create({vm_session.image!r})\n"
        "print(box.id, box.vmm_pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    sandbox_id, vmm_pid = child.stdout.split()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{vmm_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{vmm_pid}").exists(), "QEMU outlived its host process"
    ls = vmr("sandbox", "ls")
    assert sandbox_id in ls.stdout and "stopped" in ls.stdout
    pruned = vmr("sandbox", "prune")
    assert sandbox_id in pruned.stdout
    assert sandbox_id not in vmr("sandbox", "ls").stdout


# --- the CLI -----------------------------------------------------------------------


def vmr(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmruntime", *args], capture_output=True,
                          text=input is None, input=input, timeout=300)  # fmt: skip


def test_vmr_run_streams_and_propagates_the_exit_code(vm_session: VmSession) -> None:
    before = state.list_records()
    result = subprocess.run(
        [sys.executable, "-m", "vmruntime", "run", vm_session.image, "--",
         "sh", "-c", "cat; echo to-stderr >&2; exit 5"],
        input=b"piped in\n", capture_output=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert result.stdout == b"piped in\n"
    assert result.stderr.endswith(b"to-stderr\n")
    assert state.list_records() == before  # `vmr run` leaves nothing behind


def test_vmr_run_options_env_workdir_user_and_default_command(vm_session: VmSession) -> None:
    result = vmr("run", "-e", "A=from the cli", "-w", "/www", "-u", "app", vm_session.image,
                 "--", "sh", "-c", 'echo "$A|$GREETING"; pwd; id -u')  # fmt: skip
    expected = "from the cli|hello from the image\n/www\n1000\n"
    assert (result.returncode, result.stdout) == (0, expected), result.stderr
    default = vmr("run", vm_session.image)
    assert (default.returncode, default.stdout) == (0, "default command ran\n")


def test_detached_sandbox_lifecycle_through_the_cli(vm_session: VmSession) -> None:
    started = vmr("run", "-d", "--name", "lifecycle", vm_session.image)
    assert started.returncode == 0, started.stderr
    sandbox_id = started.stdout.strip()
    try:
        assert "running" in vmr("sandbox", "ls").stdout
        first = vmr("sandbox", "exec", "lifecycle", "--", "sh", "-c", "echo kept > /root/f")
        assert first.returncode == 0, first.stderr
        second = vmr("sandbox", "exec", sandbox_id[:6], "--", "cat", "/root/f")
        assert (second.returncode, second.stdout) == (0, "kept\n")
        assert vmr("sandbox", "exec", "lifecycle", "--", "sh", "-c", "exit 9").returncode == 9
        assert vmr("sandbox", "logs", "lifecycle").returncode == 0
        refused = vmr("sandbox", "rm", "lifecycle")
        assert refused.returncode == 1 and "stop it first" in refused.stderr
        assert vmr("sandbox", "stop", "lifecycle").returncode == 0
        assert "stopped" in vmr("sandbox", "ls").stdout
    finally:
        vmr("sandbox", "rm", "-f", sandbox_id)
    assert sandbox_id not in vmr("sandbox", "ls").stdout
    assert not qemu_processes(sandbox_id)


# --- the built-in default image -----------------------------------------------------


def test_default_image_runs_python(vm_session: VmSession) -> None:
    from vmruntime.images.default_image import DEFAULT_IMAGE, ensure_default_image
    from vmruntime.images.store import ImageStore

    os.environ["VMRUNTIME_CACHE"] = str(vm_session.real_cache)
    try:
        ensure_default_image()
        store = ImageStore(vm_session.real_cache)
        with Sandbox.create(DEFAULT_IMAGE, store=store, memory_mib=1024) as box:
            result = box.exec(["python3", "-c", "import sys; print(sys.version_info[:2])"],
                              timeout=300)  # fmt: skip
            assert result.stdout == b"(3, 11)\n", result
    finally:
        os.environ["VMRUNTIME_CACHE"] = str(vm_session.cache)


def test_exiting_without_stop_leaves_nothing(vm_session: VmSession) -> None:
    script = (
        "from vmruntime import Sandbox\n"
        f"box = Sandbox.create({vm_session.image!r})\n"
        "print(box.id, box.vmm_pid, flush=True)\n"
    )
    before = state.list_records()
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr
    sandbox_id, vmm_pid = child.stdout.split()
    assert not Path(f"/proc/{vmm_pid}").exists()
    assert state.list_records() == before
    assert not state.SandboxPaths(sandbox_id).state.exists()


def test_stopping_a_sandbox_another_process_owns_goes_through_qmp(vm_session: VmSession) -> None:
    box = Sandbox.create(vm_session.image, keep=True)
    try:
        stopped = vmr("sandbox", "stop", box.id)
        assert stopped.returncode == 0, stopped.stderr
        # QEMU is our child here, so it lingers as a zombie until we reap it.
        assert state.process_start_time(box.vmm_pid) is None
        with pytest.raises(AgentDiedError):
            box.exec(["true"])
    finally:
        box.kill()
    assert "stopped" in vmr("sandbox", "ls").stdout
    assert vmr("sandbox", "rm", box.id).returncode == 0


def test_guest_dying_of_memory_exhaustion_says_so(vm_session: VmSession) -> None:
    # A hog the OOM killer may not kill leaves the kernel nothing to kill but itself.
    box = Sandbox.create(vm_session.image, memory_mib=128)
    try:
        with pytest.raises(GuestOutOfMemoryError) as caught:
            box.exec(["sh", "-c", "echo -1000 > /proc/self/oom_score_adj; exec tail /dev/zero"],
                     timeout=300)  # fmt: skip
        assert "Kernel panic - not syncing: System is deadlocked on memory" in str(caught.value)
    finally:
        box.kill()


def test_full_disk_while_preparing_is_a_clear_error_and_leaves_nothing(
    vm_session: VmSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = qemu_processes(str(vm_session.runtime))
    with small_tmpfs(tmp_path / "tiny", "1m") as tiny:
        monkeypatch.setenv("VMRUNTIME_STATE", str(tiny))
        with pytest.raises(VmruntimeError, match="No space left on device"):
            Sandbox.create(vm_session.image)  # its 4 GiB layer needs 2 MB on disk
        assert list((tiny / "sandboxes").iterdir()) == []
        assert qemu_processes(str(vm_session.runtime)) == running


def test_bad_writable_size_is_refused_before_anything_is_made(vm_session: VmSession) -> None:
    before = state.list_records()
    with pytest.raises(SandboxError, match="writable_size=1000"):
        Sandbox.create(vm_session.image, writable_size=1000)
    assert state.list_records() == before


def test_vmr_run_with_a_tty_from_a_terminal(vm_session: VmSession) -> None:
    import fcntl
    import select
    import struct
    import termios

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-m", "vmruntime", "run", "-t", vm_session.image, "--",
         "sh", "-c", "tty; stty size; read line; echo got:$line; exit 4"],
        stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = b""

    def read_until(wanted: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 300
        while wanted not in seen and time.monotonic() < deadline:
            if select.select([controller], [], [], 1)[0]:
                try:
                    seen += os.read(controller, 4096)
                except OSError:  # EIO: the child closed the terminal
                    return

    try:
        read_until(b"\r\n33 111")  # stty size: rows, then columns
        os.write(controller, b"typed\r")
        read_until(b"got:typed")
        assert child.wait(timeout=120) == 4
    finally:
        child.kill()
        os.close(controller)
    assert b"/dev/pts/0" in seen and b"33 111" in seen and b"got:typed" in seen, seen


def test_async_api_in_the_callers_own_event_loop(vm_session: VmSession) -> None:
    async def scenario() -> None:
        async with await AsyncSandbox.create(vm_session.image) as box:
            process = await box.exec_stream(["sh", "-c", "read x; echo got-$x; echo oops >&2"])
            await process.write(b"input\n")
            await process.close_stdin()
            streams = [item async for item in process]
            assert sorted(streams) == [("stderr", b"oops\n"), ("stdout", b"got-input\n")]
            assert (await process.wait()).returncode == 0
            await box.fs.write("/tmp/f", b"async")
            assert await box.fs.read("/tmp/f") == b"async"
            vmm_pid = box.vmm_pid
        assert state.process_start_time(vmm_pid) is None

    asyncio.run(scenario())


def test_ctrl_c_on_vmr_run_ends_the_sandbox(vm_session: VmSession) -> None:
    before = state.list_records()
    running = qemu_processes(str(vm_session.runtime))
    child = subprocess.Popen(
        [sys.executable, "-m", "vmruntime", "run", vm_session.image, "--",
         "sh", "-c", "echo started; sleep 600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # A shell starts background jobs with SIGINT ignored, and an ignored signal
        # stays ignored across exec: give vmr the disposition a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline() == b"started\n"
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=60) == 130
    assert state.list_records() == before
    assert qemu_processes(str(vm_session.runtime)) == running
