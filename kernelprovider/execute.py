"""Run a notebook top to bottom on a (sandboxed) kernel and keep the executed copy.

Who calls it: ``python -m kernelprovider execute`` (``scripts/run.sh`` runs the
quick-start notebook with it) and tests. What it promises: the notebook is run with
nbclient, as ``jupyter nbconvert --execute`` would, on the kernelspec named (else the
one the notebook's metadata names); the executed copy is written to ``output`` even
when a cell fails, so its traceback can be read there; the input file is never
changed; no warm kernel is left running after it. A failing cell is a
:class:`NotebookExecutionError`.
"""

from __future__ import annotations

from pathlib import Path

from vmruntime.errors import VmruntimeError

DEFAULT_CELL_TIMEOUT = 600.0  # seconds; Python in a TCG guest is >10x slower than on the host
DEFAULT_STARTUP_TIMEOUT = 180.0  # after the provisioner's own launch: the first kernel_info


class NotebookExecutionError(VmruntimeError):
    """A notebook whose run stopped: a cell raised, timed out, or the kernel died.
    ``output`` holds the executed copy up to that cell."""

    def __init__(self, notebook: Path, output: Path, reason: str) -> None:
        super().__init__(f"notebook {notebook}: {reason}\n(executed copy: {output})")
        self.notebook = notebook
        self.output = output
        self.reason = reason


def default_output(notebook: Path) -> Path:
    """``NAME.executed.ipynb`` beside ``NAME.ipynb``."""
    return notebook.with_name(notebook.stem + ".executed.ipynb")


def execute_notebook(notebook: Path, output: Path | None = None, kernel_name: str | None = None,
                     cell_timeout: float = DEFAULT_CELL_TIMEOUT,
                     startup_timeout: float = DEFAULT_STARTUP_TIMEOUT) -> Path:  # fmt: skip
    """Execute ``notebook`` on ``kernel_name`` and write the result to ``output``; its path."""
    # Here, not at the top: importing nbformat (jsonschema) takes over a second, and
    # `python -m kernelprovider install | list` should not pay for it.
    import nbformat
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from kernelprovider.provisioner import MicroVMProvisioner

    output = output or default_output(notebook)
    document = nbformat.read(notebook, as_version=4)
    kernel = kernel_name or document.metadata.get("kernelspec", {}).get("name")
    if not kernel:
        raise NotebookExecutionError(notebook, output, "no kernel named, and none in its metadata")
    client = NotebookClient(
        document, kernel_name=kernel, timeout=cell_timeout, startup_timeout=startup_timeout,
        # The kernel's working directory, as Jupyter Server would give it: the notebook's
        # folder (the guest only has it when the kernelspec shares it).
        resources={"metadata": {"path": str(notebook.resolve().parent)}},
    )  # fmt: skip
    failure = None
    try:
        client.execute()
    except NoSuchKernel:
        failure = f"no kernelspec named {kernel!r} (see `python -m kernelprovider list`)"
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        failure = str(exc)
    finally:
        # Warm kernels made ahead for the next start: there is none after this run.
        MicroVMProvisioner.close_pools()
    output.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(document, output)
    if failure is not None:
        raise NotebookExecutionError(notebook, output, failure)
    return output
