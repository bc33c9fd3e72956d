"""The one exception hierarchy of vmruntime.

Every error the runtime raises on purpose derives from :class:`VmruntimeError`
and carries the offending value (a digest, a path, an image reference) as an
attribute, so callers can react without parsing messages.
"""

from __future__ import annotations

from pathlib import Path


class VmruntimeError(Exception):
    """Root of every error vmruntime raises on purpose."""


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
