"""Where a ``SandboxActor``'s disk state comes from and goes to: local snapshot names,
store URLs, and the snapshot a restarted actor restores.

Who calls it: :class:`ray_backend.actor.SandboxActorBody`. What it promises: a snapshot
given as a store URL (``<store URL>/<name>``, as ``snapshot(name, push_to=...)`` returns
it) is pulled into this node's store, with its image (by digest: from the store, where
``push_to`` sends it, else from its registry), before the sandbox is made
(:func:`vmruntime.snapshots.ensure_local`: idempotent, one fetch when several actors of a
node start at once); an actor that Ray restarts (``max_restarts``) restores the last
snapshot it took, found through Ray's key-value store under the actor's id, or else the
one it was created from.
"""

from __future__ import annotations

import warnings

from vmruntime._blocking import in_thread
from vmruntime.snapshots import SnapshotStore, ensure_local, remote

_KV_NAMESPACE = "vmruntime"


async def local_snapshot(spec: str) -> str:
    """The local name of snapshot ``spec`` (a local name, or a store URL pulled now), its
    base image in this node's cache."""
    return await in_thread(ensure_local, spec)


def publish(name: str, url: str) -> str:
    """Push local snapshot ``name``, with its base image, to the store at ``url``; the URL
    that restores it on any node."""
    return remote.push(SnapshotStore().get(name), url, progress=False, with_image=True).url


def _kv_key() -> bytes | None:
    import ray

    try:
        actor_id = ray.get_runtime_context().get_actor_id()
    except Exception:
        return None
    return f"sandbox-actor-snapshot:{actor_id}".encode() if actor_id else None


def remember_for_restart(spec: str) -> None:
    """Record ``spec`` as what this actor restores if Ray restarts it."""
    from ray.experimental import internal_kv

    key = _kv_key()
    if key is not None and internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_put(key, spec.encode(), overwrite=True, namespace=_KV_NAMESPACE)


def restart_source(snapshot: str | None) -> str | None:
    """What the sandbox starts from: for an actor that Ray restarted, the last snapshot it
    took (if any); else ``snapshot``."""
    import ray

    try:
        with warnings.catch_warnings():  # Ray 2.60 warns about its own use of actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:
        return snapshot
    key = _kv_key()
    if not restarted or key is None:
        return snapshot
    from ray.experimental import internal_kv

    recorded = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    return recorded.decode() if recorded else snapshot
