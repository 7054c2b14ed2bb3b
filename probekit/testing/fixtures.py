"""Pytest fixtures for plugin authors; use them from a ``conftest.py``:

```python
from probekit.testing.fixtures import isolated_registry  # noqa: F401
```
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from probekit.registry import Registry, isolated_registries


@pytest.fixture
def isolated_registry() -> Iterator[dict[str, Registry[Any]]]:
    """Every registry as a private copy for one test; changes vanish when the test ends."""
    with isolated_registries() as registries:
        yield registries
