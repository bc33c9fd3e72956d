"""``WarmActorPool``: sandbox actors started ahead, each handed out once, ready at once.

Who calls it: a Ray driver (or any task) that will need sandbox actors of one kind, e.g.
one per incoming job. What it promises:

- it keeps ``size`` :data:`~ray_backend.actor.SandboxActor` s of one set of options
  started in the background (each resumed from the node's warm template, see
  :mod:`ray_backend.warm`, unless ``warm=False``); :meth:`claim` returns one whose
  sandbox and worker are up, so its first ``run`` or ``exec`` answers at once, and
  starts its replacement (nothing the caller waits for);
- an actor is handed out once, even when threads claim at once (a lock around the
  ready set); an actor that failed to start is dropped (its error kept in
  :attr:`failures`) and replaced, never handed out;
- :meth:`close` kills the actors not handed out; the actors are the driver's own (not
  detached), so a driver that dies takes them and their VMs with it; while the pool
  lives, ``vmr pool ls`` on the driver's machine lists it and its members.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.actor import ActorHandle

from vmruntime.errors import VmruntimeError
from vmruntime.pools import PoolKey
from vmruntime.pools.registry import PoolListing


class WarmActorPool:
    """``size`` ready ``SandboxActor`` s made with ``actor_options`` (Ray's: ``num_cpus``,
    ``memory``, ``resources``...) and ``sandbox_options`` (``SandboxActor``'s: ``image``,
    ``env``, ``workdir``...)."""

    def __init__(self, size: int = 2, *, actor_options: Mapping[str, Any] | None = None,
                 **sandbox_options: Any) -> None:  # fmt: skip
        if size < 1:
            raise ValueError(f"pool size {size}: want 1 or more")
        self.size = size
        self._actor_options = dict(actor_options or {})
        self._sandbox_options = sandbox_options
        self._lock = threading.Lock()
        self._starting: dict[ray.ObjectRef, ActorHandle] = {}
        self._ready: list[tuple[ActorHandle, str]] = []
        self._closed = False
        self.claims = 0
        self.failures: list[str] = []
        key = PoolKey(f"image:{sandbox_options.get('image') or 'default'}",
                      int(self._actor_options.get("num_cpus", 1) or 1), 0,
                      purpose="ray:" + repr(sorted(sandbox_options.items())))  # fmt: skip
        self._listing = PoolListing(f"ray-{key.digest}", key.describe(), size)
        with self._lock:
            self._top_up()

    def claim(self, timeout: float | None = 300.0) -> ActorHandle:
        """A ready actor, yours alone (waits for one if none is ready yet)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise VmruntimeError("the warm actor pool is closed")
                self._collect(0)
                if self._ready:
                    actor, _ = self._ready.pop(0)
                    self.claims += 1
                    self._top_up()
                    self._publish()
                    return actor
                pending = list(self._starting)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise VmruntimeError(f"no warm sandbox actor was ready within {timeout:g} s "
                                     f"(last failures: {self.failures[-3:]})")  # fmt: skip
            ray.wait(pending, num_returns=1, timeout=min(left or 1.0, 1.0))

    @property
    def ready(self) -> int:
        with self._lock:
            self._collect(0)
            return len(self._ready)

    def close(self) -> None:
        """Kill every actor not handed out (idempotent)."""
        with self._lock:
            self._closed = True
            actors = [a for a, _ in self._ready] + list(self._starting.values())
            self._ready, self._starting = [], {}
        for actor in actors:
            ray.kill(actor)
        self._listing.remove()

    def __enter__(self) -> WarmActorPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _top_up(self) -> None:
        """Start actors until ready + starting is the size (the lock is held)."""
        from ray_backend.actor import SandboxActor

        while not self._closed and len(self._ready) + len(self._starting) < self.size:
            actor = SandboxActor.options(**self._actor_options).remote(**self._sandbox_options)
            self._starting[actor.get_instance_id.remote()] = actor
        self._publish()

    def _collect(self, timeout: float) -> None:
        """Move the actors that finished starting to the ready list (the lock is held)."""
        if not self._starting:
            return
        done, _ = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=timeout)
        for ref in done:
            actor = self._starting.pop(ref)
            try:
                self._ready.append((actor, ray.get(ref)))
            except Exception as exc:  # its constructor failed: never hand it out
                self.failures = [*self.failures[-9:], f"{type(exc).__name__}: {exc}"[:500]]
                ray.kill(actor)
        if done:
            self._top_up()

    def _publish(self) -> None:
        members = [{"id": sandbox_id, "state": "ready"} for _, sandbox_id in self._ready]
        members += [{"id": "-", "state": "making"}] * len(self._starting)
        self._listing.write(members, claims=self.claims, misses=0, failures=self.failures[-3:])
