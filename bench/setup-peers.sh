#!/usr/bin/env bash
# Install the peer tools bench/pull.py compares against, idempotently: only the
# Debian packages that are missing, so a second run takes a second and changes nothing.
#   skopeo  downloads and verifies blobs into an OCI layout (peer of both comparisons)
#   umoci   unpacks that layout into a root filesystem (skopeo + umoci = a full pull)
#   podman  pulls into its own container storage (another full pull)
# Nothing else is needed: as root, podman pulls into a private --root with the vfs
# driver, which needs neither uidmap nor fuse-overlayfs (podman recommends both; they
# are left out on purpose with --no-install-recommends). The registry the benchmark
# pushes to (docker-registry) comes from scripts/setup.sh.
set -euo pipefail

PEER_PACKAGES=(skopeo umoci podman)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${PEER_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-peers: ${PEER_PACKAGES[*]} already installed"
  exit 0
fi
echo "setup-peers: installing Debian packages: ${missing[*]}"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
# podman's package may enable services or sockets (podman.socket, podman-restart);
# the benchmark starts podman itself, so nothing of it should run in the background.
if command -v systemctl >/dev/null; then
  for unit in podman.socket podman.service podman-restart.service; do
    if systemctl is-active -q "$unit" 2>/dev/null; then
      as_root systemctl disable --now "$unit" >/dev/null 2>&1 || true
    fi
  done
fi
