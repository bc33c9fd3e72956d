"""Compiling the guest agent (``vmruntime/guest/agent/*.c``) into a static binary.

Who calls it: the initramfs builder (which puts the binary at ``/init``) and the tests
that run the agent on the host in ``--serve-fd`` mode.

What it promises: :func:`ensure_agent` returns the path of an executable built from
exactly the current sources and flags, cached under
``<cache>/guest/agent/<hash16>/vmr-agent``. The file appears atomically (built in a
temporary directory under the cache, renamed into place) and concurrent callers,
threads or processes, are serialized by an flock on ``<cache>/guest/agent/.lock``.
A failure raises :class:`~vmruntime.errors.GuestAssetError` with the compiler's
last lines of output.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from vmruntime import _paths
from vmruntime.errors import GuestAssetError

AGENT_SOURCE_DIR = Path(__file__).resolve().parent / "agent"
AGENT_BINARY_NAME = "vmr-agent"
COMPILER = "gcc"
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")
_STDERR_TAIL = 2000


def _sources() -> list[Path]:
    return sorted(p for p in AGENT_SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def agent_hash() -> str:
    """sha256 over the sources (names and bytes) and the flags.

    Not the compiler's version: a machine whose cache setup filled must start
    sandboxes without gcc, and any gcc that builds these sources builds the same agent.
    """
    digest = hashlib.sha256()
    for path in _sources():
        content = path.read_bytes()
        digest.update(f"{path.name}\0{len(content)}\0".encode())
        digest.update(content)
    digest.update("\0".join(CFLAGS).encode())
    return digest.hexdigest()


def _compile(workdir: Path) -> Path:
    output = workdir / AGENT_BINARY_NAME
    c_files = [str(p) for p in _sources() if p.suffix == ".c"]
    command = [COMPILER, *CFLAGS, "-o", str(output), *c_files]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        reason = f"cannot run {COMPILER}: {exc}; run scripts/setup.sh"
        raise GuestAssetError("agent", reason) from exc
    if result.returncode != 0 or not output.is_file():
        tail = (result.stderr or result.stdout)[-_STDERR_TAIL:].strip()
        raise GuestAssetError(
            "agent", f"{COMPILER} exited with {result.returncode}: {tail or 'no output'}"
        )
    output.chmod(0o755)
    return output


def agents_dir(cache_root: Path | None = None) -> Path:
    """``<cache>/guest/agent``: one directory per agent hash."""
    return _paths.cache_root(cache_root) / "guest" / "agent"


def ensure_agent(cache_root: Path | None = None) -> Path:
    """The cached agent binary for the current sources, compiling it first if needed."""
    agent_dir = agents_dir(cache_root)
    final = agent_dir / agent_hash()[:16] / AGENT_BINARY_NAME
    if final.is_file():
        return final
    try:
        agent_dir.mkdir(parents=True, exist_ok=True)
        # The cache's writing lock, shared: a prune (which removes old agents) waits.
        with _paths.cache_writing(cache_root), _paths.flock(agent_dir / ".lock"):
            if not final.is_file():  # else another caller built it while we waited
                _build_into(final)
        return final
    except OSError as exc:
        raise GuestAssetError("agent", f"cannot build into {agent_dir}: {exc}") from exc


def _build_into(final: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".build-", dir=final.parent.parent) as tmp:
        staged = Path(tmp) / final.parent.name
        staged.mkdir()
        _compile(staged)
        try:
            # The directory is renamed as a whole, so the binary is never seen half-written.
            os.rename(staged, final.parent)
        except OSError as exc:
            if not final.is_file():
                raise GuestAssetError("agent", f"cannot install into {final}: {exc}") from exc
