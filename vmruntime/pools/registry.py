"""Where live pools say what they hold, for ``vmr pool ls``.

Who calls it: :class:`vmruntime.pools.WarmPool` (writes its listing whenever its members
change) and ``vmr pool ls`` (reads them). What it promises: one JSON file per pool under
``<runtime>/pools/`` (the runtime root is ours and 0700), replaced atomically, naming
its owner by pid and start time, so a listing whose owner is gone (a crash) is shown
as such and removed, never mistaken for a live pool. Format version 1:
``{"version": 1, "name", "key", "size", "owner_pid", "owner_start", "updated",
"claims", "misses", "failures", "members": [{"id", "state", ...}]}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from vmruntime._paths import ensure_runtime_root, private_dir
from vmruntime.vm.state import process_alive, process_start_time

VERSION = 1


def pools_dir() -> Path:
    return private_dir(ensure_runtime_root() / "pools")


class PoolListing:
    """One pool's file (see the module)."""

    def __init__(self, name: str, key: dict[str, Any], size: int) -> None:
        self.name = name
        self.key = key
        self.size = size
        pid = os.getpid()
        self._owner = (pid, process_start_time(pid))
        self._file_name = f"{pid}-{name}.json"

    def write(self, members: list[dict[str, Any]], **counts: Any) -> None:
        document = {"version": VERSION, "name": self.name, "key": self.key, "size": self.size,
                    "owner_pid": self._owner[0], "owner_start": self._owner[1],
                    "updated": time.time(), "members": members, **counts}  # fmt: skip
        with contextlib.suppress(OSError):  # a listing is for people: never fail a pool on it
            directory = pools_dir()
            temp = directory / f".{self._file_name}.tmp"
            temp.write_text(json.dumps(document))
            os.replace(temp, directory / self._file_name)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            (pools_dir() / self._file_name).unlink(missing_ok=True)


def live_pools() -> list[dict[str, Any]]:
    """Every listed pool whose owner still runs; listings of gone owners are removed."""
    pools = []
    for path in sorted(pools_dir().glob("*.json")):
        try:
            document = json.loads(path.read_text())
            owner = (int(document["owner_pid"]), document["owner_start"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not process_alive(*owner):
            path.unlink(missing_ok=True)
            continue
        pools.append(document)
    return pools
