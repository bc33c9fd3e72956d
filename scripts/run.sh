#!/usr/bin/env bash
# Quick start, command 1: set everything up, then run the main job: build (or find
# cached) the built-in default image and show it in the local image cache.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/vmr image build-default
.venv/bin/vmr image ls
