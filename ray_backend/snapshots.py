"""Where a ``SandboxActor``'s disk state comes from and goes to: local snapshot names,
store URLs, and the snapshot a restarted actor restores.

Who calls it: :class:`ray_backend.actor.SandboxActorBody`. What it promises: a snapshot
given as a store URL (``<store URL>/<name>``, as ``snapshot(name, push_to=...)`` returns
it) is pulled into this node's store, with its image, before the sandbox is made; an
actor that Ray restarts (``max_restarts``) restores the last snapshot it took, found
through Ray's key-value store under the actor's id, or else the one it was created from.
"""

from __future__ import annotations

import warnings

from vmruntime._blocking import in_thread
from vmruntime.snapshots import SnapshotStore, remote
from vmruntime.snapshots.names import check_name

_KV_NAMESPACE = "vmruntime"


def is_url(spec: str) -> bool:
    return "://" in spec


async def local_snapshot(spec: str) -> str:
    """The local name of snapshot ``spec`` (a local name, or a store URL pulled now)."""
    if not is_url(spec):
        return check_name(spec)
    return await in_thread(_pull_once, spec)


def _pull_once(url: str) -> str:
    _, name = remote.split_snapshot_url(url)
    store = SnapshotStore()
    if not store.exists(name):
        try:
            remote.pull(url, name, store, progress=False)
        except Exception:
            if not store.exists(name):  # another actor on this node pulled it meanwhile
                raise
    return name


def publish(name: str, url: str) -> str:
    """Push local snapshot ``name`` to the store at ``url``; the URL that restores it."""
    return remote.push(SnapshotStore().get(name), url, progress=False).url


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
