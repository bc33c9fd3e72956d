"""Registry credentials from a docker-style ``auths`` file.

Looked up, first found wins: ``$VMRUNTIME_AUTH_FILE``, ``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.docker/config.json``. Each has
``{"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}`` or
``{"username": ..., "password": ...}`` entries.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vmruntime.errors import AuthenticationError
from vmruntime.images.reference import DOCKER_HUB

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def auth_file_candidates() -> list[Path]:
    paths = [os.environ.get("VMRUNTIME_AUTH_FILE"), os.environ.get("REGISTRY_AUTH_FILE")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        paths.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    paths.append(str(Path.home() / ".docker" / "config.json"))
    return [Path(p) for p in paths if p]


def find_credentials(registry: str, files: list[Path] | None = None) -> Credentials | None:
    """Credentials for ``registry`` (as in a normalised reference), or None."""
    keys = _DOCKER_HUB_KEYS if registry == DOCKER_HUB else (registry, f"https://{registry}")
    for path in files if files is not None else auth_file_candidates():
        auths = _read_auths(path)
        for key in keys:
            if key in auths:
                return _decode_entry(path, key, auths[key])
    return None


def _read_auths(path: Path) -> dict[str, dict]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AuthenticationError(str(path), f"unreadable credentials file ({exc})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    return auths if isinstance(auths, dict) else {}


def _decode_entry(path: Path, key: str, entry: object) -> Credentials:
    if not isinstance(entry, dict):
        raise AuthenticationError(str(path), f"malformed entry for {key}")
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raise AuthenticationError(str(path), f"entry for {key}: auth is not base64") from None
        if not sep:
            raise AuthenticationError(str(path), f"entry for {key}: auth is not user:password")
        return Credentials(user, password)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    raise AuthenticationError(str(path), f"entry for {key} has no credentials")
