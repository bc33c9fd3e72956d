"""Warm pools: ready sandboxes of one kind, made ahead, each handed out once.

Who calls it: the front doors (the Jupyter provisioner's kernel pool, Ray's sandbox
actors), always on one event loop (vmruntime's runtime loop, ``vmruntime.vm.sync``).
What a :class:`WarmPool` promises:

- it keeps ``size`` members ready, made by the caller's ``make`` (a resume from a memory
  snapshot where there is one, else a boot) in the background: a refill never runs on
  a claimer's behalf, and never blocks the loop (``make`` is a coroutine);
- :meth:`WarmPool.claim` hands out a ready member at once, or makes one if none is
  ready (a miss, counted); a member is handed out at most once, even under concurrent
  claims: a claim takes it from the ready list with no ``await`` in between;
- a member that died while it waited is ended and never handed out;
- :meth:`WarmPool.close` ends every member not handed out and stops refilling;
  members are ordinary sandboxes of this process, so a crash of the process ends them
  too (their VMs die with it), and a listing on disk (:mod:`.registry`) shows each
  live pool to ``vmr pool ls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vmruntime.errors import SandboxError, VmruntimeError
from vmruntime.pools import registry
from vmruntime.vm import AsyncSandbox

log = logging.getLogger(__name__)
# A failing maker is retried after this long, doubling up to the cap: a broken image
# must not turn the pool into a boot loop.
_RETRY_FIRST, _RETRY_CAP = 1.0, 60.0


@dataclass(frozen=True)
class PoolKey:
    """What makes two members interchangeable: where they come from (an image reference
    or a snapshot's digest), their cpus and memory, the shape of their mounts, and what
    the front door prepared in them (``purpose``, e.g. ``jupyter:<argv>``)."""

    source: str
    cpus: int
    memory_mib: int
    mounts: tuple[str, ...] = ()
    purpose: str = ""

    @property
    def digest(self) -> str:
        """A short stable name for the key (file names, snapshot names, listings)."""
        text = json.dumps([self.source, self.cpus, self.memory_mib, list(self.mounts),
                           self.purpose])  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "cpus": self.cpus, "memory_mib": self.memory_mib,
                "mounts": list(self.mounts), "purpose": self.purpose}  # fmt: skip


@dataclass
class PoolMember:
    """One ready sandbox and what its maker prepared in it (``payload``: e.g. the pid of
    a process waiting in it)."""

    sandbox: AsyncSandbox
    payload: Any = None
    made_seconds: float = 0.0
    made_at: float = field(default_factory=time.time)


MemberMaker = Callable[[], Awaitable[PoolMember]]


class WarmPool:
    """``size`` ready members of ``key`` (see the module)."""

    def __init__(self, key: PoolKey, size: int, make: MemberMaker, *, name: str = "",
                 refill_delay: float = 0.0) -> None:  # fmt: skip
        if size < 0:
            raise ValueError(f"pool size {size}: want 0 or more")
        self.key = key
        self.size = size
        # After a claim, wait this long before making its replacement: the claimed member's
        # first moments (a kernel's first cells) should not compete with a resume for CPU.
        self.refill_delay = refill_delay
        self.name = name or key.digest
        self._make = make
        self._ready: list[PoolMember] = []
        self._making = 0
        self._refill: asyncio.Task[None] | None = None
        self._closed = False
        self.claims = 0
        self.misses = 0
        self.failures: list[str] = []
        self._listing = registry.PoolListing(self.name, key.describe(), size)

    @property
    def ready(self) -> int:
        return len(self._ready)

    def start(self) -> None:
        """Begin filling (idempotent); call on the loop the pool lives on."""
        self._start_after(0.0)

    def _start_after(self, delay: float) -> None:
        if self._closed:
            raise VmruntimeError(f"pool {self.name} is closed")
        if self._refill is None or self._refill.done():
            self._refill = asyncio.ensure_future(self._fill(delay))
        self._publish()

    async def claim(self) -> PoolMember:
        """A member nobody else gets: a ready one, or one made now if none is ready."""
        if self._closed:
            raise VmruntimeError(f"pool {self.name} is closed")
        self.claims += 1
        while self._ready:
            member = self._ready.pop(0)  # no await between the check and the pop
            if member.sandbox.running:
                self._start_after(self.refill_delay)
                self._publish()
                return member
            log.warning("pool %s: member %s died while it waited", self.name, member.sandbox.id)
            await _end(member)
        self.misses += 1
        self.start()
        member = await self._make()
        self._publish()
        return member

    async def close(self) -> None:
        """End every member not handed out; stop refilling (idempotent)."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        members, self._ready = self._ready, []
        for member in members:
            await _end(member)
        self._listing.remove()

    async def _fill(self, delay_first: float = 0.0) -> None:
        if delay_first > 0:
            await asyncio.sleep(delay_first)
        delay = _RETRY_FIRST
        while not self._closed and len(self._ready) + self._making < self.size:
            self._making += 1
            self._publish()
            try:
                member = await self._make()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a maker's failure must not end the pool
                self.failures = [*self.failures[-9:], f"{type(exc).__name__}: {exc}"]
                log.warning("pool %s: making a member failed: %s", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_CAP)
                continue
            finally:
                self._making -= 1
            delay = _RETRY_FIRST
            if self._closed:
                await _end(member)
                return
            self._ready.append(member)
            self._publish()

    def _publish(self) -> None:
        members = [{"id": m.sandbox.id, "state": "ready", "made_seconds": round(m.made_seconds, 3)}
                   for m in self._ready]  # fmt: skip
        members += [{"id": "-", "state": "making"}] * self._making
        self._listing.write(members, claims=self.claims, misses=self.misses,
                            failures=self.failures[-3:])  # fmt: skip


async def _end(member: PoolMember) -> None:
    with contextlib.suppress(SandboxError):
        await member.sandbox.kill()
