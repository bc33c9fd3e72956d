"""``SandboxPool``: untrusted calls spread over several sandbox actors.

Who calls it: Ray jobs with many calls to make. What it promises: the interface of
``ray.util.ActorPool`` (``map``, ``map_unordered``, ``submit``, ``get_next``,
``get_next_unordered``, ``has_next``, ``has_free``, ``push``, ``pop_idle``), taking the
untrusted function itself where ``ActorPool`` takes a ``(actor, value) -> ObjectRef``
function: each value is one ``run(fn, value)`` on whichever actor is free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ray.actor import ActorHandle
from ray.util import ActorPool


class SandboxPool(ActorPool):
    """Spreads ``run`` calls over ``actors`` (``SandboxActor`` handles)."""

    def __init__(self, actors: Sequence[ActorHandle]) -> None:
        super().__init__(list(actors))

    @classmethod
    def create(cls, size: int, **actor_options: Any) -> SandboxPool:
        """A pool of ``size`` new actors, each ``SandboxActor.remote(**actor_options)``."""
        from ray_backend.actor import SandboxActor

        return cls([SandboxActor.remote(**actor_options) for _ in range(size)])

    def map(self, fn: Callable[[Any], Any], values: Iterable[Any]) -> Iterator[Any]:  # type: ignore[override]
        """``fn(value)`` for each value, in the guests; results in the values' order."""
        return super().map(fn, values)  # which calls our submit for each value

    def map_unordered(self, fn: Callable[[Any], Any],  # type: ignore[override]
                      values: Iterable[Any]) -> Iterator[Any]:  # fmt: skip
        """As :meth:`map`, results as they finish."""
        return super().map_unordered(fn, values)

    def submit(self, fn: Callable[[Any], Any], value: Any) -> None:  # type: ignore[override]
        """Start ``fn(value)`` on a free actor (or when one frees up)."""
        # ActorPool re-submits what it queued (already a _Runner) when an actor frees up.
        super().submit(fn if isinstance(fn, _Runner) else _Runner(fn), value)


class _Runner:
    """What ActorPool calls with a free actor: one ``run`` of the untrusted function."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, actor: ActorHandle, value: Any) -> Any:
        return actor.run.remote(self.fn, value)
