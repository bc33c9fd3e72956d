"""``vmr image load``: an image from a file into the cache, offline.

Who calls it: the CLI, the default-image builder, tests.

What it accepts: an OCI image layout directory, an OCI archive (a tar of such
a layout, possibly gzip-compressed) and a ``docker save`` tar (the classic
``manifest.json`` format; newer docker writes an OCI layout, handled as such).
What it promises: the same verification as a pull (every blob against its
digest, every layer against its diff_id) before anything enters the cache.
"""

from __future__ import annotations

import json
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vmruntime._streams import CHUNK, HashingReader, compression_of, sha256_digest
from vmruntime.errors import ArchiveError, DigestMismatchError, ImageError, SizeMismatchError
from vmruntime.images.ingest import (
    BlobSink,
    ImageRecord,
    LayerHandler,
    Progress,
    ProgressFactory,
    ingest_image,
    no_progress,
)
from vmruntime.images.manifest import (
    DEFAULT_PLATFORM,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    canonical_json,
    load_json,
    parse_descriptor,
    parse_manifest_document,
    select_platform,
)
from vmruntime.images.reference import canonical_reference
from vmruntime.images.store import ImageStore, RefRecord

_REF_NAME = "org.opencontainers.image.ref.name"
_CONTAINERD_NAME = "io.containerd.image.name"
_MAX_INDEX_DEPTH = 2


def load(
    path: Path | str,
    tag: str | None = None,
    *,
    store: ImageStore | None = None,
    platform: str = DEFAULT_PLATFORM,
    progress: ProgressFactory = no_progress,
    layers: LayerHandler | None = None,
) -> ImageRecord:
    """Load the image at ``path``; ``tag`` names it (and picks it in a multi-image file).

    ``layers`` makes each layer's product (see
    :class:`~vmruntime.images.ingest.LayerHandler`).
    """
    path = Path(path)
    store = store or ImageStore()
    if tag is not None:
        tag = canonical_reference(tag)
    if path.is_dir():
        return _load_layout(store, _DirFiles(path), path, tag, platform, progress, layers)
    if not path.is_file():
        raise ArchiveError(path, "no such file or directory")
    with _open_tar(path) as archive:
        files = _TarFiles(path, archive)
        if files.has("index.json") and files.has("oci-layout"):
            return _load_layout(store, files, path, tag, platform, progress, layers)
        if files.has("manifest.json"):
            return _load_docker_save(store, files, path, tag, progress, layers)
    raise ArchiveError(
        path, "neither an OCI archive (oci-layout, index.json) nor a docker-save tar"
    )


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(path, f"not a tar archive or OCI layout directory ({exc})") from None


# --- where the files come from -------------------------------------------


class _Files:
    """Named files of a layout or archive, read as streams; also a BlobSource."""

    origin: Path

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield  # pragma: no cover

    def read_small(self, name: str, limit: int = 8 * 1024 * 1024) -> bytes:
        if not self.has(name):
            raise ArchiveError(self.origin, f"missing {name}")
        if self.size(name) > limit:
            raise ArchiveError(self.origin, f"{name} is larger than {limit} bytes")
        with self.open(name) as stream:
            return stream.read()

    def copy_blob(self, desc: Descriptor, sink: BlobSink, progress: Progress) -> None:
        name = _blob_name(desc.digest)
        if not self.has(name):
            raise ArchiveError(self.origin, f"missing blob {desc.digest}")
        self.copy_member(name, sink, progress)

    def copy_member(self, name: str, sink: BlobSink, progress: Progress) -> None:
        with self.open(name) as stream:
            while chunk := stream.read(CHUNK):
                sink.write(chunk)
                progress.advance(len(chunk))


class _DirFiles(_Files):
    def __init__(self, root: Path) -> None:
        self.origin = root

    def has(self, name: str) -> bool:
        return (self.origin / name).is_file()

    def size(self, name: str) -> int:
        return (self.origin / name).stat().st_size

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        with open(self.origin / name, "rb") as stream:
            yield stream


class _TarFiles(_Files):
    """Members of a tar; a plain tar is read at member offsets, so threads can share it."""

    def __init__(self, origin: Path, archive: tarfile.TarFile) -> None:
        self.origin = origin
        self.archive = archive
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for member in archive:
                if member.isfile():
                    self.members[_normalise(member.name)] = member
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(origin, f"unreadable tar ({exc})") from None
        self.seekable_plain = _is_plain_tar(origin)
        self._lock = threading.Lock()

    def has(self, name: str) -> bool:
        return name in self.members

    def size(self, name: str) -> int:
        return self.members[name].size

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        member = self.members[name]
        if self.seekable_plain:
            with open(self.origin, "rb") as raw:
                raw.seek(member.offset_data)
                yield _Window(raw, member.size)
            return
        with self._lock:  # a compressed tar has one shared decompression position
            stream = self.archive.extractfile(member)
            assert stream is not None
            yield stream


class _Window:
    """The ``size`` bytes of a file from its current position."""

    def __init__(self, raw: IO[bytes], size: int) -> None:
        self.raw, self.left = raw, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.raw.read(n)
        self.left -= len(data)
        return data


def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return compression_of(head) is None and not head.startswith((b"BZh", b"\xfd7zXZ"))


def _normalise(name: str) -> str:
    return name.lstrip("/").removeprefix("./")


def _blob_name(digest: str) -> str:
    algorithm, hex_digest = digest.split(":", 1)
    return f"blobs/{algorithm}/{hex_digest}"


# --- OCI image layouts ----------------------------------------------------


def _load_layout(
    store: ImageStore,
    files: _Files,
    origin: Path,
    tag: str | None,
    platform: str,
    progress: ProgressFactory,
    layers: LayerHandler | None,
) -> ImageRecord:
    layout = load_json(files.read_small("oci-layout"), f"{origin}: oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise ArchiveError(
            origin, f"unsupported imageLayoutVersion {layout.get('imageLayoutVersion')!r}"
        )
    index_doc = parse_manifest_document(
        files.read_small("index.json"),
        f"{origin}: index.json",
        "application/vnd.oci.image.index.v1+json",
    )
    if not isinstance(index_doc, ImageIndex):
        raise ArchiveError(origin, "index.json is not an image index")
    entry, name = _pick_layout_entry(origin, index_doc, tag)
    reference = tag or name
    if reference is None:
        raise ArchiveError(origin, "the layout does not name its image; pass --tag REF")
    manifest, body, digest, parent_index = _resolve_layout_manifest(files, origin, entry, platform)
    return ingest_image(
        store,
        files,
        manifest,
        body,
        digest,
        reference=reference,
        source_kind=f"load {origin}",
        index=parent_index,
        platform=platform,
        progress=progress,
        layers=layers,
    )


def _entry_name(entry: Descriptor) -> str | None:
    """A full reference named by an index entry, if it names one."""
    for key in (_CONTAINERD_NAME, _REF_NAME):
        value = entry.annotations.get(key)
        if value and ("/" in value or ":" in value):
            try:
                return canonical_reference(value)
            except ImageError:
                continue
    return None


def _pick_layout_entry(
    origin: Path, index: ImageIndex, tag: str | None
) -> tuple[Descriptor, str | None]:
    entries = list(index.manifests)
    if not entries:
        raise ArchiveError(origin, "index.json lists no images")
    if tag is not None:
        short_tag = tag.rsplit(":", 1)[-1] if "@" not in tag else None
        for entry in entries:
            names = {_entry_name(entry), entry.annotations.get(_REF_NAME)}
            if tag in names or (short_tag and short_tag in names):
                return entry, tag
    if len(entries) == 1:
        return entries[0], _entry_name(entries[0])
    names = [e.annotations.get(_REF_NAME) or e.digest for e in entries]
    raise ArchiveError(origin, f"holds {len(entries)} images ({', '.join(names)}); pass --tag")


def _resolve_layout_manifest(
    files: _Files, origin: Path, entry: Descriptor, platform: str
) -> tuple[ImageManifest, bytes, str, tuple[bytes, str] | None]:
    parent_index: tuple[bytes, str] | None = None
    for _ in range(_MAX_INDEX_DEPTH + 1):
        body = _read_verified(files, entry)
        document = parse_manifest_document(
            body, f"{origin}: manifest {entry.digest}", entry.media_type
        )
        if isinstance(document, ImageManifest):
            return document, body, entry.digest, parent_index
        if parent_index is None:
            parent_index = (body, entry.digest)
        entry = select_platform(document, platform, str(origin))
    raise ArchiveError(origin, "image indexes nested too deeply")


def _read_verified(files: _Files, desc: Descriptor) -> bytes:
    body = files.read_small(_blob_name(desc.digest))
    if len(body) != desc.size:
        raise SizeMismatchError(f"{files.origin}: blob {desc.digest}", desc.size, len(body))
    actual = sha256_digest(body)
    if actual != desc.digest:
        raise DigestMismatchError(f"{files.origin}: blob {desc.digest}", desc.digest, actual)
    return body


# --- classic docker save --------------------------------------------------


@dataclass
class _DockerSaveImage:
    config_name: str
    repo_tags: list[str]
    layer_names: list[str]


class _DockerSaveSource:
    """Serves a docker-save tar's members under the digests we assigned them."""

    def __init__(self, files: _Files, names: dict[str, str]) -> None:
        self.files, self.names = files, names

    def copy_blob(self, desc: Descriptor, sink: BlobSink, progress: Progress) -> None:
        self.files.copy_member(self.names[desc.digest], sink, progress)


def _load_docker_save(
    store: ImageStore,
    files: _Files,
    origin: Path,
    tag: str | None,
    progress: ProgressFactory,
    layer_handler: LayerHandler | None,
) -> ImageRecord:
    image = _pick_docker_save_image(origin, files, tag)
    config_bytes = files.read_small(image.config_name)
    config_digest = sha256_digest(config_bytes)
    stated = Path(image.config_name).stem
    if len(stated) == 64 and f"sha256:{stated}" != config_digest:
        raise DigestMismatchError(
            f"{origin}: config {image.config_name}", f"sha256:{stated}", config_digest
        )
    config = load_json(config_bytes, f"{origin}: {image.config_name}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(image.layer_names):
        raise ArchiveError(origin, f"{len(image.layer_names)} layers but {len(diff_ids)} diff_ids")
    names = {config_digest: image.config_name}
    layers = []
    for layer_name, diff_id in zip(image.layer_names, diff_ids, strict=True):
        desc = _docker_save_layer(files, origin, layer_name, str(diff_id))
        names[desc.digest] = layer_name
        layers.append(desc)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [layer.to_json() for layer in layers],
    }
    body = canonical_json(manifest_doc)
    manifest = parse_manifest_document(body, f"{origin}: manifest")
    assert isinstance(manifest, ImageManifest)
    references = [tag] if tag else [canonical_reference(t) for t in image.repo_tags]
    if not references:
        raise ArchiveError(origin, "the archive does not name its image; pass --tag REF")
    source = _DockerSaveSource(files, names)
    record = ingest_image(
        store,
        source,
        manifest,
        body,
        sha256_digest(body),
        reference=references[0],
        source_kind=f"load {origin}",
        progress=progress,
        layers=layer_handler,
    )
    for extra in references[1:]:
        store.set_ref(
            RefRecord(extra, record.manifest_digest, OCI_MANIFEST, source=f"load {origin}")
        )
    return record


def _pick_docker_save_image(origin: Path, files: _Files, tag: str | None) -> _DockerSaveImage:
    doc: Any = json.loads(files.read_small("manifest.json") or b"null")
    if not isinstance(doc, list) or not doc:
        raise ArchiveError(origin, "manifest.json is not a non-empty list")
    images = [_docker_save_entry(origin, entry) for entry in doc]
    if tag is not None:
        for image in images:
            if tag in {canonical_reference(t) for t in image.repo_tags}:
                return image
    if len(images) == 1:
        return images[0]
    raise ArchiveError(
        origin,
        f"holds {len(images)} images; pass --tag naming one of "
        f"{sorted(t for i in images for t in i.repo_tags)}",
    )


def _docker_save_entry(origin: Path, entry: object) -> _DockerSaveImage:
    if not isinstance(entry, dict):
        raise ArchiveError(origin, "manifest.json entry is not an object")
    config, tags, layers = entry.get("Config"), entry.get("RepoTags") or [], entry.get("Layers")
    if not isinstance(config, str) or not isinstance(layers, list) or not isinstance(tags, list):
        raise ArchiveError(origin, "manifest.json entry lacks Config or Layers")
    return _DockerSaveImage(
        _normalise(config), [str(t) for t in tags], [_normalise(str(layer)) for layer in layers]
    )


def _docker_save_layer(files: _Files, origin: Path, name: str, diff_id: str) -> Descriptor:
    if not files.has(name):
        raise ArchiveError(origin, f"missing layer {name}")
    with files.open(name) as stream:
        compression = compression_of(stream.read(4))
    if compression is None:
        # A plain tar's digest is its diff_id: the blob check then verifies the config's claim.
        return parse_descriptor(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": diff_id,
                "size": files.size(name),
            },
            f"{origin}: {name}",
        )
    with files.open(name) as stream:
        reader = HashingReader(stream)  # type: ignore[arg-type]
        reader.drain()
    return Descriptor(
        f"application/vnd.oci.image.layer.v1.tar+{compression}", reader.digest, files.size(name)
    )
