"""The Ray notebook, run as ``scripts/run.sh`` runs it: nbclient on the ordinary local
``python3`` kernel, which starts its own local Ray and hands functions to
``SandboxActor``s, each in a real microVM of the default image.

The notebook's kernel is a separate process, so its ``ray.init(num_cpus=2)`` starts a
second local Ray beside the session's (``ray_session``, running in this process): a
``ray.init()`` without an address joins only a cluster named by ``RAY_ADDRESS`` or one that
``ray start`` recorded in its temp dir, and each local Ray takes free ports of its own.
The kernel still gets a Ray temp dir of its own (``RAY_TMPDIR``): its sockets and logs
stay under the test's directory, a ``ray start`` cluster recorded in the machine's
/tmp/ray cannot capture its ``ray.init``, and what it leaves behind can be told from the
session's.
"""

from __future__ import annotations

import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
import ray
from conftest import setup_kernel
from helpers import outputs_of
from vm_support import broker_processes, processes, qemu_processes

from kernelprovider.execute import execute_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "ray_sandbox.ipynb"


def test_the_committed_notebook_has_no_outputs_runs_locally_and_stops_ray() -> None:
    document = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(document)
    assert document.metadata.kernelspec.name == "python3"  # it drives Ray from the host
    code = [cell for cell in document.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "ray.init(num_cpus=2" in code[0].source
    assert "ray.shutdown()" in code[-1].source


def line_value(text: str, label: str) -> str:
    """What follows ``label`` on its own line of the notebook's output."""
    found = re.search(rf"^{re.escape(label)} *(.+)$", text, re.MULTILINE)
    assert found, f"no line {label!r} in:\n{text}"
    return found.group(1).strip()


def leftovers(marker: str) -> list[int]:
    """Ray processes (raylet, GCS, workers) or VMs still running under ``marker``."""
    return processes(b"ray", marker) + qemu_processes(marker) + broker_processes(marker)


@pytest.fixture
def private() -> Iterator[Path]:
    """A directory for the kernel's VMs and its Ray; short, since Unix socket paths live
    under it."""
    path = Path(tempfile.mkdtemp(prefix="vmr-nb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_the_ray_notebook_runs_functions_in_microvms_and_refuses_what_is_hostile(
    ray_session: Any, private: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel inherits this environment: its sandboxes and its Ray get directories of
    # their own, so what they leave can be told from the session's.
    runtime, ray_tmp = private / "run", private / "ray"
    runtime.mkdir(mode=0o700)
    ray_tmp.mkdir()
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("VMRUNTIME_STATE", str(state))
    # the default image's cache, whatever another session fixture made of this variable
    monkeypatch.setenv("VMRUNTIME_CACHE", str(ray_session.cache))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    notebook_before = NOTEBOOK.read_bytes()

    output = execute_notebook(NOTEBOOK, tmp_path / "executed.ipynb", "python3")

    text, rich = outputs_of(nbformat.read(output, as_version=4))
    host_release = line_value(text, "host kernel release:")
    guest_release = line_value(text, "guest kernel release:")
    assert host_release == platform.release()
    assert guest_release == setup_kernel().release != host_release
    assert line_value(text, "guest CPUs:") == "1"
    memory = int(line_value(text, "guest memory:").removesuffix(" MiB"))
    assert 400 < memory <= 512, text  # the default 512 MiB, less the guest kernel's share
    assert re.search(r"^guest Python: 3\.11\.\d+$", text, re.MULTILINE), text

    table = next(o for o in rich if "text/html" in o.get("data", {}))
    assert all(city in table["data"]["text/html"] for city in ("Oslo", "Lima", "Pune"))
    assert "raised in the guest: ZeroDivisionError('division by zero')" in text
    assert "killed: the call timed out after 3 s and was killed" in text
    assert "the next call: 2.0" in text

    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49]" in text
    shares = dict(re.findall(r"^computed on (vmr-[0-9a-f]+): (\d+)$", text, re.MULTILINE))
    assert len(shares) == 2 and sum(map(int, shares.values())) == 8, text
    for start in ("a new sandbox:", "from the snapshot:"):
        assert float(line_value(text, f"start to first answer, {start}").removesuffix(" s")) > 0
    assert "the restored sandbox has the file: sqrt(144) = 12.0" in text

    assert "the guest gets FileNotFoundError: No such file or directory" in text
    assert "the guest read it" not in text
    assert len(re.findall(r"^connect to .+: OSError ENETUNREACH", text, re.MULTILINE)) == 2
    assert "(unexpected)" not in text
    assert re.search(r"^refused: the sandbox returned a \S+\.Trap, which is not plain data$",
                     text, re.MULTILINE), text  # fmt: skip
    # The marker's folder was removed empty (rmdir), so `touch` never ran on the host.
    assert "marker file on the host exists: False" in text

    assert "sandboxes: ['TERMINATED', 'TERMINATED', 'TERMINATED', 'TERMINATED']" in text
    assert "Ray running: False | snapshot kept: False" in text
    assert list((ray_tmp / "ray").glob("session_2*")), "the notebook's Ray used another temp dir"
    deadline = time.monotonic() + 60
    while leftovers(str(private)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not leftovers(str(private)), "the notebook's Ray or VMs outlived it"
    assert not list((state / "sandboxes").iterdir())  # terminated sandboxes leave no files
    # Only the node's warm-start template stays (a cache, reused by later actors).
    kept = {p.name for p in (state / "snapshots").iterdir()} - {".locks"}
    assert all(name.startswith("ray-warm-") for name in kept), kept
    assert NOTEBOOK.read_bytes() == notebook_before

    # The session's own Ray, running all along in this process, is untouched.
    assert ray.get(ray.remote(platform.node).remote(), timeout=120) == platform.node()
