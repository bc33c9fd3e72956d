#!/usr/bin/env bash
# Quick start, command 2: set everything up, then run the linter and the tests.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow"` for the fast tier).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
