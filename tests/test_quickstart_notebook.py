"""The quick-start notebook and ``python -m kernelprovider execute``.

The slow test runs ``notebooks/quickstart.ipynb`` as ``scripts/run.sh`` does: a
kernelspec for the default image installed into a temporary prefix, the notebook
executed with nbclient on it, every kernel in a real microVM.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import VmSession, setup_kernel
from helpers import outputs_of
from vm_support import broker_processes, qemu_processes

from kernelprovider.execute import NotebookExecutionError, execute_notebook
from kernelprovider.install import InstallScope, KernelOptions, install

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_committed_notebook_has_no_outputs_and_names_the_sandboxed_kernel() -> None:
    document = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(document)
    assert document.metadata.kernelspec.name == "vmruntime-default"
    assert "sandboxed" in document.metadata.kernelspec.display_name
    code = [cell for cell in document.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_execute_names_a_missing_kernel_and_leaves_the_input_alone(tmp_path: Path) -> None:
    before = NOTEBOOK.read_bytes()
    output = tmp_path / "out.ipynb"
    with pytest.raises(NotebookExecutionError, match="no kernelspec named 'nowhere'"):
        execute_notebook(NOTEBOOK, output, kernel_name="nowhere")
    assert NOTEBOOK.read_bytes() == before
    assert output.exists()  # the copy is written even when the run stops

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "kernelprovider", "execute", str(NOTEBOOK), "--kernel", "nowhere",
         "-o", str(output)], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no kernelspec named 'nowhere'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_quickstart_notebook_runs_in_a_microvm(
    vm_session: VmSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmruntime.images.default_image import ensure_default_image

    monkeypatch.setenv("VMRUNTIME_CACHE", str(vm_session.real_cache))  # the default image
    ensure_default_image()
    prefix = tmp_path / "prefix"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    docs = ROOT / "docs"
    docs_before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                   for path in docs.iterdir()}  # fmt: skip
    notebook_before = NOTEBOOK.read_bytes()
    options = KernelOptions(mounts=[f"{docs}:/shared/docs:ro"], env={"HOST_PROJECT_DIR": str(ROOT)})
    install("quickstart-test", options, InstallScope(prefix=prefix))

    output = execute_notebook(NOTEBOOK, tmp_path / "executed.ipynb", "quickstart-test")

    text, rich = outputs_of(nbformat.read(output, as_version=4))
    release = re.search(r"^kernel release: (\S+)$", text, re.MULTILINE)
    assert release and release.group(1) == setup_kernel().release, text
    assert re.search(r"^hostname: +vmr-[0-9a-f]+$", text, re.MULTILINE), text
    memory = re.search(r"^memory: +(\d+) MiB$", text, re.MULTILINE)
    assert memory and 900 < int(memory.group(1)) <= 1024, text  # the spec's, less the kernel's
    assert f"the host's project dir {ROOT} exists here: False" in text
    assert "first line of jupyter.md: # Jupyter" in text
    assert text.count("refused, EROFS") == 2, text
    assert "remounted read-write by the guest's root: True" in text
    assert "network interfaces: ['lo']" in text
    assert "network: none, connect failed with ENETUNREACH" in text
    assert "DNS: none" in text
    table = next(o for o in rich if "text/html" in o.get("data", {}))
    assert all(city in table["data"]["text/html"] for city in ("Oslo", "Lima", "Pune"))
    plot = next(o for o in rich if "image/png" in o.get("data", {}))
    assert base64.b64decode(plot["data"]["image/png"]).startswith(PNG_MAGIC)

    docs_after = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                  for path in docs.iterdir()}  # fmt: skip
    assert docs_after == docs_before  # nothing written through the read-only share
    assert not qemu_processes(str(vm_session.runtime)), "the kernel's VM outlived the notebook"
    assert not broker_processes(str(vm_session.runtime))
    assert NOTEBOOK.read_bytes() == notebook_before
