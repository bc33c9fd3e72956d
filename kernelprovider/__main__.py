"""``python -m kernelprovider``: install, list and remove sandboxed kernelspecs; execute
a notebook on one.

Who calls it: people and ``scripts/run.sh``. The work is in :mod:`kernelprovider.install`
and :mod:`kernelprovider.execute`; this module only parses options and prints. Exit
status: 0, 1 for a refusal or a failed notebook (the message says why and what to do),
2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kernelprovider import execute
from kernelprovider import install as spec
from vmruntime.errors import VmruntimeError

PROG = "python -m kernelprovider"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except VmruntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Jupyter kernels that run in microVMs (sandboxed kernelspecs)."
    )
    commands = parser.add_subparsers(title="commands")
    _add_install(commands)
    listing = commands.add_parser("list", help="list the sandboxed kernelspecs Jupyter finds")
    listing.add_argument("--json", action="store_true",
                         help="as JSON: name -> {resource_dir, spec}")  # fmt: skip
    listing.set_defaults(handler=_list)
    removal = commands.add_parser("remove", help="remove sandboxed kernelspecs")
    removal.add_argument("names", nargs="+", metavar="NAME")
    removal.set_defaults(handler=_remove)
    _add_execute(commands)
    return parser


def _add_install(commands: argparse._SubParsersAction) -> None:
    install = commands.add_parser(
        "install",
        help="install a kernelspec whose kernels run in microVMs",
        description="Write a kernelspec whose kernels run in a microVM booted from IMAGE. "
        "Without --user, --sys-prefix or --prefix it goes into the virtualenv when run "
        "from one, else into the user's Jupyter data directory.",
    )
    install.add_argument("--name", required=True, help="the kernelspec's name (a-z 0-9 . _ -)")
    install.add_argument(
        "--display-name",
        metavar="TEXT",
        help="the launcher's label; '(sandboxed: IMAGE)' is appended unless "
        "it says 'sandbox' and names the image (default: "
        "'Python 3 (sandboxed: IMAGE)')",
    )
    install.add_argument(
        "--image",
        default=spec.DEFAULT_IMAGE,
        metavar="REF",
        help="a cached image (default: %(default)s)",
    )
    install.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="HOST:GUEST[:ro]",
        help="share a host folder (repeatable)",
    )
    install.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="NAME:GUEST[:ro]",
        help="mount a named volume (repeatable)",
    )
    install.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="PATH:GUEST[:ro]",
        help="attach an ext4 disk image (repeatable)",
    )
    install.add_argument(
        "--share-notebook-dir",
        nargs="?",
        const="ro",
        default="off",
        choices=["ro", "rw"],
        metavar="ro|rw",
        help="share the notebook's folder at the same path (alone: ro)",
    )
    install.add_argument("--cpus", type=int, default=1, metavar="N")
    install.add_argument(
        "--memory",
        type=int,
        default=spec.DEFAULT_MEMORY_MIB,
        metavar="MiB",
        help="guest memory (default: %(default)s)",
    )
    install.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="NAME: pass the server's variable into the guest; NAME=VALUE: "
        "set it in the kernelspec (repeatable)",
    )
    install.add_argument(
        "--startup-timeout",
        type=float,
        default=spec.DEFAULT_STARTUP_TIMEOUT,
        metavar="S",
        help="boot + kernel listening (default: %(default)g)",
    )
    install.add_argument(
        "--keep-key-on-restart",
        action="store_true",
        help="a restart keeps the session key and ports, as a local kernel does, so "
        "clients that did not ask for it carry on (default: fresh ones)",
    )
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into the user's Jupyter data dir")
    where.add_argument("--sys-prefix", action="store_true", help=f"into {sys.prefix}")
    where.add_argument("--prefix", type=Path, metavar="P", help="into P/share/jupyter/kernels")
    install.add_argument("--replace", action="store_true", help="overwrite an existing kernelspec")
    install.set_defaults(handler=_install)


def _add_execute(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "execute",
        help="run a notebook on a kernel and write the executed copy",
        description="Run every cell of NOTEBOOK with nbclient on KERNEL (default: the kernel "
        "its metadata names) and write the executed copy (default: NOTEBOOK's name with "
        ".executed.ipynb, beside it). The input file is not changed.",
    )
    run.add_argument("notebook", type=Path, metavar="NOTEBOOK")
    run.add_argument("-o", "--output", type=Path, metavar="OUT", help="the executed copy")
    run.add_argument("--kernel", metavar="NAME", help="the kernelspec to run it on")
    run.add_argument(
        "--timeout",
        type=float,
        default=execute.DEFAULT_CELL_TIMEOUT,
        metavar="S",
        help="seconds per cell (default: %(default)g)",
    )
    run.set_defaults(handler=_execute)


def _install(args: argparse.Namespace) -> int:
    pass_env = [item for item in args.env if "=" not in item]
    env = dict(item.split("=", 1) for item in args.env if "=" in item)
    options = spec.KernelOptions(
        image=args.image, display_name=args.display_name, cpus=args.cpus,
        memory_mib=args.memory, mounts=args.mount, volumes=args.volume, disks=args.disk,
        share_notebook_dir=args.share_notebook_dir, pass_env=pass_env, env=env,
        startup_timeout=args.startup_timeout,
        rotate_key_on_restart=not args.keep_key_on_restart,
    )  # fmt: skip
    result = spec.install(args.name, options, _scope(args), replace=args.replace)
    installed = result.installed
    print(f"Installed kernelspec {installed.name} in {installed.resource_dir}")
    print(f"  display name: {installed.display_name}")
    print(f"  image: {installed.image}")
    if not result.visible:
        share = installed.resource_dir.parent.parent
        print(f"note: Jupyter does not look in {installed.resource_dir.parent} by default; "
              f"set JUPYTER_PATH={share}", file=sys.stderr)  # fmt: skip
    if result.shadowed_by is not None:
        print(f"warning: Jupyter finds {result.shadowed_by} first under the name "
              f"{installed.name}; remove that one or pick another name",
              file=sys.stderr)  # fmt: skip
    return 0


def _scope(args: argparse.Namespace) -> spec.InstallScope | None:
    if args.user:
        return spec.InstallScope(user=True)
    if args.sys_prefix:
        return spec.InstallScope(prefix=Path(sys.prefix))
    if args.prefix is not None:
        return spec.InstallScope(prefix=args.prefix)
    return None  # install() picks: the virtualenv, else the user's


def _list(args: argparse.Namespace) -> int:
    found = spec.list_specs()
    if args.json:
        doc = {s.name: {"resource_dir": str(s.resource_dir), "spec": s.spec} for s in found}
        print(json.dumps({"kernelspecs": doc}, indent=2))
        return 0
    if not found:
        print("No sandboxed kernelspecs (install one with `python -m kernelprovider install`).")
        return 0
    rows = [("NAME", "IMAGE", "DISPLAY NAME", "PATH")]
    rows += [(s.name, s.image, s.display_name, str(s.resource_dir)) for s in found]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print("Sandboxed kernelspecs (others: `jupyter kernelspec list`):")
    for row in rows:
        padded = (cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        print("  " + "  ".join(padded) + "  " + row[3])
    return 0


def _remove(args: argparse.Namespace) -> int:
    for name in args.names:
        print(f"Removed {spec.remove(name)}")
    return 0


def _execute(args: argparse.Namespace) -> int:
    output = execute.execute_notebook(args.notebook, args.output, args.kernel, args.timeout)
    print(f"Executed {args.notebook}; the executed copy is {output.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
