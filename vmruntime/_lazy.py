"""Package attributes imported on first use.

Who calls it: ``vmruntime/__init__.py`` and ``vmruntime/rootfs/__init__.py``, whose
public names would otherwise pull whole subsystems into every helper process (an
unpack worker, the CLI's quick commands).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each public name to the
    module that defines it, imported when the name is first read, then kept."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
