"""Image references, parsed and normalised the way docker does.

``python:3.12`` becomes ``docker.io/library/python:3.12``; a registry is the first
path component when it contains a ``.`` or ``:`` or is ``localhost``; a reference
may pin a manifest with ``@sha256:<64 hex>``. Anything else is an
:class:`~vmruntime.errors.InvalidReferenceError` that names the input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from vmruntime.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
DEFAULT_TAG = "latest"

# The grammar of the distribution project's reference package.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOSTNAME = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*"
)
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True, order=True)
class Reference:
    """A normalised image reference: registry, repository, tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host:port that serves the distribution API for this registry."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_ref(self) -> str:
        """What to put after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def is_loopback(self) -> bool:
        """True when the registry is on this host, the only place plain HTTP is allowed."""
        return is_loopback_host(self.registry)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raise InvalidReferenceError naming it when invalid."""
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError(str(text), "empty reference")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReferenceError(text, "contains white space")
    remainder, digest = _split_digest(text)
    remainder, tag = _split_tag(text, remainder)
    registry, repository = _split_registry(text, remainder)
    _check_repository(text, repository)
    if len(f"{registry}/{repository}") > _MAX_NAME_LENGTH:
        raise InvalidReferenceError(text, f"name longer than {_MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def _split_digest(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    remainder, digest = text.split("@", 1)
    if not _DIGEST.fullmatch(digest):
        raise InvalidReferenceError(text, f"digest {digest!r} is not sha256:<64 lowercase hex>")
    return remainder, digest


def _split_tag(text: str, remainder: str) -> tuple[str, str | None]:
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon <= last_slash:  # a colon before the last slash belongs to host:port
        return remainder, None
    name, tag = remainder[:colon], remainder[colon + 1 :]
    if not _TAG.fullmatch(tag):
        raise InvalidReferenceError(text, f"invalid tag {tag!r}")
    return name, tag


def _split_registry(text: str, name: str) -> tuple[str, str]:
    if not name:
        raise InvalidReferenceError(text, "missing repository name")
    first, sep, rest = name.partition("/")
    looks_like_host = "." in first or ":" in first or first == "localhost"
    if sep and looks_like_host:
        registry = _normalise_registry(text, first)
        repository = rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return registry, repository


def _normalise_registry(text: str, host: str) -> str:
    if host.lower() in _DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    hostname, _port = _split_port(text, host)
    if hostname.startswith("["):
        try:
            ipaddress.IPv6Address(hostname[1:-1])
        except ValueError:
            raise InvalidReferenceError(text, f"invalid registry host {host!r}") from None
    elif not _HOSTNAME.fullmatch(hostname):
        raise InvalidReferenceError(text, f"invalid registry host {host!r}")
    return host


def _split_port(text: str, host: str) -> tuple[str, str | None]:
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise InvalidReferenceError(text, f"invalid registry host {host!r}")
        hostname, rest = host[: end + 1], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise InvalidReferenceError(text, f"invalid registry host {host!r}")
    else:
        hostname, _, port = host.partition(":")
        port = port if ":" in host else None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise InvalidReferenceError(text, f"invalid registry port in {host!r}")
    return hostname, port


def _check_repository(text: str, repository: str) -> None:
    if not repository:
        raise InvalidReferenceError(text, "missing repository name")
    if repository.lower() != repository:
        raise InvalidReferenceError(text, "repository name must be lowercase")
    for component in repository.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise InvalidReferenceError(text, f"invalid repository path component {component!r}")


def is_loopback_host(registry: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    hostname = registry
    if hostname.startswith("["):
        hostname = hostname[1 : hostname.find("]")]
    elif hostname.count(":") == 1:
        hostname = hostname.split(":", 1)[0]
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


# The built-in default image: built on this machine (`vmr image build-default`), never
# pulled. "localhost" without a port names no registry anyone can publish to; the
# short name users know is a local alias of it, so Docker Hub's namesake is never used.
DEFAULT_IMAGE = "localhost/vmruntime/default:latest"
_LOCAL_ALIASES = {"docker.io/vmruntime/default:latest": DEFAULT_IMAGE}
_LOCAL_ONLY = {DEFAULT_IMAGE: "vmr image build-default"}


def canonical_reference(text: str) -> str:
    """The name the cache files ``text`` under: normalised, with local aliases applied."""
    name = str(parse_reference(text))
    return _LOCAL_ALIASES.get(name, name)


def legacy_names(canonical: str) -> list[str]:
    """Names a local-only image was cached under before it had its own (loaded, never
    pulled, so still ours)."""
    return [old for old, new in _LOCAL_ALIASES.items() if new == canonical]


def local_only_hint(reference: Reference) -> str | None:
    """For an image that only exists locally, the command that makes it; else None."""
    return _LOCAL_ONLY.get(canonical_reference(str(reference)))
