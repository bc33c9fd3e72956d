"""Warm sandbox actors on a real local Ray (slow tier): actors resumed from the node's
memory-snapshot template, and ``WarmActorPool``.

A warm actor must be indistinguishable from a cold one apart from its speed: its own
random state (Python's and numpy's), hostname and machine id, the actor's environment
and working directory, and nothing of one caller in the template another resumes.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import shares_seen
from vm_support import qemu_processes

from ray_backend import SandboxActor, WarmActorPool
from vmruntime.snapshots import SnapshotStore

pytestmark = pytest.mark.slow
SECRET = "caller-secret-5d1e0b7a"


def identity() -> dict[str, Any]:
    import os
    import random
    import socket

    import numpy

    return {"random": random.random(), "numpy": float(numpy.random.random()),
            "host": socket.gethostname(),
            "machine": open("/etc/machine-id").read().strip() if os.path.exists(
                "/etc/machine-id") else "",
            "cwd": os.getcwd(), "env": os.environ.get("FROM_ACTOR"),
            "numpy_loaded_before": "numpy" in __import__("sys").modules}  # fmt: skip


def test_warm_actors_are_independent_sandboxes(ray_session: Any) -> None:
    options = {"env": {"FROM_ACTOR": SECRET}, "workdir": "/work"}
    first, second = SandboxActor.remote(**options), SandboxActor.remote(**options)
    try:
        a, b = (ray.get(actor.run.remote(identity), timeout=300) for actor in (first, second))
        ids = {ray.get(actor.get_instance_id.remote()) for actor in (first, second)}
    finally:
        ray.kill(first)
        ray.kill(second)
    for seen in (a, b):
        assert seen["env"] == SECRET and seen["cwd"] == "/work"
    assert a["random"] != b["random"] and a["numpy"] != b["numpy"]
    assert a["host"] != b["host"] and a["machine"] != b["machine"]
    assert len(ids) == 2 and all(f"vmr-{i}" in (a["host"], b["host"]) for i in ids)
    store = SnapshotStore(ray_session.state / "snapshots")  # the actors' (Ray's env)
    templates = [s for s in store.list() if s.name.startswith("ray-warm-")]
    assert templates and all(t.manifest.memory is not None for t in templates)
    for template in templates:  # made before any caller: nothing of one is in it
        for file in template.manifest.files:
            with open(template.path / file, "rb") as data, \
                    mmap.mmap(data.fileno(), 0, access=mmap.ACCESS_READ) as view:  # fmt: skip
                assert view.find(SECRET.encode()) == -1, file


def test_warm_actors_share_their_own_folders(ray_session: Any, tmp_path: Path) -> None:
    folders = []
    for name in ("first", "second"):
        data, out = tmp_path / name / "data", tmp_path / name / "out"
        data.mkdir(parents=True)
        out.mkdir()
        (data / "in.txt").write_text(f"{name}-{os.urandom(8).hex()}")
        folders.append((data, out))
    actors = [SandboxActor.remote(mounts=[f"{data}:/data:ro", f"{out}:/out"])
              for data, out in folders]  # fmt: skip
    try:
        seen = [ray.get(actor.run.remote(shares_seen, "actor.txt"), timeout=300)
                for actor in actors]  # fmt: skip
    finally:
        for actor in actors:
            ray.kill(actor)
    for (data, out), got in zip(folders, seen, strict=True):
        assert got == {"read": (data / "in.txt").read_text(), "listing": ["in.txt"],
                       "ro_write": "EROFS", "rw_write": "written",
                       "types": ["fuse", "fuse"]}  # fmt: skip
        assert (out / "actor.txt").read_text() == "from the guest"
        assert sorted(p.name for p in data.iterdir()) == ["in.txt"]
    store = SnapshotStore(ray_session.state / "snapshots")
    # The actors were resumed from a template with their two places (other tests' actors
    # share other places, through templates of their own).
    (template,) = [s for s in store.list() if s.name.startswith("ray-warm-")
                   and s.manifest.memory and s.manifest.memory.mounts == ("/data:ro", "/out")]
    contents = [(data / "in.txt").read_bytes() for data, _ in folders]
    for file in template.manifest.files:  # its shares were empty stand-ins
        with open(template.path / file, "rb") as data_file, \
                mmap.mmap(data_file.fileno(), 0, access=mmap.ACCESS_READ) as view:  # fmt: skip
            assert all(view.find(content) == -1 for content in contents), file


def test_a_cold_actor_still_boots(ray_session: Any) -> None:
    actor = SandboxActor.remote(warm=False)
    try:
        seen = ray.get(actor.run.remote(identity), timeout=300)
        assert seen["host"].startswith("vmr-")
    finally:
        ray.kill(actor)


def test_the_warm_pool_hands_each_actor_out_once(ray_session: Any) -> None:
    marker = os.environ["XDG_RUNTIME_DIR"]  # the session's: in every QEMU's socket paths
    before = set(qemu_processes(marker))
    with WarmActorPool(2, actor_options={"num_cpus": 0}) as pool:
        # Six claims from six threads at once: six distinct actors (two were ready).
        with concurrent.futures.ThreadPoolExecutor(6) as threads:
            actors = list(threads.map(lambda _: pool.claim(timeout=600), range(6)))
        sandbox_ids = [ray.get(a.get_instance_id.remote(), timeout=60) for a in actors]
        assert len(set(sandbox_ids)) == 6, sandbox_ids
        results = ray.get([a.run.remote(identity) for a in actors], timeout=300)
        assert len({r["host"] for r in results}) == 6
        assert pool.claims == 6 and not pool.failures
        for actor in actors:
            ray.kill(actor)
    # Closing the pool killed the ready actors it still held: their VMs are gone too.
    deadline = time.monotonic() + 60
    while set(qemu_processes(marker)) - before and time.monotonic() < deadline:
        time.sleep(1)
    assert not set(qemu_processes(marker)) - before
