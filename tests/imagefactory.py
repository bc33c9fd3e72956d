"""Synthetic OCI / Docker images for tests, built in pure Python.

Who calls this: the image-pull, unpack and rootfs tests (and ``tests/registry_support.py``),
which need small images with exactly the tar entries, media types and compression they are
testing, without Docker, buildah or network access.

What it promises:

* Everything is deterministic. Tar headers carry a fixed mtime, empty user/group names and
  no ``atime``/``ctime`` pax records; gzip members carry ``mtime=0`` and no file name; JSON is
  serialised with sorted keys and no whitespace. So the same ``make_layer_tar`` entries give
  the same diff_id, the same compressed layer gives the same blob digest, and the same
  (layers, options) give the same manifest digest in every layout and every test run.
* ``rootfs.diff_ids`` in the config are the sha256 of the *uncompressed* layer tars, as the
  image spec requires, whatever compression the blobs use.
* Layouts pass ``skopeo inspect`` / ``skopeo copy`` (checked by ``tests/test_registry_support.py``).

Nothing here validates what the caller asks for: a test that wants a broken image (wrong
diff_id, odd media type, missing field) gets it through ``config_overrides`` or by writing
the blobs it wants with ``write_blob``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# A fixed, non-zero timestamp so tests can tell "mtime preserved" from "mtime unset" (0).
FIXED_MTIME = 1_600_000_000
# The config's "created" field; any fixed value keeps the config digest stable.
FIXED_CREATED = "2020-09-13T12:26:40Z"

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
DEFAULT_CMD = ("/bin/sh",)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# OCI media types (image-spec v1.0/1.1).
OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

# Docker image manifest v2 schema 2 media types.
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Compression = Literal["gzip", "none", "zstd"]
EntryKind = Literal["file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo"]

_TAR_TYPES: dict[str, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES: dict[str, int] = {
    "file": 0o644,
    "dir": 0o755,
    "symlink": 0o777,
    "hardlink": 0o644,
    "chardev": 0o666,
    "blockdev": 0o660,
    "fifo": 0o644,
}


def sha256_digest(data: bytes) -> str:
    """Return ``sha256:<hex>`` of ``data``, the digest form used everywhere in OCI."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` the one way this module always does, so digests are reproducible."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# Layer tars
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarEntry:
    """One member of a layer tar.

    ``path`` is written exactly as given (no leading ``./`` added or removed) so tests can
    produce both conventions, and hostile names such as ``../x`` or ``/etc/x``. ``target``
    is the link target for symlinks and hardlinks (for a hardlink: another path in the tar).
    ``mode`` includes the setuid/setgid/sticky bits; ``None`` means the usual default for the
    kind. ``xattrs`` become ``SCHILY.xattr.<name>`` pax records; ``bytes`` values may be
    binary (e.g. ``security.capability``). ``pax`` adds raw pax records verbatim.
    """

    path: str
    kind: EntryKind = "file"
    data: bytes = b""
    target: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int = FIXED_MTIME
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)
    pax: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _TAR_TYPES:
            raise ValueError(f"unknown tar entry kind {self.kind!r}")
        if self.data and self.kind != "file":
            raise ValueError(f"{self.path}: only regular files carry data")


def file(path: str, data: bytes | str = b"", *, mode: int = 0o644, **kw: Any) -> TarEntry:
    """A regular file; ``str`` data is UTF-8 encoded."""
    if isinstance(data, str):
        data = data.encode()
    return TarEntry(path, "file", data=data, mode=mode, **kw)


def directory(path: str, *, mode: int = 0o755, **kw: Any) -> TarEntry:
    """A directory (tarfile appends the trailing ``/``)."""
    return TarEntry(path, "dir", mode=mode, **kw)


def symlink(path: str, target: str, **kw: Any) -> TarEntry:
    """A symbolic link ``path -> target`` (target is not resolved or checked)."""
    return TarEntry(path, "symlink", target=target, **kw)


def hardlink(path: str, target: str, **kw: Any) -> TarEntry:
    """A hard link to ``target``, which must be an earlier member path of the same tar."""
    return TarEntry(path, "hardlink", target=target, **kw)


def chardev(path: str, major: int, minor: int, **kw: Any) -> TarEntry:
    """A character device node, e.g. ``chardev("dev/null", 1, 3)``."""
    return TarEntry(path, "chardev", devmajor=major, devminor=minor, **kw)


def blockdev(path: str, major: int, minor: int, **kw: Any) -> TarEntry:
    """A block device node."""
    return TarEntry(path, "blockdev", devmajor=major, devminor=minor, **kw)


def fifo(path: str, **kw: Any) -> TarEntry:
    """A named pipe."""
    return TarEntry(path, "fifo", **kw)


def whiteout(path: str, **kw: Any) -> TarEntry:
    """An AUFS-style whiteout deleting ``path`` from lower layers: ``dir/.wh.name``."""
    head, _, name = path.rstrip("/").rpartition("/")
    return TarEntry(f"{head}/.wh.{name}" if head else f".wh.{name}", "file", **kw)


def opaque_whiteout(dir_path: str, **kw: Any) -> TarEntry:
    """An opaque-directory marker hiding everything below ``dir_path`` in lower layers."""
    return TarEntry(f"{dir_path.rstrip('/')}/.wh..wh..opq", "file", **kw)


def _coerce_entry(entry: TarEntry | Mapping[str, Any]) -> TarEntry:
    # Dicts are accepted so table-driven tests can write entries as literals.
    return entry if isinstance(entry, TarEntry) else TarEntry(**entry)


def make_layer_tar(entries: Iterable[TarEntry | Mapping[str, Any]]) -> bytes:
    """Return an uncompressed PAX-format layer tar holding ``entries`` in the given order.

    Parents are not created implicitly: a test gets exactly the members it lists (which is
    how it builds layers whose files arrive before their directories, duplicates, etc.).
    Dict entries take ``TarEntry`` field names, e.g. ``{"path": "a", "data": b"x"}``.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for raw in entries:
            entry = _coerce_entry(raw)
            info = tarfile.TarInfo(entry.path)
            info.type = _TAR_TYPES[entry.kind]
            info.mode = _DEFAULT_MODES[entry.kind] if entry.mode is None else entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.uname, info.gname = entry.uname, entry.gname
            info.mtime = entry.mtime
            info.linkname = entry.target
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            info.size = len(entry.data) if entry.kind == "file" else 0
            pax: dict[str, str] = dict(entry.pax)
            for name, value in entry.xattrs.items():
                # tarfile writes str values; surrogateescape lets binary values round-trip
                # (tarfile then emits hdrcharset=BINARY and restores the original bytes).
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "surrogateescape")
                pax[f"SCHILY.xattr.{name}"] = value
            info.pax_headers = pax
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    """Compress a layer deterministically (gzip ``mtime=0``, zstd with content size)."""
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard  # imported lazily: only zstd tests need it

        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


# --------------------------------------------------------------------------------------------
# Image layouts
# --------------------------------------------------------------------------------------------


@dataclass
class ImageInfo:
    """What ``write_oci_layout`` wrote for one image; lists are in layer order.

    ``layer_digests``/``layer_sizes`` describe the blobs as stored (compressed);
    ``diff_ids``/``uncompressed_sizes`` describe the uncompressed tars.
    """

    layout_dir: Path
    tag: str | None
    platform: str
    manifest_digest: str
    manifest_size: int
    manifest_media_type: str
    manifest: bytes
    config_digest: str
    config_size: int
    config_media_type: str
    config: bytes
    layer_digests: list[str]
    layer_sizes: list[int]
    layer_media_types: list[str]
    diff_ids: list[str]
    uncompressed_sizes: list[int]

    @property
    def config_json(self) -> dict[str, Any]:
        """The parsed image config."""
        return json.loads(self.config)

    @property
    def manifest_json(self) -> dict[str, Any]:
        """The parsed manifest."""
        return json.loads(self.manifest)

    def blob_path(self, digest: str) -> Path:
        """Where ``digest`` lives in the layout."""
        return blob_path(self.layout_dir, digest)


@dataclass
class MultiPlatformInfo:
    """What ``write_oci_index_multiplatform`` wrote: the index and one image per platform."""

    layout_dir: Path
    tag: str
    index_digest: str
    index_size: int
    index_media_type: str
    index: bytes
    images: dict[str, ImageInfo]

    @property
    def index_json(self) -> dict[str, Any]:
        """The parsed image index / manifest list."""
        return json.loads(self.index)


def blob_path(layout_dir: str | os.PathLike[str], digest: str) -> Path:
    """``<layout>/blobs/<alg>/<hex>`` for ``digest``."""
    alg, _, hexpart = digest.partition(":")
    return Path(layout_dir) / "blobs" / alg / hexpart


def write_blob(layout_dir: str | os.PathLike[str], data: bytes) -> str:
    """Store ``data`` as a blob of the layout (idempotent) and return its digest."""
    digest = sha256_digest(data)
    path = blob_path(layout_dir, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return digest


def _parse_platform(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], got {platform!r}")
    result = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        result["variant"] = parts[2]
    return result


def _merge_config(base: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Top-level keys replace; the nested ``config`` dict merges one level; ``None`` deletes.

    So ``{"config": {"Cmd": ["/x"]}}`` keeps the default Env, and ``{"rootfs": None}`` makes a
    config without rootfs for negative tests.
    """
    merged = dict(base)
    for key, value in (overrides or {}).items():
        if value is None:
            merged.pop(key, None)
        elif key == "config" and isinstance(value, Mapping):
            inner = dict(merged.get("config", {}))
            for ikey, ivalue in value.items():
                if ivalue is None:
                    inner.pop(ikey, None)
                else:
                    inner[ikey] = ivalue
            merged["config"] = inner
        else:
            merged[key] = value
    return merged


def make_config(
    diff_ids: Sequence[str],
    *,
    platform: str = "linux/amd64",
    config_overrides: Mapping[str, Any] | None = None,
) -> bytes:
    """Return image config JSON bytes (shared by the OCI and docker-save writers)."""
    base: dict[str, Any] = {
        "created": FIXED_CREATED,
        **_parse_platform(platform),
        "config": {"Env": list(DEFAULT_ENV), "Cmd": list(DEFAULT_CMD)},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": FIXED_CREATED, "created_by": f"imagefactory layer {i}"}
            for i in range(len(diff_ids))
        ],
    }
    return canonical_json(_merge_config(base, config_overrides))


def _layer_media_type(compression: Compression, docker: bool) -> str:
    if docker:
        if compression == "zstd":
            raise ValueError("Docker schema 2 has no zstd layer media type")
        return DOCKER_LAYER_GZIP if compression == "gzip" else DOCKER_LAYER_TAR
    return {"gzip": OCI_LAYER_GZIP, "none": OCI_LAYER_TAR, "zstd": OCI_LAYER_ZSTD}[compression]


def _write_image_blobs(
    layout_dir: Path,
    layers: Sequence[bytes],
    *,
    compression: Compression,
    config_overrides: Mapping[str, Any] | None,
    docker_media_types: bool,
    platform: str,
    tag: str | None,
) -> ImageInfo:
    """Write config, layers and manifest blobs (not index.json) and describe them."""
    layer_type = _layer_media_type(compression, docker_media_types)
    diff_ids = [sha256_digest(layer) for layer in layers]
    blobs = [compress(layer, compression) for layer in layers]
    layer_digests = [write_blob(layout_dir, blob) for blob in blobs]
    config = make_config(diff_ids, platform=platform, config_overrides=config_overrides)
    config_digest = write_blob(layout_dir, config)
    config_type = DOCKER_CONFIG if docker_media_types else OCI_CONFIG
    manifest_type = DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": layer_type, "digest": digest, "size": len(blob)}
                for digest, blob in zip(layer_digests, blobs, strict=True)
            ],
        }
    )
    manifest_digest = write_blob(layout_dir, manifest)
    return ImageInfo(
        layout_dir=layout_dir,
        tag=tag,
        platform=platform,
        manifest_digest=manifest_digest,
        manifest_size=len(manifest),
        manifest_media_type=manifest_type,
        manifest=manifest,
        config_digest=config_digest,
        config_size=len(config),
        config_media_type=config_type,
        config=config,
        layer_digests=layer_digests,
        layer_sizes=[len(blob) for blob in blobs],
        layer_media_types=[layer_type] * len(layers),
        diff_ids=diff_ids,
        uncompressed_sizes=[len(layer) for layer in layers],
    )


def _add_to_index(layout_dir: Path, descriptor: dict[str, Any], tag: str) -> None:
    """Create or update ``oci-layout`` and ``index.json``; an existing ``tag`` is replaced.

    Updating rather than overwriting lets several images share one layout (and its blobs).
    """
    layout_dir.mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_bytes(
        canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})
    )
    index_path = layout_dir / "index.json"
    manifests: list[dict[str, Any]] = []
    if index_path.exists():
        manifests = [
            m
            for m in json.loads(index_path.read_bytes()).get("manifests", [])
            if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
        ]
    descriptor = {**descriptor, "annotations": {REF_NAME_ANNOTATION: tag}}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*manifests, descriptor]}
    index_path.write_bytes(canonical_json(index))


def write_oci_layout(
    layout_dir: str | os.PathLike[str],
    layers: Sequence[bytes],
    *,
    compression: Compression = "gzip",
    config_overrides: Mapping[str, Any] | None = None,
    tag: str = "latest",
    docker_media_types: bool = False,
    platform: str = "linux/amd64",
) -> ImageInfo:
    """Write a one-platform image into an OCI image layout and return its digests.

    ``layers`` are uncompressed tars (from ``make_layer_tar``), bottom layer first; they are
    compressed per ``compression``. ``docker_media_types=True`` writes Docker v2 schema 2
    manifest/config/layer media types (gzip or none only) inside the OCI layout, which is how
    a pushed Docker-format image is produced. ``config_overrides``: see ``_merge_config``.
    ``platform`` ("os/arch[/variant]") sets the config's os/architecture/variant.
    The layout may already hold other images: blobs are shared and ``index.json`` gains (or
    replaces) the entry annotated ``org.opencontainers.image.ref.name=<tag>``.
    """
    root = Path(layout_dir)
    info = _write_image_blobs(
        root,
        layers,
        compression=compression,
        config_overrides=config_overrides,
        docker_media_types=docker_media_types,
        platform=platform,
        tag=tag,
    )
    descriptor = {
        "mediaType": info.manifest_media_type,
        "digest": info.manifest_digest,
        "size": info.manifest_size,
    }
    _add_to_index(root, descriptor, tag)
    return info


def write_oci_index_multiplatform(
    layout_dir: str | os.PathLike[str],
    per_platform: Mapping[str, Sequence[bytes]],
    *,
    compression: Compression = "gzip",
    tag: str = "latest",
    docker_media_types: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
) -> MultiPlatformInfo:
    """Write a multi-platform image: one manifest per platform under an image index.

    ``per_platform`` maps "linux/amd64", "linux/arm64", "linux/arm/v7", ... to that
    platform's uncompressed layer tars. The index blob (an OCI image index, or a Docker
    manifest list with ``docker_media_types=True``) lists each manifest with its
    ``platform``; ``index.json`` points at the index under ``tag``, the layout form that
    ``skopeo copy --all oci:DIR:TAG`` pushes as a multi-arch image.
    """
    root = Path(layout_dir)
    images = {
        platform: _write_image_blobs(
            root,
            layers,
            compression=compression,
            config_overrides=config_overrides,
            docker_media_types=docker_media_types,
            platform=platform,
            tag=None,
        )
        for platform, layers in per_platform.items()
    }
    index_type = DOCKER_MANIFEST_LIST if docker_media_types else OCI_INDEX
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [
                {
                    "mediaType": image.manifest_media_type,
                    "digest": image.manifest_digest,
                    "size": image.manifest_size,
                    "platform": _parse_platform(platform),
                }
                for platform, image in images.items()
            ],
        }
    )
    index_digest = write_blob(root, index)
    _add_to_index(root, {"mediaType": index_type, "digest": index_digest, "size": len(index)}, tag)
    return MultiPlatformInfo(
        layout_dir=root,
        tag=tag,
        index_digest=index_digest,
        index_size=len(index),
        index_media_type=index_type,
        index=index,
        images=images,
    )


# --------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
    tar.addfile(info)


def write_oci_archive(layout_dir: str | os.PathLike[str], tar_path: str | os.PathLike[str]) -> Path:
    """Tar an OCI layout (``oci-archive:`` format): members relative to the layout root.

    Members are sorted and carry fixed metadata so the archive is reproducible.
    """
    root = Path(layout_dir)
    out = Path(tar_path)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_dir():
                _add_dir(tar, rel)
            else:
                _add_bytes(tar, rel, path.read_bytes())
    return out


@dataclass
class DockerSaveInfo:
    """What ``write_docker_save`` wrote; ``layer_paths`` are the in-tar ``<id>/layer.tar``."""

    tar_path: Path
    repo_tags: list[str]
    config_digest: str
    config: bytes
    diff_ids: list[str]
    layer_paths: list[str]


def write_docker_save(
    tar_path: str | os.PathLike[str],
    layers: Sequence[bytes],
    repo_tag: str | Sequence[str] | None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    platform: str = "linux/amd64",
) -> DockerSaveInfo:
    """Write a classic ``docker save`` tarball (pre-Docker-25 layout).

    Contents: ``manifest.json`` (``[{"Config", "RepoTags", "Layers"}]``), ``<hex>.json``
    config, ``<id>/layer.tar`` + ``<id>/VERSION`` + ``<id>/json`` per layer, and the legacy
    ``repositories`` file. ``layers`` are uncompressed tars, stored as-is. Layer ids are
    chained (sha256 of parent id + diff_id) like Docker's v1 ids, so the same tar used twice
    in one image still gets two directories. ``repo_tag=None`` writes an untagged save.
    """
    tags = [repo_tag] if isinstance(repo_tag, str) else list(repo_tag or [])
    diff_ids = [sha256_digest(layer) for layer in layers]
    config = make_config(diff_ids, platform=platform, config_overrides=config_overrides)
    config_digest = sha256_digest(config)
    config_name = config_digest.partition(":")[2] + ".json"
    out = Path(tar_path)
    layer_paths: list[str] = []
    parent = ""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            layer_id = hashlib.sha256(f"{parent}\n{diff_id}".encode()).hexdigest()
            _add_dir(tar, layer_id)
            _add_bytes(tar, f"{layer_id}/VERSION", b"1.0")
            v1: dict[str, Any] = {"id": layer_id, "created": FIXED_CREATED}
            if parent:
                v1["parent"] = parent
            _add_bytes(tar, f"{layer_id}/json", canonical_json(v1))
            _add_bytes(tar, f"{layer_id}/layer.tar", layer)
            layer_paths.append(f"{layer_id}/layer.tar")
            parent = layer_id
        _add_bytes(tar, config_name, config)
        manifest = [{"Config": config_name, "RepoTags": tags or None, "Layers": layer_paths}]
        _add_bytes(tar, "manifest.json", canonical_json(manifest))
        repositories: dict[str, dict[str, str]] = {}
        for full in tags:
            repo, _, tag = full.rpartition(":")
            repositories.setdefault(repo, {})[tag] = parent
        if repositories and parent:
            _add_bytes(tar, "repositories", canonical_json(repositories))
    return DockerSaveInfo(
        tar_path=out,
        repo_tags=tags,
        config_digest=config_digest,
        config=config,
        diff_ids=diff_ids,
        layer_paths=layer_paths,
    )
