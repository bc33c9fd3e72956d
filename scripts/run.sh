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
