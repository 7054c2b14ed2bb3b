"""JSON that every reader accepts (non-finite floats become ``null``), and JSON read strictly
(no key twice in one object).

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON (``jq``, browsers and most
languages refuse them). probekit's metrics can be undefined (AUROC of a split with one class), so
every JSON file and line probekit writes for people and tools goes through `dumps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by ``None``; numpy scalars
    become Python numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return finite(item())
    return value


class RepeatedKeyError(ValueError):
    """A JSON object that names one key twice (``json`` would keep the last value silently)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key[:80]!r} appears twice in one object")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for `json.loads`: an object (at any depth) may not repeat a key.

    Raises:
        RepeatedKeyError: naming the key.
    """
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise RepeatedKeyError(key)
        found[key] = value
    return found


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of `finite` ``value``; never writes ``NaN`` or ``Infinity``."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
