"""A snapshot made ready to restore on this machine, whether it is here or in a store.

Who calls it: front doors that restore on whichever machine a scheduler picked (the Ray
actor's ``snapshot=``), and ``vmr snapshot pull --with-image``. What it promises:

- :func:`ensure_local` takes a local snapshot name or a store URL (``<store URL>/<name>``,
  as ``vmr snapshot pull`` takes) and returns the name of a local snapshot that
  ``Sandbox.create(from_snapshot=…)`` restores, its base image in the cache by digest;
- a URL is read once (name, then index, both checked): what is restored is the snapshot
  the name pointed at then. It is kept locally as ``<name>-<12 hex of its index
  digest>``, so a later push under the same name is a different local snapshot, never
  mixed up with the one before, and a snapshot already fetched is not fetched again;
- idempotent and safe when several processes of one machine ask at once: one fetches
  under the store's lock, the others wait and find it; the image cache's blob locks do
  the same for the image;
- the base image comes, by its manifest digest, from the cache, else from the store
  when the snapshot was pushed with it (:mod:`.remote_images`), else from the registry
  the manifest names (``<repository>@<digest>``); every blob is checked on the way in.
  The image is fetched before the snapshot: a snapshot that could not be restored is not
  pulled. When no place has it, :class:`SnapshotImageUnavailableError` names the digest
  and what each place answered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vmruntime import images
from vmruntime.errors import (
    CacheError,
    ImageNotFoundError,
    SnapshotExistsError,
    SnapshotImageUnavailableError,
    SnapshotStoreError,
    VmruntimeError,
)
from vmruntime.images.store import ImageStore
from vmruntime.rootfs.layers import ErofsLayers
from vmruntime.snapshots.capture import pull_reference
from vmruntime.snapshots.manifest import SnapshotManifest
from vmruntime.snapshots.names import check_name
from vmruntime.snapshots.remote import (
    RemoteStore,
    pull_index,
    read_index,
    read_name,
    split_snapshot_url,
)
from vmruntime.snapshots.remote_images import fetch_image, record_path
from vmruntime.snapshots.store import SnapshotStore

DIGEST_SUFFIX = 12  # hex digits of the index digest in a fetched snapshot's local name


def ensure_local(
    spec: str,
    *,
    store: SnapshotStore | None = None,
    image_store: ImageStore | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> str:
    """The local name of snapshot ``spec`` (a local name, or ``<store URL>/<name>``),
    fetched if need be, with its base image in ``image_store`` (see the module).

    ``storage_options`` reach the store's filesystem (fsspec), as for
    :func:`~vmruntime.snapshots.remote.pull`.
    """
    store = store if store is not None else SnapshotStore()
    image_store = image_store if image_store is not None else ImageStore()
    if not is_store_url(spec):
        snapshot = store.get(spec)
        ensure_base_image(snapshot.manifest, image_store)
        return snapshot.name
    store_url, remote_name = split_snapshot_url(spec)
    remote = RemoteStore.open(store_url, storage_options)
    remote.forget_listings()
    index_hex = read_name(remote, remote_name)
    manifest, digests = read_index(remote, index_hex)
    local_name = fetched_name(remote_name, index_hex)
    ensure_base_image(manifest, image_store, remote, progress=progress)
    expected = dataclasses.replace(manifest, name=local_name)
    with store.lock(local_name):
        if _have(store, expected):
            return local_name
        try:
            pull_index(remote, manifest, digests, local_name, store, progress=progress)
        except SnapshotExistsError:  # a fetcher that takes no lock (`vmr snapshot pull`)
            if not _have(store, expected):
                raise
    return local_name


def is_store_url(spec: str) -> bool:
    """A URL has a ``/`` (``s3://b/p/name``, ``/srv/store/name``); a name never does."""
    return "/" in spec


def fetched_name(remote_name: str, index_hex: str) -> str:
    """``<name>-<12 hex>``, the name shortened so that the whole is a valid name."""
    return check_name(f"{remote_name[: 99 - DIGEST_SUFFIX]}-{index_hex[:DIGEST_SUFFIX]}")


def _have(store: SnapshotStore, expected: SnapshotManifest) -> bool:
    """Whether ``store`` holds this snapshot, by its manifest digest (which pins the layer's
    content when it is sealed; the local store is trusted, as restore trusts it); another
    one under its name is an error."""
    if not store.exists(expected.name):
        return False
    found = store.get(expected.name)
    if found.digest != expected.digest():
        raise SnapshotExistsError(expected.name)
    return True


def ensure_base_image(
    manifest: SnapshotManifest,
    image_store: ImageStore,
    remote: RemoteStore | None = None,
    *,
    progress: bool = False,
) -> str:
    """Where the base image of ``manifest`` was found: "cache", "store" (``remote``, if it
    was pushed with the snapshot) or "registry"; every fetched blob is checked. Raises
    :class:`SnapshotImageUnavailableError` when none has it."""
    digest = manifest.image_manifest_digest
    if _cached(digest, image_store):
        return "cache"
    tried = ["the cache: not there"]
    if remote is not None:
        try:
            if fetch_image(remote, digest, manifest.image, image_store, progress=progress):
                return "store"
            tried.append(f"store {remote.url}: no {record_path(digest)}")
        except SnapshotStoreError as exc:
            tried.append(f"store {exc.url}: {exc.reason}")
    reference = pull_reference(manifest.image, digest)
    if _names_no_registry(reference):
        tried.append(f"registry: none, {reference} was built or loaded on a machine (push "
                     "the snapshot with its image: `vmr snapshot push --with-image`)")  # fmt: skip
    else:
        try:
            images.pull(reference, store=image_store, layers=ErofsLayers(image_store))
            return "registry"
        except VmruntimeError as exc:
            tried.append(f"registry ({reference}): {exc}")
    raise SnapshotImageUnavailableError(manifest.name, manifest.image, digest, reference, tried)


def _names_no_registry(reference: str) -> bool:
    """``localhost/…`` without a port names no registry (docs/default-image.md): the
    default image and the images loaded under such names exist only where they were made."""
    try:
        return images.parse_reference(reference).registry == "localhost"
    except VmruntimeError:
        return False  # the pull says what is wrong with it


def _cached(digest: str, image_store: ImageStore) -> bool:
    """The image is cached with all its layer blobs (a layer's filesystem image, if
    missing, is rebuilt from its blob when a sandbox starts)."""
    try:
        image = images.resolve(digest, image_store)
    except (ImageNotFoundError, CacheError):
        return False
    return all(image_store.has_blob(layer.digest) for layer in image.manifest.layers)
