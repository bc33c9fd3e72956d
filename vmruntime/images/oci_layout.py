"""Write OCI image layouts (``oci-layout`` + ``index.json`` + ``blobs/sha256/``).

This is the producing side of the image pipeline: a builder (the default image
builder in :mod:`vmruntime.images.default_image`) has one or more layer tars and
wants them to become an image that the cache can load, and that standard tools
(``skopeo inspect oci:DIR``, ``umoci``) accept.

Promises of :func:`write_image_layout`:

* every blob is stored under the sha256 of its exact bytes, and every JSON blob
  is written to a temporary name, fsynced, then renamed, so a crash never leaves
  a blob whose name does not match its content;
* ``index.json`` is written last: a layout whose writing failed is never
  referenced by its index (stray blobs may remain; the caller owns ``dest_dir``);
* uncompressed layers that live on the same filesystem as ``dest_dir`` are
  hard-linked, not copied (the default image's layer is hundreds of MB);
* failures to write (a full disk, permissions) raise
  :class:`~vmruntime.errors.ImageBuildError` naming the path.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from vmruntime._durable import fsync_dir, fsync_path
from vmruntime._streams import file_digest
from vmruntime.errors import ImageBuildError
from vmruntime.images.manifest import canonical_json

MEDIA_TYPE_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT_VERSION = "1.0.0"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK_SIZE = 1 << 20  # 1 MiB: large enough for throughput, small enough for memory

LayerSource = str | os.PathLike[str] | BinaryIO
"""A layer is an uncompressed tar, given as a path or as a readable binary stream."""


@dataclass(frozen=True)
class ImageConfigSpec:
    """The parts of an OCI image config a builder chooses; the writer adds the rest.

    ``created`` defaults to ``$SOURCE_DATE_EPOCH`` when set (reproducible builds),
    otherwise to the current time.
    """

    env: Mapping[str, str] = field(
        default_factory=lambda: {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
    )
    cmd: Sequence[str] | None = None
    entrypoint: Sequence[str] | None = None
    working_dir: str = "/"
    user: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    architecture: str = "amd64"
    os: str = "linux"
    created: datetime | None = None
    created_by: str = ""
    comment: str | None = None

    def to_oci(self, diff_ids: Sequence[str]) -> dict[str, Any]:
        """The full OCI image config for layers with these diff_ids."""
        section: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in self.env.items()]}
        if self.entrypoint is not None:
            section["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            section["Cmd"] = list(self.cmd)
        if self.working_dir:
            section["WorkingDir"] = self.working_dir
        if self.user is not None:
            section["User"] = self.user
        if self.labels:
            section["Labels"] = dict(self.labels)
        created = format_timestamp(self.created or default_created())
        entry: dict[str, Any] = {"created": created, "created_by": self.created_by}
        if self.comment:
            entry["comment"] = self.comment
        return {
            "created": created,
            "architecture": self.architecture,
            "os": self.os,
            "config": section,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [dict(entry) for _ in diff_ids],
        }


@dataclass(frozen=True)
class LayerBlob:
    """One stored layer: ``digest`` names the blob, ``diff_id`` its uncompressed tar."""

    digest: str
    diff_id: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class LayoutResult:
    """What :func:`write_image_layout` wrote, with the digests a loader needs."""

    path: Path
    tag: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: tuple[LayerBlob, ...]

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(layer.digest for layer in self.layers)

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(layer.diff_id for layer in self.layers)


def write_image_layout(
    dest_dir: str | os.PathLike[str],
    layers: Iterable[LayerSource],
    *,
    tag: str,
    config: ImageConfigSpec | Mapping[str, Any],
    annotations: Mapping[str, str] | None = None,
    compress: bool = False,
) -> LayoutResult:
    """Write an image made of ``layers`` into the OCI image layout ``dest_dir``.

    ``layers`` are uncompressed tars, bottom layer first, as paths or readable
    binary streams (streams are read to the end, not closed). With
    ``compress=False`` each blob is the tar itself (digest == diff_id, media type
    ``...layer.v1.tar``); with ``compress=True`` it is gzipped (``...tar+gzip``).

    ``config`` is either an :class:`ImageConfigSpec` or a complete OCI image
    config mapping without ``rootfs`` (the writer fills in ``rootfs`` and, when
    absent, ``created``, ``history`` (one entry per layer), ``architecture``
    (amd64) and ``os`` (linux)).

    ``dest_dir`` is created if needed; if it already holds a layout, the new
    image is added and an older index entry with the same ``tag`` is replaced.
    ``index.json`` carries ``tag`` as ``org.opencontainers.image.ref.name``.

    Raises :class:`ImageBuildError` (naming the path) when writing fails,
    :class:`ValueError` for an unusable ``config``.
    """
    dest = Path(dest_dir)
    what = f"OCI layout {dest}"
    try:
        blobs = _prepare_layout_dir(dest)
        stored = tuple(_store_layer(blobs, layer, compress) for layer in layers)
        if not stored:
            raise ValueError("an image needs at least one layer")
        config_doc = _config_document(config, [layer.diff_id for layer in stored])
        config_digest, config_size = _write_json_blob(blobs, config_doc)
        manifest = _manifest_document(config_digest, config_size, stored, annotations)
        manifest_digest, manifest_size = _write_json_blob(blobs, manifest)
        _write_index(dest, manifest_digest, manifest_size, tag)
    except OSError as exc:
        raise ImageBuildError(what, _describe_os_error(exc)) from exc
    return LayoutResult(
        path=dest,
        tag=tag,
        manifest_digest=manifest_digest,
        manifest_size=manifest_size,
        config_digest=config_digest,
        layers=stored,
    )


# --- time ---------------------------------------------------------------------


def default_created() -> datetime:
    """``$SOURCE_DATE_EPOCH`` if set (reproducible builds), else now, in UTC."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        return datetime.fromtimestamp(int(epoch), tz=UTC)
    return datetime.fromtimestamp(int(time.time()), tz=UTC)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix, as OCI configs conventionally use."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- layout skeleton and JSON documents --------------------------------------


def _prepare_layout_dir(dest: Path) -> Path:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    marker = dest / "oci-layout"
    if not marker.exists():
        _write_atomically(marker, canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    return blobs


def _config_document(
    config: ImageConfigSpec | Mapping[str, Any], diff_ids: list[str]
) -> dict[str, Any]:
    if isinstance(config, ImageConfigSpec):
        return config.to_oci(diff_ids)
    doc = dict(config)
    if "rootfs" in doc:
        raise ValueError("config must not contain 'rootfs': the writer computes it from the layers")
    doc.setdefault("architecture", "amd64")
    doc.setdefault("os", "linux")
    doc.setdefault("created", format_timestamp(default_created()))
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    history = doc.setdefault("history", [{"created": doc["created"]} for _ in diff_ids])
    real_entries = [h for h in history if not h.get("empty_layer")]
    if len(real_entries) != len(diff_ids):
        raise ValueError(
            f"config history has {len(real_entries)} non-empty entries for {len(diff_ids)} layers"
        )
    return doc


def _manifest_document(
    config_digest: str,
    config_size: int,
    layers: Sequence[LayerBlob],
    annotations: Mapping[str, str] | None,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return manifest


def _write_index(dest: Path, manifest_digest: str, manifest_size: int, tag: str) -> None:
    index_path = dest / "index.json"
    entries: list[dict[str, Any]] = []
    if index_path.exists():
        # Keep other images of a shared layout; the tag moves to the new manifest.
        old = json.loads(index_path.read_text())
        entries = [
            m
            for m in old.get("manifests", [])
            if m.get("annotations", {}).get(ANNOTATION_REF_NAME) != tag
        ]
    entries.append(
        {
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {ANNOTATION_REF_NAME: tag},
        }
    )
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": entries}
    _write_atomically(index_path, canonical_json(index))


def _write_json_blob(blobs: Path, doc: Mapping[str, Any]) -> tuple[str, int]:
    data = canonical_json(doc)
    hex_digest = hashlib.sha256(data).hexdigest()
    target = blobs / hex_digest
    if not target.exists():
        _write_atomically(target, data)
    return f"sha256:{hex_digest}", len(data)


def _write_atomically(path: Path, data: bytes) -> None:
    with _temp_file(path.parent) as (tmp_path, handle):
        handle.write(data)
        _flush_and_sync(handle)
        os.replace(tmp_path, path)
    fsync_dir(path.parent)


# --- layers ---------------------------------------------------------------------


def _store_layer(blobs: Path, source: LayerSource, compress: bool) -> LayerBlob:
    if compress:
        return _store_compressed(blobs, source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.stat().st_dev == blobs.stat().st_dev:
            return _link_layer(blobs, path)
        with path.open("rb") as stream:
            return _copy_layer(blobs, stream)
    return _copy_layer(blobs, source)


def _link_layer(blobs: Path, path: Path) -> LayerBlob:
    """Hash the tar, then hard-link it in: no second copy of a large file."""
    digest = file_digest(path)
    target = blobs / digest.removeprefix("sha256:")
    if not target.exists():
        try:
            os.link(path, target)
        except OSError as exc:
            # Filesystems without hard links (some FUSE, vfat): fall back to a copy.
            if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EXDEV, errno.ENOTSUP):
                raise
            with path.open("rb") as stream:
                return _copy_layer(blobs, stream)
    # The tar was written by someone else who may not have synced it.
    fsync_path(target)
    fsync_dir(blobs)
    return LayerBlob(digest, digest, target.stat().st_size, MEDIA_TYPE_LAYER_TAR)


def _copy_layer(blobs: Path, stream: IO[bytes]) -> LayerBlob:
    """Copy and hash in a single pass, then rename the copy to its digest."""
    hasher = hashlib.sha256()
    size = 0
    with _temp_file(blobs) as (tmp_path, handle):
        while chunk := stream.read(CHUNK_SIZE):
            hasher.update(chunk)
            handle.write(chunk)
            size += len(chunk)
        _flush_and_sync(handle)
        digest = "sha256:" + hasher.hexdigest()
        os.replace(tmp_path, blobs / hasher.hexdigest())
    fsync_dir(blobs)
    return LayerBlob(digest, digest, size, MEDIA_TYPE_LAYER_TAR)


def _store_compressed(blobs: Path, source: LayerSource) -> LayerBlob:
    """Gzip the tar; the diff_id hashes the tar, the digest hashes the gzip stream."""
    if isinstance(source, str | os.PathLike):
        with Path(source).open("rb") as stream:
            return _store_compressed(blobs, stream)
    tar_hasher = hashlib.sha256()
    with _temp_file(blobs) as (tmp_path, handle):
        hashing = _HashingWriter(handle)
        # mtime=0 and no file name in the header: same tar, same blob digest.
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, mtime=0) as gz:
            while chunk := source.read(CHUNK_SIZE):
                tar_hasher.update(chunk)
                gz.write(chunk)
        _flush_and_sync(handle)
        hex_digest = hashing.hasher.hexdigest()
        os.replace(tmp_path, blobs / hex_digest)
    fsync_dir(blobs)
    return LayerBlob(
        digest=f"sha256:{hex_digest}",
        diff_id=f"sha256:{tar_hasher.hexdigest()}",
        size=hashing.size,
        media_type=MEDIA_TYPE_LAYER_TAR_GZIP,
    )


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


# --- files, durability and errors ---------------------------------------------------


@contextmanager
def _temp_file(directory: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A temporary file in ``directory``; removed on exit unless renamed away.

    An OSError raised inside gets the temporary file's path as its ``filename``
    if it has none (a failed ``write`` does not say which file), so the error
    the caller sees names the path that could not be written.
    """
    fd, name = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    path = Path(name)
    # mkstemp makes the file 0600; blobs are content, readable like any file we write.
    os.fchmod(fd, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield path, handle
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    finally:
        path.unlink(missing_ok=True)


def _flush_and_sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _describe_os_error(exc: OSError) -> str:
    where = exc.filename or "(unknown path)"
    if exc.errno == errno.ENOSPC:
        return f"no space left on device while writing {where}"
    return f"cannot write {where}: {exc.strerror or exc}"
