"""Warm sandboxed kernels (slow tier): kernels taken from a pool of copies of one memory
snapshot of a started kernel, through jupyter_client's real KernelManager.

The first kernel of a kernelspec also makes its template (a boot, ipykernel started with
a key nobody holds, a memory snapshot); the others are resumed copies, claimed with the
user's key. Each must be indistinguishable from a freshly started kernel, apart from
its speed: cells numbered from 1, an empty history, its own random state, hostname and
machine id, the kernelspec's environment; and no user's key may be in the snapshot.
"""

from __future__ import annotations

import inspect
import json
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DefaultImageSession
from helpers import shares_seen, write_kernelspec
from jupyter_client import BlockingKernelClient, KernelManager

from kernelprovider.provisioner import MicroVMProvisioner
from vmruntime.errors import MountError, SandboxNotFoundError
from vmruntime.pools.registry import live_pools
from vmruntime.snapshots import SnapshotStore
from vmruntime.vm import state

pytestmark = pytest.mark.slow
GUEST_KERNEL = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
PROBE = """
import os, random, socket, numpy
print(json.dumps({"random": random.random(), "numpy": float(numpy.random.random()),
                  "host": socket.gethostname(), "machine": open("/etc/machine-id").read().strip(),
                  "env": os.environ.get("FROM_SPEC"), "inputs": len(In), "numpy_loaded": True}))
"""


def write_spec(root: Path, name: str, **config: object) -> str:
    config = {"image": "vmruntime/default:latest", "memory": 1024, "pool_size": 1, **config}
    return write_kernelspec(root, name, GUEST_KERNEL, config, env={"FROM_SPEC": "spec-value"})


@pytest.fixture(scope="module")
def jupyter_root(default_image_session: DefaultImageSession,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # fmt: skip
    root = tmp_path_factory.mktemp("jupyter-warm")
    with pytest.MonkeyPatch.context() as patch:
        # The default image's session, whatever another session fixture set since: the
        # pool makes and refills its kernels in this process's environment.
        patch.setenv("VMRUNTIME_CACHE", str(default_image_session.cache))
        patch.setenv("VMRUNTIME_STATE", str(default_image_session.state))
        patch.setenv("XDG_RUNTIME_DIR", str(default_image_session.runtime))
        patch.setenv("JUPYTER_PATH", str(root))
        patch.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
        yield root
    MicroVMProvisioner.close_pools()


@pytest.fixture(scope="module")
def warm_spec(jupyter_root: Path) -> str:
    return write_spec(jupyter_root, "warm")


def start(name: str) -> tuple[KernelManager, BlockingKernelClient]:
    manager = KernelManager(kernel_name=name)
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=180)
    return manager, client


def run(client: BlockingKernelClient, code: str) -> tuple[dict, str]:
    out: list[str] = []

    def keep(message: dict) -> None:
        if message["msg_type"] == "stream":
            out.append(message["content"]["text"])

    reply = client.execute_interactive(code, timeout=120, output_hook=keep)
    return reply["content"], "".join(out)


def wait_for_a_ready_member(timeout: float = 240, sharing: str = "") -> None:
    """Until a pool of warm kernels has one ready (of a kernelspec ``sharing`` a folder)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pool in live_pools():
            shares = " ".join(pool["key"]["mounts"])
            if pool["name"].startswith("jupyter-") and sharing in shares and any(
                    m["state"] == "ready" for m in pool["members"]):  # fmt: skip
                return
        time.sleep(0.5)
    raise AssertionError(f"no warm kernel became ready: {live_pools()}")


def assert_not_in_templates(secrets: list[str], what: str) -> None:
    templates = [s for s in SnapshotStore().list() if s.name.startswith("jupyter-warm-")]
    assert templates, "the template is kept in the snapshot store"
    for template in templates:
        assert template.manifest.memory is not None
        for file in template.manifest.files:
            with open(template.path / file, "rb") as data:
                if os.fstat(data.fileno()).st_size == 0:
                    continue
                with mmap.mmap(data.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    for secret in secrets:
                        assert view.find(secret.encode()) == -1, f"{what} is in {file}"


def test_warm_kernels_are_fresh_kernels_of_their_own(warm_spec: str) -> None:
    first, first_client = start(warm_spec)  # makes the template, then claims a copy
    try:
        wait_for_a_ready_member()
        started = time.monotonic()
        second, second_client = start(warm_spec)  # a ready copy
        claim_seconds = time.monotonic() - started
        try:
            seen = []
            for client in (first_client, second_client):
                content, out = run(client, "import json\n" + PROBE)
                assert content["status"] == "ok" and content["execution_count"] == 1
                seen.append(json.loads(out))
                _, history = run(client, "print(len(_ih), _i1.startswith('import json'))")
                assert history == "3 True\n"  # '' + the probe + this cell: nothing else
            for probe in seen:
                # One input before the probe's own: the warm-up left no trace.
                assert probe["inputs"] == 2 and probe["env"] == "spec-value"
                assert probe["host"].startswith("vmr-") and len(probe["machine"]) == 32
            a, b = seen
            assert a["random"] != b["random"] and a["numpy"] != b["numpy"]
            assert a["host"] != b["host"] and a["machine"] != b["machine"]
            assert claim_seconds < 30  # a resumed copy, not a boot plus an import of ipykernel
            sandbox_ids = {first.provisioner.sandbox_id, second.provisioner.sandbox_id}
            assert len(sandbox_ids) == 2
            users_keys = [first.session.key.decode(), second.session.key.decode()]
        finally:
            second_client.stop_channels()
            second.shutdown_kernel(now=True)
    finally:
        first_client.stop_channels()
        first.shutdown_kernel(now=True)
    assert_not_in_templates(users_keys, "a user's key")


def test_warm_kernels_share_the_kernelspecs_folders(jupyter_root: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    marker = os.urandom(16).hex()  # a host file's content, to be in no template byte
    (data / "in.txt").write_text(marker)
    name = write_spec(jupyter_root, "warm-shares", mounts=[f"{data}:/data:ro", f"{out}:/out"])
    source = inspect.getsource(shares_seen)
    kernels = [start(name)]  # makes the template (empty stand-in folders), claims a copy
    try:
        wait_for_a_ready_member(sharing=str(data))
        kernels.append(start(name))  # a ready copy, its folders served by its own broker
        for index, (manager, client) in enumerate(kernels):
            probe = (f"import json\nfrom typing import Any\n{source}\n"
                     f"print(json.dumps(shares_seen('k{index}.txt')))")
            content, output = run(client, probe)
            assert content["status"] == "ok", content
            assert json.loads(output) == {"read": marker, "listing": ["in.txt"],
                                          "ro_write": "EROFS", "rw_write": "written",
                                          "types": ["fuse", "fuse"]}  # fmt: skip
            assert (out / f"k{index}.txt").read_text() == "from the guest"
            record = state.find_record(manager.provisioner.sandbox_id)
            assert record.layer_origin, "a resumed copy of the template, not a boot"
        assert sorted(p.name for p in data.iterdir()) == ["in.txt"]
    finally:
        for manager, client in kernels:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
    assert_not_in_templates([marker], "a shared host file's content")


def test_a_kernelspec_sharing_a_missing_folder_is_refused_naming_it(jupyter_root: Path) -> None:
    name = write_spec(jupyter_root, "warm-missing", mounts=["/no/such/folder:/data:ro"])
    started = time.monotonic()
    with pytest.raises(MountError, match="/no/such/folder"):
        KernelManager(kernel_name=name).start_kernel()
    assert time.monotonic() - started < 10  # refused before any template is made


def test_interrupt_reaches_a_warm_kernel(warm_spec: str) -> None:
    wait_for_a_ready_member()
    manager, client = start(warm_spec)
    try:
        msg_id = client.execute("import time; time.sleep(60)")
        time.sleep(2)
        manager.interrupt_kernel()
        reply = client.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        # ipykernel aborts what arrives while it still unwinds the error (stop_on_error);
        # under TCG that takes a moment, for a cold kernel as for a warm one.
        time.sleep(3)
        _, out = run(client, "print('still here')")
        assert out == "still here\n"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert not manager.is_alive()


def test_closing_the_pools_ends_their_kernels(warm_spec: str, tmp_path: Path) -> None:
    wait_for_a_ready_member()
    pools = [p for p in live_pools() if p["name"].startswith("jupyter-")]
    member_ids = [m["id"] for pool in pools for m in pool["members"] if m["state"] == "ready"]
    assert member_ids
    MicroVMProvisioner.close_pools()
    assert not [p for p in live_pools() if p["name"].startswith("jupyter-")]
    for sandbox_id in member_ids:
        with pytest.raises(SandboxNotFoundError):
            state.find_record(sandbox_id)
