"""Transport (b): the broker's :class:`FuseHandler` served at a host mount point via ``/dev/fuse``.

The same handler that answers a guest's virtio-fs requests answers the host
kernel's FUSE client here, so a share can be inspected (and the handler tested)
with ordinary file APIs. No libfuse and no ``fusermount``: ``/dev/fuse`` is
opened and ``mount(2)``/``umount2(2)`` are called through ctypes, which needs
root (or ``CAP_SYS_ADMIN``).

Mount options, and why:

- ``default_permissions``: the kernel checks every access against the mode and
  owner the handler *reports*, as the guest's virtiofs client does (it always
  mounts with ``default_permissions``). The handler does no permission checks of
  its own (the guest kernel is the one to enforce them) and runs as root, so
  without this flag every caller would act with the broker's authority.
- no ``allow_other`` by default: only the mounting user (``user_id``/``group_id``)
  may use the mount. With identity virtualization every file shows the guest's
  owner and the guest-chosen modes, which say nothing about who on the *host*
  should read it; ``allow_other=True`` opts into sharing that view.
- ``MS_NOSUID | MS_NODEV``: the guest chooses the modes and device numbers the
  handler reports (a virtual ``chmod u+s`` or ``mknod c 1 1`` costs it nothing),
  so the host must never honour set-id bits or open a device through the mount.
- not ``MS_RDONLY`` even for a read-only share: the handler enforces read-only
  on the host (EROFS), and that is what a mount should exercise.

The server runs in the process that mounts, so that process must not touch the
mount while holding the GIL: a page fault on an ``mmap`` of a file in the mount
(or ``mmap.flush``) waits for a serving thread that waits for the GIL, forever.
Plain file calls release the GIL and are fine. For the same reason a process
killed while one of its own files in the mount is open may hang in exit (its
last ``close`` waits for the server it just lost) until ``umount -f``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import re
import select
import signal
import stat
import threading
import weakref
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from vmruntime.broker import _libc
from vmruntime.broker.abi import IN_HEADER, INIT_OUT, OUT_HEADER, Op, error_reply
from vmruntime.errors import BrokerError

if TYPE_CHECKING:
    from vmruntime.broker.handler import BrokerOptions, FuseHandler

__all__ = ["FuseMount", "serve_mount"]

_log = logging.getLogger(__name__)

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

FSTYPE = "fuse.vmruntime"
# The kernel refuses a read() smaller than this (FUSE_MIN_READ_BUFFER), and one
# smaller than in_header + write_in + max_write once INIT has negotiated max_write.
_MIN_READ_BUFFER = 8192
# Room for the fixed part of any request beside the data (libfuse keeps a page).
_HEADER_ROOM = 4096
# INIT comes first and its max_write is not known yet: large enough for any sane one.
_INIT_READ_BUFFER = 1024 * 1024 + _HEADER_ROOM
_INIT_TIMEOUT_S = 10.0
_JOIN_TIMEOUT_S = 10.0
_NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET})
# Mounts still up when the interpreter exits get unmounted: without it the kernel keeps a
# dead mount (ENOTCONN) once the process's /dev/fuse descriptor goes.
_LIVE: weakref.WeakSet[FuseMount] = weakref.WeakSet()


@atexit.register
def _close_live_mounts() -> None:
    for mount in list(_LIVE):
        with contextlib.suppress(Exception):
            mount.close()


def _unescape_mountinfo(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounted_devices(mountpoint: Path) -> list[str]:
    """``major:minor`` of every FUSE mount of ours at ``mountpoint``, oldest first."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
            except ValueError:
                continue
            if fields[sep + 1] == FSTYPE and _unescape_mountinfo(fields[4]) == str(mountpoint):
                found.append(fields[2])
    return found


class FuseMount:
    """A :class:`FuseHandler` mounted at a host directory through ``/dev/fuse``.

    Who calls it: the functional tests, ``python -m vmruntime.broker mount``
    (through :func:`serve_mount`) and people inspecting a share on the host.

    Promises: after :meth:`start` returns, the mount is live (INIT answered) and
    ``threads`` background threads feed every kernel request to the handler and
    write its reply back; FORGET and BATCH_FORGET get none, a handler that raises
    costs only that request (EIO). :meth:`close` unmounts (lazily if the mount is
    busy: open files then get ENOTCONN), stops and joins the threads and closes
    ``/dev/fuse``; it is idempotent and also runs when :meth:`start` fails. The
    handler is the caller's: it is neither closed nor sent DESTROY (the kernel
    only sends DESTROY to block-device FUSE and virtio-fs). See the module
    docstring for the mount options.
    """

    def __init__(
        self,
        handler: FuseHandler,
        mountpoint: Path,
        *,
        fsname: str = "vmruntime",
        threads: int = 1,
        allow_other: bool = False,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if not fsname or "\0" in fsname:
            raise ValueError(f"bad fsname {fsname!r}")
        self.handler = handler
        self.mountpoint = Path(mountpoint)
        self.fsname = fsname
        self.threads = threads
        self.allow_other = allow_other
        self.max_write = 0
        self._fd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._mounted = False
        self._device: str | None = None  # major:minor of our superblock, for close()
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._ended = threading.Event()  # a worker saw the connection go (unmounted/aborted)
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FuseMount:
        """Mount, answer INIT, start serving. Raises :class:`BrokerError` (mount undone)."""
        with self._lock:
            if self._started or self._closed:
                raise BrokerError(self.mountpoint, "a FuseMount starts only once")
            self._started = True
            _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        try:
            mountpoint = self.mountpoint.resolve(strict=True)
        except OSError as e:
            raise BrokerError(self.mountpoint, f"mount point: {e.strerror}") from None
        if not mountpoint.is_dir():
            raise BrokerError(self.mountpoint, "mount point is not a directory")
        self.mountpoint = mountpoint
        try:
            # O_CLOEXEC: a child holding the device would keep the connection alive after close().
            self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise BrokerError(self.mountpoint, f"cannot open /dev/fuse: {e.strerror}") from None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        options = [
            f"fd={self._fd}",
            f"rootmode={stat.S_IFDIR:o}",
            f"user_id={os.geteuid()}",
            f"group_id={os.getegid()}",
            "default_permissions",
        ]
        if self.allow_other:
            options.append("allow_other")
        before = set(_mounted_devices(mountpoint))
        try:
            _libc.mount(self.fsname, mountpoint, FSTYPE, MS_NOSUID | MS_NODEV, ",".join(options))
        except OSError as e:
            raise BrokerError(self.mountpoint, f"mount(2): {e.strerror}") from None
        self._mounted = True
        new = [dev for dev in _mounted_devices(mountpoint) if dev not in before]
        self._device = new[-1] if new else None
        self._handshake()
        for i in range(self.threads):
            worker = threading.Thread(
                target=self._serve, name=f"devfuse-{mountpoint.name}-{i}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def _handshake(self) -> None:
        """Answer INIT here, before any worker reads, so every worker's buffer is sized for the
        max_write it states (a read buffer sized before INIT could be too small afterwards)."""
        buf = bytearray(_INIT_READ_BUFFER)
        while True:
            ready = select.select([self._fd], [], [], _INIT_TIMEOUT_S)[0]
            if not ready:
                raise BrokerError(self.mountpoint, "the kernel sent no INIT")
            try:
                n = os.readv(self._fd, [buf])
            except BlockingIOError:
                continue
            except OSError as e:
                raise BrokerError(self.mountpoint, f"reading INIT: {e.strerror}") from None
            break
        request = bytes(memoryview(buf)[:n])
        _len, opcode, _unique, *_ = IN_HEADER.unpack_from(request)
        if opcode != Op.INIT:
            raise BrokerError(self.mountpoint, f"first request is opcode {opcode}, not INIT")
        reply = self._call_handler(request)
        if reply is None:
            raise BrokerError(self.mountpoint, "the handler gave no reply to INIT")
        try:
            os.write(self._fd, reply)
        except OSError as e:
            raise BrokerError(self.mountpoint, f"replying to INIT: {e.strerror}") from None
        _rlen, error, _ = OUT_HEADER.unpack_from(reply)
        if error:
            raise BrokerError(self.mountpoint, f"the handler refused INIT: {os.strerror(-error)}")
        if len(reply) >= OUT_HEADER.size + INIT_OUT.size:
            self.max_write = INIT_OUT.unpack_from(reply, OUT_HEADER.size)[6]
        else:  # a reply of an old protocol minor: the kernel assumes 4 KiB
            self.max_write = 4096

    def close(self) -> None:
        """Unmount, stop and join the threads, close ``/dev/fuse``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._mounted:
                self._unmount()
        finally:
            self._stopping.set()
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")
            for worker in self._workers:
                worker.join(_JOIN_TIMEOUT_S)
                if worker.is_alive():
                    _log.error("%s: worker %s did not stop", self.mountpoint, worker.name)
            # Closing the last /dev/fuse descriptor aborts the connection: what a lazy
            # unmount left behind now answers ENOTCONN instead of waiting on us.
            for fd in (self._fd, self._wake_r, self._wake_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd = self._wake_r = self._wake_w = -1
            self._ended.set()

    def _unmount(self) -> None:
        # Only if our superblock is still the one mounted there: after an outside unmount
        # something else may have been mounted at the same path.
        mounted = _mounted_devices(self.mountpoint)
        if not mounted or (self._device is not None and self._device not in mounted):
            return
        # The workers keep serving meanwhile: unmounting may need them (flushes, FORGETs).
        try:
            _libc.umount2(self.mountpoint, UMOUNT_NOFOLLOW)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise BrokerError(self.mountpoint, f"umount2: {e.strerror}") from None
            # Busy (an open file, a cwd): detach now, the rest goes when close() aborts.
            try:
                _libc.umount2(self.mountpoint, UMOUNT_NOFOLLOW | MNT_DETACH)
            except OSError as e2:
                raise BrokerError(self.mountpoint, f"umount2(MNT_DETACH): {e2.strerror}") from None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until serving has ended (unmounted from outside, aborted, or closed).

        True if it has; False on timeout.
        """
        return self._ended.wait(timeout)

    @property
    def serving(self) -> bool:
        return self._started and not self._ended.is_set()

    def __enter__(self) -> FuseMount:
        return self.start() if not self._started else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- serving -------------------------------------------------------------------------

    def _call_handler(self, request: bytes) -> bytes | None:
        try:
            return self.handler.handle(request)
        except Exception:
            # The contract says handle() never raises; if it does, only this request fails.
            _log.exception("%s: the handler raised", self.mountpoint)
            if len(request) < IN_HEADER.size:
                return None
            _len, opcode, unique, *_ = IN_HEADER.unpack_from(request)
            return None if opcode in _NO_REPLY else error_reply(unique, errno.EIO)

    def _serve(self) -> None:
        buf = bytearray(max(_MIN_READ_BUFFER, self.max_write + _HEADER_ROOM))
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll())
                if self._wake_r in events or self._stopping.is_set():
                    return
                try:
                    n = os.readv(self._fd, [buf])
                except (BlockingIOError, InterruptedError):
                    continue  # another worker took the request
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        continue  # the request was interrupted before we read it
                    if e.errno != errno.ENODEV:
                        _log.error("%s: reading /dev/fuse: %s", self.mountpoint, e)
                    return  # ENODEV: unmounted or aborted, the normal end
                reply = self._call_handler(bytes(view[:n]))
                if reply is None:
                    continue
                if not self._write_reply(reply):
                    return
        finally:
            view.release()
            self._ended.set()

    def _write_reply(self, reply: bytes) -> bool:
        """Write one reply; False once the connection is gone."""
        while True:
            try:
                os.write(self._fd, reply)
                return True
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return True  # the request was interrupted or aborted meanwhile: no taker
                if e.errno == errno.ENODEV:
                    return False
                # EINVAL: the kernel rejected the reply's shape, a handler bug; the kernel
                # has failed that request, so keep serving the others.
                _log.error("%s: reply rejected by the kernel: %s", self.mountpoint, e)
                return True


def serve_mount(root: Path, mountpoint: Path, options: BrokerOptions) -> None:
    """Serve ``root`` at ``mountpoint`` in the foreground until SIGTERM/SIGINT or an unmount.

    Who calls it: ``python -m vmruntime.broker mount``. Must run in the main thread
    (it installs signal handlers, and restores the previous ones when it returns).
    """
    from vmruntime.broker.handler import FuseHandler

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        handler = FuseHandler(root, options)
        try:
            with FuseMount(handler, mountpoint) as mount:
                # Short waits: a signal handler runs between them, and Event.wait() resumes
                # its remaining timeout after one rather than returning.
                while not stop.is_set() and not mount.wait(0.2):
                    pass
        finally:
            handler.close()
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
