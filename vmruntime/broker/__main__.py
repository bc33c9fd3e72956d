"""The broker as a process: ``python -m vmruntime.broker serve|mount ...``.

``serve`` listens on a Unix socket for QEMU's ``vhost-user-fs-device``, serves
one front-end and exits 0 when it disconnects (QEMU exited) or on
SIGTERM/SIGINT; it writes one byte to ``--ready-fd`` once the socket listens.
``serve --transport console`` instead connects to ``--socket``, where QEMU listens for
a virtio-console port's chardev (retrying until QEMU is there, ``--connect-timeout``),
and serves the FUSE messages the guest's agent relays on it (``console.py``); it writes
the ready byte once the share is open, as QEMU starts after it. ``--resume``: the guest's
FUSE session began with an earlier broker (docs/broker.md, "Resuming a session").
Exit status 3: the guest broke the console stream's framing.
``mount`` serves the same share on a host mount point through ``/dev/fuse``.
Exit status 2: the share or the socket cannot be set up (the reason is on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from vmruntime.broker.handler import BrokerOptions, FuseHandler
from vmruntime.errors import VmruntimeError

log = logging.getLogger("vmruntime.broker")

EXIT_SETUP_FAILED = 2
EXIT_BAD_STREAM = 3


def _share_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--readonly", action="store_true")
    parser.add_argument("--identity", choices=("virtual", "passthrough"), default="virtual")
    parser.add_argument("--uid", type=int, default=0)
    parser.add_argument("--gid", type=int, default=0)
    parser.add_argument("--containment", choices=("auto", "openat2", "walk"), default="auto")
    parser.add_argument("--max-handles", type=int, default=1024)
    parser.add_argument("--resume", action="store_true",
                        help="the guest's FUSE session began with an earlier broker")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log every vhost-user message")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vmruntime.broker")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a share to QEMU over vhost-user-fs")
    serve.add_argument("--socket", required=True, type=Path)
    serve.add_argument("--root", required=True, type=Path)
    serve.add_argument("--ready-fd", type=int, default=-1)
    serve.add_argument("--transport", choices=("vhost-user", "console"), default="vhost-user")
    serve.add_argument("--connect-timeout", type=float, default=60.0,
                       help="console: how long to wait for QEMU's socket")  # fmt: skip
    _share_options(serve)
    mount = commands.add_parser("mount", help="serve a share on a host mount point (/dev/fuse)")
    mount.add_argument("root", type=Path)
    mount.add_argument("mountpoint", type=Path)
    _share_options(mount)
    return parser


def _options(args: argparse.Namespace) -> BrokerOptions:
    return BrokerOptions(
        readonly=args.readonly, identity=args.identity, uid=args.uid, gid=args.gid,
        containment=args.containment, max_handles=args.max_handles, resumed=args.resume,
        # Each round trip over a console port costs the guest far more than over vhost-user.
        few_round_trips=getattr(args, "transport", "") == "console",
    )  # fmt: skip


def _raise_nofile_limit() -> None:
    # Every inode the guest looks up is an O_PATH fd: take all the fds we may.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _listen(path: Path) -> socket.socket:
    """A listening socket at ``path``; a stale socket there is replaced, anything else not."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(os.fspath(path))
        os.chmod(path, 0o600)  # only our user (QEMU runs as us) may connect
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


def _unlink_if_ours(path: Path, inode: int) -> None:
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


def _signal_ready(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.write(fd, b"\x01")
    except OSError as exc:
        log.warning("cannot signal readiness on fd %d: %s", fd, exc)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_share(args: argparse.Namespace) -> FuseHandler | None:
    if not args.root.is_dir():
        print(f"share root {args.root} is not a directory", file=sys.stderr)
        return None
    try:
        return FuseHandler(args.root, _options(args))
    except (VmruntimeError, OSError, ValueError) as exc:
        print(f"share root {args.root}: {exc}", file=sys.stderr)
        return None


def serve_console(args: argparse.Namespace) -> int:
    from vmruntime.broker.console import ConsoleTransport, FramingError, connect_console

    handler = _open_share(args)
    if handler is None:
        return EXIT_SETUP_FAILED
    transport = ConsoleTransport(handler)
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, lambda *_: transport.stop())
    try:
        _signal_ready(args.ready_fd)  # QEMU, which listens, starts after us
        try:
            sock = connect_console(args.socket, args.connect_timeout)
        except (VmruntimeError, OSError) as exc:
            print(f"cannot connect to {args.socket}: {exc}", file=sys.stderr)
            return EXIT_SETUP_FAILED
        log.info("serving %s on the console port at %s", args.root, args.socket)
        with sock:
            try:
                transport.serve(sock)
            except FramingError as exc:
                log.error("%s; closing the connection", exc)
                return EXIT_BAD_STREAM
    finally:
        log.info("requests by opcode: %s", handler.describe_counts() or "none")
        handler.close()
    return 0


def serve(args: argparse.Namespace) -> int:
    from vmruntime.broker.vhost_user import VhostUserFsBackend

    if args.transport == "console":
        return serve_console(args)
    handler = _open_share(args)
    if handler is None:
        return EXIT_SETUP_FAILED
    backend = VhostUserFsBackend(handler)
    try:
        try:
            listener = _listen(args.socket)
        except OSError as exc:
            print(f"cannot listen on {args.socket}: {exc}", file=sys.stderr)
            return EXIT_SETUP_FAILED
        inode = os.lstat(args.socket).st_ino  # the socket file's, not the socket's own
        for signo in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signo, lambda *_: backend.stop())
        log.info("serving %s on %s", args.root, args.socket)
        _signal_ready(args.ready_fd)
        try:
            backend.serve(listener)
        finally:
            listener.close()
            _unlink_if_ours(args.socket, inode)
    finally:
        backend.close()
        log.info("requests by opcode: %s", handler.describe_counts() or "none")
        handler.close()
    return 0


def mount(args: argparse.Namespace) -> int:
    from vmruntime.broker.devfuse import serve_mount

    try:
        serve_mount(args.root, args.mountpoint, _options(args))
    except (VmruntimeError, OSError) as exc:
        print(f"cannot serve {args.root} on {args.mountpoint}: {exc}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s broker[%(process)d] %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    _raise_nofile_limit()
    return serve(args) if args.command == "serve" else mount(args)


if __name__ == "__main__":
    sys.exit(main())
