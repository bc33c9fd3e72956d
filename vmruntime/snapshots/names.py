"""Snapshot names: they become directory names locally and keys in shared stores."""

from __future__ import annotations

import re

from vmruntime.errors import SnapshotNameError

MAX_NAME_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: object) -> str:
    """``name`` if it is a valid snapshot name, else :class:`SnapshotNameError` saying why."""
    if not isinstance(name, str):
        raise SnapshotNameError(repr(name), "want a string")
    if not name:
        raise SnapshotNameError(name, "empty")
    if len(name) > MAX_NAME_LENGTH:
        raise SnapshotNameError(name, f"longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or ".." in name:
        raise SnapshotNameError(name, "contains '/' or '..'")
    if not _NAME.fullmatch(name):
        raise SnapshotNameError(
            name, "want letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name
