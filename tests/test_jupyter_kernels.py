"""Sandboxed kernels in real microVMs, through jupyter_client's real kernel managers.

Slow tier: every kernel boots the default image and imports ipykernel in the guest
(tens of seconds under TCG), so most tests share one kernel; restart, two kernels at
once, a VM that dies and a server that is killed each need their own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DefaultImageSession, setup_kernel
from helpers import write_kernelspec
from jupyter_client import AsyncKernelManager, BlockingKernelClient, KernelManager
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from kernelprovider.kernel import KernelLaunchError
from vmruntime.vm import state

pytestmark = [pytest.mark.slow, pytest.mark.anyio]
GUEST_KERNEL = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
SECRET = "server-side-secret-8c1f"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write_spec(root: Path, name: str, argv: list[str] | None = None, **config: Any) -> str:
    config = {"image": "vmruntime/default:latest", "memory": 1024, **config}
    return write_kernelspec(root, name, argv or GUEST_KERNEL, config)


@pytest.fixture(scope="module")
def jupyter_dirs(default_image_session: DefaultImageSession,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # fmt: skip
    root = tmp_path_factory.mktemp("jupyter")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root))
        patch.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
        yield root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    notebook = tmp_path_factory.mktemp("notebook-dir")
    (notebook / "data.csv").write_text("a,b\n1,2\n3,4\n")
    shared = tmp_path_factory.mktemp("shared")
    (shared / "readme.txt").write_text("shared with the guest, read-only\n")
    return {"notebook": notebook, "shared": shared}


@pytest.fixture(scope="module")
def kernel(jupyter_dirs: Path, folders: dict[str, Path]) -> Iterator[KernelManager]:
    """One kernel for the tests that do not end it (the synchronous manager)."""
    name = write_spec(jupyter_dirs, "shared-kernel", share_notebook_dir="ro",
                      mounts=[f"{folders['shared']}:/shared:ro"], pass_env=["WANTED"])  # fmt: skip
    km = KernelManager(kernel_name=name)
    env = {**os.environ, "SERVER_SECRET": SECRET, "WANTED": "yes", "JPY_SESSION_NAME": "nb"}
    km.start_kernel(cwd=str(folders["notebook"]), env=env)
    yield km
    km.shutdown_kernel()
    assert not km.is_alive()


@pytest.fixture
def client(kernel: KernelManager) -> Iterator[BlockingKernelClient]:
    kc = kernel.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    yield kc
    kc.stop_channels()


def run(kc: BlockingKernelClient, code: str, timeout: float = 120,
        **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """The execute_reply's content and every IOPub message of the cell."""
    messages: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=messages.append, **options)
    return reply["content"], messages


def stdout_of(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in messages
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")  # fmt: skip


# --- one kernel, many cells -------------------------------------------------------------


def test_cells_run_in_the_guest(client: BlockingKernelClient) -> None:
    project = str(Path.cwd())
    code = f"import os, platform; print(platform.release()); print(os.path.exists({project!r}))"
    reply, messages = run(client, code)
    assert reply["status"] == "ok"
    release, project_visible = stdout_of(messages).split()
    assert release == setup_kernel().release != os.uname().release
    assert project_visible == "False"  # the host's files are not there


def test_rich_output_and_an_error_with_its_traceback(client: BlockingKernelClient) -> None:
    reply, messages = run(client, "from IPython.display import HTML, display\n"
                                  "display(HTML('<b>bold</b>'))\n6 * 7")  # fmt: skip
    assert reply["status"] == "ok"
    datas = [m["content"]["data"] for m in messages
             if m["msg_type"] in ("display_data", "execute_result")]  # fmt: skip
    assert {"text/html": "<b>bold</b>", "text/plain": "<IPython.core.display.HTML object>"} in datas
    assert any(d.get("text/plain") == "42" for d in datas)
    reply, messages = run(client, "def f():\n    return 1 / 0\nf()")
    assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0]["traceback"]))
    assert "return 1 / 0" in plain and "f()" in plain


def test_input_is_answered_through_stdin(client: BlockingKernelClient) -> None:
    answered = []

    def answer(msg: dict[str, Any]) -> None:
        answered.append(msg["content"]["prompt"])
        client.input("Ada")

    reply, messages = run(client, "name = input('name? '); print('hello', name)",
                          allow_stdin=True, stdin_hook=answer)  # fmt: skip
    assert reply["status"] == "ok" and answered == ["name? "]
    assert stdout_of(messages) == "hello Ada\n"


def test_interrupt_stops_a_sleeping_cell(kernel: KernelManager,
                                         client: BlockingKernelClient) -> None:  # fmt: skip
    msg_id = client.execute("import time; time.sleep(60)")
    client.get_iopub_msg(timeout=60)  # busy: the cell is running
    time.sleep(2)
    started = time.monotonic()
    kernel.interrupt_kernel()
    reply = client.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 30


def test_the_server_environment_stays_out(client: BlockingKernelClient) -> None:
    _, messages = run(client, "import os, json; print(json.dumps(dict(os.environ)))")
    seen = json.loads(stdout_of(messages))
    assert "SERVER_SECRET" not in seen and SECRET not in json.dumps(seen)
    assert seen["WANTED"] == "yes" and seen["JPY_SESSION_NAME"] == "nb"
    assert not any(value == os.environ.get("HOME") for value in seen.values())


def test_the_notebook_folder_is_shared_read_only_and_is_the_cwd(
    client: BlockingKernelClient, folders: dict[str, Path]
) -> None:
    code = textwrap.dedent("""
        import os, errno
        print(os.getcwd())
        print(open("data.csv").read().splitlines()[1])
        print(open("/shared/readme.txt").read().strip())
        for path in ("new.txt", "/shared/new.txt"):
            try:
                open(path, "w")
            except OSError as exc:
                print(errno.errorcode[exc.errno])
    """)
    reply, messages = run(client, code)
    assert reply["status"] == "ok"
    assert stdout_of(messages).splitlines() == [
        str(folders["notebook"].resolve()), "1,2", "shared with the guest, read-only",
        "EROFS", "EROFS"]  # fmt: skip
    assert sorted(p.name for p in folders["notebook"].iterdir()) == ["data.csv"]


def test_twenty_megabytes_of_text_arrive_whole(client: BlockingKernelClient) -> None:
    code = "for i in range(20):\n    print(str(i % 10) * 999_999)"
    reply, messages = run(client, code, timeout=600)
    assert reply["status"] == "ok"
    text = stdout_of(messages)
    assert len(text) == 20_000_000
    assert text.count("\n") == 20 and text.startswith("0" * 999_999 + "\n1")


def test_a_two_megabyte_png_arrives_whole(client: BlockingKernelClient) -> None:
    # An uncompressed PNG of random pixels: 2 MB that no compressor can shrink.
    code = textwrap.dedent("""
        import hashlib, os, struct, zlib
        from IPython.display import Image, display
        width, height = 1024, 683
        rows = b"".join(b"\\0" + os.urandom(width * 3) for _ in range(height))
        def chunk(kind, data):
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
        png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
               8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))
        print(len(png), hashlib.sha256(png).hexdigest())
        display(Image(data=png, format="png"))
    """)
    reply, messages = run(client, code, timeout=600)
    assert reply["status"] == "ok"
    size, digest = stdout_of(messages).split()
    assert int(size) > 2_000_000
    images = [m["content"]["data"]["image/png"] for m in messages
              if m["msg_type"] == "display_data"]  # fmt: skip
    (png,) = [base64.b64decode(data) for data in images]
    assert hashlib.sha256(png).hexdigest() == digest


# --- kernels of their own ---------------------------------------------------------------


def test_restart_keeps_the_sandbox_and_its_files(jupyter_dirs: Path) -> None:
    km = KernelManager(kernel_name=write_spec(jupyter_dirs, "restart"))
    km.start_kernel()
    try:
        sandbox = km.provisioner.sandbox_id
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        run(kc, "open('/root/kept.txt', 'w').write('still here'); variable = 1")
        kc.stop_channels()
        key = km.session.key
        km.restart_kernel()
        assert km.session.key != key and km.provisioner.sandbox_id == sandbox
        kc = km.client()  # a restart changes the ports and the key, so a new client
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        reply, messages = run(kc, "print(open('/root/kept.txt').read())")
        assert stdout_of(messages) == "still here\n"
        reply, _ = run(kc, "variable")
        assert reply["status"] == "error" and reply["ename"] == "NameError"
        kc.stop_channels()
        vmm = _vmm_pid(km)
    finally:
        km.shutdown_kernel()
    assert not _alive(vmm)


async def test_two_kernels_at_once_each_in_its_own_vm(jupyter_dirs: Path) -> None:
    name = write_spec(jupyter_dirs, "pair")
    managers = [AsyncKernelManager(kernel_name=name) for _ in range(2)]
    await asyncio.gather(*(km.start_kernel() for km in managers))
    try:
        hosts = []
        for km in managers:
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=120)
            messages: list[dict[str, Any]] = []
            await kc.execute_interactive("import socket; print(socket.gethostname())",
                                         timeout=120, output_hook=messages.append)  # fmt: skip
            hosts.append(stdout_of(messages).strip())
            kc.stop_channels()
        vmms = [_vmm_pid(km) for km in managers]
        assert len(set(vmms)) == 2 and all(map(_alive, vmms))
        assert len(set(hosts)) == 2, hosts
    finally:
        await asyncio.gather(*(km.shutdown_kernel() for km in managers))
    assert not any(map(_alive, vmms))


async def test_a_vm_that_dies_is_reported_and_a_new_one_boots(
    jupyter_dirs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    km = AsyncIOLoopKernelManager(kernel_name=write_spec(jupyter_dirs, "dies"))
    await km.start_kernel()
    try:
        first, key = _vmm_pid(km), km.session.key
        restarted = asyncio.Event()
        km.add_restart_callback(restarted.set, "restart")
        os.kill(first, signal.SIGKILL)
        await asyncio.wait_for(restarted.wait(), 60)
        while km.session.key == key or not km.has_kernel:  # the callback fires first
            await asyncio.sleep(0.2)
        assert _vmm_pid(km) not in (None, first)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=180)
        reply = await kc.execute_interactive("print('new vm')", timeout=120)
        assert reply["content"]["status"] == "ok"
        kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)
    assert "died with its VM" in caplog.text
    assert "last lines of the guest console" in caplog.text


def test_a_startup_timeout_names_the_cause_and_the_console(jupyter_dirs: Path) -> None:
    km = KernelManager(kernel_name=write_spec(jupyter_dirs, "silent", argv=["sleep", "600"],
                                              startup_timeout=25.0))  # fmt: skip
    with pytest.raises(KernelLaunchError) as caught:
        km.start_kernel()
    message = str(caught.value)
    assert "did not listen on its ports within the startup timeout (25 s)" in message
    console = message.split("--- last lines of the guest console ---\n")[1]
    assert console.strip()  # what the guest printed (a quiet boot prints little)
    assert not km.has_kernel


def test_a_killed_server_leaves_no_vm(jupyter_dirs: Path) -> None:
    name = write_spec(jupyter_dirs, "orphan")
    script = textwrap.dedent(f"""
        import sys, time
        from jupyter_client import KernelManager
        km = KernelManager(kernel_name={name!r})
        km.start_kernel()
        print(km.provisioner.sandbox.vmm_pid, flush=True)
        time.sleep(600)
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        vmm = int(line)
        assert _alive(vmm)
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 10
    while _alive(vmm) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(vmm)


def _vmm_pid(km: KernelManager | AsyncKernelManager) -> int | None:
    sandbox = km.provisioner.sandbox  # type: ignore[union-attr]
    return sandbox.vmm_pid if sandbox is not None else None


def _alive(pid: int | None) -> bool:
    """A process that exists and is not a zombie."""
    return pid is not None and state.process_start_time(pid) is not None
