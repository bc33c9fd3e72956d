"""The Jupyter provisioner through jupyter_client's real kernel managers, fast tier.

The sandbox's VMM is tests/fake_vmm.py's fake driver: the real guest agent runs on the
host, so the kernel (a real ipykernel, the host's) runs there too, behind the real
port forwards. What needs a real guest (files kept across restart, shared folders,
the guest's view) is in test_jupyter_kernels.py, slow tier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_vmm import FakeDriver
from fake_world import IMAGE, fake, left_behind
from helpers import write_kernelspec
from jupyter_client import AsyncKernelManager, KernelManager
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from kernelprovider.kernel import KernelLaunchError
from kernelprovider.provisioner import MicroVMProvisioner, guest_environment
from vmruntime.errors import ImageNotFoundError, MountError
from vmruntime.vm import CreationPlan

pytestmark = pytest.mark.anyio
HOST_KERNEL = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def write_spec(root: Path, name: str, argv: list[str] | None = None,
               env: dict[str, str] | None = None, interrupt_mode: str = "signal",
               **config: Any) -> str:  # fmt: skip
    config = {"image": IMAGE, "startup_timeout": 60.0, **config}
    return write_kernelspec(root, name, argv or HOST_KERNEL, config, env, interrupt_mode)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def driver(world: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDriver]:
    """Sandboxes of this test boot on a fake VMM; kernelspecs live in world/jupyter."""
    the_driver = fake()
    monkeypatch.setattr(MicroVMProvisioner, "creation_plan", lambda: CreationPlan(the_driver))
    monkeypatch.setenv("JUPYTER_PATH", str(world / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(world / "jupyter-runtime"))
    yield the_driver
    assert left_behind(the_driver) == []


@pytest.fixture
def spec_root(world: Path) -> Path:
    return world / "jupyter"


@pytest.fixture
async def kernel(driver: FakeDriver, spec_root: Path) -> AsyncIterator[AsyncKernelManager]:
    km = AsyncKernelManager(kernel_name=write_spec(spec_root, "fake"))
    await km.start_kernel()
    yield km
    await km.shutdown_kernel(now=True)


async def run_cell(km: AsyncKernelManager, code: str, timeout: float = 30) -> tuple[str, str]:
    """(status, stdout + error text) of one cell, through a fresh client."""
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
        out: list[str] = []

        def collect(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(content["text"])
            elif msg["msg_type"] == "error":
                out.append(content["ename"] + ": " + content["evalue"])

        reply = await client.execute_interactive(code, timeout=timeout, output_hook=collect)
        return reply["content"]["status"], "".join(out)
    finally:
        client.stop_channels()


# --- what reaches the guest -------------------------------------------------------------


def test_only_the_kernelspec_env_pass_env_and_jpy_variables_go_in() -> None:
    server = {"SECRET": "s3cret", "PATH": "/host/bin", "KEEP": "1", "FROM_SPEC": "v",
              "JPY_SESSION_NAME": "/nb.ipynb", "HOME": "/root"}  # fmt: skip
    assert guest_environment(server, {"FROM_SPEC": "v"}, ["KEEP"]) == {
        "KEEP": "1", "FROM_SPEC": "v", "JPY_SESSION_NAME": "/nb.ipynb"}  # fmt: skip


async def test_a_server_secret_is_not_readable_by_a_cell(
    driver: FakeDriver, spec_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVER_SECRET", "do-not-leak")
    monkeypatch.setenv("WANTED", "passed")
    name = write_spec(spec_root, "envs", env={"FROM_SPEC": "${WANTED}-templated"},
                      pass_env=["WANTED"])  # fmt: skip
    km = AsyncKernelManager(kernel_name=name)
    await km.start_kernel(env={**os.environ, "JPY_SESSION_NAME": "/x/nb.ipynb"})
    try:
        status, out = await run_cell(km, "import os, json; print(json.dumps(dict(os.environ)))")
    finally:
        await km.shutdown_kernel()
    assert status == "ok"
    seen = json.loads(out)
    assert "SERVER_SECRET" not in seen and "do-not-leak" not in out
    assert seen["WANTED"] == "passed"
    assert seen["FROM_SPEC"] == "passed-templated"
    assert seen["JPY_SESSION_NAME"] == "/x/nb.ipynb"


# --- lifecycle --------------------------------------------------------------------------


async def test_execute_shutdown_and_nothing_left(kernel: AsyncKernelManager) -> None:
    provisioner = kernel.provisioner
    assert isinstance(provisioner, MicroVMProvisioner) and provisioner.has_process
    assert await kernel.is_alive()
    assert await run_cell(kernel, "print(6 * 7)") == ("ok", "42\n")
    info = await provisioner.get_provisioner_info()
    assert info["sandbox_id"] and info["connection_info"]["ip"] == "127.0.0.1"
    await kernel.shutdown_kernel()
    assert not provisioner.has_process and not await kernel.is_alive()


async def test_restart_keeps_the_sandbox_with_a_fresh_key_and_fresh_ports(
    kernel: AsyncKernelManager,
) -> None:
    assert (await run_cell(kernel, "x = 1; print(x)"))[0] == "ok"
    before = dict(kernel.get_connection_info())
    sandbox = (await kernel.provisioner.get_provisioner_info())["sandbox_id"]
    await kernel.restart_kernel()
    after = dict(kernel.get_connection_info())
    assert (await kernel.provisioner.get_provisioner_info())["sandbox_id"] == sandbox
    assert after["key"] != before["key"]
    ports = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
    assert not {before[p] for p in ports} & {after[p] for p in ports}
    status, out = await run_cell(kernel, "print(x)")
    assert status == "error" and "NameError" in out


async def test_a_restart_can_keep_key_and_ports_so_connected_clients_carry_on(
    driver: FakeDriver, spec_root: Path
) -> None:
    km = AsyncKernelManager(kernel_name=write_spec(spec_root, "keep", rotate_key_on_restart=False))
    await km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=30)
        await client.execute_interactive("x = 1", timeout=30)
        before = dict(km.get_connection_info())
        await km.restart_kernel()
        assert dict(km.get_connection_info()) == before
        # The same client: its sockets reconnect by themselves; wait_for_ready waits until
        # its IOPub subscription is back too, as any client does after a restart.
        await client.wait_for_ready(timeout=60)
        reply = await client.execute_interactive("x", timeout=30)
        assert reply["content"]["ename"] == "NameError"  # a fresh kernel answered it
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_a_failed_restart_keeps_the_sandbox_for_the_next_try(
    kernel: AsyncKernelManager,
) -> None:
    provisioner = kernel.provisioner
    sandbox = provisioner.sandbox
    argv = list(kernel.kernel_spec.argv)
    kernel.kernel_spec.argv = ["sh", "-c", "echo 'broken on restart' >&2; exit 5"]
    with pytest.raises(KernelLaunchError, match="exited with code 5"):
        await kernel.restart_kernel()
    assert not provisioner.has_process
    assert provisioner.sandbox is sandbox and sandbox.running  # its files are still there
    kernel.kernel_spec.argv = argv
    await kernel.start_kernel()
    assert provisioner.sandbox is sandbox
    assert await run_cell(kernel, "print('recovered')") == ("ok", "recovered\n")


async def test_interrupt_by_signal_stops_a_long_cell(kernel: AsyncKernelManager) -> None:
    await _interrupt_a_sleeping_cell(kernel)


async def test_interrupt_by_message_stops_a_long_cell(driver: FakeDriver,
                                                      spec_root: Path) -> None:  # fmt: skip
    km = AsyncKernelManager(kernel_name=write_spec(spec_root, "bymsg", interrupt_mode="message"))
    await km.start_kernel()
    try:
        await _interrupt_a_sleeping_cell(km)
    finally:
        await km.shutdown_kernel(now=True)


async def _interrupt_a_sleeping_cell(kernel: AsyncKernelManager) -> None:
    client = kernel.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=30)
        msg_id = client.execute("import time; time.sleep(60)")
        await asyncio.sleep(1.0)
        await kernel.interrupt_kernel()
        reply = await client.get_shell_msg(timeout=20)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        client.stop_channels()


async def test_a_kernel_that_exits_is_reported_and_brought_back(
    driver: FakeDriver, spec_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Jupyter Server's kernel manager (the ioloop one) has the restarter."""
    kernel = AsyncIOLoopKernelManager(kernel_name=write_spec(spec_root, "exits"))
    await kernel.start_kernel()
    try:
        await _exit_and_come_back(kernel)
    finally:
        await kernel.shutdown_kernel(now=True)
    assert "exited with code 3" in caplog.text  # the server's log says what happened


async def _exit_and_come_back(kernel: AsyncIOLoopKernelManager) -> None:
    restarted = asyncio.Event()
    kernel.add_restart_callback(restarted.set, "restart")
    sandbox = (await kernel.provisioner.get_provisioner_info())["sandbox_id"]
    client = kernel.client()
    client.start_channels()
    await client.wait_for_ready(timeout=30)
    old_key = kernel.session.key
    client.execute("import os; os._exit(3)")
    client.stop_channels()
    await asyncio.wait_for(restarted.wait(), 60)
    await asyncio.wait_for(_relaunched(kernel, old_key), 60)  # the callback fires first
    assert await run_cell(kernel, "print('back')") == ("ok", "back\n")
    assert (await kernel.provisioner.get_provisioner_info())["sandbox_id"] == sandbox


async def _relaunched(kernel: AsyncKernelManager, old_key: bytes) -> None:
    while kernel.session.key == old_key or not kernel.has_kernel:
        await asyncio.sleep(0.1)


def test_the_synchronous_kernel_manager_works_between_its_calls(
    driver: FakeDriver, spec_root: Path
) -> None:
    """Its loop runs only inside its calls; the forwards run on vmruntime's loop."""
    km = KernelManager(kernel_name=write_spec(spec_root, "sync"))
    km.start_kernel()
    try:
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=30)
        reply = client.execute_interactive("print('sync ok')", timeout=30)
        assert reply["content"]["status"] == "ok"
        client.stop_channels()
    finally:
        km.shutdown_kernel()
    assert not km.is_alive()


async def test_shutdown_with_clients_connected_leaves_a_clean_log(
    kernel: AsyncKernelManager, caplog: pytest.LogCaptureFixture
) -> None:
    clients = [kernel.client() for _ in range(2)]
    for client in clients:
        client.start_channels()
        await client.wait_for_ready(timeout=30)
    caplog.set_level(logging.WARNING)
    await kernel.restart_kernel()
    await kernel.shutdown_kernel()
    await asyncio.sleep(0.5)  # what a late callback would print, it prints by now
    for client in clients:
        client.stop_channels()
    noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noise == []


# --- failures ---------------------------------------------------------------------------


async def test_a_missing_image_fails_the_start_and_names_it(driver: FakeDriver,
                                                            spec_root: Path) -> None:  # fmt: skip
    km = AsyncKernelManager(kernel_name=write_spec(spec_root, "noimage", image="nosuch/img:1"))
    with pytest.raises(ImageNotFoundError, match="nosuch/img:1"):
        await km.start_kernel()
    assert not km.has_kernel


async def test_a_bad_mount_fails_the_start_and_names_it(driver: FakeDriver,
                                                        spec_root: Path) -> None:  # fmt: skip
    km = AsyncKernelManager(kernel_name=write_spec(spec_root, "badmount",
                                                   mounts=["/no/such/dir:/data:ro"]))  # fmt: skip
    with pytest.raises(MountError, match="/no/such/dir"):
        await km.start_kernel()


async def test_a_kernel_that_dies_at_start_says_why(driver: FakeDriver, spec_root: Path) -> None:
    argv = ["sh", "-c", "echo 'ModuleNotFoundError: no ipykernel here' >&2; exit 7"]
    km = AsyncKernelManager(kernel_name=write_spec(spec_root, "dies", argv=argv))
    with pytest.raises(KernelLaunchError, match="exited with code 7") as caught:
        await km.start_kernel()
    assert "no ipykernel here" in str(caught.value)
    assert not km.has_kernel


async def test_a_kernel_that_never_listens_times_out(driver: FakeDriver, spec_root: Path) -> None:
    km = AsyncKernelManager(kernel_name=write_spec(spec_root, "silent", argv=["sleep", "600"],
                                                   startup_timeout=3.0))  # fmt: skip
    with pytest.raises(KernelLaunchError, match=r"did not listen .* startup timeout"):
        await km.start_kernel()
