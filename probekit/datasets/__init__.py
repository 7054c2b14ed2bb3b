"""Datasets shipped inside the package, so the default training run needs nothing external.

``DEMO_SAFETY`` is a small, balanced prompt-safety demo set (about 1,200 English rows, one JSON
object per line: ``text``, ``label`` with 1 = unsafe request and 0 = benign, and a ``topic`` tag).
It was written for probekit by the project and is released under CC0-1.0; see ``README.md`` in this
folder. It is for smoke runs and the demo, not a benchmark.
"""

from importlib.resources import files
from pathlib import Path

__all__ = ["DEMO_SAFETY"]

DEMO_SAFETY: Path = Path(str(files(__package__) / "demo_safety.jsonl"))
"""Path to ``demo_safety.jsonl``: the prompt-safety demo set (JSON Lines, UTF-8)."""
