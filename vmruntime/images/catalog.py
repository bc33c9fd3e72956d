"""Reading and tidying the cache: list, inspect, resolve, remove, prune.

Who calls it: the CLI (``vmr image ls | inspect | rm | prune``) and the sandbox
code, which resolves a reference to the layer images it attaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmruntime.errors import ImageNotFoundError, VmruntimeError
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
from vmruntime.images.unpack import unpack_file


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
    record = store.get_ref(canonical_name(reference, store))
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
    for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        if not store.has_rootfs(diff_id):
            _rebuild_layer_image(store, reference, layer.digest, diff_id)
    paths = tuple(store.rootfs_path(d) for d in config.diff_ids)
    return ImageRecord(record.reference, record.manifest, manifest, config, paths)


def _rebuild_layer_image(store: ImageStore, reference: str, digest: str, diff_id: str) -> None:
    """A layer image deleted behind the cache's back is rebuilt from its verified blob."""
    with store.writing(), store.blob_lock(digest), store.rootfs_lock(diff_id):
        if store.has_rootfs(diff_id):
            return
        if not store.has_blob(digest):
            raise ImageNotFoundError(reference)
        unpack_file(store, store.blob_path(digest), digest, diff_id)


def list_images(store: ImageStore | None = None) -> list[ImageSummary]:
    """Every cached reference; one whose files are gone is listed as incomplete, not fatal."""
    store = store or ImageStore()
    summaries = []
    for record in sorted(store.list_refs(), key=lambda r: r.reference):
        try:
            image = resolve(record.reference, store)
        except VmruntimeError as exc:
            summaries.append(
                ImageSummary(
                    record.reference,
                    record.manifest,
                    0,
                    0,
                    None,
                    f"{record.source} (incomplete: {exc})",
                )
            )
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
