"""OCI and Docker v2 schema 2 manifests, indexes and configs: parsing and validation.

Everything here reads JSON that came from outside (a registry, an archive) and
treats it as hostile: fields are type-checked, digests must be sha256 and sizes
non-negative integers, before anything else relies on them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from vmruntime.errors import ManifestError, PlatformNotFoundError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

DEFAULT_PLATFORM = "linux/amd64"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A manifest or config bigger than this is an attack, not an image.
MAX_JSON_DOCUMENT = 8 * 1024 * 1024


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: media type, sha256 digest and exact size."""

    media_type: str
    digest: str
    size: int
    platform: str | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class ImageManifest:
    """An image manifest: one config and its layers, in order from the base up."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ImageIndex:
    """An image index (or Docker manifest list): one manifest per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config the runtime uses; ``raw`` keeps the rest."""

    architecture: str
    os: str
    diff_ids: tuple[str, ...]
    env: tuple[str, ...]
    cmd: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    working_dir: str
    user: str
    labels: dict[str, str]
    created: str | None
    raw: dict[str, Any] = field(compare=False, repr=False)


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object of bounded size, or raise ManifestError naming ``what``."""
    if len(data) > MAX_JSON_DOCUMENT:
        raise ManifestError(what, f"document of {len(data)} bytes is too large")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(what, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ManifestError(what, "not a JSON object")
    return doc


def parse_descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ManifestError(what, "descriptor is not an object")
    media_type = obj.get("mediaType")
    digest = obj.get("digest")
    size = obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(what, f"descriptor has no mediaType: {obj!r:.200}")
    if not is_digest(digest):
        raise ManifestError(what, f"unsupported or malformed digest {digest!r:.100}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(what, f"descriptor {digest} has an invalid size {size!r:.50}")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestError(what, f"descriptor {digest} has malformed annotations")
    return Descriptor(
        media_type,
        str(digest),
        size,
        _platform_string(obj.get("platform")),
        {str(k): str(v) for k, v in annotations.items()},
    )


def _platform_string(platform: object) -> str | None:
    if not isinstance(platform, dict):
        return None
    parts = [str(platform.get("os", "")), str(platform.get("architecture", ""))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def media_type_of(doc: dict[str, Any], header_type: str | None) -> str:
    """The media type a manifest declares, falling back to the HTTP Content-Type."""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc and "config" in doc:
        return OCI_MANIFEST
    return (header_type or "").split(";")[0].strip()


def parse_manifest_document(
    data: bytes, what: str, header_type: str | None = None
) -> ImageManifest | ImageIndex:
    """Parse a manifest or an index; schema 1 and unknown types are refused."""
    doc = load_json(data, what)
    media_type = media_type_of(doc, header_type)
    if media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ManifestError(what, "Docker schema 1 manifests are not supported")
    if media_type in INDEX_TYPES:
        return _parse_index(doc, media_type, what)
    if media_type in IMAGE_MANIFEST_TYPES:
        return _parse_image_manifest(doc, media_type, what)
    raise ManifestError(what, f"unsupported manifest media type {media_type!r}")


def _parse_index(doc: dict[str, Any], media_type: str, what: str) -> ImageIndex:
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(what, "index has no manifests list")
    return ImageIndex(media_type, tuple(parse_descriptor(e, what) for e in entries))


def _parse_image_manifest(doc: dict[str, Any], media_type: str, what: str) -> ImageManifest:
    config = parse_descriptor(doc.get("config"), what)
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(what, f"unsupported config media type {config.media_type!r}")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ManifestError(what, "manifest has no layers list")
    layers = tuple(parse_descriptor(layer, what) for layer in raw_layers)
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(
                what, f"layer {layer.digest} has unsupported media type {layer.media_type!r}"
            )
    return ImageManifest(media_type, config, layers, _string_dict(doc.get("annotations"), what))


def select_platform(index: ImageIndex, platform: str, what: str) -> Descriptor:
    """The index entry for ``platform`` (``os/arch[/variant]``), or PlatformNotFoundError."""
    want = platform.split("/")
    if len(want) not in (2, 3):
        raise ManifestError(what, f"invalid platform {platform!r}; expected os/arch[/variant]")
    candidates = []
    for entry in index.manifests:
        if entry.platform is None:
            continue
        have = entry.platform.split("/")
        if have[:2] == want[:2] and (len(want) == 2 or have[2:] == want[2:]):
            candidates.append(entry)
    # Without a requested variant, prefer the entry without one (amd64 has none; arm64 is v8).
    candidates.sort(key=lambda e: len(e.platform.split("/")) if e.platform else 0)
    for entry in candidates:
        if entry.media_type in IMAGE_MANIFEST_TYPES or entry.media_type in INDEX_TYPES:
            return entry
    available = sorted({e.platform for e in index.manifests if e.platform})
    raise PlatformNotFoundError(what, platform, available)


def parse_config(data: bytes, what: str) -> ImageConfig:
    doc = load_json(data, what)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ManifestError(what, "config has no rootfs.diff_ids")
    diff_ids = tuple(rootfs["diff_ids"])
    for diff_id in diff_ids:
        if not is_digest(diff_id):
            raise ManifestError(what, f"malformed diff_id {diff_id!r:.100}")
    settings = doc.get("config") or {}
    if not isinstance(settings, dict):
        raise ManifestError(what, "config.config is not an object")
    return ImageConfig(
        architecture=str(doc.get("architecture", "")),
        os=str(doc.get("os", "")),
        diff_ids=diff_ids,
        env=_string_tuple(settings.get("Env"), what, "Env") or (),
        cmd=_string_tuple(settings.get("Cmd"), what, "Cmd"),
        entrypoint=_string_tuple(settings.get("Entrypoint"), what, "Entrypoint"),
        working_dir=str(settings.get("WorkingDir") or ""),
        user=str(settings.get("User") or ""),
        labels=_string_dict(settings.get("Labels"), what),
        created=doc.get("created") if isinstance(doc.get("created"), str) else None,
        raw=doc,
    )


def _string_dict(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(what, "annotations or labels are not an object")
    return {str(k): str(v) for k, v in value.items()}


def _string_tuple(value: object, what: str, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(what, f"config {key} is not a list of strings")
    return tuple(value)


def check_layers_match_config(manifest: ImageManifest, config: ImageConfig, what: str) -> None:
    if len(manifest.layers) != len(config.diff_ids):
        raise ManifestError(
            what,
            f"manifest has {len(manifest.layers)} layers but config lists "
            f"{len(config.diff_ids)} diff_ids",
        )


def canonical_json(doc: dict[str, Any]) -> bytes:
    """Stable JSON bytes for documents we write ourselves (so their digest is stable)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
