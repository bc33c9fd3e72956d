"""A module of the caller's own (not installed anywhere), for the Ray tests: the guest
cannot import it, so its functions must travel by value."""

from __future__ import annotations

OFFSET = 1000


def add_offset(value: int) -> int:
    return value + OFFSET
