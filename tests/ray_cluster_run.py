"""Two Ray nodes on this machine, a job on them, then ``ray stop``: run by
tests/test_ray_cluster.py inside a PID namespace of its own.

Why a PID namespace (``unshare --pid --fork --mount-proc``): ``ray stop`` ends every Ray
process it can see on the machine, and this machine is shared with other Ray sessions.
In the namespace it sees only this cluster's processes (and the QEMUs and brokers its
actors start), so the test runs the real ``ray stop`` and touches nothing else.

Protocol with the test, one line each way: it prints ``result <json>`` when the job is
done (or ``error <json>``), then waits for ``stop`` on stdin, runs ``ray stop``, prints
``stopped <exit status>``, and waits for ``exit``. The test checks what ``ray stop``
left between the two. The job, as a Ray user would write it: an actor pinned to the
first node, from the small Python image, writes a file and snapshots with ``push_to``
(the snapshot and its image go to the store); an actor pinned to the second node, whose
cache holds nothing but the guest kernel, restores ``snapshot=<that URL>`` and reads the
file in a function that runs in its guest; it is detached, so it (and its VM) is still
running when the driver has gone and ``ray stop`` comes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from typing import Any

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def start_nodes(config: dict[str, Any]) -> None:
    head, second = config["head"], config["second"]
    address = f"127.0.0.1:{config['port']}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    _ray_start(head, ["--head", f"--port={config['port']}", "--include-dashboard=false",
                      *common, '--resources={"first_node": 1}'])  # fmt: skip
    _ray_start(second, [f"--address={address}", *common, '--resources={"second_node": 1}'])


def _ray_start(node: dict[str, Any], arguments: list[str]) -> None:
    """``ray start`` with this node's own cache, state, runtime and Ray temp directories
    (a ``ray start``'s environment reaches the actors of its node)."""
    env = {**os.environ, **node["env"]}
    command = [RAY, "start", f"--temp-dir={node['temp_dir']}", *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")


def write_state() -> str:
    """Runs in the first node's guest."""
    with open("/root/state", "w") as handle:
        handle.write("written on the first node")
    return os.uname().release


def read_state() -> tuple[str, str]:
    """Runs in the second node's guest."""
    with open("/root/state") as handle:
        return handle.read(), os.uname().release


def actor_options(resource: str) -> dict[str, Any]:
    """One CPU and 256 MiB (the VM's size), on the node that has ``resource``."""
    return {"num_cpus": 1, "memory": 256 << 20, "resources": {resource: 1}}


def node_id(actor: Any) -> str:
    """Runs in the actor's process (``__ray_call__``): the node it is on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def job(config: dict[str, Any]) -> dict[str, Any]:
    import ray

    from ray_backend import SandboxActor

    ray.init(address=f"127.0.0.1:{config['port']}", log_to_driver=False)
    try:
        first = SandboxActor.options(**actor_options("first_node")).remote(config["image"])
        first_release = ray.get(first.run.remote(write_state), timeout=600)
        url = ray.get(first.snapshot.remote("two-node", push_to=config["store"]), timeout=600)
        first_node = ray.get(first.__ray_call__.remote(node_id))
        ray.kill(first)
        # Detached: it outlives this driver, so that `ray stop` is what must end its VM.
        second = SandboxActor.options(**actor_options("second_node"), name="second",
                                      lifetime="detached").remote(snapshot=url)  # fmt: skip
        seen, second_release = ray.get(second.run.remote(read_state), timeout=600)
        second_node = ray.get(second.__ray_call__.remote(node_id))
        return {"url": url, "seen": seen, "releases": [first_release, second_release],
                "nodes": [first_node, second_node]}  # fmt: skip
    finally:
        ray.shutdown()


def main() -> None:
    config = json.loads(sys.argv[1])
    try:
        start_nodes(config)
        print("result", json.dumps(job(config)), flush=True)
    except BaseException as exc:
        print("error", json.dumps(f"{exc!r}\n{traceback.format_exc()}"), flush=True)
    sys.stdin.readline()  # "stop"
    stopped = subprocess.run([RAY, "stop"], capture_output=True, text=True, timeout=120)
    print("stopped", stopped.returncode, flush=True)
    sys.stdin.readline()  # "exit": the namespace ends with this process


if __name__ == "__main__":
    main()
