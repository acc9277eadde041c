"""Light package imports: public names imported from their modules on first use.

``medcl --help`` imports every job's CLI module; a package ``__init__`` that imported torch, MONAI or h5py
eagerly would make it slow. A package lists its public names and their modules once::

    __getattr__, __dir__ = lazy_exports(__name__, {"Bag": "medcl.mil.bags", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to the module defining it."""
    table = dict(names)

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
