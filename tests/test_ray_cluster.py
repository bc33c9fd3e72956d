"""Two Ray nodes on one machine (slow): an actor on the second node, whose cache started
empty, restores a snapshot that an actor on the first node pushed, with its image, to an
S3-compatible store (moto on 127.0.0.1), and runs a function in it; ``ray stop`` then
leaves no QEMU or broker behind.

The nodes are ``ray start`` processes, each with its own ``VMRUNTIME_CACHE``, state,
runtime and Ray temp directory; the second has a custom resource the second actor asks
for. Facts for Ray 2.60 (docs/DESIGN): ``--node-ip-address=127.0.0.1`` for both, and
``RAY_AUTH_MODE=token`` for the head, the second node and the driver alike (with one
token for all, in ``RAY_AUTH_TOKEN``: ``ray start --head`` makes none). The cluster
and its driver run in a PID namespace of their own (tests/ray_cluster_run.py says why).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import USER_CACHE, end_session_runtime, setup_kernel
from registry_support import free_port
from s3_support import S3Server, running_s3_server
from vm_support import broker_processes, qemu_processes

from vmruntime.images import ImageStore
from vmruntime.snapshots import SnapshotStore

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


def node(root: Path, cache: Path, runtime: Path, s3_server: S3Server) -> dict[str, Any]:
    """One node's directories and the environment its ``ray start`` passes to its actors."""
    return {
        "temp_dir": tempfile.mkdtemp(prefix="ray-", dir="/tmp"),  # socket paths stay short
        "env": {
            "VMRUNTIME_CACHE": str(cache),
            "VMRUNTIME_STATE": str(root / "state"),
            "XDG_RUNTIME_DIR": str(runtime),
            "AWS_ENDPOINT_URL": s3_server.endpoint,
        },
    }


def empty_cache(root: Path) -> Path:
    """A cache holding only the guest kernel (linked: the tests never download one)."""
    kernel = setup_kernel()
    cache = root / "cache"
    (cache / "guest" / "kernel").mkdir(parents=True)
    (cache / "guest" / "kernel" / kernel.release).symlink_to(kernel.vmlinuz.parent)
    return cache


def vm_processes(runtimes: list[Path]) -> list[int]:
    return [pid for runtime in runtimes
            for pid in qemu_processes(str(runtime)) + broker_processes(str(runtime))]  # fmt: skip


def eventually_none(runtimes: list[Path], timeout: float = 10) -> list[int]:
    """The VM processes still there after ``timeout`` (QEMU exits on its parent's death)."""
    deadline = time.monotonic() + timeout
    while (left := vm_processes(runtimes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def answer(stdout: IO[str], kind: str) -> str:
    """The payload of the cluster's next ``<kind> <payload>`` line (Ray's own output may
    come between); its ``error`` line fails the test with the traceback."""
    other = []
    for line in stdout:
        word, _, payload = line.rstrip("\n").partition(" ")
        if word == kind:
            return payload
        if word == "error":
            pytest.fail(f"the cluster failed: {json.loads(payload)}", pytrace=False)
        other.append(line)
    pytest.fail(f"the cluster ended without {kind!r}; it said: {''.join(other)[-3000:]}")


def test_an_actor_on_a_second_node_restores_what_the_first_pushed(
    python_image: str, s3_server: S3Server, tmp_path: Path
) -> None:
    runtimes = [Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp")) for _ in range(2)]
    second_cache = empty_cache(tmp_path / "second")
    config = {
        "port": free_port(),
        "image": python_image,
        "store": f"s3://{s3_server.new_bucket()}/snapshots",
        "head": node(tmp_path / "head", USER_CACHE, runtimes[0], s3_server),
        "second": node(tmp_path / "second", second_cache, runtimes[1], s3_server),
    }
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        # `ray start --head` needs a token to exist (it makes none); one for the cluster.
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # The workers import ray_backend from this checkout (and the driver's functions
        # travel by value).
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH")])
        ),
    }
    cluster = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, str(HERE / "ray_cluster_run.py"), json.dumps(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    assert cluster.stdin is not None and cluster.stdout is not None
    try:
        result = json.loads(answer(cluster.stdout, "result"))
        running = vm_processes(runtimes[1:])  # the second actor is alive: its VM runs

        cluster.stdin.write("stop\n")
        cluster.stdin.flush()
        stopped = answer(cluster.stdout, "stopped")
        left = eventually_none(runtimes)
        cluster.stdin.write("exit\n")
        cluster.stdin.flush()
        cluster.wait(timeout=60)
    finally:
        if cluster.poll() is None:  # the test failed midway
            cluster.kill()  # --kill-child: the namespace and all in it go too,
            cluster.wait()
            eventually_none(runtimes)  # a moment after unshare itself
        for runtime in runtimes:
            end_session_runtime(runtime)
        for name in ("head", "second"):
            shutil.rmtree(config[name]["temp_dir"], ignore_errors=True)

    assert result["url"] == f"{config['store']}/two-node"
    assert result["seen"] == "written on the first node"
    assert result["nodes"][0] != result["nodes"][1]
    for release in result["releases"]:
        assert release != platform.release() and release.endswith("-cloud-amd64")
    # What the second node's stores hold: the snapshot under its fetched name, and the
    # image from the store (its registry serves nothing: it was built on this machine).
    fetched = [s.name for s in SnapshotStore(tmp_path / "second" / "state" / "snapshots").list()]
    assert len(fetched) == 1 and fetched[0].startswith("two-node-")
    refs = ImageStore(second_cache).list_refs()
    assert [r.source for r in refs] == [f"store {config['store']}"]
    # `ray stop` ended every QEMU and broker of both nodes.
    assert running, "the second actor's VM should have been running before `ray stop`"
    assert stopped == "0", f"ray stop exited with status {stopped}"
    assert left == [], f"VM processes outlived `ray stop`: {left}"
