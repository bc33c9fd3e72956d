"""What a sandbox mounts besides its image: host folders, named volumes, disk images.

Who calls it: users build :class:`Mount` values for ``Sandbox.create(mounts=...)``;
the ``vmr run --mount/--volume/--disk`` options parse theirs with
:meth:`Mount.parse`; :mod:`vmruntime.vm.sandbox` checks them
(:func:`resolve_mounts`) and brings them up (:class:`SandboxMounts`).

What it promises:

- a mount that cannot be honoured is a :class:`~vmruntime.errors.MountError`
  naming it, raised before anything is made or booted: a guest path that is not
  absolute and normalised, is ``/`` or lies under ``/proc``, ``/sys`` or
  ``/dev``, a guest path used twice, a host folder that is not a directory, a disk
  image that is not a regular file (or block device) holding an ext2/3/4
  filesystem, an external socket that is not a socket;
- host folders and directory volumes reach the guest only through a broker
  (``vmruntime.broker``, one process per share) that treats the guest as hostile;
  read-only is enforced by the broker, not by the guest's mount flags; the guest
  sees the sandbox user (root, or the image's numeric ``User``) as the owner of
  every file, and its chmod/chown never reach the host's inodes;
- disk images are virtio-blk devices; at most one writable attachment of an
  image exists at a time (:class:`~vmruntime.errors.DiskInUseError`), and the
  attach lock lives as long as the VM (QEMU inherits it);
- :meth:`SandboxMounts.close` ends every broker it started and releases every
  lock, whatever happened before.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vmruntime.errors import MountError
from vmruntime.guest import protocol as p
from vmruntime.vm import state

if TYPE_CHECKING:
    from vmruntime.broker.process import BrokerProcess
    from vmruntime.vm.driver import MachineSpec
    from vmruntime.volumes import Volume
    from vmruntime.volumes.attach import Attachment

MountKind = Literal["bind", "volume", "disk", "external"]
# How a share's FUSE requests reach its broker: a vhost-user-fs device (the fastest; QEMU
# 7.2 cannot migrate it), or a virtio-console port the agent relays /dev/fuse over
# (migrates with the VM: the transport of sandboxes that are memory-snapshotted).
ShareTransport = Literal["vhost-user", "console"]
SHARE_TRANSPORTS: tuple[ShareTransport, ...] = ("vhost-user", "console")
# The virtio-console port of share N (the agent's own port is org.vmruntime.agent).
SHARE_PORT_PREFIX = "org.vmruntime.fs."
# The guest's own pseudo-filesystems: a mount there would hide or shadow the kernel's.
_RESERVED = ("/proc", "/sys", "/dev")
_EXT_MAGIC_OFFSET = 1080  # s_magic of the ext2/3/4 superblock (which starts at 1024)
_EXT_MAGIC = b"\x53\xef"
# Open files a sandbox's guest may hold across all its shares (CVE-2020-10717): each
# broker gets its part, and never fewer than _MIN_HANDLES_PER_SHARE.
SANDBOX_OPEN_HANDLES = 1024
_MIN_HANDLES_PER_SHARE = 64
_OPTION_NAMES = {"bind": "--mount", "volume": "--volume", "disk": "--disk", "external": "external"}


@dataclass(frozen=True)
class Mount:
    """One thing to mount in a sandbox at ``guest`` (an absolute guest path).

    ``Mount(host, guest)`` shares the host directory ``host`` through a broker;
    :meth:`volume`, :meth:`disk` and :meth:`external` make the other kinds. For a
    volume, ``host`` holds its name. ``transport`` says how a share (a folder or a
    directory volume) reaches the broker: ``"vhost-user"`` (a vhost-user-fs device, the
    default) or ``"console"`` (a virtio-console port, which a memory snapshot can carry);
    a disk volume ignores it, an external share must be ``"vhost-user"``.
    """

    host: Path | str
    guest: str
    readonly: bool = False
    kind: MountKind = "bind"
    transport: ShareTransport = "vhost-user"

    def __post_init__(self) -> None:
        if self.kind not in _OPTION_NAMES:
            raise ValueError(f"mount kind {self.kind!r}: want one of {sorted(_OPTION_NAMES)}")
        if self.transport not in SHARE_TRANSPORTS:
            raise ValueError(f"share transport {self.transport!r}: want one of {SHARE_TRANSPORTS}")
        if self.transport != "vhost-user" and self.kind in ("disk", "external"):
            raise ValueError(f"a {self.kind} mount has no {self.transport!r} transport")
        if self.kind != "volume" and not isinstance(self.host, Path):
            object.__setattr__(self, "host", Path(self.host))  # frozen: set once, here

    @property
    def migrates(self) -> bool:
        """Whether a memory snapshot can carry it: a share over the console transport (a
        disk volume is a disk: a resumed copy cannot write what its original holds)."""
        return self.transport == "console" and self.kind in ("bind", "volume")

    @property
    def place(self) -> str:
        """Where it is in the guest, and how: ``GUEST[:ro]`` (what a memory snapshot
        records of a share, and all that its copies must match)."""
        return self.guest + (":ro" if self.readonly else "")

    @property
    def spec(self) -> str:
        """``HOST:GUEST[:ro]`` (``NAME:GUEST[:ro]`` for a volume): what :meth:`parse` and
        ``vmr run --mount`` take."""
        return f"{self.host}:{self.place}"

    @classmethod
    def volume(cls, name: str, guest: str, readonly: bool = False) -> Mount:
        """A named volume (``vmr volume create``): a directory share or a disk."""
        return cls(name, guest, readonly, "volume")

    @classmethod
    def disk(cls, path: Path | str, guest: str, readonly: bool = False) -> Mount:
        """A raw disk image holding an ext2/3/4 filesystem, attached as a virtio-blk disk."""
        return cls(Path(path), guest, readonly, "disk")

    @classmethod
    def external(cls, socket: Path | str, guest: str, readonly: bool = False) -> Mount:
        """A vhost-user-fs socket served by someone else (e.g. Debian's virtiofsd).

        For benchmarks and trusted servers only: vmruntime does not start, contain
        or stop that server, and ``readonly`` is only the guest's mount flag, which
        the guest's root can undo. Shares of untrusted guests go through :class:`Mount`.
        """
        return cls(Path(socket), guest, readonly, "external")

    @classmethod
    def parse(cls, spec: str, kind: MountKind = "bind") -> Mount:
        """``HOST:GUEST[:ro|:rw]`` (``NAME:GUEST[:ro]`` for a volume), as ``vmr run`` takes."""
        body, readonly = spec, False
        for suffix, flag in ((":ro", True), (":rw", False)):
            if body.endswith(suffix):
                body, readonly = body[: -len(suffix)], flag
                break
        # The host side may contain colons; a guest path may not.
        host, sep, guest = body.rpartition(":")
        if not sep or not host or not guest:
            what = "NAME" if kind == "volume" else "HOST"
            raise MountError(spec, f"want {what}:GUEST[:ro]")
        return cls(host if kind == "volume" else Path(host), guest, readonly, kind)

    def __str__(self) -> str:
        via = f" (via {self.transport})" if self.transport != "vhost-user" else ""
        return f"{_OPTION_NAMES[self.kind]} {self.spec}{via}"


@dataclass(frozen=True)
class ResolvedMount:
    """A checked mount: what backs it on the host, and how the guest gets it."""

    mount: Mount
    source: Path  # the share's root, the disk image, or the external socket
    share: bool  # True: virtio-fs (broker or external); False: a virtio-blk disk
    volume: Volume | None = None


def check_guest_paths(mounts: Sequence[Mount]) -> None:
    """The checks that need no disk: every guest path allowed, none used twice."""
    seen: dict[str, Mount] = {}
    for mount in mounts:
        _check_guest_path(mount)
        if mount.guest in seen:
            raise MountError(str(mount), f"{mount.guest} is already mounted by {seen[mount.guest]}")
        seen[mount.guest] = mount


def resolve_mounts(mounts: Sequence[Mount | str] | None) -> list[ResolvedMount]:
    """Check every mount and find what backs it; :class:`MountError` for the first bad one.

    Strings are taken as ``HOST:GUEST[:ro]`` bind mounts. Volumes are looked up in
    the default volume store (an unknown one raises ``VolumeNotFoundError``).
    """
    parsed = [Mount.parse(item) if isinstance(item, str) else item for item in mounts or ()]
    for mount in parsed:
        if not isinstance(mount, Mount):
            raise TypeError(f"mounts: {mount!r} is not a Mount")
    check_guest_paths(parsed)
    return [_resolve_host(mount) for mount in parsed]


def _check_guest_path(mount: Mount) -> None:
    guest = mount.guest
    if not isinstance(guest, str) or not guest.startswith("/"):
        raise MountError(str(mount), f"guest path {guest!r} is not absolute")
    # normpath keeps a leading "//", which is not the canonical spelling either.
    if posixpath.normpath(guest) != guest or guest.startswith("//") or "\0" in guest:
        raise MountError(str(mount), f"guest path {guest!r} is not normalised")
    if guest == "/":
        raise MountError(str(mount), "cannot mount over the guest's root")
    if any(guest == top or guest.startswith(top + "/") for top in _RESERVED):
        raise MountError(str(mount), f"guest path {guest} is under /proc, /sys or /dev")
    if len(guest.encode()) > 4000:
        raise MountError(str(mount), "guest path too long")


def _resolve_host(mount: Mount) -> ResolvedMount:
    if mount.kind == "volume":
        return _resolve_volume(mount)
    path = Path(mount.host).expanduser()
    try:
        info = os.stat(path)
    except OSError as exc:
        raise MountError(str(mount), f"{path}: {exc.strerror}") from None
    path = path.resolve()
    if mount.kind == "bind":
        if not stat.S_ISDIR(info.st_mode):
            raise MountError(str(mount), f"{path} is not a directory")
        return ResolvedMount(mount, path, share=True)
    if mount.kind == "external":
        if not stat.S_ISSOCK(info.st_mode):
            raise MountError(str(mount), f"{path} is not a socket")
        return ResolvedMount(mount, path, share=True)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
        raise MountError(str(mount), f"{path} is not a regular file (a raw disk image)")
    _check_ext_filesystem(mount, path)
    return ResolvedMount(mount, path, share=False)


def _resolve_volume(mount: Mount) -> ResolvedMount:
    from vmruntime.volumes import VolumeStore

    volume = VolumeStore().get(str(mount.host))
    if volume.kind == "directory":
        return ResolvedMount(mount, Path(volume.path), share=True, volume=volume)
    _check_ext_filesystem(mount, Path(volume.path))
    return ResolvedMount(mount, Path(volume.path), share=False, volume=volume)


def _check_ext_filesystem(mount: Mount, image: Path) -> None:
    """The guest mounts disks as ext4 (which reads ext2 and ext3 too): say so early."""
    try:
        with open(image, "rb") as disk:
            disk.seek(_EXT_MAGIC_OFFSET)
            magic = disk.read(2)
    except OSError as exc:
        raise MountError(str(mount), f"cannot read {image}: {exc.strerror}") from None
    if magic != _EXT_MAGIC:
        reason = f"{image} holds no ext2/3/4 filesystem (a whole-disk filesystem, unpartitioned)"
        raise MountError(str(mount), reason)


def guest_owner(user: str) -> tuple[int, int]:
    """Who the guest sees owning a share's files: root, or the image's numeric ``User``.

    ``"1000"`` gives 1000:1000 and ``"1000:50"`` gives 1000:50; a user by name
    cannot be looked up on the host (the image's /etc/passwd is in the guest), so
    it gives root, as does no user at all.
    """
    name, _, group = user.partition(":")
    if not name.isdigit():
        return 0, 0
    uid = int(name)
    return uid, int(group) if group.isdigit() else uid


@dataclass
class _Share:
    resolved: ResolvedMount
    tag: str  # the virtio-fs tag, or the console port's name
    socket: Path
    broker: BrokerProcess | None = None

    @property
    def transport(self) -> ShareTransport:
        return self.resolved.mount.transport

    @property
    def fstype(self) -> str:
        """What the agent mounts (docs/agent-protocol.md, MOUNT)."""
        return "fuse-console" if self.transport == "console" else "virtiofs"


@dataclass
class _Disk:
    resolved: ResolvedMount
    serial: str


@dataclass
class SandboxMounts:
    """The shares and disks of one sandbox, from the locks and brokers to the guest's mounts.

    Who calls it: :meth:`AsyncSandbox.create`: :meth:`prepare` before QEMU boots
    (QEMU connects to the brokers' sockets at startup), :meth:`attach` to the machine,
    :meth:`requests` after the agent's HELLO, :meth:`close` when the VM has ended or
    the creation failed. What it promises: after :meth:`prepare` raises, nothing it
    made is left (no broker, no lock); :meth:`close` is idempotent.
    """

    shares: list[_Share] = field(default_factory=list)
    disks: list[_Disk] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)

    @classmethod
    def prepare(cls, resolved: Sequence[ResolvedMount], paths: state.SandboxPaths, *,
                owner: tuple[int, int], detached: bool,
                resume: bool = False) -> SandboxMounts:  # fmt: skip
        """Take the attach locks, then start one broker per host folder or directory volume.

        ``resume``: the machine is a restored memory snapshot whose guest mounted these
        shares with earlier brokers; they start resumed (docs/broker.md, "Resuming a
        session"). Only console shares can be in such a machine (vhost-user-fs does not
        migrate); :class:`MountError` for any other share.
        """
        made = cls()
        try:
            for item in resolved:
                if resume and item.share and item.mount.transport != "console":
                    reason = "a resumed machine has console shares only (vhost-user-fs "
                    raise MountError(str(item.mount), reason + "cannot migrate)")
                made._add(item, paths)
            served = [s for s in made.shares if s.resolved.mount.kind != "external"]
            handles = max(_MIN_HANDLES_PER_SHARE, SANDBOX_OPEN_HANDLES // max(1, len(served)))
            for index, share in enumerate(made.shares):
                if share in served:
                    share.broker = _start_broker(share, paths, index, owner, detached, handles,
                                                 resume)  # fmt: skip
        except BaseException:
            made.close()
            raise
        return made

    def _add(self, item: ResolvedMount, paths: state.SandboxPaths) -> None:
        mount = item.mount
        holder = f"sandbox {paths.id}"
        if item.volume is not None:
            self.attachments.append(item.volume.attach(readonly=mount.readonly, holder=holder))
        elif mount.kind == "disk":
            from vmruntime.volumes.attach import DiskAttachment

            attachment = DiskAttachment.acquire(item.source, readonly=mount.readonly, holder=holder)
            self.attachments.append(attachment)
        if item.share:
            index = len(self.shares)
            socket = item.source if mount.kind == "external" else paths.share_socket(index)
            tag = f"{SHARE_PORT_PREFIX}{index}" if mount.transport == "console" else f"vmr{index}"
            self.shares.append(_Share(item, tag, socket))
        else:
            self.disks.append(_Disk(item, f"D{len(self.disks)}"))

    def attach(self, spec: MachineSpec) -> None:
        """Add the virtio-fs devices or console ports, the disks and the lock descriptors to
        the machine. QEMU listens on a console share's socket and its broker connects."""
        for share in self.shares:
            if share.transport == "console":
                spec.attach_console_port(share.tag, share.socket)
            else:
                spec.attach_vhost_user_fs(share.socket, share.tag)
        for disk in self.disks:
            readonly = disk.resolved.mount.readonly
            # QEMU's own image lock would refuse a reader next to another VM writing the
            # image; our attach lock already decides who may write.
            spec.attach_disk(disk.resolved.source, serial=disk.serial, readonly=readonly,
                             locking=not readonly)  # fmt: skip
        for attachment in self.attachments:
            spec.hold_fds(list(attachment.fds))

    def requests(self) -> list[tuple[Mount, p.MountRequest]]:
        """The agent's MOUNT requests, parents before children (``/a`` before ``/a/b``)."""
        devices = [(s.resolved.mount, s.tag, s.fstype) for s in self.shares]
        devices += [(d.resolved.mount, d.serial, "ext4") for d in self.disks]
        items = [
            (mount, p.MountRequest(source, fstype, mount.guest, mount.readonly))
            for mount, source, fstype in devices
        ]
        return sorted(items, key=lambda item: item[0].guest.count("/"))

    @property
    def broker_processes(self) -> list[list[int | None]]:
        """``[pid, start time]`` of each broker, for the sandbox record."""
        return [
            [share.broker.pid, state.process_start_time(share.broker.pid)]
            for share in self.shares
            if share.broker is not None
        ]

    def describe(self) -> list[str]:
        """The mounts as the CLI spells them, with absolute host paths (for the record)."""
        return [_spell(item.resolved) for item in [*self.shares, *self.disks]]

    def release_locks(self) -> None:
        """Close our copies of the lock descriptors (QEMU keeps its own)."""
        for attachment in self.attachments:
            attachment.release()

    def close(self) -> None:
        """End the brokers and release the locks (call once the VM is gone)."""
        for share in self.shares:
            broker, share.broker = share.broker, None
            if broker is not None:
                _end_broker(broker)
        self.release_locks()


def _spell(resolved: ResolvedMount) -> str:
    mount = resolved.mount
    host = mount.host if mount.kind == "volume" else resolved.source
    return str(Mount(host, mount.guest, mount.readonly, mount.kind, mount.transport))


def _start_broker(share: _Share, paths: state.SandboxPaths, index: int, owner: tuple[int, int],
                  detached: bool, max_handles: int, resume: bool) -> BrokerProcess:  # fmt: skip
    from vmruntime.broker.process import BrokerProcess, ShareConfig

    mount = share.resolved.mount
    config = ShareConfig(share.resolved.source, readonly=mount.readonly, uid=owner[0],
                         gid=owner[1], max_handles=max_handles)  # fmt: skip
    return BrokerProcess.start(config, share.socket, log=paths.broker_log(index),
                               detached=detached, transport=share.transport,
                               resume=resume)  # fmt: skip


def _end_broker(broker: BrokerProcess) -> None:
    # Once QEMU is gone a broker exits by itself; stop() covers one that did not.
    with contextlib.suppress(Exception):
        if broker.running():
            broker.stop(timeout=2)
    with contextlib.suppress(Exception):
        broker.kill()
