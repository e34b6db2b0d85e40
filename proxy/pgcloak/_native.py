"""The optional C parts (setup.py): one import rule for every module that has one."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def load(name: str) -> ModuleType | None:
    """The C module ``name``, or None where it is not built, or where
    ``PGCLOAK_PURE_PYTHON=1`` asks for the Python code alone (tests, bench)."""
    if os.environ.get("PGCLOAK_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:  # not compiled here: the Python code does the same
        return None
