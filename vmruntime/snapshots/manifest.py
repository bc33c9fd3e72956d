"""The snapshot manifest (schemas 1 and 2): what a snapshot is, in a form that outlives processes.

Who uses it: the local store, export/import and the shared store (each checks it with
:meth:`SnapshotManifest.from_json`), restore (which takes the image from it). What it
promises: one canonical JSON encoding (sorted keys, no spaces, UTF-8), so
:meth:`SnapshotManifest.digest` names a manifest wherever it is; parsing refuses any
document that is not exactly a schema-1 manifest (a disk snapshot) or a schema-2 one (a
memory snapshot: schema 1 plus ``memory``). Spec: docs/snapshots.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from vmruntime.errors import SnapshotManifestError
from vmruntime.snapshots.names import check_name

SCHEMA_VERSION = 1  # a disk snapshot
MEMORY_SCHEMA_VERSION = 2  # a memory snapshot: schema 1 + "memory"
SCHEMAS = (SCHEMA_VERSION, MEMORY_SCHEMA_VERSION)
ACCELERATORS = ("tcg", "kvm")
CHUNK_SIZE = 4 << 20  # the unit of the seal, the export archive and the shared store
SEAL_ALGORITHM = "sha256-chunks-v1"
LAYER_FORMATS = ("raw",)
MAX_LABELS = 64
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class LayerInfo:
    """The snapshot's writable layer: its file beside the manifest, format and sizes."""

    apparent_size: int
    allocated_size: int
    file: str = "layer.img"
    format: str = "raw"


@dataclass(frozen=True)
class SavedFile:
    """A file of a memory snapshot beside the manifest: its name, apparent size and content
    digest (:func:`vmruntime.snapshots.seal.content_digest`, checked on every restore for the
    device state and by ``verify``, import and pull for both)."""

    file: str
    size: int
    digest: str


@dataclass(frozen=True)
class MemoryInfo:
    """A memory snapshot's saved machine: its RAM and device state, and the machine shape
    a resumed copy must have (the device state only loads into the same devices)."""

    ram: SavedFile
    state: SavedFile
    cpus: int
    memory_mib: int
    accelerator: str
    # The guest paths of its shares (console transport), in order, with ":ro" for a
    # read-only one: a resumed copy needs shares at the same places (host folders may
    # differ). Optional in the document (absent: none).
    mounts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        document = {"ram": _saved_dict(self.ram), "state": _saved_dict(self.state),
                    "cpus": self.cpus, "memory_mib": self.memory_mib,
                    "accelerator": self.accelerator}  # fmt: skip
        if self.mounts:
            document["mounts"] = list(self.mounts)
        return document

    @classmethod
    def from_dict(cls, document: object) -> MemoryInfo:
        keys = {"ram", "state", "cpus", "memory_mib", "accelerator"}
        has_mounts = isinstance(document, dict) and "mounts" in document
        top = _fields(document, "memory", keys | ({"mounts"} if has_mounts else set()))
        saved = {"file", "size", "digest"}
        ram, state = (_fields(top[key], key, saved) for key in ("ram", "state"))
        mounts = top.get("mounts", [])
        if not isinstance(mounts, list):
            raise SnapshotManifestError("memory mounts: want a list")
        return cls(ram=SavedFile(**ram), state=SavedFile(**state), cpus=top["cpus"],
                   memory_mib=top["memory_mib"], accelerator=top["accelerator"],
                   mounts=tuple(mounts))  # fmt: skip


def _saved_dict(saved: SavedFile) -> dict[str, Any]:
    return {"file": saved.file, "size": saved.size, "digest": saved.digest}


@dataclass(frozen=True)
class DataFile:
    """One data file of a snapshot (:attr:`SnapshotManifest.data_files`): its role
    ("layer", "ram", "state"), name beside the manifest, apparent size, and the
    :func:`vmruntime.snapshots.seal.content_digest` it must have (None: not recorded)."""

    role: str
    file: str
    size: int
    digest: str | None


@dataclass(frozen=True)
class Seal:
    """A digest over the layer's content (:func:`vmruntime.snapshots.seal.content_digest`)."""

    digest: str
    algorithm: str = SEAL_ALGORITHM


@dataclass(frozen=True)
class SnapshotManifest:
    """One snapshot: the base image it pins, its layer, when, from what, and labels."""

    name: str
    image: str
    image_manifest_digest: str
    image_layer_digests: tuple[str, ...]
    layer: LayerInfo
    created_at: str = field(default_factory=lambda: now())
    parent: str | None = None  # the parent snapshot's manifest digest
    labels: Mapping[str, str] = field(default_factory=dict)
    seal: Seal | None = None
    memory: MemoryInfo | None = None
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "image_layer_digests", tuple(self.image_layer_digests))
        _check(self)

    @property
    def files(self) -> tuple[str, ...]:
        """Every data file beside the manifest: the layer, then a memory snapshot's RAM and
        device state."""
        if self.memory is None:
            return (self.layer.file,)
        return (self.layer.file, self.memory.ram.file, self.memory.state.file)

    @property
    def data_files(self) -> tuple[DataFile, ...]:
        """:attr:`files` with what export and the shared store need to carry and check
        each one: its apparent size and the content digest it must have (the layer's is
        its seal, None when unsealed)."""
        layer = DataFile("layer", self.layer.file, self.layer.apparent_size,
                         self.seal.digest if self.seal is not None else None)  # fmt: skip
        if self.memory is None:
            return (layer,)
        ram, state = self.memory.ram, self.memory.state
        return (layer, DataFile("ram", ram.file, ram.size, ram.digest),
                DataFile("state", state.file, state.size, state.digest))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        document = self._disk_dict()
        if self.memory is not None:
            document["memory"] = self.memory.to_dict()
        return document

    def _disk_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "image": self.image,
            "image_manifest_digest": self.image_manifest_digest,
            "image_layer_digests": list(self.image_layer_digests),
            "layer": {"file": self.layer.file, "format": self.layer.format,
                      "apparent_size": self.layer.apparent_size,
                      "allocated_size": self.layer.allocated_size},
            "created_at": self.created_at,
            "parent": self.parent,
            "labels": dict(self.labels),
            "seal": None if self.seal is None else {"algorithm": self.seal.algorithm,
                                                     "digest": self.seal.digest},
        }

    def to_json(self) -> bytes:
        """The canonical encoding: the bytes :meth:`digest` is taken over."""
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> SnapshotManifest:
        """Parse and check a manifest; anything else is a :class:`SnapshotManifestError`."""
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotManifestError(f"not JSON: {exc}") from None
        return cls.from_dict(document)

    @classmethod
    def from_dict(cls, document: object) -> SnapshotManifest:
        schema = document.get("schema") if isinstance(document, dict) else None
        if schema not in SCHEMAS or isinstance(schema, bool):
            raise SnapshotManifestError(f"schema {schema!r} is not one of {SCHEMAS}")
        keys = {"schema", "name", "image", "image_manifest_digest", "image_layer_digests",
                "layer", "created_at", "parent", "labels", "seal"}  # fmt: skip
        top = _fields(document, "manifest", keys | ({"memory"} if schema == 2 else set()))
        layer = _fields(top["layer"], "layer", {"file", "format", "apparent_size",
                                                "allocated_size"})  # fmt: skip
        seal = None
        if top["seal"] is not None:
            raw = _fields(top["seal"], "seal", {"algorithm", "digest"})
            seal = Seal(digest=raw["digest"], algorithm=raw["algorithm"])
        if not isinstance(top["image_layer_digests"], list):
            raise SnapshotManifestError("image_layer_digests: want a list")
        if not isinstance(top["labels"], dict):
            raise SnapshotManifestError("labels: want an object")
        try:
            return cls(
                name=top["name"], image=top["image"],
                image_manifest_digest=top["image_manifest_digest"],
                image_layer_digests=tuple(top["image_layer_digests"]),
                layer=LayerInfo(apparent_size=layer["apparent_size"],
                                allocated_size=layer["allocated_size"], file=layer["file"],
                                format=layer["format"]),
                created_at=top["created_at"], parent=top["parent"], labels=top["labels"],
                seal=seal, schema=top["schema"],
                memory=MemoryInfo.from_dict(top["memory"]) if "memory" in top else None,
            )  # fmt: skip
        except TypeError as exc:
            raise SnapshotManifestError(str(exc)) from None


def canonical_json(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode()  # fmt: skip


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fields(document: object, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise SnapshotManifestError(f"{what}: want an object")
    missing, extra = keys - document.keys(), document.keys() - keys
    if missing:
        raise SnapshotManifestError(f"{what}: missing {sorted(missing)}")
    if extra:
        raise SnapshotManifestError(f"{what}: unknown {sorted(extra)}")
    return document


def _check(manifest: SnapshotManifest) -> None:
    try:
        check_name(manifest.name)
    except ValueError as exc:
        raise SnapshotManifestError(str(exc)) from None
    _want_str("image", manifest.image, 1, 512)
    _want_digest("image_manifest_digest", manifest.image_manifest_digest)
    for digest in manifest.image_layer_digests:
        _want_digest("image_layer_digests", digest)
    _check_layer(manifest.layer)
    if not isinstance(manifest.created_at, str) or not _TIMESTAMP.fullmatch(manifest.created_at):
        raise SnapshotManifestError(
            f"created_at {manifest.created_at!r}: want YYYY-MM-DDTHH:MM:SSZ")
    if manifest.parent is not None:
        _want_digest("parent", manifest.parent)
    _check_labels(manifest.labels)
    if manifest.seal is not None:
        if manifest.seal.algorithm != SEAL_ALGORITHM:
            raise SnapshotManifestError(f"seal algorithm {manifest.seal.algorithm!r} is unknown")
        _want_digest("seal digest", manifest.seal.digest)
    want = SCHEMA_VERSION if manifest.memory is None else MEMORY_SCHEMA_VERSION
    if manifest.schema != want or isinstance(manifest.schema, bool):
        kind = "disk" if manifest.memory is None else "memory"
        reason = f"schema {manifest.schema!r}: want {want} for a {kind} snapshot"
        raise SnapshotManifestError(reason)
    if manifest.memory is not None:
        _check_memory(manifest.memory, manifest.layer.file)


def _check_memory(memory: MemoryInfo, layer_file: str) -> None:
    names = {layer_file, "manifest.json"}
    for what, saved in (("ram", memory.ram), ("state", memory.state)):
        if not isinstance(saved.file, str) or not _FILE.fullmatch(saved.file) or (
                saved.file in names):  # fmt: skip
            raise SnapshotManifestError(f"memory {what} file {saved.file!r}: want a plain file "
                                        "name of its own")  # fmt: skip
        names.add(saved.file)
        _want_size(f"memory {what} size", saved.size)
        _want_digest(f"memory {what} digest", saved.digest)
    _want_int("memory cpus", memory.cpus, 1, 256)
    _want_int("memory memory_mib", memory.memory_mib, 16, 1 << 20)
    if memory.ram.size != memory.memory_mib << 20:
        raise SnapshotManifestError(f"memory ram size {memory.ram.size} is not memory_mib "
                                    f"{memory.memory_mib} MiB")  # fmt: skip
    for mount in memory.mounts:
        if not isinstance(mount, str) or not mount.startswith("/") or len(mount) > 4096 or (
                "\0" in mount):  # fmt: skip
            raise SnapshotManifestError(f"memory mount {mount!r}: want an absolute guest path")
    if memory.accelerator not in ACCELERATORS:
        raise SnapshotManifestError(f"memory accelerator {memory.accelerator!r}: want one of "
                                    f"{ACCELERATORS}")  # fmt: skip


def _want_size(what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 50:
        raise SnapshotManifestError(f"{what} {value!r}: want a size in bytes")


def _want_int(what: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SnapshotManifestError(f"{what} {value!r}: want an integer in {low}-{high}")


def _check_layer(layer: LayerInfo) -> None:
    if not isinstance(layer.file, str) or not _FILE.fullmatch(layer.file) or layer.file in (
            "manifest.json",):  # fmt: skip
        raise SnapshotManifestError(f"layer file {layer.file!r}: want a plain file name")
    if layer.format not in LAYER_FORMATS:
        raise SnapshotManifestError(f"layer format {layer.format!r}: want one of {LAYER_FORMATS}")
    for what in ("apparent_size", "allocated_size"):
        _want_size(f"layer {what}", getattr(layer, what))


def _check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise SnapshotManifestError(f"{len(labels)} labels: at most {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise SnapshotManifestError(f"label key {key!r}: want [A-Za-z0-9._/-], 1-128")
        _want_str(f"label {key}", value, 0, 1024)


def _want_str(what: str, value: object, shortest: int, longest: int) -> None:
    if not isinstance(value, str) or not shortest <= len(value) <= longest or "\0" in value:
        raise SnapshotManifestError(f"{what} {value!r}: want a string of {shortest}-{longest}")


def _want_digest(what: str, value: object) -> None:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise SnapshotManifestError(f"{what} {value!r}: want sha256:<64 hex digits>")
