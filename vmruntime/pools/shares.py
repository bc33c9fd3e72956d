"""Shares of warm templates: a template shares the places its members will, from empty
stand-in folders, and each member resumes onto its own host folders.

Who calls it: the front doors' warm templates (``kernelprovider.pool``,
``ray_backend.warm``). What it promises: :func:`carried_shares` says whether a memory
snapshot can carry a sandbox's mounts (host folders only), in the form its copies take
them (the console transport); :func:`stand_ins` gives empty private folders at the
same guest places, removed afterwards, so that a template depends only on where the
shares are and holds no host file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from vmruntime.vm import Mount


def carried_shares(mounts: Sequence[Mount | str]) -> tuple[Mount, ...] | None:
    """``mounts`` over the console transport, or None if one is not a host folder (a
    volume or a disk: a memory snapshot's copies cannot be given one)."""
    parsed = [m if isinstance(m, Mount) else Mount.parse(m) for m in mounts]
    if any(m.kind != "bind" for m in parsed):
        return None
    return tuple(dataclasses.replace(m, transport="console") for m in parsed)


@contextlib.contextmanager
def stand_ins(shares: Sequence[Mount]) -> Iterator[list[Mount]]:
    """``shares`` served from empty 0700 folders instead, for as long as it is entered."""
    with tempfile.TemporaryDirectory(prefix="vmr-template-shares-") as root:
        empty = [dataclasses.replace(m, host=Path(root) / str(i)) for i, m in enumerate(shares)]
        for mount in empty:
            Path(mount.host).mkdir(mode=0o700)
        yield empty
