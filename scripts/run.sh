#!/usr/bin/env bash
# Quick start, command 1: set everything up, then run the main job: build (or find
# cached) the built-in default image and run untrusted code in a microVM booted from
# it. No network is needed once setup has run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/vmr image build-default
.venv/bin/vmr doctor
.venv/bin/vmr run vmruntime/default:latest -- python3 -c '
import os, platform, socket
print("hello from", platform.node(), "running Linux", platform.release())
print("visible at /:", sorted(os.listdir("/")))
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    print("network: reachable (unexpected)")
except OSError as exc:
    print("network: none (" + exc.strerror + ")")
'
