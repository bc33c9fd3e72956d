"""``python -m vmruntime.guest prepare [--refresh]``: fetch and build the guest assets.

Who calls it: ``scripts/setup.sh`` (last step) and people preparing a machine
while it has network access. What it promises: on success the kernel, agent and
initramfs are cached and their paths and sizes are printed; on failure the
reason goes to stderr and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmruntime.errors import VmruntimeError
from vmruntime.guest.assets import ensure_guest_assets
from vmruntime.guest.build import ensure_agent
from vmruntime.guest.kernel import ensure_kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmruntime.guest")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="download the kernel, build agent + initramfs")
    prepare.add_argument("--refresh", action="store_true", help="look for a newer kernel first")
    prepare.add_argument("--cache", type=Path, default=None, help="cache directory")
    args = parser.parse_args(argv)
    try:
        if args.refresh:
            ensure_kernel(args.cache, refresh=True)
        assets = ensure_guest_assets(args.cache)
        agent = ensure_agent(args.cache)  # cached by now: only reports its path
    except VmruntimeError as exc:
        print(f"vmruntime.guest: {exc}", file=sys.stderr)
        return 1
    print(f"guest kernel    {assets.release}")
    for label, path in (
        ("vmlinuz", assets.kernel),
        ("agent", agent),
        ("initramfs", assets.initramfs),
    ):
        print(f"  {label:<13} {path} ({_size(path)})")
    return 0


def _size(path: Path) -> str:
    return f"{path.stat().st_size / (1 << 20):.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
