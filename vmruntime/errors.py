"""The one exception hierarchy of vmruntime.

Every error the runtime raises on purpose derives from :class:`VmruntimeError`
and carries the offending value (a digest, a path, an image reference) as an
attribute, so callers can react without parsing messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class VmruntimeError(Exception):
    """Root of every error vmruntime raises on purpose.

    Errors pickle with their message and attributes (not through their constructors,
    whose arguments differ), so they survive a trip between processes: a Ray actor's
    error reaches its caller as itself.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(kind: type[VmruntimeError], args: tuple[object, ...],
                   state: dict[str, object]) -> VmruntimeError:  # fmt: skip
    error = kind.__new__(kind)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


# --- image references ------------------------------------------------------


class InvalidReferenceError(VmruntimeError, ValueError):
    """A string that is not a valid image reference."""

    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(f"invalid image reference {reference!r}: {reason}")
        self.reference = reference
        self.reason = reason


# --- images, registries and the cache -------------------------------------


class ImageError(VmruntimeError):
    """Something is wrong with an image, its manifest or its blobs."""


class ImageNotFoundError(ImageError, LookupError):
    """The reference is not in the local cache."""

    def __init__(self, reference: str) -> None:
        super().__init__(
            f"image {reference!r} is not in the local cache; "
            f"fetch it with `vmr image pull {reference}` or `vmr image load PATH --tag {reference}`"
        )
        self.reference = reference


class ImageNotPullableError(ImageError):
    """An image that exists only where it is built, such as the built-in default image."""

    def __init__(self, reference: str, command: str) -> None:
        super().__init__(
            f"image {reference!r} is built on this machine, not pulled from a registry; "
            f"run `{command}`"
        )
        self.reference = reference
        self.command = command


class DigestMismatchError(ImageError):
    """Content does not hash to the digest that names it."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


class SizeMismatchError(ImageError):
    """Content is shorter or longer than its descriptor says (a truncated transfer)."""

    def __init__(self, what: str, expected: int, actual: int) -> None:
        super().__init__(f"{what}: expected {expected} bytes, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


class ManifestError(ImageError):
    """A manifest, index or config that cannot be used."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class PlatformNotFoundError(ManifestError):
    """An image index without a manifest for the wanted platform."""

    def __init__(self, reference: str, platform: str, available: list[str]) -> None:
        super().__init__(
            reference,
            f"no manifest for platform {platform}; available: {', '.join(available) or 'none'}",
        )
        self.platform = platform
        self.available = available


class RegistryError(ImageError):
    """The registry answered with an error or could not be reached."""

    def __init__(self, url: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.status = status
        self.reason = reason


class AuthenticationError(RegistryError):
    """The registry refused our credentials (or wanted some we do not have)."""


class ArchiveError(ImageError):
    """An image layout, OCI archive or docker-save tar that cannot be read."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class LayerError(ImageError):
    """A layer tar whose content cannot become a filesystem image."""

    def __init__(self, layer: str, reason: str, member: str | None = None) -> None:
        where = f" (entry {member!r})" if member is not None else ""
        super().__init__(f"layer {layer}{where}: {reason}")
        self.layer = layer
        self.member = member
        self.reason = reason


class CacheError(VmruntimeError):
    """The on-disk cache is unusable (wrong layout version, unwritable, full)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cache {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class ImageBuildError(VmruntimeError):
    """Building an image (for example the default image) failed."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"building {what}: {reason}")
        self.what = what
        self.reason = reason


class GuestAssetError(VmruntimeError):
    """A guest asset (kernel, modules, agent, initramfs, writable layer) cannot be made."""

    def __init__(self, asset: str, reason: str) -> None:
        super().__init__(f"guest {asset}: {reason}")
        self.asset = asset
        self.reason = reason


class UnsafeDirectoryError(VmruntimeError):
    """A private directory (sockets, locks) that is not ours or not mode 0700."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class DiskImageError(VmruntimeError):
    """An ext4 disk image (writable layer, disk volume) that cannot be made."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"disk image {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class SandboxError(VmruntimeError):
    """A sandbox failed or cannot do what was asked."""

    def __init__(self, sandbox_id: str, reason: str, console_tail: str = "") -> None:
        message = f"sandbox {sandbox_id}: {reason}"
        if console_tail:
            message += "\n--- last lines of the guest console ---\n" + console_tail
        super().__init__(message)
        self.sandbox_id = sandbox_id
        self.reason = reason
        self.console_tail = console_tail


class SandboxConfigError(SandboxError, ValueError):
    """A sandbox request that cannot be honoured, found before anything is made."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__("-", f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value


class CommandFailedError(SandboxError):
    """A command run with ``check=True`` exited non-zero (like CalledProcessError)."""

    def __init__(self, sandbox_id: str, argv: list[str], returncode: int, stdout: bytes,
                 stderr: bytes) -> None:  # fmt: skip
        detail = stderr.decode(errors="replace").strip()[-2000:]
        how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited {returncode}"
        super().__init__(sandbox_id, f"{argv!r} {how}" + (f": {detail}" if detail else ""))
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class SandboxNotFoundError(SandboxError):
    """No sandbox has this id (or name)."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(sandbox_id, "no such sandbox (see `vmr sandbox ls`)")


class BootError(SandboxError):
    """The VM did not come up to a working agent."""


class AgentDiedError(SandboxError):
    """The guest agent or kernel went away (panic, out of memory, killed VM)."""


class GuestOutOfMemoryError(AgentDiedError):
    """The guest kernel ran out of memory and the VM died of it."""


class AgentProtocolError(SandboxError):
    """The guest sent something the agent protocol does not allow."""


class ExecStartError(SandboxError):
    """The agent could not start a command (no such program or working directory, not
    executable, ...); ``errno`` and ``message`` are the guest's."""

    def __init__(self, sandbox_id: str, argv: list[str], errno: int, message: str) -> None:
        super().__init__(sandbox_id, f"cannot start {argv!r}: {message}")
        self.argv = argv
        self.errno = errno
        self.message = message


class ExecTimeoutError(SandboxError):
    """An exec ran past its timeout and was killed; this is not an exit code."""

    def __init__(self, sandbox_id: str, argv: list[str], timeout: float) -> None:
        super().__init__(sandbox_id, f"{argv!r} timed out after {timeout:g} s and was killed")
        self.argv = argv
        self.timeout = timeout


class GuestFileError(SandboxError):
    """A file operation in the guest failed; ``errno`` is the guest's errno."""

    def __init__(self, sandbox_id: str, path: str, errno: int, message: str) -> None:
        super().__init__(sandbox_id, f"{path}: {message}")
        self.path = path
        self.errno = errno


class FreezeError(SandboxError):
    """Freezing or thawing the guest's writable layer failed; ``errno`` is the guest's
    (``ETIMEDOUT`` from a thaw: the freeze had already ended, so whatever was copied
    meanwhile may be inconsistent)."""

    def __init__(self, sandbox_id: str, errno: int, message: str) -> None:
        super().__init__(sandbox_id, message)
        self.errno = errno


class AdoptError(SandboxError):
    """The agent has no parked detached exec with this pid (``errno`` ``ESRCH``), or it
    is attached to this connection already (``EBUSY``)."""

    def __init__(self, sandbox_id: str, pid: int, errno: int, message: str) -> None:
        super().__init__(sandbox_id, f"cannot adopt pid {pid}: {message}")
        self.pid = pid
        self.errno = errno


class IdentityError(SandboxError):
    """The guest could not take a fresh identity (RNG seed, clock, hostname or
    machine-id); ``errno`` is the guest's."""

    def __init__(self, sandbox_id: str, errno: int, message: str) -> None:
        super().__init__(sandbox_id, message)
        self.errno = errno


class VmmError(VmruntimeError):
    """The virtual machine monitor (QEMU) could not be started or controlled."""

    def __init__(self, reason: str, argv: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.argv = argv or []


class MemorySnapshotError(VmmError):
    """A VM's memory could not be saved or resumed (the message says why: a device that
    cannot migrate, a driver without the feature, a VMM that refused)."""


# --- shares: the virtio-fs broker, bind mounts, volumes, disk images --------


class BrokerError(VmruntimeError):
    """The virtio-fs broker could not serve a share (bad root, socket, transport)."""

    def __init__(self, root: Path | str, reason: str) -> None:
        super().__init__(f"share {root}: {reason}")
        self.root = Path(root)
        self.reason = reason


class MountError(VmruntimeError, ValueError):
    """A mount request that cannot be honoured (bad guest path, missing host path...)."""

    def __init__(self, mount: str, reason: str) -> None:
        super().__init__(f"mount {mount}: {reason}")
        self.mount = mount
        self.reason = reason


class VolumeError(VmruntimeError):
    """A named volume that cannot be created, found, attached or removed."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"volume {name!r}: {reason}")
        self.name = name
        self.reason = reason


class VolumeNotFoundError(VolumeError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(name, "no such volume (see `vmr volume ls`)")


class DiskInUseError(VmruntimeError):
    """A disk image (a disk volume or a user's own image) already has a writer attached."""

    def __init__(self, path: Path | str, holder: str = "") -> None:
        who = f" (held by {holder})" if holder else ""
        super().__init__(
            f"disk {path} is attached writable elsewhere{who}; attach it read-only or stop that"
            " sandbox first"
        )
        self.path = Path(path)
        self.holder = holder


# --- snapshots ---------------------------------------------------------------


class SnapshotError(VmruntimeError):
    """A snapshot that cannot be made, found, read, moved or restored."""


class SnapshotNameError(SnapshotError, ValueError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"snapshot name {name!r}: {reason}")
        self.name = name
        self.reason = reason


class SnapshotNotFoundError(SnapshotError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"snapshot {name!r}: no such snapshot (see `vmr snapshot ls`)")
        self.name = name


class SnapshotExistsError(SnapshotError):
    def __init__(self, name: str) -> None:
        super().__init__(f"snapshot {name!r} already exists (remove it or pick another name)")
        self.name = name


class SnapshotManifestError(SnapshotError, ValueError):
    """A snapshot manifest that is not valid (schema, fields, digests)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"snapshot manifest: {reason}")
        self.reason = reason


class SnapshotCorruptError(SnapshotError):
    """A stored snapshot whose files disagree with its manifest (sizes, seal)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"snapshot {name!r} is damaged: {reason}")
        self.name = name
        self.reason = reason


class SnapshotImportError(SnapshotError):
    """An export archive refused on import; nothing was imported."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot import {path}: {reason}; nothing was imported")
        self.path = Path(path)
        self.reason = reason


class SnapshotStoreError(SnapshotError):
    """A shared snapshot store (an fsspec URL) refused, or held bad data."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"snapshot store {url}: {reason}")
        self.url = url
        self.reason = reason


class SnapshotBaseImageError(SnapshotError, LookupError):
    """A snapshot's base image is not in the cache with the digest its manifest pins."""

    def __init__(self, name: str, image: str, digest: str, pull: str) -> None:
        super().__init__(f"snapshot {name!r}: its base image {image} ({digest}) is not in the "
                         f"cache; get exactly that image with: vmr image pull {pull}")  # fmt: skip
        self.name = name
        self.image = image
        self.digest = digest
        self.pull = pull


class SnapshotImageUnavailableError(SnapshotBaseImageError):
    """A snapshot's base image is in none of the places asked for it by digest: the cache,
    the store the snapshot came from, the registry its manifest names. ``tried`` says
    what each answered."""

    def __init__(self, name: str, image: str, digest: str, pull: str,
                 tried: Sequence[str]) -> None:  # fmt: skip
        SnapshotError.__init__(self, f"snapshot {name!r}: its base image {image} ({digest}) "
                               "is not in the cache and could not be fetched: "
                               + "; ".join(tried))  # fmt: skip
        self.name = name
        self.image = image
        self.digest = digest
        self.pull = pull
        self.tried = tuple(tried)
