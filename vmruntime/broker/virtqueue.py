"""Guest memory and split virtqueues, read as if every byte came from an attacker.

Who calls it: :mod:`vmruntime.broker.vhost_user`, which maps the memory table the
front-end (QEMU) sends and builds one :class:`SplitQueue` per started ring.

What it promises:

- every guest address and length is checked against the memory table before it
  is touched; a buffer becomes ``memoryview`` slices of the shared mapping, so
  request and reply data are never copied here;
- each descriptor is read once, into Python integers, and only those copies
  are validated and used: the guest rewriting a descriptor meanwhile changes
  nothing;
- a chain that loops, leaves guest memory, points at an index outside its table,
  nests indirect tables or puts a readable buffer after a writable one is a
  :class:`Chain` with ``error`` set (the caller answers it with a used length
  of 0); a ring whose own indexes are impossible raises
  :class:`BrokenQueueError` and the caller stops serving that queue.

Memory ordering: the rings are shared with guest vCPUs running concurrently.
This is written for x86-64 (the only host we run on), where stores are not
reordered with stores nor loads with loads, so the order of the ``struct``
calls is enough there; the one place a store must be ordered before a later
load (notification suppression, see :func:`full_fence`) takes a real barrier.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmruntime.errors import VmruntimeError

log = logging.getLogger(__name__)

# Descriptor flags (virtio 1.1, 2.6.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# avail->flags: the driver asks for no interrupts (a hint, used without EVENT_IDX).
VRING_AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768
# QEMU's own virtio devices refuse more than 1024 buffers in one request; Linux's
# virtio-fs never sends more than its queue size (128 by default) in one.
MAX_INDIRECT_DESCRIPTORS = 1024
# The most regions SET_MEM_TABLE may carry without CONFIGURE_MEM_SLOTS.
MAX_MEMORY_REGIONS = 8

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_DESC_SIZE = _DESC.size

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: later loads wait for earlier stores to be visible.

    Python has no fence primitive. Taking and dropping an uncontended lock does a
    locked read-modify-write in glibc (``sem_trywait``/``sem_post``), which x86
    defines as a full barrier. Needed where we store an index and then load one
    the guest stores before loading ours (event-index and NO_INTERRUPT races).
    """
    _fence_lock.acquire()
    _fence_lock.release()


class VirtqueueError(VmruntimeError):
    """Guest memory or a virtqueue holds something the broker cannot use."""


class AddressError(VirtqueueError):
    """An address range that is not (entirely) guest memory."""


class BadChainError(VirtqueueError):
    """One descriptor chain is unusable; the queue itself keeps working."""


class BrokenQueueError(VirtqueueError):
    """The ring's own indexes are impossible; the queue cannot be served any more."""


class MemoryTableError(VirtqueueError):
    """A memory table from the front-end that cannot be mapped."""


@dataclass(frozen=True)
class RegionSpec:
    """One region of SET_MEM_TABLE as the front-end describes it."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


class MemoryRegion:
    """One shared mapping of guest RAM, made by :class:`GuestMemory`.

    ``view`` spans exactly the region; ``close`` unmaps it unless a slice of it
    is still alive elsewhere (then the mapping stays until that slice is gone).
    """

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        self.spec = spec
        self.guest_addr = spec.guest_addr
        self.guest_end = spec.guest_addr + spec.size
        self.user_addr = spec.user_addr
        self.user_end = spec.user_addr + spec.size
        # mmap offsets must be page aligned; map from the page below and skip the rest.
        start = spec.mmap_offset - spec.mmap_offset % mmap.ALLOCATIONGRANULARITY
        skip = spec.mmap_offset - start
        try:
            self._map: mmap.mmap | None = mmap.mmap(
                fd, spec.size + skip, flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start,
            )  # fmt: skip
        except (OSError, ValueError, OverflowError) as exc:
            raise MemoryTableError(f"cannot map region {spec}: {exc}") from exc
        self.view = memoryview(self._map)[skip : skip + spec.size]

    def close(self) -> None:
        if self._map is None:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            # Someone still holds a slice (a handler that kept a view): the mapping
            # stays until that slice is garbage; never unmap memory still in use.
            log.warning("guest memory region %#x still referenced; left mapped", self.guest_addr)
        self._map = None


def _check_region(spec: RegionSpec, fd: int) -> None:
    limit = 1 << 64
    if spec.size <= 0:
        raise MemoryTableError(f"region {spec} is empty")
    if spec.guest_addr + spec.size > limit or spec.user_addr + spec.size > limit:
        raise MemoryTableError(f"region {spec} wraps around the address space")
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise MemoryTableError(f"region {spec}: bad file descriptor: {exc}") from exc
    # Touching a mapping past the end of its file is SIGBUS: refuse such a region now.
    if not stat.S_ISREG(info.st_mode) or info.st_size < spec.mmap_offset + spec.size:
        raise MemoryTableError(
            f"region {spec}: its file ({info.st_size} bytes, mode {info.st_mode:o}) is not "
            "a regular file that holds the whole region"
        )


def _check_disjoint(specs: Sequence[RegionSpec]) -> None:
    for attr in ("guest_addr", "user_addr"):
        ranges = sorted((getattr(s, attr), getattr(s, attr) + s.size) for s in specs)
        for (_, end), (start, _) in itertools.pairwise(ranges):
            if start < end:
                raise MemoryTableError(f"memory regions overlap in {attr} at {start:#x}")


class GuestMemory:
    """The guest's RAM as the front-end's memory table describes it.

    Who calls it: :class:`vmruntime.broker.vhost_user.VhostUserFsBackend` on
    SET_MEM_TABLE; queues translate through it. Promises: every translation
    either lies wholly inside mapped regions or raises :class:`AddressError`.
    """

    def __init__(self, specs: Sequence[RegionSpec], fds: Sequence[int]) -> None:
        if len(specs) != len(fds):
            raise MemoryTableError(f"{len(specs)} regions but {len(fds)} file descriptors")
        if len(specs) > MAX_MEMORY_REGIONS:
            raise MemoryTableError(f"{len(specs)} regions; at most {MAX_MEMORY_REGIONS}")
        for spec, fd in zip(specs, fds, strict=True):
            _check_region(spec, fd)
        _check_disjoint(specs)
        self.regions: list[MemoryRegion] = []
        try:
            for spec, fd in sorted(zip(specs, fds, strict=True), key=lambda p: p[0].guest_addr):
                self.regions.append(MemoryRegion(spec, fd))
        except MemoryTableError:
            self.close()
            raise
        self._starts = [r.guest_addr for r in self.regions]
        self._last: MemoryRegion | None = None

    @classmethod
    def empty(cls) -> GuestMemory:
        return cls([], [])

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
        self._starts = []
        self._last = None

    def _region_at(self, addr: int) -> MemoryRegion | None:
        pos = bisect.bisect_right(self._starts, addr) - 1
        if pos >= 0 and addr < self.regions[pos].guest_end:
            return self.regions[pos]
        return None

    def gpa_views(self, addr: int, length: int) -> list[memoryview]:
        """``length`` bytes at guest physical ``addr``, split where regions meet."""
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise AddressError(f"range {addr:#x}+{length:#x} wraps around")
        last = self._last
        if last is not None and last.guest_addr <= addr and addr + length <= last.guest_end:
            offset = addr - last.guest_addr  # the common case: inside the region used last
            return [last.view[offset : offset + length]]
        views: list[memoryview] = []
        while length > 0:
            region = self._region_at(addr)
            if region is None:
                for view in views:
                    view.release()
                raise AddressError(f"guest address {addr:#x} is not in guest memory")
            offset = addr - region.guest_addr
            take = min(length, region.guest_end - addr)
            views.append(region.view[offset : offset + take])
            self._last = region
            addr += take
            length -= take
        return views

    def gpa_span(self, addr: int, length: int) -> memoryview:
        """A range that must lie in one region (an indirect descriptor table)."""
        region = self._region_at(addr)
        if region is None or length < 0 or addr + length > region.guest_end:
            raise AddressError(f"range {addr:#x}+{length:#x} is not inside one memory region")
        offset = addr - region.guest_addr
        return region.view[offset : offset + length]

    def uva_span(self, addr: int, length: int) -> memoryview:
        """A range given as a front-end (QEMU) virtual address: ring addresses."""
        for region in self.regions:
            if region.user_addr <= addr and addr + length <= region.user_end:
                offset = addr - region.user_addr
                return region.view[offset : offset + length]
        raise AddressError(f"front-end address {addr:#x}+{length:#x} is not in one region")


@dataclass
class Chain:
    """One request from :meth:`SplitQueue.pop`: its head index and its buffers.

    ``error`` set: the chain was unusable and has no buffers; answer it with a
    used length of 0. Otherwise ``release`` the views once the request is answered.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    writable_len: int = 0
    error: str = ""

    def release(self) -> None:
        """Drop the views so the mappings can be closed; a view still exported stays."""
        for views in (self.readable, self.writable):
            for view in views:
                try:  # noqa: SIM105 - a hot path: suppress() costs an object per view
                    view.release()
                except BufferError:
                    pass
        self.readable = []
        self.writable = []


def ring_sizes(size: int, *, event_idx: bool = True) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring for ``size``."""
    extra = 2 if event_idx else 0
    return _DESC_SIZE * size, 4 + 2 * size + extra, 4 + 8 * size + extra


def valid_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


class SplitQueue:
    """A started split virtqueue (virtio 1.1, 2.6) over translated ring views.

    Who calls it: the vhost-user backend, from its one event-loop thread.
    Promises: ``pop`` hands out each available chain once, in ring order, with
    its buffers checked; ``push`` publishes a used entry; ``need_notify`` says
    whether the driver asked for an interrupt (NO_INTERRUPT or EVENT_IDX).
    """

    def __init__(self, memory: GuestMemory, size: int, desc: memoryview, avail: memoryview,
                 used: memoryview, *, last_avail: int, event_idx: bool,
                 indirect: bool) -> None:  # fmt: skip
        if not valid_queue_size(size):
            raise BrokenQueueError(f"queue size {size} is not a power of two up to 32768")
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = last_avail & 0xFFFF
        self._memory = memory
        self._desc, self._avail, self._used = desc, avail, used
        self._check_views()
        # The used index the device continues from is the one in guest memory.
        self.used_idx = _U16.unpack_from(used, 2)[0]
        self._avail_idx = self.last_avail
        self._signalled_used: int | None = None

    def _check_views(self) -> None:
        want = ring_sizes(self.size, event_idx=True)
        got = (len(self._desc), len(self._avail), len(self._used))
        if got != want:
            raise BrokenQueueError(f"ring views of {got} bytes, want {want}")

    def remap(self, memory: GuestMemory, desc: memoryview, avail: memoryview,
              used: memoryview) -> None:  # fmt: skip
        """Continue on a new memory table (the front-end sent SET_MEM_TABLE again)."""
        self.release()
        self._memory = memory
        self._desc, self._avail, self._used = desc, avail, used
        self._check_views()

    def release(self) -> None:
        for view in (self._desc, self._avail, self._used):
            view.release()

    # The driver side of the ring.

    def _read_avail_idx(self) -> int:
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        if (avail_idx - self.last_avail) & 0xFFFF > self.size:
            ahead = f"more than a queue ({self.size}) ahead of {self.last_avail}"
            raise BrokenQueueError(f"avail idx {avail_idx} is {ahead}")
        self._avail_idx = avail_idx
        return avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has offered nothing new."""
        if self._avail_idx == self.last_avail and self._read_avail_idx() == self.last_avail:
            return None
        slot = self.last_avail & (self.size - 1)
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        if head >= self.size:
            raise BrokenQueueError(f"avail ring slot {slot} names descriptor {head}")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = Chain(head)
        try:
            self._walk(chain)
        except (BadChainError, AddressError) as exc:
            chain.release()
            chain.error = str(exc)
        return chain

    def _walk(self, chain: Chain) -> None:
        table, limit, index, steps = self._desc, self.size, chain.head, 0
        views = self._memory.gpa_views
        unpack = _DESC.unpack_from
        out = chain.readable
        writable_len = 0
        # Guest pages that are neighbours in guest memory become one view: a 1 MiB
        # WRITE is often a few runs of pages rather than 256 separate ones.
        run_addr = run_len = 0
        try:
            while True:
                steps += 1
                if steps > limit:
                    raise BadChainError(f"chain from {chain.head} loops or exceeds its table")
                addr, length, flags, nxt = unpack(table, _DESC_SIZE * index)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if table is not self._desc or steps != 1:
                        raise BadChainError("an indirect descriptor must be a chain's only one")
                    table, limit = self._indirect_table(addr, length, flags)
                    index, steps = 0, 0
                    continue
                if flags & VIRTQ_DESC_F_WRITE:
                    if out is chain.readable:  # the first device-writable buffer
                        if run_len:
                            out.extend(views(run_addr, run_len))
                            run_len = 0
                        out = chain.writable
                    writable_len += length
                elif out is chain.writable:
                    raise BadChainError("a device-readable buffer after a writable one")
                if length:
                    if run_len and addr == run_addr + run_len:
                        run_len += length
                    else:
                        if run_len:
                            out.extend(views(run_addr, run_len))
                        run_addr, run_len = addr, length
                if not flags & VIRTQ_DESC_F_NEXT:
                    if run_len:
                        out.extend(views(run_addr, run_len))
                    return
                if nxt >= limit:
                    raise BadChainError(f"next index {nxt} is outside a table of {limit}")
                index = nxt
        finally:
            chain.writable_len = writable_len
            if table is not self._desc:
                table.release()

    def _indirect_table(self, addr: int, length: int, flags: int) -> tuple[memoryview, int]:
        if not self.indirect:
            raise BadChainError("indirect descriptor, but INDIRECT_DESC was not negotiated")
        if flags & VIRTQ_DESC_F_NEXT:
            raise BadChainError("indirect descriptor with NEXT set")
        count, rest = divmod(length, _DESC_SIZE)
        if rest or not 0 < count <= MAX_INDIRECT_DESCRIPTORS:
            raise BadChainError(f"indirect table of {length} bytes")
        return self._memory.gpa_span(addr, length), count

    # The device side of the ring.

    def push(self, head: int, length: int) -> None:
        """Publish ``head`` as used with ``length`` bytes written (entry before index)."""
        slot = self.used_idx & (self.size - 1)
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.used_idx)

    def arm(self) -> bool:
        """Ask the driver for a kick on its next buffer; True if one is already there.

        With EVENT_IDX the driver kicks only when it passes ``avail_event``, so
        after draining we move it to where we stopped and look once more: a
        buffer added between our last look and that store would get no kick.
        """
        if self.event_idx:
            _U16.pack_into(self._used, 4 + 8 * self.size, self.last_avail)
            full_fence()
        return self._read_avail_idx() != self.last_avail

    def need_notify(self) -> bool:
        """Whether to interrupt the driver for the entries pushed since the last call."""
        full_fence()  # our used idx store must be visible before we read its wishes
        if not self.event_idx:
            return not _U16.unpack_from(self._avail, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old is None:
            return True
        used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
        # virtio's vring_need_event: the driver's event index lies in [old, new).
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
