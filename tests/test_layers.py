"""Packages import one way: the layers contract in pyproject.toml holds and covers them all."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def contract_layers() -> list[set[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    assert contract["type"] == "layers"
    return [{name.strip() for name in layer.split("|")} for layer in contract["layers"]]


def lint_imports() -> str:
    tool = Path(sys.executable).with_name("lint-imports")
    if not tool.exists():
        found = shutil.which("lint-imports")
        if found is None:
            pytest.skip("import-linter is not installed (scripts/setup.sh installs it)")
        tool = Path(found)
    return str(tool)


def test_the_layers_contract_is_kept() -> None:
    result = subprocess.run([lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_every_package_and_module_of_vmruntime_has_a_layer() -> None:
    placed = set().union(*contract_layers())
    tops = {
        f"vmruntime.{path.stem if path.suffix else path.name}"
        for path in (ROOT / "vmruntime").iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py")
        or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert tops - placed == set(), "add these to [tool.importlinter] layers in pyproject.toml"
    assert {"kernelprovider", "ray_backend"} <= placed


def test_a_lower_layer_importing_a_higher_one_is_caught(tmp_path: Path) -> None:
    """The check can fail: a copy of the tree where images imports vm breaks the contract."""
    copy = tmp_path / "tree"
    skip = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", "tests", "bench")
    shutil.copytree(ROOT, copy, ignore=skip)
    with open(copy / "vmruntime" / "images" / "manifest.py", "a") as module:
        module.write("\nfrom vmruntime.vm import state  # noqa: E402, F401\n")
    env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([lint_imports(), "--no-cache"], cwd=copy, capture_output=True,
                            text=True, env=env)  # fmt: skip
    assert result.returncode != 0
    assert "vmruntime.images.manifest -> vmruntime.vm.state" in result.stdout
