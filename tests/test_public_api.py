"""The public API: every name a package's ``__all__`` lists exists, is defined inside
vmruntime, and is what its name says (a class, a function or a constant).

Driven by ``__all__`` itself, so a name added to an ``__all__`` is checked too.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections import Counter
from types import ModuleType

import pytest

PUBLIC_MODULES = (
    "vmruntime",
    "vmruntime.images",
    "vmruntime.vm",
    "vmruntime.volumes",
    "vmruntime.broker",
)
_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # checked first: CapWords has lower case
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]*")
_FUNCTION_NAME = re.compile(r"[a-z][a-z0-9_]*")


def exported(module_name: str) -> list[str]:
    return list(importlib.import_module(module_name).__all__)


EXPORTS = [(module, name) for module in PUBLIC_MODULES for name in exported(module)]


def kind_of(name: str) -> str:
    """What a public name promises by its spelling."""
    if name == "__version__":
        return "version"
    if _CONSTANT_NAME.fullmatch(name):
        return "constant"
    if _CLASS_NAME.fullmatch(name):
        return "class"
    if _FUNCTION_NAME.fullmatch(name):
        return "function"
    return "unknown"


def defined_in_vmruntime(value: object) -> bool:
    module = getattr(value, "__module__", None) or ""
    return module == "vmruntime" or module.startswith("vmruntime.")


def check_export(module: ModuleType, name: str) -> None:
    where = f"{module.__name__}.{name}"
    assert hasattr(module, name), f"{module.__name__}.__all__ lists {name!r}, which it lacks"
    value = getattr(module, name)
    kind = kind_of(name)
    if kind == "version":
        assert isinstance(value, str) and value, f"{where} is {value!r}, not a version string"
    elif kind == "constant":
        assert isinstance(value, str | int | float | tuple | frozenset), (
            f"{where} is named like a constant but is {type(value).__name__}"
        )
    elif kind == "class":
        assert inspect.isclass(value), f"{where} is named like a class but is {value!r}"
        assert defined_in_vmruntime(value), f"{where} comes from {value.__module__}"
    elif kind == "function":
        assert callable(value) and not inspect.isclass(value), (
            f"{where} is named like a function but is {value!r}"
        )
        assert defined_in_vmruntime(value), f"{where} comes from {value.__module__}"
    else:
        pytest.fail(f"{where}: a public name must be a Class, a function or a CONSTANT")


@pytest.mark.parametrize(("module_name", "name"), EXPORTS, ids=[f"{m}:{n}" for m, n in EXPORTS])
def test_each_public_name_is_what_it_says(module_name: str, name: str) -> None:
    check_export(importlib.import_module(module_name), name)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_has_no_duplicates(module_name: str) -> None:
    names = exported(module_name)
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    assert not duplicates, f"{module_name}.__all__ lists these more than once: {duplicates}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_star_import_gives_exactly_all(module_name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module_name} import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == sorted(set(exported(module_name)))


def test_functions_named_like_their_modules_stay_functions() -> None:
    # Importing the submodules after the package must not rebind the package's names.
    import vmruntime
    import vmruntime.images
    import vmruntime.images.load
    import vmruntime.images.pull

    assert inspect.isfunction(vmruntime.images.pull) and inspect.isfunction(vmruntime.images.load)
    assert inspect.isfunction(vmruntime.pull) and inspect.isfunction(vmruntime.load)


def test_importing_the_runtime_does_not_load_the_http_stack() -> None:
    import subprocess
    import sys

    probe = "import sys, vmruntime.rootfs.unpack, vmruntime.vm; print('requests' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
