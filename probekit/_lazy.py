"""Names a module serves on first use (PEP 562), so that importing it does not import what they
need: the pooler specs and ``import probekit`` stay free of torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(module: str, sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` that imports ``name`` from ``sources[name]`` when
    it is first asked for; any other name is an `AttributeError`, as usual."""

    def getattr_(name: str) -> Any:
        if name in sources:
            return getattr(importlib.import_module(sources[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return getattr_
