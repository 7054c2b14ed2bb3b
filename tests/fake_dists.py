"""Make real (unpacked) distributions with entry points in a folder, for discovery tests.

``importlib.metadata`` reads ``*.dist-info`` folders on ``sys.path`` exactly as it reads
installed ones, so a folder prepended to ``sys.path`` behaves like site-packages.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path


def make_dist(
    root: Path,
    name: str,
    modules: dict[str, str],
    entry_points: dict[str, dict[str, str]],
    version: str = "0.1.0",
) -> None:
    """Write modules and a ``{name}-{version}.dist-info`` with the given entry points under ``root``."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{ep} = {target}" for ep, target in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    importlib.invalidate_caches()


def forget_modules(*names: str) -> None:
    """Drop imported plugin modules so a later test imports them afresh."""
    for name in names:
        sys.modules.pop(name, None)


TOY_POOLER = '''
from typing import Literal

import torch
from pydantic import Field

from probekit.poolers.base import Pooler, as_bool_mask
from probekit.spec import BuildContext, TokenPoolerSpec


class Scaled(Pooler):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, hidden, mask):
        keep = as_bool_mask(mask, hidden).unsqueeze(-1)
        total = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype)).sum(dim=1)
        return self.scale * total / keep.sum(dim=1).clamp(min=1)

    def output_dim(self, hidden_size):
        return hidden_size


class ScaledMeanSpec(TokenPoolerSpec):
    """A plugin pooler: a scaled masked mean."""

    kind: Literal["{kind}"] = "{kind}"
    scale: float = Field(default=2.0, gt=0)

    def build(self, ctx: BuildContext) -> Scaled:
        return Scaled(self.scale)
'''


def toy_pooler_module(kind: str) -> str:
    """Source of a plugin module defining ``ScaledMeanSpec`` with the given kind."""
    return TOY_POOLER.replace("{kind}", kind)
