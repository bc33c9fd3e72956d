"""Host memory of a sandbox's processes, from ``/proc``: PSS without the guest's RAM.

``python bench/X.py`` finds this module beside the script. All sizes are KiB, as
``/proc`` gives them.

Guest RAM is a shared memfd (``-object memory-backend-memfd``), which QEMU (and a
vhost-user broker, when there are mounts) maps; its pages are the guest's memory,
not overhead, so every mapping of it is left out. What remains is split the way
``smaps_rollup`` splits PSS: anonymous, file and shmem. PSS divides a shared page
among the processes mapping it, so the file part (QEMU and its libraries) shrinks
as more QEMUs run.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# QEMU names the memfd after the backend's type: "/memfd:memory-backend-memfd (deleted)".
GUEST_RAM_MAPPING = "/memfd:memory-backend-memfd"
QEMU_COMM = "qemu-system-x86"  # /proc/PID/comm is cut at 15 characters
_MAPPING_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def read_kib_lines(text: str) -> dict[str, int]:
    """The ``Name: N kB`` lines of a /proc file's text, as {name: N}."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name.strip()] = int(parts[0])
    return fields


def read_kib_fields(path: Path) -> dict[str, int]:
    return read_kib_lines(path.read_text())


def host_rss_kib() -> int:
    return read_kib_fields(Path("/proc/self/status"))["VmRSS"]


def guest_ram_pss(smaps: str) -> int:
    """PSS of the guest-RAM memfd mappings in a process's ``smaps`` text."""
    total = 0
    in_guest_ram = False
    for line in smaps.splitlines():
        if _MAPPING_HEADER.match(line):
            in_guest_ram = GUEST_RAM_MAPPING in line
        elif in_guest_ram and line.startswith("Pss:"):
            total += int(line.split()[1])
    return total


@dataclass(frozen=True)
class ProcessMemory:
    """One process's PSS, guest RAM left out of shmem, in KiB."""

    pid: int
    comm: str
    anon: int
    file: int
    shmem: int  # without guest RAM
    guest_ram: int  # PSS of its guest-RAM mappings (not counted in total)
    rss_file: int  # file pages mapped, whole: what the file part is when nobody shares

    @property
    def total(self) -> int:
        return self.anon + self.file + self.shmem


def read_process_memory(pid: int) -> ProcessMemory:
    proc = Path(f"/proc/{pid}")
    rollup = read_kib_fields(proc / "smaps_rollup")
    guest_ram = guest_ram_pss((proc / "smaps").read_text())
    return ProcessMemory(
        pid=pid,
        comm=(proc / "comm").read_text().strip(),
        anon=rollup["Pss_Anon"],
        file=rollup["Pss_File"],
        shmem=rollup["Pss_Shmem"] - guest_ram,
        guest_ram=guest_ram,
        rss_file=read_kib_fields(proc / "status")["RssFile"],
    )


def children(pid: int) -> set[int]:
    """Live children of ``pid``, over all its threads (a child's parent is a thread)."""
    pids: set[int] = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                pids |= {int(child) for child in (task / "children").read_text().split()}
    return pids


def with_descendants(pids: Iterable[int]) -> set[int]:
    """``pids`` and every live process below them."""
    found: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children(pid)
    return found


def qemu_pids() -> set[int]:
    """Every QEMU on this host (ours and other users'): they share QEMU's file pages."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == QEMU_COMM:
                    pids.add(int(entry.name))
    return pids
