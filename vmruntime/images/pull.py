"""``vmr image pull``: an image from a registry into the cache.

Who calls it: the CLI and anyone with a reference (``vmruntime.images.pull``).

What it promises: the manifest is resolved (an index to the wanted platform),
checked against the pinned digest when the reference has one, and every blob
verified on the way in (see :mod:`vmruntime.images.ingest`). Blobs already in
the cache are not downloaded again, by this process or a concurrent one.
"""

from __future__ import annotations

from vmruntime._streams import sha256_digest
from vmruntime.errors import DigestMismatchError, ImageNotPullableError, ManifestError
from vmruntime.images.ingest import (
    ImageRecord,
    LayerHandler,
    ProgressFactory,
    ingest_image,
    no_progress,
)
from vmruntime.images.manifest import (
    DEFAULT_PLATFORM,
    ImageIndex,
    ImageManifest,
    parse_manifest_document,
    select_platform,
)
from vmruntime.images.reference import (
    Reference,
    canonical_reference,
    local_only_hint,
    parse_reference,
)
from vmruntime.images.registry import RegistryClient
from vmruntime.images.store import ImageStore

_MAX_INDEX_DEPTH = 2


def pull(
    reference: str | Reference,
    *,
    store: ImageStore | None = None,
    platform: str = DEFAULT_PLATFORM,
    client: RegistryClient | None = None,
    progress: ProgressFactory = no_progress,
    layers: LayerHandler | None = None,
) -> ImageRecord:
    """Pull ``reference`` into ``store`` and return the cached image.

    ``layers`` makes each layer's product while it downloads (see
    :class:`~vmruntime.images.ingest.LayerHandler`).
    """
    ref = reference if isinstance(reference, Reference) else parse_reference(reference)
    if (hint := local_only_hint(ref)) is not None:
        raise ImageNotPullableError(str(reference), hint)
    store = store or ImageStore()
    client = client or RegistryClient(ref)
    manifest, body, digest, index = _resolve_manifest(client, ref, platform)
    return ingest_image(
        store,
        client,
        manifest,
        body,
        digest,
        reference=canonical_reference(str(ref)),
        source_kind="pull",
        index=index,
        platform=platform,
        progress=progress,
        layers=layers,
    )


def _resolve_manifest(
    client: RegistryClient, ref: Reference, platform: str
) -> tuple[ImageManifest, bytes, str, tuple[bytes, str] | None]:
    """Fetch the manifest for ``ref``, following an index to ``platform``."""
    target, expected = ref.manifest_ref, ref.digest
    index: tuple[bytes, str] | None = None
    for _ in range(_MAX_INDEX_DEPTH + 1):
        body, content_type, header_digest = client.get_manifest(target)
        digest = _verified_digest(ref, target, body, expected, header_digest)
        document = parse_manifest_document(body, f"manifest {target} of {ref}", content_type)
        if isinstance(document, ImageManifest):
            return document, body, digest, index
        assert isinstance(document, ImageIndex)
        if index is None:
            index = (body, digest)
        entry = select_platform(document, platform, str(ref))
        target, expected = entry.digest, entry.digest
    raise ManifestError(str(ref), "image indexes nested too deeply")


def _verified_digest(
    ref: Reference, target: str, body: bytes, expected: str | None, header: str | None
) -> str:
    actual = sha256_digest(body)
    if expected is not None and actual != expected:
        raise DigestMismatchError(f"manifest {target} of {ref}", expected, actual)
    if header and header.startswith("sha256:") and header != actual:
        raise DigestMismatchError(
            f"manifest {target} of {ref} (Docker-Content-Digest)", header, actual
        )
    return actual
