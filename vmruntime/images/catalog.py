"""Reading and tidying the cache: list, inspect, resolve, remove, prune.

Who calls it: the CLI (``vmr image ls | inspect | rm | prune``) and the sandbox
code, which resolves a reference to the image it boots. Everything here but
:func:`remove` and :func:`prune` only reads the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vmruntime.errors import CacheError, ImageNotFoundError, VmruntimeError
from vmruntime.images.ingest import ImageRecord
from vmruntime.images.manifest import (
    ImageIndex,
    ImageManifest,
    is_digest,
    load_json,
    parse_config,
    parse_manifest_document,
)
from vmruntime.images.reference import canonical_reference, legacy_names
from vmruntime.images.store import ImageStore, PruneResult, RefRecord


@dataclass(frozen=True)
class ImageSummary:
    reference: str
    manifest_digest: str
    size: int
    layers: int
    created: str | None
    source: str


def canonical_name(text: str, store: ImageStore) -> str:
    """The cache's key for a user's reference; a bare manifest digest finds its image."""
    if is_digest(text):
        for record in store.list_refs():
            if record.manifest == text:
                return record.reference
        raise ImageNotFoundError(text)
    return canonical_reference(text)


def _ref_record(reference: str, store: ImageStore) -> RefRecord:
    name = canonical_name(reference, store)
    record = store.get_ref(name)
    for legacy in legacy_names(name) if record is None else ():
        # Caches from before the local name: only a loaded entry counts, never a pull.
        old = store.get_ref(legacy)
        if old is not None and old.source != "pull":
            record = old
    if record is None:
        raise ImageNotFoundError(reference)
    return record


def resolve(reference: str, store: ImageStore | None = None) -> ImageRecord:
    """The cached image for ``reference`` (a reference or a manifest digest).

    Reads only: the record has no ``layer_paths`` (see
    :func:`vmruntime.rootfs.layer_images` for the files a sandbox attaches). Raises
    ImageNotFoundError (which suggests pull or load) when it is not cached.
    """
    store = store or ImageStore()
    record = _ref_record(reference, store)
    manifest = parse_manifest_document(
        store.read_blob(record.manifest), f"manifest {record.manifest}", record.media_type
    )
    assert isinstance(manifest, ImageManifest)
    config = parse_config(store.read_blob(manifest.config.digest), f"config of {reference}")
    return ImageRecord(record.reference, record.manifest, manifest, config)


def list_images(store: ImageStore | None = None) -> list[ImageSummary]:
    """Every cached reference; one whose blobs are gone is listed as incomplete, not fatal."""
    store = store or ImageStore()
    summaries = []
    for record in sorted(store.list_refs(), key=lambda r: r.reference):
        try:
            image = resolve(record.reference, store)
            _check_layer_blobs(image, store)
        except VmruntimeError as exc:
            source = f"{record.source} (incomplete: {exc})"
            summaries.append(ImageSummary(record.reference, record.manifest, 0, 0, None, source))
            continue
        size = sum(layer.size for layer in image.manifest.layers)
        summaries.append(
            ImageSummary(
                record.reference,
                record.manifest,
                size,
                len(image.manifest.layers),
                image.config.created,
                record.source,
            )
        )
    return summaries


def _check_layer_blobs(image: ImageRecord, store: ImageStore) -> None:
    for layer in image.manifest.layers:
        if not store.has_blob(layer.digest):
            raise CacheError(store.blob_path(layer.digest), f"layer blob {layer.digest} is missing")


def inspect(reference: str, store: ImageStore | None = None,
            layer_files: Callable[[str], str | None] | None = None) -> dict[str, Any]:  # fmt: skip
    """A JSON-able description: manifest, config and where each layer lives.

    ``layer_files(diff_id)``, if given, names what else the cache holds for a layer
    (its filesystem image), shown as ``rootfs``.
    """
    store = store or ImageStore()
    image = resolve(reference, store)
    record = store.get_ref(image.reference)
    assert record is not None
    return {
        "reference": image.reference,
        "manifestDigest": image.manifest_digest,
        "index": record.index,
        "platform": record.platform,
        "source": record.source,
        "manifest": load_json(store.read_blob(image.manifest_digest), "manifest"),
        "config": image.config.raw,
        "layers": [
            {
                "digest": layer.digest,
                "mediaType": layer.media_type,
                "size": layer.size,
                "diffId": diff_id,
                "blob": str(store.blob_path(layer.digest)),
                **({"rootfs": layer_files(diff_id)} if layer_files else {}),
            }
            for layer, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True)
        ],
    }


def remove(reference: str, store: ImageStore | None = None) -> str:
    """Forget a reference (its blobs stay until ``prune``); returns the name removed."""
    store = store or ImageStore()
    record = _ref_record(reference, store)
    store.remove_ref(record.reference)
    return record.reference


@dataclass(frozen=True)
class Referenced:
    """What the cached references need: blobs, and the layers' uncompressed digests."""

    blobs: frozenset[str]
    diff_ids: frozenset[str]


# Deletes what the references do not need of something besides blobs (layer images,
# guest assets...); called under the cache's exclusive lock.
Pruner = Callable[[Referenced], PruneResult]


def prune(store: ImageStore | None = None, *, also: Sequence[Pruner] = (),
          pinned: Iterable[str] = ()) -> PruneResult:  # fmt: skip
    """Delete every blob no reference needs, and stale temp files; then run ``also``.

    ``pinned``: manifest digests whose blobs stay even without a reference (the base
    images snapshots pin). Everything happens under the cache's exclusive lock, so no
    pull, load or build is at work meanwhile.
    """
    store = store or ImageStore()
    with store.exclusive():
        referenced = referenced_content(store, pinned)
        result = store.prune(referenced.blobs)
        for pruner in also:
            result.merge(pruner(referenced))
        return result


def referenced_content(store: ImageStore, pinned: Iterable[str] = ()) -> Referenced:
    """The blobs and diff_ids that the cached references (and ``pinned`` manifests) need."""
    blobs: set[str] = set()
    diff_ids: set[str] = set()
    for record in store.list_refs():
        if record.index:
            blobs.add(record.index)
        _collect(store, record.manifest, record.media_type, blobs, diff_ids)
    for digest in pinned:
        _collect(store, digest, None, blobs, diff_ids)
    return Referenced(frozenset(blobs), frozenset(diff_ids))


def _collect(store: ImageStore, digest: str, media_type: str | None, blobs: set[str],
             rootfs: set[str]) -> None:  # fmt: skip
    blobs.add(digest)
    if not store.has_blob(digest):
        return
    manifest = parse_manifest_document(store.read_blob(digest), digest, media_type)
    if isinstance(manifest, ImageIndex):
        return
    blobs.add(manifest.config.digest)
    blobs.update(layer.digest for layer in manifest.layers)
    if store.has_blob(manifest.config.digest):
        config = parse_config(store.read_blob(manifest.config.digest), manifest.config.digest)
        rootfs.update(config.diff_ids)
