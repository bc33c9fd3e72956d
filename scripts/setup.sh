#!/usr/bin/env bash
# Set up everything the project needs on a Debian 12 machine, idempotently:
# the Debian packages (only those missing, so a second run takes seconds), then a
# virtualenv in .venv with the Python dependencies pinned in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  python3 python3-venv python3-pip ca-certificates
  qemu-system-x86 qemu-utils          # the microVMs (TCG here, KVM on real hosts)
  e2fsprogs erofs-utils util-linux    # writable layers; fsck/dump of layer images; mount
  busybox-static gcc libc6-dev        # the guest initramfs and the static guest agent
  mmdebstrap debootstrap gpg uidmap libdpkg-perl arch-test  # the built-in default image
  docker-registry skopeo apache2-utils  # the tests' local registry, pushes, htpasswd
  chromium chromium-driver            # the JupyterLab test drives a headless browser
)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
# The packaged registry starts itself as a service on :5000; the tests run their own.
if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
  as_root systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" -V))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.vmruntime-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing Python dependencies into .venv"
  log=.venv/pip-install.log
  { .venv/bin/python -m pip install --upgrade "pip>=23,<27" \
      && .venv/bin/python -m pip install -e '.[test]'; } >"$log" 2>&1 \
    || { tail -n 30 "$log" >&2; echo "setup: pip install failed, see $log" >&2; exit 1; }
  echo "$wanted" > "$stamp"
fi

# The guest kernel (downloaded once), the agent (compiled once) and the initramfs;
# all cached, so a second run only checks that they are there.
.venv/bin/python -m vmruntime.guest prepare
