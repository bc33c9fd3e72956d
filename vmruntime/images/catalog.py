"""Reading and tidying the cache: list, inspect, resolve, remove, prune.

Who calls it: the CLI (``vmr image ls | inspect | rm | prune``) and the sandbox
code, which resolves a reference to the layer images it attaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmruntime.errors import ImageNotFoundError, InvalidReferenceError
from vmruntime.images.ingest import ImageRecord
from vmruntime.images.manifest import (
    ImageIndex,
    ImageManifest,
    is_digest,
    load_json,
    parse_config,
    parse_manifest_document,
)
from vmruntime.images.reference import parse_reference
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
    return str(parse_reference(text))


def _ref_record(reference: str, store: ImageStore) -> RefRecord:
    try:
        name = canonical_name(reference, store)
    except InvalidReferenceError:
        raise
    record = store.get_ref(name)
    if record is None:
        raise ImageNotFoundError(reference)
    return record


def resolve(reference: str, store: ImageStore | None = None) -> ImageRecord:
    """The cached image for ``reference``, with the paths of its layer filesystem images.

    Raises ImageNotFoundError (which suggests pull or load) when it is not cached.
    """
    store = store or ImageStore()
    record = _ref_record(reference, store)
    manifest = parse_manifest_document(
        store.read_blob(record.manifest), f"manifest {record.manifest}", record.media_type
    )
    assert isinstance(manifest, ImageManifest)
    config = parse_config(store.read_blob(manifest.config.digest), f"config of {reference}")
    paths = tuple(store.rootfs_path(d) for d in config.diff_ids)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ImageNotFoundError(reference)
    return ImageRecord(record.reference, record.manifest, manifest, config, paths)


def list_images(store: ImageStore | None = None) -> list[ImageSummary]:
    store = store or ImageStore()
    summaries = []
    for record in sorted(store.list_refs(), key=lambda r: r.reference):
        image = resolve(record.reference, store)
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


def inspect(reference: str, store: ImageStore | None = None) -> dict[str, Any]:
    """A JSON-able description: manifest, config and where each layer lives."""
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
                "rootfs": str(path),
            }
            for layer, diff_id, path in zip(
                image.manifest.layers, image.config.diff_ids, image.layer_paths, strict=True
            )
        ],
    }


def remove(reference: str, store: ImageStore | None = None) -> str:
    """Forget a reference (its blobs stay until ``prune``); returns the name removed."""
    store = store or ImageStore()
    record = _ref_record(reference, store)
    store.remove_ref(record.reference)
    return record.reference


def prune(store: ImageStore | None = None) -> PruneResult:
    """Delete every blob and layer image that no reference needs, and stale temp files."""
    store = store or ImageStore()
    with store.exclusive():
        blobs: set[str] = set()
        rootfs: set[str] = set()
        for record in store.list_refs():
            _collect(store, record, blobs, rootfs)
        return store.prune(blobs, rootfs)


def _collect(store: ImageStore, record: RefRecord, blobs: set[str], rootfs: set[str]) -> None:
    blobs.add(record.manifest)
    if record.index:
        blobs.add(record.index)
    if not store.has_blob(record.manifest):
        return
    manifest = parse_manifest_document(
        store.read_blob(record.manifest), record.manifest, record.media_type
    )
    if isinstance(manifest, ImageIndex):
        return
    blobs.add(manifest.config.digest)
    blobs.update(layer.digest for layer in manifest.layers)
    if store.has_blob(manifest.config.digest):
        config = parse_config(store.read_blob(manifest.config.digest), manifest.config.digest)
        rootfs.update(config.diff_ids)


def default_image_is_current(input_hash: str, store: ImageStore | None = None) -> bool:
    """True when the cached default image was built from these inputs."""
    from vmruntime.images.default_image import DEFAULT_IMAGE, INPUTS_LABEL

    try:
        image = resolve(DEFAULT_IMAGE, store)
    except ImageNotFoundError:
        return False
    return image.config.labels.get(INPUTS_LABEL) == input_hash
