#!/usr/bin/env bash
# Quick start, command 1: set everything up, then run the main job: build (or find
# cached) the built-in default image and run untrusted code in a microVM booted from
# it. No network is needed once setup has run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/vmr image build-default
.venv/bin/vmr doctor
# The project's docs/ folder is shared read-only: the guest reads it through the
# virtio-fs broker and cannot change it.
.venv/bin/vmr run --mount "$PWD/docs:/shared/docs:ro" vmruntime/default:latest -- python3 -c '
import os, platform, socket
print("hello from", platform.node(), "running Linux", platform.release())
print("visible at /:", sorted(os.listdir("/")))
print("shared read-only at /shared/docs:", len(os.listdir("/shared/docs")), "files")
try:
    open("/shared/docs/README.md", "w")
    print("write to the read-only share: allowed (unexpected)")
except OSError as exc:
    print("write to the read-only share: refused (" + exc.strerror + ")")
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    print("network: reachable (unexpected)")
except OSError as exc:
    print("network: none (" + exc.strerror + ")")
'

# The Jupyter front door: a kernelspec whose kernels run in microVMs booted from the
# default image, installed into the virtualenv (not the user's home), with docs/ shared
# read-only; then the quick-start notebook runs on it and the executed copy is kept.
.venv/bin/python -m kernelprovider install --name vmruntime-default \
    --mount "$PWD/docs:/shared/docs:ro" --env HOST_PROJECT_DIR="$PWD" --sys-prefix --replace
.venv/bin/python -m kernelprovider execute notebooks/quickstart.ipynb \
    --kernel vmruntime-default --output build/quickstart.executed.ipynb

# The Ray front door: this notebook runs on an ordinary local kernel (the virtualenv's
# python3), starts a local Ray and hands functions to SandboxActors, each owning a
# microVM; it ends with ray.shutdown(), so no Ray process or VM outlives it.
.venv/bin/python -m kernelprovider execute notebooks/ray_sandbox.ipynb \
    --kernel python3 --output build/ray_sandbox.executed.ipynb
cat <<END

To open the notebook in JupyterLab on the same sandboxed kernel:
    .venv/bin/jupyter lab notebooks/quickstart.ipynb
(its metadata names the kernel "Python 3 (sandboxed: vmruntime/default:latest)";
pick it under Kernel > Change Kernel for any other notebook)
The Ray notebook runs on the ordinary "Python 3 (ipykernel)" kernel, on this machine:
    .venv/bin/jupyter lab notebooks/ray_sandbox.ipynb
END
