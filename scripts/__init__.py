"""The repository's scripts, importable from the repository root as ``scripts.<name>`` (they are not part of the
installed package): the tests and benchmarks build their tiny models and synthetic data with them."""

from __future__ import annotations

import importlib
from types import ModuleType


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, imported once (as ``scripts.<name>``) however often it is asked for."""
    return importlib.import_module(f"{__name__}.{name}")
