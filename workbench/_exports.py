"""Lazy package exports: a package names its public surface without importing it.

A package's ``__init__`` maps each public name to the module that defines it;
the module is imported on first use. Importing ``workbench.streams`` to start
a worker then costs nothing beyond what the worker uses.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that finds ``name`` in ``package.where[name]``."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{module}"), name)

    return __getattr__
