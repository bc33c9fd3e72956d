"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmruntime.images.store import ImageStore


class ShortReads(io.RawIOBase):
    """A non-seekable stream whose reads return at most ``chunk`` bytes, like a pipe."""

    def __init__(self, data: bytes, chunk: int = 65536 - 123) -> None:
        self._data = memoryview(data)
        self._chunk = chunk
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._chunk, len(self._data) - self.consumed)
        buffer[:n] = self._data[self.consumed : self.consumed + n]
        self.consumed += n
        return n


def cache_contents(store: ImageStore) -> dict[str, int]:
    """Every blob, layer image and temp file with its size (locks do not count)."""
    found = {}
    for directory in (store.blobs_dir, store.root / "rootfs" / "sha256", store.tmp_dir):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            found[str(path.relative_to(store.root))] = path.stat().st_size
    refs = store.root / "refs.json"
    if refs.exists():
        found["refs.json"] = hash(refs.read_bytes())
    return found


def vmr_env(store: ImageStore) -> dict[str, str]:
    return {**os.environ, "VMRUNTIME_CACHE": str(store.root)}


def unpack_workers(under: Path) -> list[str]:
    """Command lines of running layer-unpack workers building an image under ``under``
    (their last argument; other processes on the machine may be pulling too)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        argv = [arg for arg in argv if arg]
        if b"vmruntime.rootfs.unpack_worker" in argv and argv[-1].startswith(bytes(under)):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible-looking bytes (so misplaced blocks show)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


# --- round trips -----------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "1m") at ``mount_point``: a real full disk, in milliseconds."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs that fills up")
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def sparse_file(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    """A ``size``-byte file at ``path``, a hole except for ``writes`` (offset -> bytes)."""
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, data in writes.items():
            file.seek(offset)
            file.write(data)
    return path


def outputs_of(document: Any) -> tuple[str, list[dict]]:
    """All stream text of an executed notebook (an nbformat document), and its rich
    outputs; fails on a cell that raised, with its traceback."""
    text, rich = [], []
    for cell in document.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", "".join(output.get("traceback", []))
            if output.output_type == "stream":
                text.append(output.text)
            else:
                rich.append(output)
    return "".join(text), rich


def shares_seen(written_name: str) -> dict[str, Any]:
    """Run in a guest that shares a host folder read-only at /data and one read-write at
    /out: what it reads and lists, what its writes get, and the mounts' types. Self
    contained: Ray ships it by value, a kernel runs its source."""
    import errno
    import os

    def attempt(path: str) -> str:
        try:
            with open(path, "w") as f:
                f.write("from the guest")
            return "written"
        except OSError as exc:
            return errno.errorcode[exc.errno]

    with open("/proc/mounts") as table:
        types = {line.split()[1]: line.split()[2] for line in table}
    with open("/data/in.txt") as data:
        read = data.read()
    return {"read": read, "listing": sorted(os.listdir("/data")),
            "ro_write": attempt("/data/guest.txt"), "rw_write": attempt(f"/out/{written_name}"),
            "types": [types.get("/data", ""), types.get("/out", "")]}  # fmt: skip


def write_kernelspec(root: Path, name: str, argv: list[str], config: dict[str, Any],
                     env: dict[str, str] | None = None,
                     interrupt_mode: str = "signal") -> str:  # fmt: skip
    """Kernelspec ``name`` under ``root/kernels`` (``root`` on the test's JUPYTER_PATH),
    run by ``microvm-provisioner`` with ``config``; its name."""
    folder = root / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": argv, "display_name": f"{name} (sandboxed)", "language": "python",
        "interrupt_mode": interrupt_mode, "env": env or {},
        "metadata": {"kernel_provisioner": {"provisioner_name": "microvm-provisioner",
                                            "config": config}},
    }  # fmt: skip
    (folder / "kernel.json").write_text(json.dumps(spec))
    return name
